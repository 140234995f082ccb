"""Multiple-choice items from the domain corpus: pick the definition that fits a term.

Each item shows a term (an entry's headword) and ``n_choices`` definitions: the entry's own and
``n_choices - 1`` distractors drawn from *other headwords* of the same domain and split. Options
are deduplicated by normalised definition text, so no two options read the same, and the
position of the correct option is balanced across items. In lm-eval terms an item is
``question`` + ``choices`` (list of str) + ``answer`` (int index).
"""

from __future__ import annotations

import logging
import re
import zlib

import numpy as np
import pandas as pd

from moecollab.data.corpus import DOMAINS, SPLITS, normalise_headword

logger = logging.getLogger(__name__)

MCQ_COLUMNS: tuple[str, ...] = (
    "item_id",
    "domain",
    "split",
    "term",
    "question",
    "choices",
    "answer",
    "entry_id",
)
#: Fewest words a definition needs to make an item (shorter ones are too vague).
MIN_DEFINITION_WORDS = 4
#: Longest definition shown, in characters (cut at a word boundary) to keep prompts short.
MAX_DEFINITION_CHARS = 300

_DOMAIN_PREFIX = re.compile(r"^\((?:[a-z][a-z .'-]{1,40})\)\s*")  # WordNet "(economics) …"
_NON_WORD = re.compile(r"[^0-9a-z]+")
_WORD = re.compile(r"[0-9a-z]+")


def question_for(term: str) -> str:
    """The question text of an item about ``term``.

    Examples
    --------
    >>> question_for("Elaiometer")
    "Which definition fits the term 'Elaiometer'?"
    """
    return f"Which definition fits the term '{term}'?"


def shorten_definition(definition: str, max_chars: int = MAX_DEFINITION_CHARS) -> str:
    """Strip a WordNet domain prefix and cut at a word boundary to at most ``max_chars``.

    Examples
    --------
    >>> shorten_definition("(law) a writ issued by authority of law")
    'a writ issued by authority of law'
    >>> shorten_definition("one two three four", max_chars=12)
    'one two...'
    """
    definition = _DOMAIN_PREFIX.sub("", " ".join(definition.split()))
    if len(definition) <= max_chars:
        return definition
    cut = definition[: max_chars - 3].rsplit(" ", 1)[0].rstrip(" ,;:")
    return cut + "..."


def normalise_definition(definition: str) -> str:
    """Definition text for duplicate detection: lower-case letters and digits only.

    Examples
    --------
    >>> normalise_definition("A  sour substance.") == normalise_definition("a sour substance")
    True
    """
    return _NON_WORD.sub(" ", definition.casefold()).strip()


def _term_words(term: str) -> list[str]:
    # The whole term plus its longer words: "sperm whale" must not be defined as "a whale …".
    words = [w for w in _WORD.findall(term.casefold()) if len(w) >= 4]
    whole = " ".join(_WORD.findall(term.casefold()))
    return [whole, *words] if whole else words


def definition_names_term(definition: str, term: str) -> bool:
    """True when the definition contains the term, one of its words, or their stems.

    A stem is the word minus its last three characters, for words over five characters
    (at least four characters long); matches are case-insensitive at a word start.

    Examples
    --------
    >>> definition_names_term("An instrument used in acidimetry.", "Acidimeter")
    True
    >>> definition_names_term("An apparatus for determining the amount of oil.", "Elaiometer")
    False
    """
    # " " + words joined by spaces: "at a word start" becomes a plain substring test (a regex
    # per term would be compiled tens of thousands of times).
    definition_words = " " + " ".join(_WORD.findall(definition.casefold()))
    for word in _term_words(term):
        stem = word[:-3] if len(word) > 5 else word
        if len(stem) < 4:
            stem = word
        if " " + stem in definition_words:
            return True
    return False


def is_mcq_eligible(headword: str, definition: str) -> bool:
    """Whether an entry can become an item: long enough and not naming its own term."""
    definition = shorten_definition(definition)
    return len(definition.split()) >= MIN_DEFINITION_WORDS and not definition_names_term(
        definition, headword
    )


def _pool_generator(seed: int, domain: str, split: str) -> np.random.Generator:
    # One generator per (domain, split): items of one pool do not change when others are
    # added or dropped (crc32 is stable across runs, unlike hash()).
    return np.random.default_rng([seed, zlib.crc32(domain.encode()), zlib.crc32(split.encode())])


