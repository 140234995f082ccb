"""Field cloze items: finish a held-out definition with the word that belongs to its field.

An item is a held-out entry cut just before a **cue word**, a word that is characteristic of the
entry's field in the training text; the options are that word and ``n_choices - 1`` cue words
of other fields, one field each::

    Hydrometer: An instrument for determining the specific gravity of ____
    options: liquids | statute | vertebra | theorem

A model answers from what it knows of the field, since the entry itself was never in its
training text (splits are drawn by headword). Each option is one word, and with a tokenizer
given one token, so the four continuations share one forward pass in lm-eval (it reuses the
context's logits for one-token continuations): thousands of items stay cheap.

How characteristic a word is of a field comes from the training split only
(:func:`field_word_table`): its frequency per field, each field's counts normalised to one, so
large fields do not claim every word. Distractors are drawn with the frequency their words have
in training text, as the answers are, so a word's commonness does not give the answer away.
"""

from __future__ import annotations

import re
import zlib
from collections import Counter

import numpy as np
import pandas as pd

from moecollab.data.corpus import DOMAINS, SPLITS
from moecollab.data.mcq import shorten_definition
from moecollab.data.sources import SPLIT_GROUPS

#: Columns of an item table (those of :data:`moecollab.data.mcq.MCQ_COLUMNS`, so the same
#: lm-eval writer takes both).
CLOZE_COLUMNS: tuple[str, ...] = (
    "item_id", "domain", "split", "term", "question", "choices", "answer", "entry_id",
)
_CANDIDATE = re.compile(r"[a-z]{4,}")


def _words(text: str) -> list[str]:
    return _CANDIDATE.findall(text.casefold())


def field_word_table(corpus: pd.DataFrame, *, split: str = "train",
                     min_count: int = 5) -> pd.DataFrame:
    """How characteristic each word is of each field, from one split's definitions.

    Parameters
    ----------
    corpus : DataFrame
        Needs ``domain``, ``split`` and ``definition``.
    split : str, default "train"
        The split whose text is counted; keep it the training split, so that nothing about
        held-out entries decides which words count as cues.
    min_count : int, default 5
        Words seen fewer times in the split (all fields together) are left out.

    Returns
    -------
    DataFrame
        One row per word (lower-case letters, at least four), sorted by word: ``word``,
        ``field`` (where it is most characteristic), ``specificity`` (the share of the word's
        field-normalised frequency that falls in that field, between ``1/n_fields`` and 1),
        ``count`` (occurrences in ``field``) and ``total`` (in all fields).

    Examples
    --------
    >>> corpus = pd.DataFrame({"domain": ["law", "law", "chemistry"], "split": "train",
    ...                        "definition": ["a writ of court", "the court decides",
    ...                                       "an acid and a base with court"]})
    >>> table = field_word_table(corpus, min_count=1).set_index("word")
    >>> table.loc["court", "field"], round(float(table.loc["court", "specificity"]), 3)
    ('law', 0.667)
    """
    rows = corpus[corpus["split"] == split]
    if rows.empty:
        raise ValueError(f"corpus has no entries in split {split!r}")
    counts = {field: Counter(word for text in group["definition"] for word in _words(text))
              for field, group in rows.groupby("domain", sort=True)}
    fields = sorted(counts)
    words = sorted(set().union(*counts.values()))
    matrix = np.array([[counts[field][word] for field in fields] for word in words], float)
    totals = matrix.sum(axis=1)
    keep = totals >= min_count
    matrix, totals = matrix[keep], totals[keep]
    words = [word for word, kept in zip(words, keep, strict=True) if kept]
    rates = matrix / matrix.sum(axis=0, keepdims=True).clip(min=1)  # per-field frequency
    share = rates / rates.sum(axis=1, keepdims=True)
    best = share.argmax(axis=1)
    return pd.DataFrame({
        "word": words,
        "field": [fields[index] for index in best],
        "specificity": share[np.arange(len(words)), best],
        "count": matrix[np.arange(len(words)), best].astype(int),
        "total": totals.astype(int),
    })


def cue_words(table: pd.DataFrame, *, min_specificity: float = 0.5,
              tokenizer=None, max_tokens: int = 1) -> pd.DataFrame:
    """The rows of :func:`field_word_table` that count as cues of their field.

    A cue has ``specificity >= min_specificity`` and, when ``tokenizer`` is given, is at most
    ``max_tokens`` tokens long with a leading space (as it appears after the context).
    """
    if not 0 < min_specificity <= 1:
        raise ValueError(f"min_specificity must be in (0, 1]; got {min_specificity!r}")
    cues = table[table["specificity"] >= min_specificity]
    if tokenizer is not None:
        lengths = [len(ids) for ids in tokenizer(
            [" " + word for word in cues["word"]], add_special_tokens=False)["input_ids"]]
        cues = cues[np.array(lengths, dtype=int) <= max_tokens]
    return cues.reset_index(drop=True)


def _blanks(headword: str, definition: str, cues: dict[str, str], field: str,
            min_context_words: int) -> list[tuple[int, str, str]]:
    """(position, context, cue) for each cue word of ``field`` in the definition, last first."""
    words = shorten_definition(definition).split(" ")
    found = []
    for position in range(len(words) - 1, min_context_words - 1, -1):
        raw = words[position]
        word = raw.strip(".,;:()[]\"'!?").casefold()
        # The word must start the token as written ("acid," is fine, "(acid" or "Acid" not: a
        # capital or bracket would change how the option reads after the context).
        if cues.get(word) != field or not raw.startswith(word):
            continue
        found.append((position, f"{headword}: " + " ".join(words[:position]), word))
    return found


