"""The embedded domain corpus: reading, splits, multiple-choice items, provenance.

``load_corpus`` and ``load_general_text`` read the committed files in ``data/``;
``make_mcq_items`` turns corpus entries into term-to-definition multiple-choice items and
``make_cloze_items`` held-out entries into field cloze items; the corpus itself is built
by ``python -m moecollab.build.corpus``.
"""

from moecollab.data.cloze import make_cloze_items
from moecollab.data.corpus import (
    DATA_DIR,
    DOMAINS,
    SPLITS,
    CorpusError,
    load_corpus,
    load_general_text,
    normalise_headword,
    split_of_headword,
)
from moecollab.data.mcq import make_mcq_items
from moecollab.data.sampling import cap_entries, take_words

__all__ = [
    "DATA_DIR",
    "DOMAINS",
    "SPLITS",
    "CorpusError",
    "load_corpus",
    "load_general_text",
    "make_cloze_items",
    "make_mcq_items",
    "cap_entries",
    "take_words",
    "normalise_headword",
    "split_of_headword",
]
