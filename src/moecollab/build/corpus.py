"""Build the embedded domain corpus in ``data/`` from installed Debian dictionary packages.

Run as ``python -m moecollab.build.corpus [--out DIR] [--check]``.

Sources (see ``data/README.md`` and ``data/LICENSES/``):

* **GCIDE** (``dict-gcide``): Webster 1913 senses carrying field labels such as ``(Chem.)``,
  ``(Law)``, ``(Zool.)``; a label is mapped to a study domain by :data:`LABEL_RULES`.
* **FOLDOC** (``dict-foldoc``): every article is computer science.
* **WordNet 3.0** (``wordnet-base``): a synset's own topic pointer (``;c``), whose topic is
  mapped to a discipline by walking its hypernym chain to the nearest seed lemma
  (:data:`TOPIC_SEEDS`); the lexicographer files ``noun.animal``/``noun.plant`` (biology) and
  ``noun.body`` (medicine) are fallbacks.

Every labelled entry gets a split by the hash of its normalised headword (80/10/10), so a
headword never appears in two splits. Each domain is capped at :data:`MAX_ENTRIES_PER_DOMAIN`
entries, chosen by hash. GCIDE senses without a study domain become ``general.jsonl.gz``:
unlabelled language-model text, restricted to train-split headwords.

Outputs are byte-identical across rebuilds (sorted rows, gzip ``mtime=0``, no dates), so
``--check`` can compare hashes with the committed ``PROVENANCE.json``.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import hashlib
import json
import logging
import re
import string
import subprocess
import sys
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from moecollab.artifacts import atomic_path
from moecollab.data.corpus import (
    CORPUS_FILENAME,
    DATA_DIR,
    DOMAINS,
    GENERAL_FILENAME,
    PROVENANCE_FILENAME,
    normalise_headword,
    split_of_headword,
)

logger = logging.getLogger(__name__)

#: Bump when a parsing or mapping rule changes: recorded in PROVENANCE.json.
RULES_VERSION = "1"
#: Largest number of labelled entries kept per domain (biology alone has ~30,000).
MAX_ENTRIES_PER_DOMAIN = 6000
#: Fewest entries a domain must keep; the build fails below it.
MIN_ENTRIES_PER_DOMAIN = 800
#: Budget for both compressed files together.
MAX_TOTAL_COMPRESSED_BYTES = 8_000_000

PACKAGES = ("dict-gcide", "dict-foldoc", "wordnet-base")
SOURCE_FILES = {
    "dict-gcide": ("gcide.index", "gcide.dict.dz"),
    "dict-foldoc": ("foldoc.index", "foldoc.dict.dz"),
    "wordnet-base": ("data.noun", "data.verb", "data.adj", "data.adv"),
}
LICENSE_FILES = {
    # destination name -> source path
    "gcide-copyright.txt": "/usr/share/doc/dict-gcide/copyright",
    "foldoc-copyright.txt": "/usr/share/doc/dict-foldoc/copyright",
    "wordnet-copyright.txt": "/usr/share/doc/wordnet-base/copyright",
    "GPL-2.txt": "/usr/share/common-licenses/GPL-2",
    "GFDL-1.2.txt": "/usr/share/common-licenses/GFDL-1.2",
}

# --------------------------------------------------------------------------------------------
# Label -> domain rules (GCIDE field labels). Checked in order; the first match wins, so the
# more specific keys ("eccl. hist", "physiol. chem", "mining") come before general ones
# ("eccl", "physiol", "min"). Each key matches at the start of a word of the normalised label.
# Domains outside the study (economics, business, psychology, "other") map to None.
# --------------------------------------------------------------------------------------------
_LABEL_KEYS: tuple[tuple[str | None, tuple[str, ...]], ...] = (
    ("law", (r"^(?:.*\W)?law\b", "eng. law", "scots law", "civil law", "feudal law", "equity",
             "parliamentary")),
    ("history", ("heraldry", "^her$", "eccl. hist", "eng. hist", "^hist$", "archaeol",
                 "antiquities", "antiq", "myth", "chron", "numismatics")),
    ("chemistry", ("chem", "physiol. chem", "old chem", "biochem", "crystallog", "alchemy")),
    ("medicine", (r"^(?:.*[\s.(])?med(?!iaeval|ieval)", "anat", "surg", "farriery", "^far$",
                  "pharm", "dentistry", "pathol", "veterinary")),
    ("biology", ("zool", "bot", "biol", "physiol", "paleon", "genetics", "nat. hist", "hort",
                 "herpetol", "ichth", "entom", "ornith", "conch", "mycol", "embryol",
                 "microbiol", "bacteriol", "ecol")),
    ("physics", ("physics", "astron", "elec", "mechanics", "optics", "^opt$", "meteor",
                 "magnetism", "acoustics")),
    ("mathematics", ("math", "geom", "alg", "arith", "trig", "statistics", "conic sections")),
    ("computer_science", ("computers", "computer", "programming")),
    # "(Mech.)" in Webster 1913 labels machine parts and tools (dog, hob): engineering.
    ("engineering", (r"^(?:.*[\s.(])?arch(?!ery|aeol)", "mach", "mech", "engin", "mining",
                     "fort", "metal", "carp", "shipbuilding", "aeronautics", "gun", "founding",
                     "steam engine", "railroad", "surveying", "^surv$", "telegraphy", "^teleg$")),
    (None, ("finance", "polit. econ", "banking", "coinage", "com", "stock exchange",
            "bookkeeping", "insurance", "psychol", "phrenology", "^phren$", "psychiatry",
            "psychoanalysis")),
    ("philosophy", ("eccl", "r. c. ch", "r.c.ch", "ch. of eng", "logic", "theol", "metaph",
                    "philos", "scripture", "^script$", "ethics", "hinduism")),
)


def _label_pattern(keys: tuple[str, ...]) -> re.Pattern[str]:
    # Plain keys match at the start of a word ("chem" matches "chemistry"); keys starting with
    # "^" are regular expressions, e.g. "^her$" must be the whole part ("her", not "herpetol").
    alternatives = [k if k.startswith("^") else r"(?:^|(?<=[\s.(]))" + re.escape(k)
                    for k in keys]
    return re.compile("|".join(f"(?:{a})" for a in alternatives))


LABEL_RULES: tuple[tuple[str | None, re.Pattern[str]], ...] = tuple(
    (domain, _label_pattern(keys)) for domain, keys in _LABEL_KEYS
)

# WordNet: a topic synset is mapped to the discipline of the nearest seed lemma on its
# hypernym chain (the topic itself included).
TOPIC_SEEDS: dict[str, str] = {
    **dict.fromkeys(
        ("biology", "botany", "zoology", "genetics", "microbiology", "bacteriology",
         "entomology", "ornithology", "ichthyology", "herpetology", "mycology", "ecology",
         "embryology", "cytology", "physiology", "biochemistry", "molecular_biology",
         "paleontology", "palaeontology", "life_science", "virology", "taxonomy"),
        "biology",
    ),
    **dict.fromkeys(
        ("medicine", "medical_science", "anatomy", "pathology", "surgery", "pharmacology",
         "pharmacy", "dentistry", "immunology", "neurology", "oncology", "obstetrics",
         "ophthalmology", "cardiology", "dermatology", "veterinary_medicine", "nursing",
         "epidemiology", "gynecology", "pediatrics", "radiology", "orthopedics", "urology"),
        "medicine",
    ),
    **dict.fromkeys(
        ("chemistry", "organic_chemistry", "inorganic_chemistry", "physical_chemistry",
         "crystallography", "alchemy", "chemical_science"),
        "chemistry",
    ),
    **dict.fromkeys(
        ("physics", "astronomy", "astrophysics", "optics", "acoustics", "mechanics",
         "thermodynamics", "nuclear_physics", "electromagnetism", "meteorology",
         "quantum_physics", "cosmology", "electricity", "magnetism"),
        "physics",
    ),
    **dict.fromkeys(
        ("engineering", "architecture", "electrical_engineering", "electronics",
         "mechanical_engineering", "civil_engineering", "chemical_engineering", "aeronautics",
         "metallurgy", "mining", "telecommunication", "nuclear_engineering", "rocketry"),
        "engineering",
    ),
    **dict.fromkeys(
        ("computer_science", "computing", "information_science", "artificial_intelligence",
         "computer_technology"),
        "computer_science",
    ),
    **dict.fromkeys(
        ("law", "jurisprudence", "criminal_law", "civil_law", "international_law"), "law"
    ),
    **dict.fromkeys(
        ("history", "archeology", "archaeology", "heraldry", "mythology", "chronology",
         "numismatics"),
        "history",
    ),
    **dict.fromkeys(
        ("philosophy", "logic", "ethics", "metaphysics", "epistemology", "theology",
         "religion"),
        "philosophy",
    ),
    **dict.fromkeys(
        ("mathematics", "math", "maths", "statistics", "geometry", "algebra", "arithmetic",
         "calculus", "trigonometry", "topology", "probability_theory", "number_theory"),
        "mathematics",
    ),
}
# Lexicographer-file fallbacks when a synset has no topic pointer (field 2 of a data line).
LEXFILE_DOMAINS = {5: "biology", 20: "biology", 8: "medicine"}

# Definitions that only point elsewhere carry no meaning of their own.
CROSS_REFERENCE_PREFIXES = (
    "see ", "see under", "same as", "pl. of", "pl ", "obs.", "variant of", "a variant of",
    "alt. of", "imp. of", "p. p. of", "imp. & p. p.", "p. pr. of", "plural of", "superl. of",
    "compar. of", "an obsolete form", "obsolete form", "archaic form", "abbreviation for",
    "abbreviation of", "acronym for", "an abbreviation", "an acronym", "sing. of",
)
MIN_TEXT_WORDS = 3

DIGITS = string.ascii_uppercase + string.ascii_lowercase + string.digits + "+/"


class BuildError(RuntimeError):
    """A source is missing or the built corpus breaks a requirement (one-line message)."""


# --------------------------------------------------------------------------------------------
# dictd
# --------------------------------------------------------------------------------------------
def dictd_int(digits: str) -> int:
    """Decode a dictd index number written in base-64 digits (most significant first).

    Examples
    --------
    >>> dictd_int("B"), dictd_int("BA"), dictd_int("r5iN")
    (1, 64, 11507853)
    """
    try:
        return functools.reduce(lambda n, ch: 64 * n + DIGITS.index(ch), digits, 0)
    except ValueError:
        raise ValueError(f"not a dictd base-64 number: {digits!r}") from None


def read_dictd_articles(index_path: Path, dict_path: Path) -> Iterator[str]:
    """Yield every article of a dictd dictionary once, in file order.

    Several index keys may point at one article: articles are deduplicated on
    ``(offset, length)``; ``00-database…`` / ``00database…`` metadata keys are skipped.
    """
    locations: set[tuple[int, int]] = set()
    for line in index_path.read_text(encoding="utf-8", errors="replace").splitlines():
        fields = line.split("\t")
        if len(fields) < 3 or fields[0].startswith(("00-database", "00database")):
            continue
        locations.add((dictd_int(fields[1]), dictd_int(fields[2])))
    with gzip.open(dict_path, "rb") as stream:  # dictzip is gzip-compatible when read whole
        raw = stream.read()
    for offset, length in sorted(locations):
        chunk = raw[offset : offset + length]
        try:
            yield chunk.decode("utf-8")
        except UnicodeDecodeError:  # a handful of stray Windows-1252 bytes in GCIDE
            yield chunk.decode("cp1252", errors="replace")


# --------------------------------------------------------------------------------------------
# Shared text cleaning
# --------------------------------------------------------------------------------------------
_NAMED_CODES = {
    "imac": "i", "aum": "a", "asl": "a", "add": "a", "udd": "u", "eth": "th", "th": "th",
    "ng": "ng", "ae": "ae", "oe": "oe", "AE": "AE", "OE": "OE", "root": "root", "deg": " deg",
    "sect": "sect.", "yogh": "y", "edh": "th", "thorn": "th", "ait": "a", "ult": "u",
}
_ACCENT_PREFIXED = re.compile(r"\[[\"'`^~=.,\-*]([A-Za-z]{1,2})\]")
_ACCENT_SUFFIXED = re.compile(r"\[([A-Za-z]{1,2})\^\]")
_NAMED_CODE = re.compile(r"\[(" + "|".join(sorted(_NAMED_CODES, key=len, reverse=True)) + r")\]")
_WHITESPACE = re.compile(r"\s+")


def fold_accent_codes(text: str) -> str:
    """Replace GCIDE's bracketed accent codes by plain ASCII letters.

    Examples
    --------
    >>> fold_accent_codes('Zo["o]l. and caf[\\'e] and [ae]ther')
    'Zool. and cafe and aether'
    """
    text = _ACCENT_PREFIXED.sub(r"\1", text)
    text = _ACCENT_SUFFIXED.sub(r"\1", text)
    return _NAMED_CODE.sub(lambda match: _NAMED_CODES[match.group(1)], text)


def squash(text: str) -> str:
    """Collapse runs of whitespace into single spaces and strip the ends."""
    return _WHITESPACE.sub(" ", text).strip()


def is_cross_reference(text: str) -> bool:
    """True for definitions that only send the reader elsewhere (See…, Same as…, Pl. of…).

    Examples
    --------
    >>> is_cross_reference("See under Adventure."), is_cross_reference("Needle ore and more.")
    (True, False)
    """
    lowered = text.lower().lstrip("([ ")
    return lowered.startswith(CROSS_REFERENCE_PREFIXES)


def normalise_label(label: str) -> str:
    """Lower-case a field label, fold accent codes and drop the trailing dot.

    Examples
    --------
    >>> normalise_label('Zo["o]l.'), normalise_label("Chem. & Physics")
    ('zool', 'chem. & physics')
    """
    return squash(fold_accent_codes(label)).lower().rstrip(".").strip()


def domain_of_label(label: str) -> str | None:
    """Map a GCIDE field label to a study domain, or None.

    Compound labels (``Chem. & Physics``) are split on ``&``, ``and``, ``,`` and ``;``; the
    first part that maps to a rule decides.

    Examples
    --------
    >>> domain_of_label("(Zo[\\"o]l.)".strip("()")), domain_of_label("Eccl. Hist.")
    ('biology', 'history')
    >>> domain_of_label("Naut."), domain_of_label("Chem. & Physics")
    (None, 'chemistry')
    """
    normalised = normalise_label(label)
    for part in re.split(r"\s*(?:&|\band\b|,|;)\s*", normalised):
        part = part.strip(" .")
        if not part:
            continue
        for domain, pattern in LABEL_RULES:
            if pattern.search(part):
                if domain is not None:
                    return domain
                break  # an out-of-study field (economics, psychology…): try the next part
    return None


# --------------------------------------------------------------------------------------------
# GCIDE
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sense:
    """One dictionary sense: the unit that becomes a corpus entry or a general-text line."""

    headword: str
    label: str | None  # raw field label, e.g. "Chem." (None when unlabelled)
    definition: str  # cleaned definition without label
    text: str  # "<headword>: <definition>" plus any Note paragraphs


_SOURCE_LINE = re.compile(r"^\s*\[(?:[^\]]*(?:Webster|PJC|WordNet|Century|Sp\.|MW|JC|RN|"
                          r"Chambers|CIDE|Universal|Russell|NRC|Dict)[^\]]*|[A-Z]{2,4})\]\s*$")
_LEADING_LABEL = re.compile(r"^\(([A-Z][^()]{0,60}?)\)\s*[,.:]?\s*")
_TRAILING_LABEL = re.compile(r"\(([A-Z][^()]{0,60}?)\)\s*$")
_NUMBERED = re.compile(r"^(\d{1,2})\.\s+")
_SUBSENSE = re.compile(r"^\(([a-z])\)\s+")
_PHRASE = re.compile(r"^\{([^{}]+)\}\s*(.*)$", re.S)
_AUTHOR_CITE = re.compile(r"\s*--(?=[A-Z(\[])\S.*$")
_DERIVATIVE = re.compile(r"\s--\s*\{[^}]+\},?\s*(?:n|a|adj|adv|v|v\.\s*t|v\.\s*i)\b.*$")
_BRACKET_TAG = re.compile(r"\s*\[[A-Z][^\]]{0,80}\]")  # [Obs.], [Written also …]
_TRAILING_SEE = re.compile(r"(?<=[.;,])\s*\(?(?:See\b|Cf\.|Compare\b)[^.;]*(?:\.[^.;]*){0,3}$")
_SYN_LIST = re.compile(r"\[syn:[^\]]*\]", re.S)


def _clean_unit_text(text: str) -> str:
    text = squash(fold_accent_codes(text))
    text = _SYN_LIST.sub("", text)
    text = _DERIVATIVE.sub("", text)
    text = _AUTHOR_CITE.sub("", text)
    text = text.replace("{", "").replace("}", "")
    return squash(text)


def _definition_of(text: str) -> str:
    """The bare definition: usage tags like ``[Obs.]`` removed, no trailing separator."""
    definition = squash(_BRACKET_TAG.sub("", text))
    return squash(_TRAILING_SEE.sub("", definition)).strip(" ;,")


def _gcide_headword(first_line: str) -> str:
    head = first_line.split(" \\", 1)[0]
    head = squash(fold_accent_codes(head)).strip("'\"`*")
    return head.replace('"', "").replace("*", "").replace("`", "")


def _split_header(lines: list[str]) -> tuple[str, int]:
    """The header (first line plus lines while an etymology bracket is open) and its length."""
    header_lines = [lines[0]]
    depth = lines[0].count("[") - lines[0].count("]")
    n_header = 1
    while depth > 0 and n_header < len(lines) and lines[n_header].strip():
        depth += lines[n_header].count("[") - lines[n_header].count("]")
        header_lines.append(lines[n_header])
        n_header += 1
    return " ".join(line.strip() for line in header_lines), n_header


def _blocks(lines: list[str]) -> list[list[str]]:
    """Paragraphs of an article body; blank lines and source lines end a paragraph."""
    blocks: list[list[str]] = []
    current: list[str] = []
    for line in lines:
        if not line.strip() or _SOURCE_LINE.match(line):
            if current:
                blocks.append(current)
                current = []
        else:
            current.append(line.rstrip())
    if current:
        blocks.append(current)
    return blocks


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _units_of_block(block: list[str]) -> list[str]:
    """Split a paragraph at numbered (``2.``) and lettered (``(b)``) sense markers."""
    units: list[list[str]] = []
    for line in block:
        stripped = line.strip()
        starts_unit = _indent(line) <= 12 and (
            _NUMBERED.match(stripped) or _SUBSENSE.match(stripped)
        )
        if starts_unit or not units:
            units.append([stripped])
        else:
            units[-1].append(stripped)
    return [" ".join(unit) for unit in units]


def parse_gcide_article(article: str) -> list[Sense]:
    """Split one GCIDE article into senses with their field labels.

    Numbered senses, lettered sub-senses (which inherit their parent's label), phrase
    sub-entries ``{Bill of exchange} (Com.), …`` (own headword and label) and the unnumbered
    definition of single-sense entries are units; ``Note:`` paragraphs are appended to the
    previous unit's text; ``Syn.`` blocks and indented quotations are dropped. A leading
    ``(Label)`` on a unit overrides the header label. Cross-references and texts under three
    words are dropped.

    Examples
    --------
    >>> article = '''Elaiometer \\\\E`lai*om"e*ter\\\\, n. [Gr. ? olive oil + -meter.]
    ...    (Chem.)
    ...    An apparatus for determining the amount of oil contained in
    ...    any substance. --Ure.
    ...    [1913 Webster]
    ... '''
    >>> sense, = parse_gcide_article(article)
    >>> sense.headword, sense.label, sense.text
    ('Elaiometer', 'Chem.', 'Elaiometer: An apparatus for determining the amount of oil contained in any substance.')
    """  # noqa: E501
    lines = article.replace("\r", "").split("\n")
    while lines and not lines[0].strip():
        lines.pop(0)
    if not lines:
        return []
    headword = _gcide_headword(lines[0])
    header, n_header = _split_header(lines)
    header_without_etymology = re.sub(r"\[[^\]]*\]", " ", fold_accent_codes(header))
    trailing = _TRAILING_LABEL.search(header_without_etymology.strip())
    header_label = trailing.group(1) if trailing else None

    senses: list[Sense] = []
    parent_label = header_label
    phrase_headword: str | None = None
    phrase_label: str | None = None
    body_started = False

    def emit(unit_headword: str, label: str | None, raw_text: str) -> None:
        if not unit_headword or _NUMBERED.match(unit_headword):
            return  # a mis-split line, not a headword
        text = _clean_unit_text(raw_text)
        definition = _definition_of(text)
        if len(definition.split()) < MIN_TEXT_WORDS or is_cross_reference(definition):
            return
        senses.append(Sense(unit_headword, label, definition, f"{unit_headword}: {text}"))

    for block in _blocks(lines[n_header:]):
        first = block[0]
        stripped_first = first.strip()
        if stripped_first.startswith("Syn."):
            continue
        if stripped_first.startswith("Note:"):
            if senses:  # notes are LM text only: they extend the previous sense's text
                note = _clean_unit_text(" ".join(line.strip() for line in block))
                last = senses[-1]
                senses[-1] = Sense(last.headword, last.label, last.definition,
                                   f"{last.text} {note}")
            continue
        is_marker = bool(_NUMBERED.match(stripped_first) or _SUBSENSE.match(stripped_first))
        if _indent(first) >= 8 and not is_marker:
            continue  # an indented quotation
        phrase = _PHRASE.match(" ".join(line.strip() for line in block))
        if phrase and not is_marker:
            # A phrase sub-entry: own headword, own label, else the header's.
            phrase_headword = _gcide_headword(phrase.group(1)).strip(" .,")
            # Lettered sub-senses of the phrase sit on their own lines of the same block.
            units = _units_of_block(block)
            first_unit = _PHRASE.match(units[0])
            units[0] = first_unit.group(2).lstrip(" .,") if first_unit else units[0]
            own = _LEADING_LABEL.match(units[0])
            phrase_label = own.group(1) if own else header_label
            units[0] = units[0][own.end():] if own else units[0]
            for unit in units:
                sub = _SUBSENSE.match(unit)
                text = unit[sub.end():] if sub else unit
                sub_own = _LEADING_LABEL.match(text)
                label = sub_own.group(1) if sub_own else phrase_label
                text = text[sub_own.end():] if sub_own else text
                if text.strip():
                    emit(phrase_headword, label, text)
            continue
        phrase_headword = None
        for unit in _units_of_block(block):
            numbered = _NUMBERED.match(unit)
            sub = _SUBSENSE.match(unit)
            text = unit[numbered.end():] if numbered else unit[sub.end():] if sub else unit
            own = _LEADING_LABEL.match(text)
            text = text[own.end():] if own else text
            if sub:
                label = own.group(1) if own else parent_label
            else:
                label = own.group(1) if own else header_label
                parent_label = label
                if not body_started and own and not text.strip():
                    header_label = label  # a label on its own line right after the header
            body_started = True
            if text.strip():
                emit(headword, label, text)
    return senses


def read_gcide_senses(index_path: Path, dict_path: Path) -> list[Sense]:
    """Every sense of every GCIDE article, in file order."""
    senses: list[Sense] = []
    for article in read_dictd_articles(index_path, dict_path):
        senses.extend(parse_gcide_article(article))
    return senses


# --------------------------------------------------------------------------------------------
# FOLDOC
# --------------------------------------------------------------------------------------------
_FOLDOC_TAGS = re.compile(r"^<([^<>]*)>\s*")
_FOLDOC_DATE = re.compile(r"\(\d{4}-\d{2}-\d{2}\)\s*$")
_FOLDOC_URL = re.compile(r"\{?\(?(?:https?|ftp|mailto|news|telnet|gopher):[^\s{}]*\)?\}?")


def _clean_foldoc(text: str) -> str:
    text = _FOLDOC_URL.sub("", text)
    text = text.replace("{", "").replace("}", "")
    text = re.sub(r"\(\s*\)", "", text)
    return squash(text)


def parse_foldoc_article(article: str) -> Sense | None:
    """Parse one FOLDOC article: headword, definition (first paragraph) and whole-article text.

    Examples
    --------
    >>> article = '''AMD Am2910
    ...
    ...    <processor> An {address sequencer} from {Advanced Micro
    ...    Devices}.
    ...
    ...    (1994-11-16)
    ... '''
    >>> parse_foldoc_article(article)
    Sense(headword='AMD Am2910', label='processor', definition='An address sequencer from Advanced Micro Devices.', text='AMD Am2910: An address sequencer from Advanced Micro Devices.')
    """  # noqa: E501
    lines = article.replace("\r", "").split("\n")
    while lines and not lines[0].strip():
        lines.pop(0)
    if not lines:
        return None
    headword = squash(lines[0])
    paragraphs: list[str] = []
    current: list[str] = []
    in_body = False
    for line in lines[1:]:
        if not line.strip():
            if current:
                paragraphs.append(" ".join(current))
                current = []
            in_body = True
            continue
        if in_body:  # lines before the first blank line are alternative headwords
            current.append(line.strip())
    if current:
        paragraphs.append(" ".join(current))
    paragraphs = [p for p in paragraphs if not _FOLDOC_DATE.fullmatch(p.strip())]
    if not paragraphs:
        return None
    first = squash(paragraphs[0])
    tags = _FOLDOC_TAGS.match(first)
    label = tags.group(1) if tags else None
    first = first[tags.end():] if tags else first
    definition = _clean_foldoc(first)
    if len(definition.split()) < 4 or is_cross_reference(definition):
        return None
    body = " ".join([definition, *(_clean_foldoc(p) for p in paragraphs[1:])])
    return Sense(headword, label, definition, f"{headword}: {squash(body)}")


def read_foldoc_senses(index_path: Path, dict_path: Path) -> list[Sense]:
    """Every usable FOLDOC article (all of them computer science)."""
    senses = []
    for article in read_dictd_articles(index_path, dict_path):
        sense = parse_foldoc_article(article)
        if sense is not None:
            senses.append(sense)
    return senses


# --------------------------------------------------------------------------------------------
# WordNet
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Synset:
    """The parts of a WordNet 3.0 ``data.*`` line that the corpus needs."""

    key: str  # "<offset><pos>", e.g. "06556692n"
    lexfile: int
    lemmas: tuple[str, ...]
    hypernyms: tuple[str, ...]
    topics: tuple[str, ...]
    gloss: str


def parse_wordnet_line(line: str) -> Synset | None:
    """Parse one line of a WordNet ``data.*`` file (None for licence lines).

    Examples
    --------
    >>> line = ("06556692 10 n 02 summons 0 process 0 002 @ 06552984 n 0000 "
    ...         ";c 08441203 n 0000 | a writ issued by authority of law")
    >>> synset = parse_wordnet_line(line)
    >>> synset.key, synset.lemmas, synset.hypernyms, synset.topics
    ('06556692n', ('summons', 'process'), ('06552984n',), ('08441203n',))
    """
    if line.startswith("  ") or not line.strip():
        return None
    data, _, gloss = line.partition(" | ")
    fields = data.split()
    offset, lexfile, ss_type = fields[0], int(fields[1]), fields[2]
    pos = "a" if ss_type == "s" else ss_type
    n_words = int(fields[3], 16)
    lemmas = tuple(
        re.sub(r"\([a-z]+\)$", "", fields[4 + 2 * i]) for i in range(n_words)
    )
    cursor = 4 + 2 * n_words
    n_pointers = int(fields[cursor])
    cursor += 1
    hypernyms: list[str] = []
    topics: list[str] = []
    for _ in range(n_pointers):
        symbol, target, target_pos = fields[cursor], fields[cursor + 1], fields[cursor + 2]
        target_pos = "a" if target_pos == "s" else target_pos
        if symbol in ("@", "@i"):
            hypernyms.append(target + target_pos)
        elif symbol == ";c":
            topics.append(target + target_pos)
        cursor += 4
    return Synset(offset + pos, lexfile, lemmas, tuple(hypernyms), tuple(topics), gloss.strip())


def read_wordnet(paths: Iterable[Path]) -> dict[str, Synset]:
    """All synsets of the given ``data.*`` files keyed by ``<offset><pos>``."""
    synsets: dict[str, Synset] = {}
    for path in paths:
        with open(path, encoding="latin-1") as stream:
            for line in stream:
                synset = parse_wordnet_line(line.rstrip("\n"))
                if synset is not None:
                    synsets[synset.key] = synset
    return synsets


def topic_domain(topic_key: str, synsets: dict[str, Synset], max_depth: int = 8) -> str | None:
    """The discipline of a topic synset: the nearest seed lemma on its hypernym chain."""
    frontier = [topic_key]
    seen: set[str] = set()
    for _ in range(max_depth + 1):
        next_frontier: list[str] = []
        for key in frontier:
            if key in seen or key not in synsets:
                continue
            seen.add(key)
            synset = synsets[key]
            for lemma in synset.lemmas:
                domain = TOPIC_SEEDS.get(lemma.lower())
                if domain is not None:
                    return domain
            next_frontier.extend(synset.hypernyms)
        if not next_frontier:
            return None
        frontier = next_frontier
    return None


_WORDNET_DOMAIN_PREFIX = re.compile(r"^\((?:[a-z][a-z .'-]{1,40})\)\s*")


def wordnet_senses(synsets: dict[str, Synset]) -> list[tuple[str, Sense]]:
    """(domain, sense) for every synset with a study domain, in offset order.

    A synset's own topic pointer decides (topics are not inherited down the hypernym tree:
    that is noisy); the lexicographer-file fallbacks apply only without a mapped topic.
    """
    topic_cache: dict[str, str | None] = {}
    labelled: list[tuple[str, Sense]] = []
    for key in sorted(synsets):
        synset = synsets[key]
        domain = None
        for topic in synset.topics:
            if topic not in topic_cache:
                topic_cache[topic] = topic_domain(topic, synsets)
            domain = topic_cache[topic]
            if domain is not None:
                break
        if domain is None and key.endswith("n"):
            domain = LEXFILE_DOMAINS.get(synset.lexfile)
        if domain is None:
            continue
        headword = synset.lemmas[0].replace("_", " ")
        # The "(law)" prefix would give the domain away, in MCQ items and in routing text.
        gloss = _WORDNET_DOMAIN_PREFIX.sub("", squash(synset.gloss))
        definition = squash(gloss.split('; "', 1)[0]).rstrip(" ;")
        if len(definition.split()) < MIN_TEXT_WORDS:
            continue
        labelled.append((domain, Sense(headword, None, definition, f"{headword}: {gloss}")))
    return labelled


# --------------------------------------------------------------------------------------------
# Assembly
# --------------------------------------------------------------------------------------------
def _sha1(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _entry(source: str, domain: str, sense: Sense) -> dict[str, str]:
    # The id hashes what the entry says, so it survives rebuilds and reorderings.
    entry_id = f"{source}-{_sha1(f'{source}|{sense.headword}|{sense.definition}')[:12]}"
    return {
        "entry_id": entry_id,
        "headword": sense.headword,
        "domain": domain,
        "source": source,
        "split": split_of_headword(sense.headword),
        "text": sense.text,
        "definition": sense.definition,
    }


def assemble_entries(
    gcide: list[Sense], foldoc: list[Sense], wordnet: list[tuple[str, Sense]]
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Labelled entries (capped per domain, sorted) and general-text rows (train headwords only)."""
    candidates: list[dict[str, str]] = []
    general: list[dict[str, str]] = []
    for sense in gcide:
        domain = domain_of_label(sense.label) if sense.label else None
        if domain is None:
            if split_of_headword(sense.headword) == "train":
                general.append({"headword": sense.headword, "text": sense.text})
        else:
            candidates.append(_entry("gcide", domain, sense))
    candidates.extend(_entry("foldoc", "computer_science", sense) for sense in foldoc)
    candidates.extend(_entry("wordnet", domain, sense) for domain, sense in wordnet)

    # One entry per (domain, headword, definition): GCIDE repeats senses under variant keys.
    unique: dict[tuple[str, str, str], dict[str, str]] = {}
    for entry in candidates:
        key = (entry["domain"], normalise_headword(entry["headword"]),
               entry["definition"].casefold())
        unique.setdefault(key, entry)
    by_domain: dict[str, list[dict[str, str]]] = defaultdict(list)
    for entry in unique.values():
        by_domain[entry["domain"]].append(entry)
    entries: list[dict[str, str]] = []
    for domain in DOMAINS:
        pool = sorted(by_domain.get(domain, []), key=lambda e: _sha1(e["entry_id"]))
        entries.extend(pool[:MAX_ENTRIES_PER_DOMAIN])
    entries.sort(key=lambda e: (DOMAINS.index(e["domain"]), e["split"],
                                normalise_headword(e["headword"]), e["entry_id"]))
    seen_texts: set[str] = set()
    deduplicated_general = []
    for row in general:
        if row["text"] not in seen_texts:
            seen_texts.add(row["text"])
            deduplicated_general.append(row)
    return entries, deduplicated_general


