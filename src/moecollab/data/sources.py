"""Which text each stage reads, by ``data_source``: the embedded corpus or the paper's data.

Three readers, one per role, each returning the same layout for either source (entries with
``entry_id``, ``domain``, ``split`` and ``text``; items as :func:`moecollab.data.make_mcq_items`
makes them):

- :func:`analysis_entries` (stage 01): the text whose routing is captured;
- :func:`calibration_entries` (stage 05): the text every pruning method calibrates on, and the
  fields the per-field masks are made for;
- :func:`evaluation_data` (stage 06): multiple-choice items and perplexity texts per field.

The embedded items are made once, in stage 00, and kept in its folder: :func:`write_items`
writes them there and :func:`read_items` reads them back (checking their columns), so no later
stage names stage 00's files.

``embedded`` is this study's dictionary corpus (:mod:`moecollab.data.corpus`), ``paper`` the
paper's MMLU-Pro and MMLU (:mod:`moecollab.data.paper`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from ..artifacts import Manifest, write_table
from . import paper
from .corpus import DOMAINS, SPLITS, check_domain_names, load_corpus
from .word_cloze import make_word_cloze_items

DATA_SOURCES = ("embedded", "paper")
#: Kinds of multiple-choice items (stage 06's ``item_families``): ``mcq`` asks for a term's
#: definition, ``cloze`` for the word that finishes a held-out definition in its field (options
#: from other fields), ``word`` for that word among words of the same field
#: (:mod:`moecollab.data.word_cloze`, made here from the ``cloze`` items).
ITEM_FAMILIES = ("mcq", "cloze", "word")
#: Stage 00's file of each family of embedded items (``word`` items are made from ``cloze``).
ITEM_FILES = {"mcq": "mcq_items.parquet", "cloze": "cloze_items.parquet"}
#: The columns every item has (what lm-eval's task files and the bootstrap clusters read);
#: cloze items also keep their entry's own corpus split.
ITEM_COLUMNS = ("item_id", "domain", "split", "question", "choices", "answer", "entry_id")
_FAMILY_COLUMNS = {"mcq": ITEM_COLUMNS, "cloze": (*ITEM_COLUMNS, "entry_split")}
#: Corpus splits named by stage 01's ``split`` parameter beyond the three real ones.
#: ``held_out`` is also what stage 06 evaluates (``moecollab.data.cloze.EVALUATED_SPLITS``).
SPLIT_GROUPS = {"held_out": ("validation", "test"), "all": SPLITS}


def _check(data_source: str) -> None:
    if data_source not in DATA_SOURCES:
        raise ValueError(f"data_source must be one of {', '.join(DATA_SOURCES)}; "
                         f"got {data_source!r}")


def analysis_entries(data_source: str, *, domains: Sequence[str], split: str = "held_out",
                     paper_data_dir: str = "",
                     cache_dir: str | os.PathLike | None = None) -> pd.DataFrame:
    """The entries stage 01 captures.

    ``embedded``: the corpus entries of ``domains`` in ``split`` (``train``, ``validation``,
    ``test``, ``held_out`` or ``all``). ``paper``: the analysed share of MMLU-Pro's questions of
    ``domains`` (``split`` does not apply: held-out questions are kept for evaluation).
    """
    _check(data_source)
    if data_source == "paper":
        mmlu_pro = paper.load_mmlu_pro(paper_data_dir, cache_dir=_required(cache_dir))
        return paper.analysis_entries(mmlu_pro, domains)
    corpus = load_corpus(domains=list(domains))
    return corpus[corpus["split"].isin(SPLIT_GROUPS.get(split, (split,)))]


def study_fields(model_folder: str | os.PathLike) -> list[str] | None:
    """The corpus fields of the study: stage 00's ``domains``, read from its manifest.

    Stage 00 trains on (and checks routing with) these fields and stage 01 captures them, so
    stages 05 and 06 calibrate and evaluate on the same ones. None when the manifest does not
    record them (artifacts written before the parameter existed): every field.
    """
    fields = Manifest.load(model_folder).parameters.get("domains")
    return list(fields) if fields else None


def _check_item_family(family: str) -> None:
    if family not in ITEM_FILES:
        raise ValueError(f"family must be one of {', '.join(ITEM_FILES)} (the families stage "
                         f"00 writes); got {family!r}")


def _check_item_columns(items: pd.DataFrame, family: str, where: str) -> None:
    missing = [column for column in _FAMILY_COLUMNS[family] if column not in items.columns]
    if missing:
        raise ValueError(f"{where} lacks column(s) {', '.join(missing)} of {family} items; "
                         f"expected {', '.join(_FAMILY_COLUMNS[family])}")


def write_items(model_folder: str | os.PathLike, family: str, items: pd.DataFrame) -> Path:
    """Write stage 00's items of ``family`` (``mcq`` or ``cloze``) into its folder, atomically.

    ``items`` must have :data:`ITEM_COLUMNS` (cloze items also ``entry_split``), as
    :func:`moecollab.data.make_mcq_items` and :func:`moecollab.data.make_cloze_items` make
    them; the file is Parquet, written as :func:`moecollab.artifacts.write_table` writes it.
    Returns its path.
    """
    _check_item_family(family)
    _check_item_columns(items, family, f"{family} items")
    return write_table(Path(model_folder) / ITEM_FILES[family], items)


def read_items(model_folder: str | os.PathLike, family: str,
               columns: Sequence[str] | None = None) -> pd.DataFrame:
    """The items of ``family`` (``mcq`` or ``cloze``) that stage 00 wrote in ``model_folder``.

    All columns, or only ``columns``. Raises FileNotFoundError (naming stage 00) when the file
    is missing and ValueError when it lacks a column every item of the family has.
    """
    _check_item_family(family)
    path = Path(model_folder) / ITEM_FILES[family]
    if not path.is_file():
        raise FileNotFoundError(f"no {ITEM_FILES[family]} in {model_folder}; run stage 00_model")
    items = pd.read_parquet(path)
    _check_item_columns(items, family, str(path))
    return items if columns is None else items[list(columns)]


def evaluated_entry_splits(model_folder: str | os.PathLike) -> set[str]:
    """The corpus splits of the entries that stage 00's cloze items ask about.

    Stage 06 evaluates on these items, so stage 05 must not calibrate on those splits. Empty
    when stage 00 wrote no cloze items (artifacts from before they existed).
    """
    if not (Path(model_folder) / ITEM_FILES["cloze"]).is_file():
        return set()
    return set(read_items(model_folder, "cloze", columns=["entry_split"])["entry_split"])


def _fields_of(fields: Sequence[str] | None) -> list[str]:
    """``fields`` (default every field of the corpus), sorted by name, each checked by the
    corpus's own check of field names (``load_corpus`` holds every one of them)."""
    return sorted(set(DOMAINS if fields is None else check_domain_names(fields)))


