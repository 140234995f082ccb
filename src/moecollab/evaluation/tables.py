"""Tidy tables of lm-eval results: per task and metric, per document, Table 1, relative drops.

:func:`results_table` and :func:`item_table` turn the output of
:func:`~moecollab.evaluation.harness.evaluate` into long tables (one row per task and metric,
one per task and document: :mod:`moecollab.paired` compares two models item by item on the
latter); :func:`standard_table` lays standard tasks out as the paper's Table 1;
:func:`add_method_columns` and :func:`relative_drop` add what the figures group and colour by.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from moecollab.evaluation.cache import float_or_nan
from moecollab.mask_set import MaskSet

__all__ = [
    "ITEM_TABLE_COLUMNS",
    "add_method_columns",
    "item_table",
    "relative_drop",
    "results_table",
    "standard_table",
]

_TABLE_COLUMNS = ["task", "kind", "domain", "split", "metric", "value", "stderr", "n_samples"]


def results_table(raw: Mapping[str, Any]) -> pd.DataFrame:
    """One row per (task or group, metric) from :func:`evaluate` (or ``simple_evaluate``).

    Parameters
    ----------
    raw : dict
        The output of :func:`evaluate`; lm-eval's own ``simple_evaluate`` output works too
        (without domain and split for its tasks).

    Returns
    -------
    DataFrame
        Columns ``task``, ``kind`` (``"task"`` or ``"group"``), ``domain`` (``"all"`` for a
        local group, None for lm-eval's own tasks), ``split``, ``metric`` (e.g. ``acc``; a
        filter other than lm-eval's ``none`` is kept as ``acc,<filter>``), ``value``,
        ``stderr`` (NaN where lm-eval gives none) and ``n_samples`` (documents evaluated;
        NaN for groups).
    """
    info = raw.get("task_info", {})
    groups = set(raw.get("groups", {})) | set(raw.get("group_subtasks", {}))
    n_samples = raw.get("n_samples", raw.get("n-samples", {}))
    rows = []
    for name, metrics in raw.get("results", {}).items():
        task_info = info.get(name, {})
        count = n_samples.get(name, {})
        for label, value in metrics.items():
            if "," not in label or "_stderr," in label or label.startswith("alias"):
                continue
            metric, filter_name = label.split(",", 1)
            stderr = metrics.get(f"{metric}_stderr,{filter_name}")
            rows.append({
                "task": name,
                "kind": "group" if name in groups else "task",
                "domain": task_info.get("domain"),
                "split": task_info.get("split"),
                "metric": metric if filter_name == "none" else label,
                "value": float_or_nan(value),
                "stderr": float_or_nan(stderr),
                "n_samples": float_or_nan(count.get("effective")) if isinstance(count, Mapping)
                else math.nan,
            })
    return pd.DataFrame(rows, columns=_TABLE_COLUMNS)


#: Columns of :func:`item_table` (:data:`moecollab.paired.ITEM_COLUMNS` less ``mask``).
ITEM_TABLE_COLUMNS = ["task", "domain", "split", "doc_id", "n_choices", "acc", "acc_norm",
                 "loglikelihood", "n_words", "n_bytes"]


def item_table(raw: Mapping[str, Any]) -> pd.DataFrame:
    """One row per (task, document): the per-document scores behind every metric.

    Parameters
    ----------
    raw : dict
        The output of :func:`evaluate` (whose cache keeps lm-eval's logged samples in compact
        form).

    Returns
    -------
    DataFrame
        Columns ``task``, ``domain``, ``split`` (as in :func:`results_table`), ``doc_id``
        (lm-eval's index of the document within the task), ``n_choices`` (multiple choice:
        answers offered; chance is ``1 / n_choices``), ``acc`` and ``acc_norm`` (1.0 right,
        0.0 wrong), ``loglikelihood`` (perplexity tasks: the document's summed
        log-probability), ``n_words`` and ``n_bytes`` (its length as lm-eval counts it). A
        column a task does not have is NaN. A task's ``acc`` is the mean of ``acc``; its
        ``word_perplexity`` is ``exp(-sum loglikelihood / sum n_words)``, and
        ``byte_perplexity`` likewise with ``n_bytes``.

    Examples
    --------
    >>> raw = {"samples": {"t": [{"doc_id": 0, "n_choices": 4, "acc": 1.0, "acc_norm": 0.0}],
    ...                    "p": [{"doc_id": 0, "word_perplexity": [-12.0, 3],
    ...                           "byte_perplexity": [-12.0, 15]}]}}
    >>> item_table(raw)[["task", "acc", "loglikelihood", "n_words", "n_bytes"]].to_numpy().tolist()
    [['t', 1.0, nan, nan, nan], ['p', nan, -12.0, 3.0, 15.0]]
    """
    info = raw.get("task_info", {})
    rows = []
    for task, samples in (raw.get("samples") or {}).items():
        task_info = info.get(task, {})
        for sample in samples:
            words = sample.get("word_perplexity")
            size = sample.get("byte_perplexity") or sample.get("bits_per_byte")
            pair = words or size
            rows.append({
                "task": task, "domain": task_info.get("domain"), "split": task_info.get("split"),
                "doc_id": int(sample["doc_id"]),
                "n_choices": float_or_nan(sample.get("n_choices")),
                "acc": float_or_nan(sample.get("acc")),
                "acc_norm": float_or_nan(sample.get("acc_norm")),
                "loglikelihood": float_or_nan(pair[0]) if pair else math.nan,
                "n_words": float_or_nan(words[1]) if words else math.nan,
                "n_bytes": float_or_nan(size[1]) if size else math.nan,
            })
    return pd.DataFrame(rows, columns=ITEM_TABLE_COLUMNS)


def standard_table(results: pd.DataFrame) -> pd.DataFrame:
    """The paper's Table 1 layout for standard tasks: model × task, plus the average.

    Parameters
    ----------
    results : DataFrame
        Rows of :func:`evaluate_masks` or :func:`evaluate_checkpoints` on standard tasks, with
        ``method`` and ``prune_ratio`` columns added.

    Returns
    -------
    DataFrame
        Index (``method``, ``prune_ratio``), one column per task with its normalised accuracy
        (``acc_norm``, or ``acc`` where the task has no normalised form, as in the paper), the
        mean over masks of one method and ratio (random seeds), and ``average`` over tasks.
    """
    tasks = results[results["kind"] == "task"]
    has_norm = set(tasks.loc[tasks["metric"] == "acc_norm", "task"])
    chosen = tasks[((tasks["metric"] == "acc_norm") & tasks["task"].isin(has_norm))
                   | ((tasks["metric"] == "acc") & ~tasks["task"].isin(has_norm))]
    table = chosen.pivot_table(index=["method", "prune_ratio"], columns="task", values="value",
                               aggfunc="mean")
    order = list(dict.fromkeys(chosen["task"]))
    table = table[[task for task in order if task in table.columns]]
    table.columns.name = None
    table["average"] = table.mean(axis=1)
    return table


def add_method_columns(table: pd.DataFrame, mask_set: MaskSet) -> pd.DataFrame:
    """Add each row's ``method`` and ``prune_ratio``, looked up in the set its mask comes from.

    Parameters
    ----------
    table : DataFrame
        Results with a ``mask`` column (as from :func:`evaluate_masks`); ``unpruned`` is the
        unpruned model and every other name must be a mask of ``mask_set``.
    mask_set : MaskSet
        Stage 05's masks (:meth:`moecollab.mask_set.MaskSet.load`).

    Returns
    -------
    DataFrame
        ``table``, changed in place: ``method`` and ``prune_ratio`` from the mask set's table
        (the unpruned model: ``unpruned`` and 0), so every seed of ``random`` and every
        calibration field of ``domain`` share their method.

    Examples
    --------
    >>> import numpy as np
    >>> mask_set = MaskSet()
    >>> _ = mask_set.add(np.ones((1, 4), dtype=bool), method="random", prune_ratio=0.25, seed=3)
    >>> table = add_method_columns(pd.DataFrame({"mask": ["unpruned", "random-s3@0.25"]}),
    ...                            mask_set)
    >>> table["method"].tolist(), table["prune_ratio"].tolist()
    (['unpruned', 'random'], [0.0, 0.25])
    """
    unknown = sorted(set(table["mask"]) - {"unpruned"} - set(mask_set))
    if unknown:
        raise ValueError(f"results name masks the mask set does not hold: {', '.join(unknown)}")
    known = mask_set.table.set_index("name")
    table["method"] = table["mask"].map(known["method"]).fillna("unpruned")
    table["prune_ratio"] = table["mask"].map(known["prune_ratio"]).fillna(0.0)
    return table


def relative_drop(table: pd.DataFrame, baseline_mask: str = "unpruned", *,
                  value: str = "value") -> pd.DataFrame:
    """Add ``relative_drop = (value - baseline) / baseline`` per row (the paper's Fig. 9 metric).

    Parameters
    ----------
    table : DataFrame
        Long results with a ``mask`` column (as from :func:`evaluate_masks`), ``task`` and
        ``metric``; rows are matched to the baseline on every other identifying column
        present among ``task``, ``kind``, ``domain``, ``split``, ``metric``.
    baseline_mask : str, default "unpruned"
        The ``mask`` value of the reference rows.
    value : str, default "value"

    Returns
    -------
    DataFrame
        A copy with ``baseline`` and ``relative_drop`` columns (negative = worse than the
        baseline for accuracies; 0 on the baseline rows; NaN where no baseline row matches or
        the baseline is 0).

    Examples
    --------
    >>> table = pd.DataFrame({"mask": ["unpruned", "caep"], "task": ["t", "t"],
    ...                       "metric": ["acc", "acc"], "value": [0.5, 0.4]})
    >>> relative_drop(table)["relative_drop"].round(3).tolist()
    [0.0, -0.2]
    """
    for column in ("mask", "task", "metric", value):
        if column not in table.columns:
            raise ValueError(f"table lacks column {column!r}; expected the output of "
                             "evaluate_masks")
    if baseline_mask not in set(table["mask"]):
        raise ValueError(f"baseline_mask {baseline_mask!r} is not in table['mask']; got "
                         f"{sorted(map(str, set(table['mask'])))}")
    keys = [column for column in ("task", "kind", "domain", "split", "metric")
            if column in table.columns]
    baseline = table.loc[table["mask"] == baseline_mask, [*keys, value]]
    if baseline.duplicated(keys).any():
        raise ValueError(f"the baseline rows of mask {baseline_mask!r} repeat a "
                         f"({', '.join(keys)}) combination")
    baseline = baseline.rename(columns={value: "baseline"})
    # fillna on object keys: None and NaN must match each other in the merge
    left = table.reset_index(drop=True)
    merged = left.assign(**{f"_key_{k}": left[k].astype(object).where(left[k].notna(), "")
                            for k in keys}).merge(
        baseline.assign(**{f"_key_{k}": baseline[k].astype(object)
                           .where(baseline[k].notna(), "") for k in keys}).drop(columns=keys),
        on=[f"_key_{k}" for k in keys], how="left")
    merged = merged.drop(columns=[f"_key_{k}" for k in keys])
    with np.errstate(divide="ignore", invalid="ignore"):
        drop = (merged[value] - merged["baseline"]) / merged["baseline"]
    merged["relative_drop"] = drop.where(merged["baseline"] != 0)
    return merged