def _jsonl_gz(rows: Iterable[dict[str, str]]) -> bytes:
    payload = "".join(
        json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in rows
    ).encode("utf-8")
    return gzip.compress(payload, compresslevel=9, mtime=0)  # mtime=0: byte-identical rebuilds


def cap_general_rows(
    rows: list[dict[str, str]], budget_bytes: int
) -> tuple[list[dict[str, str]], bytes]:
    """Keep a hash-ordered prefix of the general rows whose compressed file fits the budget."""
    ordered = sorted(rows, key=lambda row: _sha1(row["text"]))
    n_keep = len(ordered)
    while True:
        kept = sorted(ordered[:n_keep], key=lambda row: (normalise_headword(row["headword"]),
                                                         row["text"]))
        blob = _jsonl_gz(kept)
        if len(blob) <= budget_bytes or n_keep == 0:
            return kept, blob
        # Shrink proportionally, with a 2 % margin, until it fits.
        n_keep = int(n_keep * budget_bytes / len(blob) * 0.98)


def _atomic_write(path: Path, payload: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(payload)


def locate_sources() -> dict[str, dict[str, Path]]:
    """Find every source file through ``dpkg -L``; one clear error if a package is absent."""
    located: dict[str, dict[str, Path]] = {}
    for package, names in SOURCE_FILES.items():
        try:
            listing = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True,
                                     check=False)
        except FileNotFoundError:
            raise BuildError(
                f"dpkg not found: the corpus builds from Debian packages {', '.join(PACKAGES)}"
            ) from None
        paths = {Path(line).name: Path(line) for line in listing.stdout.splitlines()}
        missing = [name for name in names if name not in paths or not paths[name].is_file()]
        if listing.returncode != 0 or missing:
            raise BuildError(
                f"package {package} is not installed (missing {', '.join(missing)}); "
                f"install it with: apt-get install -y --no-install-recommends {package}"
            )
        located[package] = {name: paths[name] for name in names}
    return located


