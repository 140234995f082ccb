"""The paper's data: MMLU-Pro's five fields for analysis and evaluation, MMLU for calibration.

Tang et al. mine collaboration patterns on 2,812 MMLU-Pro questions (``TIGER-Lab/MMLU-Pro``,
MIT licence) from math, computer science, physics, law and psychology, and calibrate pruning on
128 MMLU samples (``cais/mmlu``, MIT licence) of 2,048 tokens. This module reads both through
``datasets`` (from the hub, or from local copies of their Parquet files) and lays them out like
the embedded corpus, so that stages 01, 05 and 06 can use them with ``data_source: paper``:

- every question becomes one entry whose text is the question followed by its options, one per
  line (``A. …``), as the paper feeds them; the answer is not part of the text;
- MMLU-Pro's categories and MMLU's subjects map to the study's field names (:data:`FIELDS`);
  MMLU subjects are grouped by MMLU's own subcategories (math, computer science, physics, law,
  psychology), the other subjects are not used;
- MMLU-Pro questions are split by a hash of ``question_id``: :data:`ANALYSIS_SHARE` of each
  field is *analysed* (stage 01 captures it; the paper analysed 2,812 of these fields' 4,959
  test questions, 57%), the rest is *held out* to evaluate pruned models (stage 06);
- MMLU questions whose text is also a held-out MMLU-Pro question (MMLU-Pro re-uses many MMLU
  questions) are dropped from the calibration text, so no evaluated question is ever read by a
  pruning method.

Prepared tables are cached as Parquet under the profile (``<cache_dir>/paper_data/``), and the
datasets' downloads under ``<cache_dir>/hf/datasets``; the embedded corpus stays the default.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import string
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

MMLU_PRO = "TIGER-Lab/MMLU-Pro"
MMLU = "cais/mmlu"
#: The paper's five fields, in the study's naming.
FIELDS: tuple[str, ...] = ("mathematics", "computer_science", "physics", "law", "psychology")
#: MMLU-Pro ``category`` → field.
MMLU_PRO_FIELDS = {"math": "mathematics", "computer science": "computer_science",
                   "physics": "physics", "law": "law", "psychology": "psychology"}
#: MMLU ``subject`` → field, by MMLU's own subcategories of these five.
MMLU_FIELDS = {
    **dict.fromkeys(("abstract_algebra", "college_mathematics", "elementary_mathematics",
                     "high_school_mathematics", "high_school_statistics"), "mathematics"),
    **dict.fromkeys(("college_computer_science", "computer_security",
                     "high_school_computer_science", "machine_learning"), "computer_science"),
    **dict.fromkeys(("astronomy", "college_physics", "conceptual_physics",
                     "high_school_physics"), "physics"),
    **dict.fromkeys(("international_law", "jurisprudence", "professional_law"), "law"),
    **dict.fromkeys(("high_school_psychology", "professional_psychology"), "psychology"),
}
#: Share of each field's MMLU-Pro questions that is analysed; the rest is held out.
ANALYSIS_SHARE = 0.6
#: Columns each dataset must have (the hub datasets' own names).
COLUMNS = {MMLU_PRO: ("question_id", "question", "options", "answer_index", "category", "src"),
           MMLU: ("question", "subject", "choices", "answer")}
#: Where a local copy keeps each dataset's test split (as ``hf download --local-dir`` lays
#: out the hub repositories), relative to the folder given as the source.
LOCAL_FILES = {MMLU_PRO: "mmlu_pro/data/test-*.parquet", MMLU: "mmlu/all/test-*.parquet"}
_HUB_CONFIG = {MMLU_PRO: None, MMLU: "all"}
#: Bump when the prepared tables change layout: cached ones are then prepared again.
PREPARATION_VERSION = 1
_SPACES = re.compile(r"\s+")


class PaperDataError(ValueError):
    """The paper's data cannot be had or is malformed (one-line message)."""


def question_text(question: str, options: Sequence[str]) -> str:
    """A question with its options, one per line, as a model reads it.

    Examples
    --------
    >>> print(question_text("2 + 2 = ?", ["3", "4"]))
    2 + 2 = ?
    A. 3
    B. 4
    """
    lines = [question.strip()]
    lines += [f"{letter}. {str(option).strip()}"
              for letter, option in zip(string.ascii_uppercase, options, strict=False)]
    return "\n".join(lines)


def _normalised(text: str) -> str:
    return _SPACES.sub(" ", str(text)).strip().casefold()


def role_of_question(question_id: int) -> str:
    """``analysis`` or ``held_out``, fixed by a hash of the MMLU-Pro ``question_id``.

    Examples
    --------
    >>> role_of_question(70) == role_of_question(70)
    True
    """
    digest = hashlib.sha1(f"mmlu-pro:{int(question_id)}".encode()).digest()
    return "analysis" if int.from_bytes(digest[:4], "big") < ANALYSIS_SHARE * 2**32 \
        else "held_out"


# --------------------------------------------------------------------------------- reading