def make_mcq_items(
    corpus: pd.DataFrame,
    *,
    n_choices: int = 4,
    seed: int = 0,
    max_items_per_domain_split: int | None = None,
) -> pd.DataFrame:
    """Build "which definition fits this term?" items from corpus entries.

    Parameters
    ----------
    corpus : DataFrame
        As returned by :func:`moecollab.data.load_corpus` (needs ``entry_id``, ``headword``,
        ``domain``, ``split``, ``definition``).
    n_choices : int, default 4
        Options per item: the correct definition and ``n_choices - 1`` distractors.
    seed : int, default 0
        Seeds the distractor draw, the option order and any subsampling.
    max_items_per_domain_split : int, optional
        Keep at most this many items per (domain, split), chosen at random with ``seed``.

    Returns
    -------
    DataFrame
        One row per item with columns ``item_id``, ``domain``, ``split``, ``term``,
        ``question``, ``choices`` (list of ``n_choices`` str), ``answer`` (int index of the
        correct definition) and ``entry_id`` (the corpus entry the item asks about).

    Notes
    -----
    Eligible entries have a definition of at least four words that does not contain the term
    or its stem. Within a (domain, split) pool one entry is kept per normalised definition, so
    synonyms with the same wording never appear as two options; distractors come from
    other headwords only. Answer positions are a shuffled cycle ``0, 1, …, n_choices - 1``,
    so each position holds the answer for ``1 / n_choices`` of the items (within one).
    """
    if isinstance(n_choices, bool) or not isinstance(n_choices, int) or n_choices < 2:
        raise ValueError(f"n_choices must be an int >= 2; got {n_choices!r}")
    if max_items_per_domain_split is not None and max_items_per_domain_split < 1:
        raise ValueError(
            "max_items_per_domain_split must be a positive int or None; "
            f"got {max_items_per_domain_split!r}"
        )
    needed = {"entry_id", "headword", "domain", "split", "definition"}
    missing = sorted(needed - set(corpus.columns))
    if missing:
        raise ValueError(f"corpus lacks column(s) {', '.join(missing)}")

    items: list[dict] = []
    domain_order = {name: rank for rank, name in enumerate(DOMAINS)}
    split_order = {name: rank for rank, name in enumerate(SPLITS)}
    pools = sorted(
        corpus.groupby(["domain", "split"], sort=False),
        key=lambda group: (domain_order.get(group[0][0], len(DOMAINS)), group[0][0],
                           split_order.get(group[0][1], len(SPLITS)), group[0][1]),
    )
    for (domain, split), pool_entries in pools:
        pool = _eligible_pool(pool_entries)
        if len(pool) < n_choices:
            logger.warning("skipping %s/%s: %d eligible entries, fewer than n_choices=%d",
                           domain, split, len(pool), n_choices)
            continue
        items.extend(_items_of_pool(pool, domain, split, n_choices, seed,
                                    max_items_per_domain_split))
    return pd.DataFrame(items, columns=list(MCQ_COLUMNS))


def _eligible_pool(pool_entries: pd.DataFrame) -> pd.DataFrame:
    """Eligible entries of one pool, one per normalised definition, sorted by entry id."""
    pool = pool_entries.sort_values("entry_id")
    shown = pool["definition"].map(shorten_definition)
    eligible = [
        is_mcq_eligible(headword, definition)
        for headword, definition in zip(pool["headword"], shown, strict=True)
    ]
    pool = pool.assign(shown=shown)[eligible]
    pool = pool.assign(
        definition_key=pool["shown"].map(normalise_definition),
        headword_key=pool["headword"].map(normalise_headword),
    )
    return pool.drop_duplicates("definition_key").reset_index(drop=True)


def _draw_distractors(
    rng: np.random.Generator, headword_keys: list[str], row: int, n_distractors: int
) -> list[int]:
    """Rows of other headwords, distinct; pools are deduplicated by definition already, so
    distinct rows give distinct option texts."""
    # A few cheap random draws almost always suffice; a full permutation is the fallback for
    # pools dominated by one headword.
    for candidates in (rng.integers(len(headword_keys), size=4 * n_distractors + 8),
                       rng.permutation(len(headword_keys))):
        distractors: list[int] = []
        for candidate in candidates.tolist():
            if (candidate != row and candidate not in distractors
                    and headword_keys[candidate] != headword_keys[row]):
                distractors.append(candidate)
                if len(distractors) == n_distractors:
                    return distractors
    return distractors


def _items_of_pool(
    pool: pd.DataFrame,
    domain: str,
    split: str,
    n_choices: int,
    seed: int,
    max_items: int | None,
) -> list[dict]:
    rng = _pool_generator(seed, domain, split)
    item_rows = rng.permutation(len(pool))
    if max_items is not None:
        item_rows = item_rows[:max_items]
    item_rows = np.sort(item_rows)  # items in entry order; the permutation only subsamples
    answer_positions = rng.permutation(np.arange(len(item_rows)) % n_choices)
    # Plain Python lists: element access on Arrow-backed columns is slow.
    headword_keys = pool["headword_key"].tolist()
    shown = pool["shown"].tolist()
    entry_ids = pool["entry_id"].tolist()
    headwords = pool["headword"].tolist()
    items = []
    for row, answer in zip(item_rows, answer_positions, strict=True):
        distractors = _draw_distractors(rng, headword_keys, int(row), n_choices - 1)
        if len(distractors) < n_choices - 1:
            continue  # a pool made of one headword's senses only
        choices = [str(shown[d]) for d in distractors]
        choices.insert(int(answer), str(shown[row]))
        entry_id = str(entry_ids[row])
        term = str(headwords[row])
        items.append({
            "item_id": f"mcq-{entry_id}",
            "domain": domain,
            "split": split,
            "term": term,
            "question": question_for(term),
            "choices": choices,
            "answer": int(answer),
            "entry_id": entry_id,
        })
    return items
