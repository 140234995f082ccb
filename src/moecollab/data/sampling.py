"""Deterministic subsets of the corpus: a per-domain cap and a word budget for general text."""

from __future__ import annotations

import numpy as np
import pandas as pd


def cap_entries(corpus: pd.DataFrame, max_per_domain: int, seed: int = 0) -> pd.DataFrame:
    """At most ``max_per_domain`` entries of each domain, drawn with a seeded permutation.

    Rows keep their original order, so splits (assigned by headword) are untouched.

    Examples
    --------
    >>> corpus = pd.DataFrame({"domain": ["a"] * 5 + ["b"] * 2, "entry_id": range(7)})
    >>> cap_entries(corpus, 3)["domain"].value_counts().to_dict()
    {'a': 3, 'b': 2}
    """
    if max_per_domain < 1:
        raise ValueError(f"max_per_domain must be >= 1; got {max_per_domain!r}")
    rng = np.random.default_rng(seed)
    keep = []
    for _, rows in corpus.groupby("domain", sort=True, observed=True):
        order = rng.permutation(len(rows))[:max_per_domain]
        keep.extend(rows.index[np.sort(order)])
    return corpus.loc[sorted(keep)].reset_index(drop=True)


def take_words(texts: list[str], n_words: int, seed: int = 0) -> list[str]:
    """Texts in a seeded random order until about ``n_words`` whitespace words are collected.

    Examples
    --------
    >>> take_words(["a b", "c d e", "f"], n_words=3, seed=0) in (["a b", "c d e"], ["c d e"],
    ...     ["f", "a b"], ["a b", "f"], ["f", "c d e"], ["c d e", "f"])
    True
    """
    taken, count = [], 0
    for index in np.random.default_rng(seed).permutation(len(texts)):
        if count >= n_words:
            break
        taken.append(texts[index])
        count += len(texts[index].split())
    return taken
