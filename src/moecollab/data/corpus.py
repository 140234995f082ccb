"""Read and validate the committed domain corpus in ``data/``.

The corpus holds dictionary entries labelled with one of ten study domains (:data:`DOMAINS`),
built by :mod:`moecollab.build.corpus` from GCIDE, FOLDOC and WordNet 3.0. The source
notes' "health" is called ``medicine`` here, "computer science" ``computer_science`` and "math"
``mathematics``. Psychology and economics are left out: each has fewer than 800 usable entries
in these sources (mostly emotion and money vocabulary rather than the disciplines).

Splits are fixed by a hash of the normalised headword (80/10/10 train/validation/test), so one
headword never sits in two splits and the unlabelled general text holds train headwords only.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import re
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

logger = logging.getLogger(__name__)

DOMAINS: tuple[str, ...] = (
    "biology",
    "medicine",
    "chemistry",
    "physics",
    "engineering",
    "computer_science",
    "law",
    "history",
    "philosophy",
    "mathematics",
)
SPLITS: tuple[str, ...] = ("train", "validation", "test")
SOURCES: tuple[str, ...] = ("gcide", "foldoc", "wordnet")
CORPUS_COLUMNS: tuple[str, ...] = (
    "entry_id",
    "headword",
    "domain",
    "source",
    "split",
    "text",
    "definition",
)
CORPUS_FILENAME = "corpus.jsonl.gz"
GENERAL_FILENAME = "general.jsonl.gz"
PROVENANCE_FILENAME = "PROVENANCE.json"

#: The repository's ``data/`` folder (src/moecollab/data/corpus.py -> ../../../data).
DATA_DIR: Path = Path(__file__).resolve().parents[3] / "data"

# Split boundaries on the first 32 bits of sha1(normalised headword): 80 / 10 / 10.
_HASH_SPACE = 2**32
_TRAIN_END = int(0.8 * _HASH_SPACE)
_VALIDATION_END = int(0.9 * _HASH_SPACE)
_WHITESPACE = re.compile(r"\s+")


class CorpusError(ValueError):
    """The corpus on disk is missing, malformed or incomplete (one-line message)."""


def normalise_headword(headword: str) -> str:
    """The form of a headword that decides its split: case-folded, spaces collapsed.

    Examples
    --------
    >>> normalise_headword("  Bill_of  Exchange ")
    'bill of exchange'
    """
    return _WHITESPACE.sub(" ", headword.replace("_", " ")).strip().casefold()


def split_of_headword(headword: str) -> str:
    """The split of a headword: sha1 of its normalised form, 80/10/10 train/validation/test.

    Examples
    --------
    >>> split_of_headword("Acid") == split_of_headword("acid")
    True
    """
    digest = hashlib.sha1(normalise_headword(headword).encode("utf-8")).digest()
    bucket = int.from_bytes(digest[:4], "big")
    if bucket < _TRAIN_END:
        return "train"
    return "validation" if bucket < _VALIDATION_END else "test"


def _resolve(path: str | Path | None, filename: str) -> Path:
    """A file path from ``None`` (the default data folder), a folder or a file."""
    resolved = DATA_DIR if path is None else Path(path)
    if resolved.is_dir():
        resolved = resolved / filename
    if not resolved.is_file():
        raise CorpusError(
            f"corpus file {resolved} not found; build it with "
            "`python -m moecollab.build.corpus`"
        )
    return resolved


def _read_jsonl_gz(path: Path, required: Iterable[str], what: str) -> list[dict]:
    required = tuple(required)
    rows: list[dict] = []
    try:
        with gzip.open(path, "rt", encoding="utf-8") as stream:
            for line_number, line in enumerate(stream, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise CorpusError(
                        f"{what} {path} line {line_number}: malformed JSON ({error.msg})"
                    ) from None
                if not isinstance(row, dict):
                    raise CorpusError(
                        f"{what} {path} line {line_number}: expected a JSON object, "
                        f"got {type(row).__name__}"
                    )
                missing = [name for name in required if not isinstance(row.get(name), str)]
                if missing:
                    raise CorpusError(
                        f"{what} {path} line {line_number}: missing required field(s) "
                        f"{', '.join(missing)} (need {', '.join(required)})"
                    )
                rows.append(row)
    except (OSError, EOFError, UnicodeDecodeError) as error:
        raise CorpusError(f"{what} {path}: cannot read gzip JSON lines ({error})") from None
    return rows


def check_domain_names(domains: Iterable[str]) -> tuple[str, ...]:
    """``domains`` as a tuple, in the order given, if each is one of :data:`DOMAINS`.

    The one check of field names: :func:`load_corpus` and the stages' readers
    (:mod:`moecollab.data.sources`) use it. A single str is one name.

    Raises
    ------
    CorpusError
        An unknown name, or no names.
    """
    if isinstance(domains, str):
        domains = (domains,)
    domains = tuple(domains)
    unknown = [name for name in domains if name not in DOMAINS]
    if unknown:
        raise CorpusError(
            f"unknown domain {unknown[0]!r}; allowed: {', '.join(DOMAINS)}"
        )
    if not domains:
        raise CorpusError(f"domains is empty; allowed: {', '.join(DOMAINS)}")
    return domains


def load_corpus(
    path: str | Path | None = None, *, domains: Iterable[str] | None = None
) -> pd.DataFrame:
    """Load the labelled corpus and check that it is complete.

    Parameters
    ----------
    path : str or Path, optional
        ``corpus.jsonl.gz`` or the folder holding it; defaults to the repository's ``data/``.
    domains : iterable of str, optional
        Keep only these domains (names from :data:`DOMAINS`); default all ten.

    Returns
    -------
    DataFrame
        One row per entry with columns ``entry_id``, ``headword``, ``domain``, ``source``,
        ``split``, ``text`` (language-model text) and ``definition`` (bare definition for
        multiple-choice items), in file order.

    Raises
    ------
    CorpusError
        A malformed line, a missing field, an unknown value, a requested domain that is absent,
        or an empty split of a requested domain.
    """
    selected = DOMAINS if domains is None else check_domain_names(domains)
    corpus_path = _resolve(path, CORPUS_FILENAME)
    rows = _read_jsonl_gz(corpus_path, CORPUS_COLUMNS, "corpus")
    allowed_values = {"domain": DOMAINS, "split": SPLITS, "source": SOURCES}
    for line_number, row in enumerate(rows, start=1):
        for field, allowed in allowed_values.items():
            if row[field] not in allowed:
                raise CorpusError(
                    f"corpus {corpus_path} entry {line_number}: {field} {row[field]!r} is not "
                    f"one of {', '.join(allowed)}"
                )
    corpus = pd.DataFrame.from_records(rows, columns=list(CORPUS_COLUMNS))
    if corpus["entry_id"].duplicated().any():
        duplicate = corpus.loc[corpus["entry_id"].duplicated(), "entry_id"].iloc[0]
        raise CorpusError(f"corpus {corpus_path}: entry_id {duplicate!r} appears twice")

    present = set(corpus["domain"])
    for domain in selected:
        if domain not in present:
            raise CorpusError(
                f"corpus is missing domain {domain!r} "
                f"(have: {', '.join(d for d in DOMAINS if d in present) or 'none'})"
            )
    corpus = corpus[corpus["domain"].isin(selected)].reset_index(drop=True)
    split_sizes = corpus.groupby(["domain", "split"]).size()
    for domain in selected:
        for split in SPLITS:
            if split_sizes.get((domain, split), 0) == 0:
                raise CorpusError(f"corpus split {split!r} of domain {domain!r} is empty")
    logger.debug("loaded %d corpus entries from %s", len(corpus), corpus_path)
    return corpus


def load_general_text(path: str | Path | None = None) -> list[str]:
    """Load the unlabelled GCIDE senses used only as extra language-model training text.

    These are every GCIDE sense without a study domain (cross-references dropped) whose
    headword falls in the train split, so they never contain a validation or test headword
    of the labelled corpus.

    Parameters
    ----------
    path : str or Path, optional
        ``general.jsonl.gz`` or the folder holding it; defaults to the repository's ``data/``.

    Returns
    -------
    list of str
        One ``"<headword>: <definition>"`` text per sense, in file order.
    """
    general_path = _resolve(path, GENERAL_FILENAME)
    rows = _read_jsonl_gz(general_path, ("headword", "text"), "general text")
    return [row["text"] for row in rows]
