"""Tests of moecollab.data: corpus loading and validation, MCQ items. (The corpus builder's
parsers and rebuild: tests/test_build_corpus.py.)"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from moecollab.data import (
    DATA_DIR,
    DOMAINS,
    SPLITS,
    CorpusError,
    load_corpus,
    load_general_text,
    make_mcq_items,
    normalise_headword,
    split_of_headword,
)
from moecollab.data.mcq import (
    MAX_DEFINITION_CHARS,
    is_mcq_eligible,
    normalise_definition,
    shorten_definition,
)

# --------------------------------------------------------------------------------------------
# Synthetic corpora
# --------------------------------------------------------------------------------------------


def _headword_in(split: str, stem: str) -> str:
    """A made-up headword whose hash falls in ``split``."""
    for number in range(10_000):
        headword = f"{stem}{number}"
        if split_of_headword(headword) == split:
            return headword
    raise AssertionError("no headword found")  # pragma: no cover


def _rows(domains=DOMAINS, splits=SPLITS) -> list[dict[str, str]]:
    rows = []
    for domain in domains:
        for split in splits:
            headword = _headword_in(split, f"{domain}term")
            rows.append({
                "entry_id": f"gcide-{domain}-{split}",
                "headword": headword,
                "domain": domain,
                "source": "gcide",
                "split": split,
                "text": f"{headword}: a thing studied in {domain}.",
                "definition": f"a thing studied in {domain}.",
            })
    return rows


def _write_corpus(path: Path, lines: list[str | dict]) -> Path:
    payload = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n"
                      for line in lines)
    path.write_bytes(gzip.compress(payload.encode("utf-8")))
    return path


def test_synthetic_corpus_loads(tmp_path):
    corpus = load_corpus(_write_corpus(tmp_path / "corpus.jsonl.gz", _rows()))
    assert list(corpus.columns) == [
        "entry_id", "headword", "domain", "source", "split", "text", "definition"
    ]
    assert len(corpus) == len(DOMAINS) * len(SPLITS)
    # A folder works too, and a subset keeps only the requested domains.
    subset = load_corpus(tmp_path, domains=["law", "history"])
    assert set(subset["domain"]) == {"law", "history"}


def test_malformed_line_is_named(tmp_path):
    lines: list[str | dict] = list(_rows())
    lines.insert(16, '{"entry_id": "broken",')
    path = _write_corpus(tmp_path / "corpus.jsonl.gz", lines)
    with pytest.raises(CorpusError, match=r"corpus .*corpus.jsonl.gz line 17: malformed JSON"):
        load_corpus(path)


def test_missing_field_is_named(tmp_path):
    rows = _rows()
    del rows[3]["definition"]
    path = _write_corpus(tmp_path / "corpus.jsonl.gz", rows)
    with pytest.raises(CorpusError, match=r"line 4: missing required field\(s\) definition"):
        load_corpus(path)


def test_unknown_value_is_named(tmp_path):
    rows = _rows()
    rows[0]["split"] = "dev"
    path = _write_corpus(tmp_path / "corpus.jsonl.gz", rows)
    with pytest.raises(CorpusError, match=r"split 'dev' is not one of train, validation, test"):
        load_corpus(path)


def test_missing_domain_is_named(tmp_path):
    rows = [row for row in _rows() if row["domain"] != "law"]
    path = _write_corpus(tmp_path / "corpus.jsonl.gz", rows)
    with pytest.raises(CorpusError, match=r"corpus is missing domain 'law' \(have: biology, "):
        load_corpus(path)
    # Not asking for law is fine.
    assert "law" not in set(load_corpus(path, domains=["biology"])["domain"])


def test_empty_split_is_named(tmp_path):
    rows = [row for row in _rows() if (row["domain"], row["split"]) != ("law", "test")]
    path = _write_corpus(tmp_path / "corpus.jsonl.gz", rows)
    with pytest.raises(CorpusError, match=r"corpus split 'test' of domain 'law' is empty"):
        load_corpus(path)


def test_unknown_domain_name_lists_allowed(tmp_path):
    path = _write_corpus(tmp_path / "corpus.jsonl.gz", _rows())
    with pytest.raises(CorpusError, match=r"unknown domain 'psychology'; allowed: biology, "):
        load_corpus(path, domains=["law", "psychology"])


def test_missing_file_names_the_builder(tmp_path):
    with pytest.raises(CorpusError,
                       match=r"not found; build it with `python -m moecollab\.build\.corpus`"):
        load_corpus(tmp_path / "nothing.jsonl.gz")


def test_corpus_error_is_a_value_error():
    assert issubclass(CorpusError, ValueError)


def test_split_of_headword_is_stable_and_normalised():
    assert split_of_headword("Bill of exchange") == split_of_headword(" bill_of   EXCHANGE ")
    assert normalise_headword(" Bill_of  Exchange") == "bill of exchange"
    splits = Counter(split_of_headword(f"word{number}") for number in range(20_000))
    assert abs(splits["train"] / 20_000 - 0.8) < 0.02
    assert abs(splits["validation"] / 20_000 - 0.1) < 0.01


# --------------------------------------------------------------------------------------------
# The committed corpus
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_corpus() -> pd.DataFrame:
    return load_corpus()


def test_real_corpus_has_every_domain_and_split(real_corpus):
    sizes = real_corpus.groupby(["domain", "split"]).size()
    for domain in DOMAINS:
        assert sizes[domain].sum() >= 800, domain
        for split in SPLITS:
            assert sizes.get((domain, split), 0) > 0, (domain, split)
    assert real_corpus["entry_id"].is_unique
    assert set(real_corpus["source"]) == {"gcide", "foldoc", "wordnet"}


def test_real_corpus_splits_are_disjoint_by_headword(real_corpus):
    keys = real_corpus["headword"].map(normalise_headword)
    splits_per_headword = real_corpus.groupby(keys)["split"].nunique()
    assert splits_per_headword.max() == 1
    assert (real_corpus["split"] == real_corpus["headword"].map(split_of_headword)).all()


def test_general_text_holds_train_headwords_only():
    texts = load_general_text()
    assert len(texts) > 10_000
    with gzip.open(DATA_DIR / "general.jsonl.gz", "rt", encoding="utf-8") as stream:
        headwords = {json.loads(line)["headword"] for line in stream}
    assert {split_of_headword(headword) for headword in headwords} == {"train"}


def test_data_files_fit_the_size_budget():
    total = sum((DATA_DIR / name).stat().st_size
                for name in ("corpus.jsonl.gz", "general.jsonl.gz"))
    assert total <= 8_000_000


# --------------------------------------------------------------------------------------------
# Multiple-choice items
# --------------------------------------------------------------------------------------------

_WORDS = ("amber basalt cobalt dolomite emerald feldspar garnet hematite iolite jasper kyanite "
          "lazurite magnetite nephrite olivine pyrite quartz rutile spinel topaz").split()


def _mcq_corpus(n_per_pool: int = 40) -> pd.DataFrame:
    rows = []
    for domain in ("chemistry", "law"):
        for number in range(n_per_pool):
            first, second = _WORDS[number % 20], _WORDS[(number * 7 + 3) % 20]
            rows.append({
                "entry_id": f"{domain}-{number:03d}",
                "headword": f"Term{domain}{number}",
                "domain": domain,
                "split": "train",
                "definition": f"A {domain} notion combining {first} with {second} number "
                              f"{number}.",
            })
    # Two headwords sharing one definition (synonyms) and one headword with two senses.
    rows.append({**rows[0], "entry_id": "chemistry-dup", "headword": "Synonym"})
    rows.append({**rows[1], "entry_id": "chemistry-sense2",
                 "definition": "A second sense of the first chemistry term, quite different."})
    return pd.DataFrame(rows)


def test_mcq_items_are_well_formed():
    corpus = _mcq_corpus()
    items = make_mcq_items(corpus, n_choices=4, seed=0)
    assert list(items.columns) == [
        "item_id", "domain", "split", "term", "question", "choices", "answer", "entry_id"
    ]
    assert items["item_id"].is_unique
    by_id = corpus.set_index("entry_id")
    owners = corpus.groupby(corpus["definition"].map(normalise_definition))
    for item in items.itertuples():
        assert len(item.choices) == 4
        normalised = [normalise_definition(choice) for choice in item.choices]
        assert len(set(normalised)) == 4, item.choices
        entry = by_id.loc[item.entry_id]
        assert item.term == entry["headword"]
        assert item.choices[item.answer] == shorten_definition(entry["definition"])
        assert item.term in item.question
        for position, choice in enumerate(item.choices):
            if position == item.answer:
                continue
            owner_rows = owners.get_group(normalise_definition(choice))
            assert set(owner_rows["domain"]) == {item.domain}
            assert set(owner_rows["split"]) == {item.split}
            assert item.term not in set(owner_rows["headword"])


def test_mcq_answer_positions_are_balanced():
    items = make_mcq_items(_mcq_corpus(n_per_pool=200), n_choices=4, seed=3)
    for _, pool in items.groupby(["domain", "split"]):
        counts = pool["answer"].value_counts().reindex(range(4), fill_value=0)
        assert counts.max() - counts.min() <= 1, counts.to_dict()


def test_mcq_is_deterministic_for_a_seed():
    corpus = _mcq_corpus()
    first = make_mcq_items(corpus, seed=7)
    again = make_mcq_items(corpus.sample(frac=1.0, random_state=1), seed=7)
    pd.testing.assert_frame_equal(first, again)
    other = make_mcq_items(corpus, seed=8)
    assert not first["choices"].equals(other["choices"])


def test_mcq_max_items_and_n_choices():
    items = make_mcq_items(_mcq_corpus(), n_choices=3, max_items_per_domain_split=5)
    assert items.groupby("domain").size().to_dict() == {"chemistry": 5, "law": 5}
    assert items["choices"].map(len).eq(3).all()
    with pytest.raises(ValueError, match=r"n_choices must be an int >= 2; got 1"):
        make_mcq_items(_mcq_corpus(), n_choices=1)


def test_mcq_eligibility_rules():
    assert is_mcq_eligible("Elaiometer", "An apparatus for determining the amount of oil.")
    assert not is_mcq_eligible("Acidimeter", "An instrument used in acidimetry of solutions.")
    assert not is_mcq_eligible("sperm whale", "a large whale with a cavity in its head")
    assert not is_mcq_eligible("Gneiss", "A layered rock.")  # under four words
    assert shorten_definition("(economics) the study of scarce goods") == (
        "the study of scarce goods")
    long_definition = "word " * 200
    shortened = shorten_definition(long_definition)
    assert len(shortened) <= MAX_DEFINITION_CHARS and shortened.endswith("word...")


def test_mcq_on_the_real_corpus(real_corpus):
    law = real_corpus[real_corpus["domain"] == "law"]
    items = make_mcq_items(law, n_choices=4, seed=0)
    assert len(items) > 1000
    assert set(items["split"]) == set(SPLITS)
    assert items["choices"].map(lambda c: len({normalise_definition(x) for x in c})).eq(4).all()
    shares = items["answer"].value_counts(normalize=True)
    assert (shares - 0.25).abs().max() < 0.01