#: The corpus splits whose entries become evaluation items (stage 00's default): nothing a
#: pruning method learns from may come from them (checked at plan time by moecollab.preflight).
#: The held-out splits, as stage 01's ``split=held_out`` names them.
EVALUATED_SPLITS: tuple[str, ...] = SPLIT_GROUPS["held_out"]


def make_cloze_items(corpus: pd.DataFrame, *, splits: tuple[str, ...] = EVALUATED_SPLITS,
                     n_choices: int = 4, min_specificity: float = 0.5, tokenizer=None,
                     max_option_tokens: int = 1, min_context_words: int = 3,
                     min_count: int = 5, blanks_per_entry: int = 0,
                     seed: int = 0) -> pd.DataFrame:
    """Field cloze items from the entries of ``splits``; cues from the training split.

    Parameters
    ----------
    corpus : DataFrame
        As returned by :func:`moecollab.data.load_corpus` (every split: the training split
        decides the cue words).
    splits : tuple of str, default ("validation", "test")
        Splits whose entries become items (never ``train``: the model has read those).
    n_choices : int, default 4
        Options per item, each from a different field; needs that many fields with cues.
    min_specificity : float, default 0.5
        How characteristic of its field a word must be to serve as a cue (see
        :func:`field_word_table`).
    tokenizer : optional
        When given, options are at most ``max_option_tokens`` tokens long.
    min_context_words : int, default 3
        Definition words that must come before the blank.
    min_count : int, default 5
        Passed to :func:`field_word_table`.
    blanks_per_entry : int, default 0
        Items per entry at most: one per cue word of the entry's field, the last cue first
        (the most context); 0 for every cue. Items of one entry share their text, so they are
        not independent: ``entry_id`` names the cluster that paired intervals resample whole
        (:func:`moecollab.paired.resample_tasks`).
    seed : int, default 0
        Seeds the distractor draw and the answer positions.

    Returns
    -------
    DataFrame
        Columns :data:`CLOZE_COLUMNS`: ``question`` is the context (the entry cut before its
        cue), ``choices`` the option words, ``answer`` the index of the cue, ``term`` the
        headword, ``item_id`` ``cloze-<entry_id>-<word position of the blank>``. Entries
        without a cue of their own field after the first ``min_context_words`` words give no
        item.
    """
    if isinstance(n_choices, bool) or not isinstance(n_choices, int) or n_choices < 2:
        raise ValueError(f"n_choices must be an int >= 2; got {n_choices!r}")
    if isinstance(blanks_per_entry, bool) or not isinstance(blanks_per_entry, int) \
            or blanks_per_entry < 0:
        raise ValueError(f"blanks_per_entry must be an int >= 0 (0 for every cue); got "
                         f"{blanks_per_entry!r}")
    if "train" in splits:
        raise ValueError("splits must not include 'train': the model was trained on it")
    cues = cue_words(field_word_table(corpus, min_count=min_count),
                     min_specificity=min_specificity, tokenizer=tokenizer,
                     max_tokens=max_option_tokens)
    field_of = dict(zip(cues["word"], cues["field"], strict=True))
    pools = {field: group for field, group in cues.groupby("field", sort=True)}
    if len(pools) < n_choices:
        raise ValueError(f"only {len(pools)} fields have cue words; n_choices={n_choices} "
                         "needs one field per option (lower min_specificity?)")
    items = []
    split_rank = {name: rank for rank, name in enumerate(SPLITS)}
    domain_rank = {name: rank for rank, name in enumerate(DOMAINS)}
    selected = corpus[corpus["split"].isin(splits)]
    for (domain, split), entries in sorted(
            selected.groupby(["domain", "split"], sort=False),
            key=lambda group: (domain_rank.get(group[0][0], len(DOMAINS)), group[0][0],
                               split_rank.get(group[0][1], len(SPLITS)))):
        if domain not in pools:
            continue
        rng = np.random.default_rng([seed, zlib.crc32(domain.encode()),
                                     zlib.crc32(split.encode())])
        others = [field for field in pools if field != domain]
        blanks = []
        for entry in entries.sort_values("entry_id").itertuples():
            found = _blanks(entry.headword, entry.definition, field_of, domain,
                            min_context_words)
            if blanks_per_entry:
                found = found[:blanks_per_entry]
            blanks.extend((entry, *blank) for blank in found)
        answers = rng.permutation(np.arange(len(blanks)) % n_choices)
        for (entry, position, context, cue), answer in zip(blanks, answers, strict=True):
            choices = []
            for field in rng.choice(others, size=n_choices - 1, replace=False):
                pool = pools[field]
                weights = pool["count"].to_numpy(float)
                choices.append(str(pool["word"].iloc[rng.choice(len(pool), p=weights /
                                                                 weights.sum())]))
            choices.insert(int(answer), cue)
            items.append({"item_id": f"cloze-{entry.entry_id}-{position:03d}",
                          "domain": domain,
                          "split": split, "term": entry.headword, "question": context,
                          "choices": choices, "answer": int(answer),
                          "entry_id": entry.entry_id})
    return pd.DataFrame(items, columns=list(CLOZE_COLUMNS))
