"""Word cloze items: the field cloze's blanks, with every option from the blank's own field.

A field cloze item (:mod:`moecollab.data.cloze`) asks which *field* a held-out definition
continues in: its three distractors are characteristic words of three other fields. A model
that knows its fields answers most of them, and keeps answering them after much of its
knowledge is pruned away, because telling ten fields apart takes little. A word cloze item keeps
the field cloze item's context and answer and takes its distractors from the **same field**::

    Hydrometer: An instrument for determining the specific gravity of ____
    options: liquids | acids | salts | metals          (all four chemistry words)

so the model must know which word of the field fits this definition, not only which field it
is in. Whether it tells pruning methods apart more sharply than the field cloze has varied
between trained models; stage 06 shows both.

The distractors are other answers of the same field's items, drawn with the frequency they have
as answers, so answer and distractors come from one distribution and a word's commonness does
not give the answer away. Nothing here is learnt from: the items only choose which of four
words the model is asked to rank. A distractor may fit the context too (two chemistry words can
both finish a definition sensibly); that lowers the ceiling, equally for every model compared.
"""

from __future__ import annotations

import logging
import zlib
from collections import Counter

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)


def make_word_cloze_items(cloze_items: pd.DataFrame, *, n_choices: int = 4,
                          seed: int = 0) -> pd.DataFrame:
    """Same-field options for every field cloze item.

    Parameters
    ----------
    cloze_items : DataFrame
        Field cloze items as :func:`moecollab.data.make_cloze_items` makes them (stage 00's
        ``cloze_items.parquet``): ``item_id``, ``domain``, ``choices``, ``answer`` and the
        context columns, which are kept.
    n_choices : int, default 4
        Options per item: the answer and ``n_choices - 1`` other answers of the same field.
    seed : int, default 0
        Seeds the distractor draw and the answer positions (one stream per field).

    Returns
    -------
    DataFrame
        One row per input item of every field with enough answers, in the input's order, with
        the same columns: ``choices`` and
        ``answer`` replaced, ``item_id`` prefixed ``word-`` instead of ``cloze-``.

    Raises
    ------
    ValueError
        If no field's items have ``n_choices`` distinct answers. A field with fewer gives no
        items (a warning says so): its options would repeat.

    Examples
    --------
    >>> items = pd.DataFrame({"item_id": [f"cloze-e{i}-004" for i in range(4)],
    ...                       "domain": "law", "question": "A writ of the",
    ...                       "choices": [["court", "acid", "atom", "verb"],
    ...                                   ["jury", "a", "b", "c"], ["writ", "a", "b", "c"],
    ...                                   ["bail", "a", "b", "c"]],
    ...                       "answer": 0})
    >>> word = make_word_cloze_items(items)
    >>> sorted(word["choices"].iloc[0]) == sorted(["court", "jury", "writ", "bail"])
    True
    >>> word["item_id"].iloc[0], [c[a] for c, a in zip(word["choices"], word["answer"])]
    ('word-e0-004', ['court', 'jury', 'writ', 'bail'])
    """
    if isinstance(n_choices, bool) or not isinstance(n_choices, int) or n_choices < 2:
        raise ValueError(f"n_choices must be an int >= 2; got {n_choices!r}")
    needed = {"item_id", "domain", "choices", "answer"}
    missing = sorted(needed - set(cloze_items.columns))
    if missing:
        raise ValueError(f"cloze_items lacks column(s) {', '.join(missing)}; expected "
                         "moecollab.data.make_cloze_items's output")
    answers = pd.Series([str(list(choices)[int(answer)]) for choices, answer in
                         zip(cloze_items["choices"], cloze_items["answer"], strict=True)],
                        index=cloze_items.index, dtype=object)
    choices_out: dict = {}
    answer_out: dict = {}
    for field, rows in cloze_items.groupby("domain", sort=True):
        field_answers = answers.loc[rows.index]
        counts = Counter(field_answers)
        if len(counts) < n_choices:
            logger.warning("field %r has %d distinct answer word(s), fewer than n_choices=%d: "
                           "no word cloze item for it", field, len(counts), n_choices)
            continue
        pool = np.array(sorted(counts))
        weights = np.array([counts[word] for word in pool], dtype=float)
        rng = np.random.default_rng([seed, zlib.crc32(str(field).encode())])
        positions = rng.permutation(np.arange(len(rows)) % n_choices)
        for index, answer, position in zip(rows.index, field_answers, positions, strict=True):
            others = pool != answer
            drawn = rng.choice(pool[others], size=n_choices - 1, replace=False,
                               p=weights[others] / weights[others].sum())
            options = [str(word) for word in drawn]
            options.insert(int(position), answer)
            choices_out[index] = options
            answer_out[index] = int(position)
    if not choices_out:
        raise ValueError(f"no field has {n_choices} distinct answer words (n_choices): no word "
                         "cloze item can be made")
    word = cloze_items.loc[[index for index in cloze_items.index if index in choices_out]].copy()
    word["choices"] = [choices_out[index] for index in word.index]
    word["answer"] = [answer_out[index] for index in word.index]
    word["item_id"] = word["item_id"].str.replace(r"^cloze-", "word-", regex=True)
    return word