def _cache_file(cache_dir: str | os.PathLike, dataset: str, source: str) -> Path:
    """The prepared table's place: keyed by the hub id, or by the bytes of the local files
    (a changed local copy is prepared again; to refresh a hub download, delete the file)."""
    digest = hashlib.sha256(f"{dataset}|{PREPARATION_VERSION}|".encode())
    if source:
        for path in _local_files(source, dataset):
            digest.update(path.name.encode() + path.read_bytes())
    name = dataset.split("/")[-1].lower()
    return Path(cache_dir) / "paper_data" / f"{name}-{digest.hexdigest()[:12]}.parquet"


def _local_files(source: str, dataset: str) -> list[Path]:
    folder = Path(source).expanduser()
    if not folder.is_dir():
        raise PaperDataError(f"paper_data_dir {source!r} is not a folder; give a folder with "
                             f"{LOCAL_FILES[MMLU_PRO]} and {LOCAL_FILES[MMLU]}, or leave it empty "
                             "to read the hub")
    files = sorted(folder.glob(LOCAL_FILES[dataset]))
    if not files:
        raise PaperDataError(f"paper_data_dir {source!r} has no {LOCAL_FILES[dataset]} "
                             f"(the test split of {dataset} as Parquet)")
    return files


def check_columns(files: Sequence[Path], dataset: str) -> None:
    """One line naming the columns a local copy lacks (the Parquet schema only is read)."""
    import pyarrow.parquet as pq

    for path in files:
        missing = [column for column in COLUMNS[dataset]
                   if column not in pq.read_schema(path).names]
        if missing:
            raise PaperDataError(f"{path} lacks column(s) {', '.join(missing)} of {dataset} "
                                 f"(expected {', '.join(COLUMNS[dataset])})")


def _read(dataset: str, source: str, cache_dir: str | os.PathLike) -> pd.DataFrame:
    """The test split of ``dataset`` through ``datasets``: from the hub or local Parquet."""
    import datasets

    hf_cache = Path(cache_dir) / "hf" / "datasets"
    if source:
        files = _local_files(source, dataset)
        check_columns(files, dataset)
        table = datasets.load_dataset("parquet", data_files={"test": [str(f) for f in files]},
                                      split="test", cache_dir=str(hf_cache))
    else:
        try:
            table = datasets.load_dataset(dataset, _HUB_CONFIG[dataset], split="test",
                                          cache_dir=str(hf_cache))
        except Exception as error:  # datasets raises many kinds; the first line says which
            reason = (str(error).splitlines() or [type(error).__name__])[0]
            raise PaperDataError(f"{dataset} could not be loaded from the hub ({reason}); set "
                                 "HF_HUB_OFFLINE=0 HF_DATASETS_OFFLINE=0 with hub access, or "
                                 "give paper_data_dir a folder with local copies") from None
    frame = table.to_pandas()
    missing = [column for column in COLUMNS[dataset] if column not in frame.columns]
    if missing:
        raise PaperDataError(f"{dataset} lacks column(s) {', '.join(missing)}")
    return frame


def _cached(dataset: str, source: str, cache_dir, prepare) -> pd.DataFrame:
    path = _cache_file(cache_dir, dataset, source)
    if path.is_file():
        return pd.read_parquet(path)
    frame = prepare(_read(dataset, source, cache_dir))
    from ..artifacts import write_table

    write_table(path, frame)
    logger.info("%s: %d questions of the five fields prepared into %s", dataset, len(frame),
                path)
    return pd.read_parquet(path)  # the same types whether freshly prepared or cached


def _prepare_mmlu_pro(raw: pd.DataFrame) -> pd.DataFrame:
    raw = raw[raw["category"].isin(MMLU_PRO_FIELDS)]
    rows = []
    for record in raw.sort_values("question_id").to_dict("records"):
        options = [str(option) for option in record["options"]]
        rows.append({
            "entry_id": f"mmlu_pro-{int(record['question_id'])}",
            "question_id": int(record["question_id"]),
            "domain": MMLU_PRO_FIELDS[record["category"]],
            "split": role_of_question(record["question_id"]),
            "question": str(record["question"]), "choices": options,
            "answer": int(record["answer_index"]), "source": str(record["src"]),
            "text": question_text(record["question"], options),
        })
    return pd.DataFrame(rows, columns=["entry_id", "question_id", "domain", "split", "question",
                                       "choices", "answer", "source", "text"])


def _prepare_mmlu(raw: pd.DataFrame) -> pd.DataFrame:
    raw = raw[raw["subject"].isin(MMLU_FIELDS)].reset_index(drop=True)
    rows = []
    for index, record in enumerate(raw.to_dict("records")):
        options = [str(option) for option in record["choices"]]
        rows.append({
            "entry_id": f"mmlu-{record['subject']}-{index}",
            "domain": MMLU_FIELDS[record["subject"]], "split": "calibration",
            "subject": str(record["subject"]), "question": str(record["question"]),
            "choices": options, "answer": int(record["answer"]),
            "text": question_text(record["question"], options),
        })
    return pd.DataFrame(rows, columns=["entry_id", "domain", "split", "subject", "question",
                                       "choices", "answer", "text"])