def calibration_entries(data_source: str, *, split: str = "validation",
                        paper_data_dir: str = "", cache_dir: str | os.PathLike | None = None,
                        fields: Sequence[str] | None = None
                        ) -> tuple[pd.DataFrame, list[str]]:
    """The calibration entries of stage 05 and the fields of its per-field masks.

    ``embedded``: the corpus's ``split`` in ``fields`` (default: every field; the stages pass
    the study's, `study_fields`). ``paper``: MMLU's questions of the paper's five fields,
    without those MMLU-Pro holds out for evaluation (``fields`` does not apply).
    """
    _check(data_source)
    if data_source == "paper":
        cache_dir = _required(cache_dir)
        mmlu_pro = paper.load_mmlu_pro(paper_data_dir, cache_dir=cache_dir)
        mmlu = paper.load_mmlu(paper_data_dir, cache_dir=cache_dir)
        return paper.calibration_entries(mmlu, mmlu_pro), list(paper.FIELDS)
    corpus = load_corpus()
    chosen = _fields_of(fields)
    return corpus[(corpus["split"] == split) & corpus["domain"].isin(chosen)], chosen


def evaluation_data(data_source: str, *, model_folder: str | os.PathLike | None = None,
                    n_perplexity_entries: int, seed: int = 0, paper_data_dir: str = "",
                    cache_dir: str | os.PathLike | None = None,
                    families: Sequence[str] = ("mcq",),
                    fields: Sequence[str] | None = None
                    ) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """Stage 06's multiple-choice items and, per field, the texts whose perplexity it measures.

    ``embedded``: the items of each family in ``families`` that stage 00 wrote in
    ``model_folder`` (:func:`read_items`): ``mcq`` (term to definition), ``cloze`` (field
    cloze) and ``word`` (word cloze, made from the cloze items with options of the same field,
    seeded by ``seed``), and the corpus's test entries. ``paper``: MMLU-Pro's held-out
    questions, as ``mcq`` items (split ``test``) and, with their options, as texts
    (``model_folder`` does not apply). Items carry a ``family`` column. ``fields`` (embedded;
    default every field) restricts items and texts to the study's fields (`study_fields`).
    """
    _check(data_source)
    if isinstance(families, str) or not families:
        raise ValueError(f"families must be a non-empty list of item families; got {families!r}")
    unknown = sorted(set(families) - set(ITEM_FAMILIES))
    if unknown:
        raise ValueError(f"unknown item families {unknown}; choose from {list(ITEM_FAMILIES)}")
    if data_source == "paper":
        if list(families) != ["mcq"]:
            raise ValueError("data_source 'paper' has multiple-choice questions only: "
                             "families must be ['mcq']")
        mmlu_pro = paper.load_mmlu_pro(paper_data_dir, cache_dir=_required(cache_dir))
        return (paper.evaluation_items(mmlu_pro).assign(family="mcq"),
                paper.evaluation_texts(mmlu_pro, n_perplexity_entries, seed=seed))
    if model_folder is None:
        raise ValueError("data_source 'embedded' needs model_folder (stage 00's folder, which "
                         "holds the items)")
    tables = []
    for family in families:
        table = read_items(model_folder, "cloze" if family == "word" else family)
        if family == "word":
            n_choices = int(table["choices"].map(len).max())
            table = make_word_cloze_items(table, n_choices=n_choices, seed=seed)
        tables.append(table.assign(family=family))
    items = pd.concat(tables, ignore_index=True)
    corpus = load_corpus()
    chosen = _fields_of(fields)
    items = items[items["domain"].isin(chosen)].reset_index(drop=True)
    held_out = corpus[corpus["split"] == "test"].sample(frac=1.0, random_state=seed)
    held_out = held_out[held_out["domain"].isin(chosen)]
    texts = {domain: rows["text"].head(n_perplexity_entries).tolist()
             for domain, rows in held_out.groupby("domain")}
    return items, texts


def _required(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is None:
        raise ValueError("data_source 'paper' needs cache_dir (the profile's cache folder)")
    return Path(cache_dir)
