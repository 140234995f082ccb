"""Tests of moecollab.data.word_cloze: field cloze blanks with options of the blank's own field."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pandas as pd
import pytest
from test_cloze import FIELD_WORDS, _corpus

from moecollab.data.cloze import make_cloze_items
from moecollab.data.word_cloze import make_word_cloze_items


def _answer(row) -> str:
    return str(list(row.choices)[row.answer])


def test_word_items_keep_context_and_answer_with_same_field_options():
    cloze = make_cloze_items(_corpus())
    word = make_word_cloze_items(cloze)
    assert len(word) == len(cloze)
    assert word["question"].tolist() == cloze["question"].tolist()
    assert [_answer(row) for row in word.itertuples()] == \
        [_answer(row) for row in cloze.itertuples()]
    assert word["item_id"].str.startswith("word-").all()
    assert (word["item_id"].str.removeprefix("word-")
            == cloze["item_id"].str.removeprefix("cloze-")).all()
    for row in word.itertuples():
        assert len(set(row.choices)) == 4                       # distinct options
        assert set(row.choices) <= set(FIELD_WORDS[row.domain])  # all of the item's field


def test_distractors_follow_the_answers_frequency_and_positions_are_balanced():
    # One field whose answers are "common" nine times out of ten: as a distractor it must come
    # up far more often than the rare words, as it does as an answer.
    answers = ["common"] * 90 + ["rare1", "rare2", "rare3", "rare4", "rare5"] * 2
    cloze = pd.DataFrame({"item_id": [f"cloze-e{i:03d}-005" for i in range(len(answers))],
                          "domain": "law", "question": "x",
                          "choices": [[word, "a", "b", "c"] for word in answers], "answer": 0})
    word = make_word_cloze_items(cloze, seed=3)
    distractors = Counter(choice for row in word.itertuples() for index, choice in
                          enumerate(row.choices) if index != row.answer)
    assert distractors["common"] == 10            # every item whose answer is rare has it
    assert max(distractors[f"rare{i}"] for i in range(1, 6)) < 90
    assert np.bincount(word["answer"], minlength=4).tolist() == [25, 25, 25, 25]
    again = make_word_cloze_items(cloze, seed=3)
    assert again.equals(word)
    assert not make_word_cloze_items(cloze, seed=4)["choices"].equals(word["choices"])


def test_a_field_with_too_few_answer_words_gives_no_items(caplog):
    cloze = make_cloze_items(_corpus())
    law = cloze["domain"] == "law"
    # Law's answers narrowed to three words: its items would need a repeated option.
    three = iter(["court", "statute", "verdict"] * len(cloze))
    narrowed = cloze.assign(
        choices=[[next(three), "x", "y", "z"] if is_law else choices
                 for is_law, choices in zip(law, cloze["choices"], strict=True)],
        answer=[0 if is_law else answer for is_law, answer in zip(law, cloze["answer"],
                                                                  strict=True)])
    word = make_word_cloze_items(narrowed)
    assert "law" not in set(word["domain"])
    assert len(word) == len(cloze) - law.sum()
    assert "'law' has 3 distinct answer word(s)" in caplog.text
    with pytest.raises(ValueError, match="no field has 5 distinct answer words"):
        make_word_cloze_items(cloze, n_choices=5)
    with pytest.raises(ValueError, match="lacks column"):
        make_word_cloze_items(cloze.drop(columns=["choices"]))
    with pytest.raises(ValueError, match="n_choices"):
        make_word_cloze_items(cloze, n_choices=1)