def package_version(package: str) -> str:
    """The installed Debian version of a package."""
    result = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package],
                            capture_output=True, text=True, check=True)
    return result.stdout.strip()


def _counts(entries: list[dict[str, str]]) -> dict[str, dict[str, dict[str, int]]]:
    counts: dict[str, dict[str, dict[str, int]]] = {}
    for domain in DOMAINS:
        counts[domain] = {split: {"entries": 0, "tokens": 0}
                          for split in ("train", "validation", "test")}
    for entry in entries:
        cell = counts[entry["domain"]][entry["split"]]
        cell["entries"] += 1
        cell["tokens"] += len(entry["text"].split())
    return counts


def _readme(provenance: dict) -> str:
    rows = []
    for domain, splits in provenance["counts"].items():
        n_entries = sum(cell["entries"] for cell in splits.values())
        n_tokens = sum(cell["tokens"] for cell in splits.values())
        rows.append(f"| {domain} | {n_entries:,} | {n_tokens:,} | "
                    + " / ".join(f"{splits[s]['entries']:,}" for s in splits) + " |")
    packages = ", ".join(f"`{p}` {v}" for p, v in provenance["packages"].items())
    return f"""# The embedded domain corpus

Generated by `python -m moecollab.build.corpus`; do not edit by hand.

| file | what |
|---|---|
| `corpus.jsonl.gz` | labelled dictionary entries, one JSON object a line: `entry_id`, `headword`, \
`domain`, `source` (gcide, foldoc, wordnet), `split` (train, validation, test: by a hash of \
the headword), `text` (language-model text), `definition` (bare definition for MCQ items) |
| `general.jsonl.gz` | unlabelled GCIDE senses (`headword`, `text`), train-split headwords \
only: extra language-model text |
| `PROVENANCE.json` | package versions, sha256 of every source and output file, counts per \
domain and split, rules version |
| `LICENSES/` | the licence notices of the sources |

Sources: {packages}.

- GCIDE (Webster 1913 and later additions): senses whose field label, such as `(Chem.)`, maps
  to a domain (rules in `moecollab.build.corpus.LABEL_RULES`).
- FOLDOC: every article is computer science (the whole cleaned article is the text).
- Princeton WordNet 3.0: synsets with a topic pointer whose topic leads to a discipline, and the
  `noun.animal`, `noun.plant` (biology) and `noun.body` (medicine) lexicographer files.

Each domain keeps at most {MAX_ENTRIES_PER_DOMAIN:,} entries (chosen by hash). Judgement calls:
religion counts as philosophy; mythology, heraldry and archaeology as history; architecture,
fortification and Webster's `(Mech.)` (machine parts and tools) as engineering; mineralogy,
geology, nautical, music and military labels are left out; psychology and economics have fewer
than 800 entries in these sources and are left out.

| domain | entries | whitespace tokens | train / validation / test entries |
|---|---|---|---|
{chr(10).join(rows)}

Licences: GCIDE is GPL-2+ (so these derived files are GPL-2+), FOLDOC is under the GNU FDL 1.1
or later with no invariant sections, WordNet 3.0 under the Princeton WordNet licence; the
notices are in `LICENSES/`.

Rebuild (Debian/Ubuntu):

```
apt-get install -y --no-install-recommends {' '.join(PACKAGES)}
python -m moecollab.build.corpus            # writes data/
python -m moecollab.build.corpus --check    # rebuilds in a temporary folder, compares hashes
```
"""


