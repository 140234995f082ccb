"""Tests of moecollab.data.cloze: cue words from the training split and field cloze items."""

from __future__ import annotations

import pandas as pd
import pytest

from moecollab.data.cloze import cue_words, field_word_table, make_cloze_items

FIELD_WORDS = {
    "chemistry": ["acid", "alkali", "crystal", "solvent"],
    "law": ["court", "statute", "plaintiff", "verdict"],
    "biology": ["genus", "leaves", "mammal", "species"],
    "mathematics": ["theorem", "integer", "polygon", "radius"],
    "history": ["emperor", "dynasty", "medieval", "treaty"],
}


def _corpus() -> pd.DataFrame:
    """Train entries that make every field's words its cues; held-out entries ending in one."""
    rows = []
    for field, words in FIELD_WORDS.items():
        for index in range(20):
            word = words[index % len(words)]
            rows.append({"entry_id": f"{field}-train-{index}", "headword": f"T{index}",
                         "domain": field, "split": "train",
                         "definition": f"a common thing that relates to the {word} here"})
        for split in ("validation", "test"):
            for index, word in enumerate(words):
                rows.append({"entry_id": f"{field}-{split}-{index}",
                             "headword": f"Held{index}", "domain": field, "split": split,
                             "definition": f"something odd described by its {word}."})
    return pd.DataFrame(rows)


def test_field_word_table_normalises_field_sizes():
    corpus = pd.DataFrame({
        "domain": ["big"] * 9 + ["small"],
        "split": "train",
        "definition": ["word filler"] * 9 + ["word"],
    })
    table = field_word_table(corpus, min_count=1).set_index("word")
    # "word" is in every entry of both fields: as frequent per word of each field's text as
    # "filler" is in big's, so it is not a cue of the big field for being in more entries.
    assert table.loc["word", "field"] == "small"
    assert table.loc["word", "specificity"] == pytest.approx((1 / 1) / (9 / 18 + 1 / 1))
    assert table.loc["filler", "specificity"] == pytest.approx(1.0)


def test_field_word_table_counts_only_the_given_split():
    corpus = _corpus()
    table = field_word_table(corpus, min_count=1)
    assert "odd" not in set(table["word"])  # only in held-out definitions
    with pytest.raises(ValueError, match="no entries in split"):
        field_word_table(corpus[corpus["split"] != "train"])


def test_items_are_held_out_cloze_with_one_option_per_field():
    corpus = _corpus()
    items = make_cloze_items(corpus, seed=0)
    assert len(items) == 2 * sum(len(words) for words in FIELD_WORDS.values())
    assert set(items["split"]) == {"validation", "test"}
    field_of = {word: field for field, words in FIELD_WORDS.items() for word in words}
    definitions = corpus.set_index("entry_id")["definition"]
    for item in items.itertuples():
        assert len(item.choices) == 4
        cue = item.choices[item.answer]
        assert field_of[cue] == item.domain
        assert [field_of[choice] for choice in item.choices].count(item.domain) == 1
        assert len({field_of[choice] for choice in item.choices}) == 4
        assert item.question == f"{item.term}: something odd described by its"
        assert definitions[item.entry_id].endswith(f"its {cue}.")


def test_answer_positions_are_balanced_and_items_deterministic():
    corpus = _corpus()
    items = make_cloze_items(corpus, seed=3)
    counts = items.groupby(["domain", "split"])["answer"].value_counts()
    assert counts.max() - counts.min() <= 1
    pd.testing.assert_frame_equal(items, make_cloze_items(corpus, seed=3))
    assert not items.equals(make_cloze_items(corpus, seed=4))


def test_no_item_without_a_cue_of_its_own_field():
    corpus = _corpus()
    # A held-out law entry whose only cue belongs to chemistry gives no item.
    corpus.loc[len(corpus)] = {"entry_id": "law-test-odd", "headword": "Odd",
                               "domain": "law", "split": "test",
                               "definition": "a matter concerning some acid."}
    items = make_cloze_items(corpus)
    assert "law-test-odd" not in set(items["entry_id"])


def test_tokenizer_limits_options_to_one_token():
    class Tokenizer:  # "alkali" takes two tokens, every other word one
        def __call__(self, texts, add_special_tokens=False):
            return {"input_ids": [[1, 2] if "alkali" in text else [1] for text in texts]}

    corpus = _corpus()
    cues = cue_words(field_word_table(corpus), tokenizer=Tokenizer())
    assert "alkali" not in set(cues["word"]) and "acid" in set(cues["word"])
    items = make_cloze_items(corpus, tokenizer=Tokenizer())
    assert not any("alkali" in choices for choices in items["choices"])


def test_every_cue_of_an_entry_gives_an_item_last_first():
    corpus = _corpus()
    corpus.loc[len(corpus)] = {"entry_id": "law-test-two", "headword": "Two",
                               "domain": "law", "split": "test",
                               "definition": "the court heard a plaintiff and an acid."}
    items = make_cloze_items(corpus).set_index("item_id")
    two = items[items["entry_id"] == "law-test-two"]
    # "court" (word 1) comes before min_context_words; "plaintiff" (word 4) is the only law
    # cue after it ("acid" is chemistry's).
    assert two.index.tolist() == ["cloze-law-test-two-004"]
    corpus.loc[len(corpus)] = {"entry_id": "law-test-three", "headword": "Three",
                               "domain": "law", "split": "test",
                               "definition": "one odd thing the court said on a statute."}
    items = make_cloze_items(corpus)
    three = items[items["entry_id"] == "law-test-three"]
    assert sorted(three["question"]) == ["Three: one odd thing the",
                                         "Three: one odd thing the court said on a"]
    assert len(set(three["item_id"])) == 2
    first = make_cloze_items(corpus, blanks_per_entry=1)
    only = first[first["entry_id"] == "law-test-three"]
    assert only["question"].tolist() == ["Three: one odd thing the court said on a"]
    assert (first.groupby("entry_id").size() == 1).all()


@pytest.mark.parametrize("kwargs, message", [
    ({"blanks_per_entry": -1}, "blanks_per_entry"),
    ({"splits": ("train", "test")}, "must not include 'train'"),
    ({"n_choices": 1}, "n_choices"),
    ({"n_choices": 6}, "only 5 fields have cue words"),
    ({"min_specificity": 0}, "min_specificity"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_cloze_items(_corpus(), **kwargs)


def test_the_evaluated_splits_are_the_held_out_group_of_the_sources():
    # One home: stage 01's split=held_out, the cloze items' splits and preflight's check.
    from moecollab import preflight
    from moecollab.data import cloze, sources

    assert cloze.EVALUATED_SPLITS is sources.SPLIT_GROUPS["held_out"]
    assert preflight.EVALUATED_SPLITS is cloze.EVALUATED_SPLITS
