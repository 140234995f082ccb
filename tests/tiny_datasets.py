"""Tiny local copies of the paper's datasets, MMLU-Pro and MMLU, with their real columns.

Laid out as ``hf download <repo> --repo-type dataset --local-dir <folder>/<name>`` lays out the
hub repositories (only the files moecollab reads, plus a decoy per-subject MMLU file that must
not be read twice):

- ``mmlu_pro/data/test-00000-of-00001.parquet``: ``question_id`` (int64), ``question``,
  ``options`` (list of str), ``answer`` (letter), ``answer_index`` (int64), ``cot_content``,
  ``category``, ``src`` (``TIGER-Lab/MMLU-Pro``'s features);
- ``mmlu/all/test-00000-of-00001.parquet``: ``question``, ``subject``, ``choices`` (list of
  str), ``answer`` (int64) (``cais/mmlu``'s features, config ``all``).

Questions are made from the embedded corpus's definitions (psychology borrows philosophy's),
with ten options for MMLU-Pro and four for MMLU, in every category/subject the loaders keep plus
one they must drop. The first ``n_shared`` MMLU questions of each field repeat MMLU-Pro
questions verbatim, as MMLU-Pro re-uses MMLU's.
"""

from __future__ import annotations

import string
from pathlib import Path

import numpy as np
import pandas as pd

#: MMLU-Pro category and an MMLU subject for each field, and the corpus field that lends text.
_FIELDS = {
    "math": ("high_school_mathematics", "mathematics"),
    "computer science": ("college_computer_science", "computer_science"),
    "physics": ("conceptual_physics", "physics"),
    "law": ("professional_law", "law"),
    "psychology": ("professional_psychology", "philosophy"),
    "biology": ("college_biology", "biology"),  # not one of the paper's fields: dropped
}


def write_tiny_paper_data(folder, *, n_per_field: int = 40, n_shared: int = 3,
                          seed: int = 0) -> Path:
    """Write both tiny datasets under ``folder``; returns ``folder`` (a ``paper_data_dir``)."""
    from moecollab import data

    folder = Path(folder)
    rng = np.random.default_rng(seed)
    corpus = data.load_corpus()
    pro_rows, mmlu_rows = [], []
    question_id = 70
    for category, (subject, lender) in _FIELDS.items():
        entries = corpus[corpus["domain"] == lender].head(3 * n_per_field)
        definitions = entries["definition"].tolist()
        headwords = entries["headword"].tolist()
        for index in range(n_per_field):
            options = rng.choice(headwords, size=10, replace=False).tolist()
            answer = int(rng.integers(10))
            options[answer] = headwords[index]
            question = f"Which term means: {definitions[index]}"
            pro_rows.append({
                "question_id": question_id, "question": question, "options": options,
                "answer": string.ascii_uppercase[answer], "answer_index": answer,
                "cot_content": "", "category": category, "src": f"ori_mmlu-{subject}"})
            question_id += 1
        for index in range(n_per_field):
            # Shared questions reuse MMLU-Pro's text: the loader must drop those it holds out.
            source = index if index < n_shared else n_per_field + index
            options = rng.choice(headwords, size=4, replace=False).tolist()
            answer = int(rng.integers(4))
            options[answer] = headwords[source]
            mmlu_rows.append({"question": f"Which term means: {definitions[source]}",
                              "subject": subject, "choices": options, "answer": answer})
    pro_path = folder / "mmlu_pro" / "data" / "test-00000-of-00001.parquet"
    mmlu_path = folder / "mmlu" / "all" / "test-00000-of-00001.parquet"
    for path, rows in ((pro_path, pro_rows), (mmlu_path, mmlu_rows)):
        path.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(rows).to_parquet(path, index=False)
    # A per-subject copy, as in the hub repository: never read (it would double the subject).
    decoy = folder / "mmlu" / "professional_law" / "test-00000-of-00001.parquet"
    decoy.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame([row for row in mmlu_rows if row["subject"] == "professional_law"]).to_parquet(
        decoy, index=False)
    return folder