def build_corpus(out_dir: Path) -> dict:
    """Build every file of the corpus into ``out_dir`` and return the provenance record."""
    sources = locate_sources()
    logger.info("reading GCIDE")
    gcide_files = sources["dict-gcide"]
    gcide = read_gcide_senses(gcide_files["gcide.index"], gcide_files["gcide.dict.dz"])
    logger.info("reading FOLDOC")
    foldoc_files = sources["dict-foldoc"]
    foldoc = read_foldoc_senses(foldoc_files["foldoc.index"], foldoc_files["foldoc.dict.dz"])
    logger.info("reading WordNet")
    synsets = read_wordnet(sources["wordnet-base"].values())
    wordnet = wordnet_senses(synsets)

    entries, general = assemble_entries(gcide, foldoc, wordnet)
    counts = _counts(entries)
    for domain, splits in counts.items():
        n_entries = sum(cell["entries"] for cell in splits.values())
        if n_entries < MIN_ENTRIES_PER_DOMAIN:
            raise BuildError(f"domain {domain!r} has only {n_entries} entries "
                             f"(need at least {MIN_ENTRIES_PER_DOMAIN})")
        empty = [split for split, cell in splits.items() if cell["entries"] == 0]
        if empty:
            raise BuildError(f"domain {domain!r} has empty split(s): {', '.join(empty)}")

    corpus_blob = _jsonl_gz(entries)
    general, general_blob = cap_general_rows(
        general, MAX_TOTAL_COMPRESSED_BYTES - len(corpus_blob)
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write(out_dir / CORPUS_FILENAME, corpus_blob)
    _atomic_write(out_dir / GENERAL_FILENAME, general_blob)
    license_dir = out_dir / "LICENSES"
    for name, source in LICENSE_FILES.items():
        if Path(source).is_file():
            _atomic_write(license_dir / name, Path(source).read_bytes())

    outputs = {CORPUS_FILENAME: hashlib.sha256(corpus_blob).hexdigest(),
               GENERAL_FILENAME: hashlib.sha256(general_blob).hexdigest()}
    for path in sorted(license_dir.iterdir()):
        outputs[f"LICENSES/{path.name}"] = _sha256_file(path)
    provenance = {
        "rules_version": RULES_VERSION,
        "packages": {package: package_version(package) for package in PACKAGES},
        "sources": {
            str(path): _sha256_file(path)
            for files in sources.values() for path in files.values()
        },
        "parameters": {
            "max_entries_per_domain": MAX_ENTRIES_PER_DOMAIN,
            "max_total_compressed_bytes": MAX_TOTAL_COMPRESSED_BYTES,
            "split_ratios": {"train": 0.8, "validation": 0.1, "test": 0.1},
        },
        "counts": counts,
        "general": {"entries": len(general),
                    "tokens": sum(len(row["text"].split()) for row in general)},
        "outputs": outputs,
    }
    readme = _readme(provenance)
    _atomic_write(out_dir / "README.md", readme.encode("utf-8"))
    provenance["outputs"]["README.md"] = hashlib.sha256(readme.encode("utf-8")).hexdigest()
    _atomic_write(out_dir / PROVENANCE_FILENAME,
                  (json.dumps(provenance, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    for domain, splits in counts.items():
        logger.info("%-17s %6d entries %8d tokens", domain,
                    sum(c["entries"] for c in splits.values()),
                    sum(c["tokens"] for c in splits.values()))
    return provenance


def check_corpus(data_dir: Path) -> list[str]:
    """Compare ``data_dir`` with its ``PROVENANCE.json`` and with a rebuild in a temporary folder.

    Returns
    -------
    list of str
        One line per difference (edited file, changed source, package version or output);
        empty when everything matches.
    """
    provenance_path = data_dir / PROVENANCE_FILENAME
    if not provenance_path.is_file():
        raise BuildError(f"no {provenance_path}: build the corpus first")
    committed = json.loads(provenance_path.read_text(encoding="utf-8"))
    problems = []
    # The files on disk must match their own provenance (catches hand edits) ...
    for name, recorded in sorted(committed.get("outputs", {}).items()):
        path = data_dir / name
        actual = _sha256_file(path) if path.is_file() else "missing"
        if actual != recorded:
            problems.append(f"file {name}: PROVENANCE.json says {recorded[:12]}, "
                            f"file has {actual[:12]}")
    # ... and a rebuild from the installed packages must reproduce that provenance.
    with tempfile.TemporaryDirectory() as tmp:
        rebuilt = build_corpus(Path(tmp))
    for section in ("sources", "outputs"):
        for name in sorted(set(committed.get(section, {})) | set(rebuilt[section])):
            old, new = committed.get(section, {}).get(name), rebuilt[section].get(name)
            if old != new:
                problems.append(f"{section[:-1]} {name}: committed {str(old)[:12]}, "
                                f"rebuilt {str(new)[:12]}")
    for name in ("packages", "rules_version"):
        if committed.get(name) != rebuilt[name]:
            problems.append(f"{name}: committed {committed.get(name)}, rebuilt {rebuilt[name]}")
    return problems


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        prog="python -m moecollab.build.corpus",
        description="Build the domain corpus from installed Debian dictionary packages.",
    )
    parser.add_argument("--out", type=Path, default=DATA_DIR,
                        help=f"output folder (default: {DATA_DIR})")
    parser.add_argument("--check", action="store_true",
                        help="rebuild in a temporary folder and compare with PROVENANCE.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.check:
            problems = check_corpus(args.out)
            if problems:
                print(f"corpus in {args.out} does not match its provenance or a rebuild:",
                      file=sys.stderr)
                for problem in problems:
                    print(f"  {problem}", file=sys.stderr)
                return 1
            print(f"corpus in {args.out} matches a rebuild from the installed packages")
            return 0
        provenance = build_corpus(args.out)
    except BuildError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    total = Counter()
    for splits in provenance["counts"].values():
        for cell in splits.values():
            total.update(cell)
    sizes = {name: (args.out / name).stat().st_size for name in (CORPUS_FILENAME,
                                                                 GENERAL_FILENAME)}
    print(f"wrote {args.out}: {total['entries']:,} labelled entries ({total['tokens']:,} tokens),"
          f" {provenance['general']['entries']:,} general senses; "
          + ", ".join(f"{name} {size / 1e6:.2f} MB" for name, size in sizes.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