def load_mmlu_pro(source: str = "", *, cache_dir: str | os.PathLike) -> pd.DataFrame:
    """MMLU-Pro's test questions of the five fields, one row per question.

    Parameters
    ----------
    source : str
        Empty: ``TIGER-Lab/MMLU-Pro`` from the hub; else a folder holding
        ``mmlu_pro/data/test-*.parquet`` (a local copy of the hub repository).
    cache_dir : path
        The profile's cache (``artifacts/<profile>/cache``).

    Returns
    -------
    DataFrame
        ``entry_id``, ``question_id``, ``domain`` (a field of :data:`FIELDS`), ``split``
        (``analysis`` or ``held_out``), ``question``, ``choices``, ``answer`` (index),
        ``source`` (MMLU-Pro's ``src``) and ``text`` (question and options).
    """
    return _cached(MMLU_PRO, source, cache_dir, _prepare_mmlu_pro)


def load_mmlu(source: str = "", *, cache_dir: str | os.PathLike) -> pd.DataFrame:
    """MMLU's test questions of the five fields (config ``all``), one row per question.

    Columns as :func:`load_mmlu_pro` (``split`` is ``calibration``; ``subject`` instead of
    ``question_id`` and ``source``); ``source`` as there, with ``mmlu/all/test-*.parquet``.
    """
    return _cached(MMLU, source, cache_dir, _prepare_mmlu)


# --------------------------------------------------------------------------------- roles


def analysis_entries(mmlu_pro: pd.DataFrame, domains: Sequence[str]) -> pd.DataFrame:
    """The analysed MMLU-Pro questions of ``domains``, for capture (stage 01)."""
    unknown = sorted(set(domains) - set(FIELDS))
    if unknown:
        raise PaperDataError(f"domains {unknown} are not among the paper's fields "
                             f"({', '.join(FIELDS)})")
    chosen = mmlu_pro[(mmlu_pro["split"] == "analysis") & mmlu_pro["domain"].isin(domains)]
    return chosen.reset_index(drop=True)


def calibration_entries(mmlu: pd.DataFrame, mmlu_pro: pd.DataFrame) -> pd.DataFrame:
    """MMLU calibration questions, without any whose text is a held-out MMLU-Pro question."""
    held_out = set(mmlu_pro.loc[mmlu_pro["split"] == "held_out", "question"].map(_normalised))
    overlap = mmlu["question"].map(_normalised).isin(held_out)
    if overlap.any():
        logger.info("dropped %d MMLU questions that MMLU-Pro evaluates", int(overlap.sum()))
    return mmlu[~overlap].reset_index(drop=True)


def evaluation_items(mmlu_pro: pd.DataFrame) -> pd.DataFrame:
    """Held-out MMLU-Pro questions as multiple-choice items (split ``test``), in the layout of
    :func:`moecollab.data.make_mcq_items`: the prompt is the question, each option a choice."""
    held_out = mmlu_pro[mmlu_pro["split"] == "held_out"]
    return pd.DataFrame({
        "item_id": held_out["entry_id"].to_numpy(), "domain": held_out["domain"].to_numpy(),
        "split": "test", "term": held_out["question_id"].astype(str).to_numpy(),
        "question": held_out["question"].to_numpy(), "choices": held_out["choices"].to_numpy(),
        "answer": held_out["answer"].astype(int).to_numpy(),
        "entry_id": held_out["entry_id"].to_numpy()}).reset_index(drop=True)


def evaluation_texts(mmlu_pro: pd.DataFrame, n_per_domain: int, *,
                     seed: int = 0) -> dict[str, list[str]]:
    """Per field, ``n_per_domain`` held-out questions with their options (for perplexity), in a
    seeded random order."""
    held_out = mmlu_pro[mmlu_pro["split"] == "held_out"]
    order = np.random.default_rng(seed).permutation(len(held_out))
    shuffled = held_out.iloc[order]
    return {field: rows["text"].head(n_per_domain).tolist()
            for field, rows in shuffled.groupby("domain", sort=False)
            if field in FIELDS}


# --------------------------------------------------------------------------------- checks


def check_available(source: str, cache_dir: str | os.PathLike | None,
                    datasets_needed: Sequence[str], *, offline: bool) -> None:
    """Before any model loads: the datasets a stage needs can be read, or one line says why.

    A local folder must hold each dataset's test Parquet files with the dataset's columns; the
    hub must be reachable unless the prepared tables are already cached under the profile.
    """
    for dataset in datasets_needed:
        if source:
            check_columns(_local_files(source, dataset), dataset)
        elif offline and not (cache_dir is not None
                              and _cache_file(cache_dir, dataset, source).is_file()):
            raise PaperDataError(
                f"data_source 'paper' reads {dataset} from the hub, which is offline here "
                "(HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set), and it is not cached under "
                "the profile; run with HF_HUB_OFFLINE=0 HF_DATASETS_OFFLINE=0 and hub access, "
                "or give paper_data_dir a folder with local copies")
