"""Paired intervals for comparisons made over the same evaluation items.

Every model of the evaluation chapter (unpruned, each pruned mask) answers the **same**
multiple-choice items and scores the **same** documents, so the fair noise for a difference
between two models is the noise of the *difference*, item by item, not of either score alone.
These functions take the per-item table that :func:`moecollab.evaluation.item_table` makes and
return percentile intervals from a **paired, stratified bootstrap**: each resample draws, within
every task, as many items as the task has, with replacement, and the *same* draw is applied to
every model. Items that are not independent (several cloze blanks cut from one definition) carry
a ``cluster`` column; then a task draws as many clusters as it has, each with all its items (a
cluster bootstrap), so shared text does not pass for more evidence than it is. Group values are
the unweighted mean over tasks, as in the study's lm-eval groups.

The atom-purity comparison of the annotation chapter has its own paired bootstrap,
:func:`paired_purity_difference`, which resamples documents (trained model and untrained control
read the same tokens).

Everything here is a pure function of arrays and tables; a fixed ``random_state`` gives the same
interval every time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

__all__ = [
    "ITEM_COLUMNS",
    "ITEM_METRICS",
    "PAPER_ACCURACY",
    "Comparison",
    "Interval",
    "Resampled",
    "chance_accuracy",
    "compare_with_baselines",
    "domain_pruning_costs",
    "interval",
    "paired_difference",
    "paired_purity_difference",
    "resample_tasks",
    "separation",
    "separation_table",
]

#: Columns of the per-item table (one row per model, task and document). An optional ``cluster``
#: column names the items a bootstrap resamples together (:func:`resample_tasks`).
ITEM_COLUMNS: tuple[str, ...] = (
    "mask", "task", "domain", "split", "doc_id", "n_choices", "acc", "acc_norm",
    "loglikelihood", "n_words", "n_bytes",
)
#: Metrics computed from the per-item table, each with how a task's value is made.
ITEM_METRICS: dict[str, str] = {
    "acc": "mean of acc",
    "acc_norm": "mean of acc_norm",
    "word_perplexity": "exp(-sum loglikelihood / sum n_words)",
    "byte_perplexity": "exp(-sum loglikelihood / sum n_bytes)",
    "bits_per_byte": "-sum loglikelihood / (sum n_bytes * ln 2)",
}
#: The paper's accuracy: ``acc_norm`` where a task has it, ``acc`` otherwise (e.g. WinoGrande).
PAPER_ACCURACY = "acc_norm|acc"
# Bootstrap indices are drawn in chunks of at most this many entries (memory bound).
_CHUNK_ENTRIES = 4_000_000


@dataclass(frozen=True)
class Interval:
    """A point estimate with a two-sided percentile interval.

    ``low``/``high`` are NaN when there is nothing to resample (e.g. no items).
    """

    estimate: float
    low: float
    high: float
    confidence: float = 0.95

    @property
    def excludes_zero(self) -> bool:
        """True when the whole interval lies on one side of zero (NaN: False)."""
        return bool(self.low > 0 or self.high < 0)

    def text(self, scale: float = 1.0, digits: int = 3, unit: str = "", *,
             signed: bool = True) -> str:
        """``"+0.032 [+0.010, +0.055]"`` (a difference) or, with ``signed=False``,
        ``"0.312 [0.250, 0.375]"`` (a level); values multiplied by ``scale``."""
        sign = "+" if signed else ""

        def number(value: float) -> str:
            return "nan" if math.isnan(value) else f"{scale * value:{sign}.{digits}f}{unit}"
        return f"{number(self.estimate)} [{number(self.low)}, {number(self.high)}]"


def interval(point: float, resamples: np.ndarray, confidence: float = 0.95) -> Interval:
    """Percentile interval of ``resamples`` around ``point``.

    Examples
    --------
    >>> interval(0.5, np.linspace(0, 1, 101), confidence=0.9)
    Interval(estimate=0.5, low=0.05, high=0.95, confidence=0.9)
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1); got {confidence!r}")
    values = np.asarray(resamples, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return Interval(float(point), math.nan, math.nan, confidence)
    tail = (1 - confidence) / 2
    low, high = np.quantile(values, [tail, 1 - tail])
    return Interval(float(point), float(round(low, 12)), float(round(high, 12)), confidence)


# --------------------------------------------------------------------------------------------
# Per-task metrics on paired bootstrap resamples
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Resampled:
    """One metric per task for several models, on all items and on paired resamples.

    Attributes
    ----------
    metric : str
    tasks : tuple of str
        Column order of every array.
    point : dict of str to ndarray, shape (n_tasks,)
        The metric per task on all items, per model.
    resamples : dict of str to ndarray, shape (n_resamples, n_tasks)
        The metric per task on each bootstrap resample; row ``b`` used the same items for
        every model.
    n_items : dict of str to int
        Items per task.
    """

    metric: str
    tasks: tuple[str, ...]
    point: dict[str, np.ndarray]
    resamples: dict[str, np.ndarray]
    n_items: dict[str, int]

    def group(self, models: str | Sequence[str]) -> tuple[float, np.ndarray]:
        """The unweighted mean over tasks: on all items, and per resample.

        A sequence of models (e.g. random masks of several seeds) gives the mean over them.
        """
        names = [models] if isinstance(models, str) else list(models)
        if not names:
            raise ValueError("models must name at least one model; got none")
        for name in names:
            if name not in self.point:
                raise ValueError(f"model {name!r} is not among the resampled models "
                                 f"{sorted(self.point)}")
        point = float(np.mean([self.point[name].mean() for name in names]))
        resamples = np.mean([self.resamples[name].mean(axis=1) for name in names], axis=0)
        return point, resamples


def _metric_columns(metric: str) -> tuple[str, str | None]:
    if metric in ("acc", "acc_norm"):
        return metric, None
    if metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        return "loglikelihood", "n_words" if metric == "word_perplexity" else "n_bytes"
    raise ValueError(f"metric must be one of {', '.join([*ITEM_METRICS, PAPER_ACCURACY])}; "
                     f"got {metric!r}")


def _task_metric(metric: str, values: np.ndarray, units: np.ndarray | None) -> np.ndarray:
    """The metric over the last axis of ``values`` (items), as lm-eval aggregates it."""
    if units is None:
        return values.mean(axis=-1)
    total = values.sum(axis=-1)
    count = units.sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if metric == "bits_per_byte":
            return -total / (count * math.log(2))
        return np.exp(-total / count)


def _chosen_metric(items: pd.DataFrame, task: str, metric: str) -> str:
    if metric != PAPER_ACCURACY:
        return metric
    has_norm = items.loc[items["task"] == task, "acc_norm"].notna().any()
    return "acc_norm" if has_norm else "acc"


def _task_clusters(items: pd.DataFrame, task: str, model: str) -> np.ndarray | None:
    """Cluster codes of one task's documents in ``doc_id`` order, or None (every item its own)."""
    if "cluster" not in items:
        return None
    rows = items[(items["task"] == task) & (items["mask"] == model)].sort_values("doc_id")
    if rows["cluster"].isna().any():
        return None
    return pd.factorize(rows["cluster"].astype(str))[0]  # numbered in document order


def _aligned_task(items: pd.DataFrame, task: str, models: Sequence[str], column: str,
                  units: str | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Per-model values of one task, rows aligned by ``doc_id``; refuses unpaired items."""
    rows = items[(items["task"] == task) & items["mask"].isin(models)]
    if rows.duplicated(["mask", "doc_id"]).any():
        raise ValueError(f"task {task!r} repeats a (mask, doc_id) pair; expected one row per "
                         "model and document")
    documents = {name: set(rows.loc[rows["mask"] == name, "doc_id"]) for name in models}
    reference = documents[models[0]]
    for name in models:
        if documents[name] != reference:
            missing = len(reference - documents[name]) + len(documents[name] - reference)
            raise ValueError(f"task {task!r} is not paired: model {name!r} differs from "
                             f"{models[0]!r} on {missing} document(s); every model must be "
                             "evaluated on the same items")
    if not reference:
        raise ValueError(f"task {task!r} has no items for models {list(models)}")
    order = sorted(reference)

    def matrix(name: str) -> np.ndarray:
        table = rows.pivot(index="doc_id", columns="mask", values=name)
        return table.reindex(index=order, columns=list(models)).to_numpy(np.float64).T

    values = matrix(column)
    if np.isnan(values).any():
        raise ValueError(f"task {task!r} has missing {column!r} values")
    return values, (matrix(units) if units is not None else None)


def resample_tasks(
    items: pd.DataFrame,
    models: Sequence[str],
    metric: str,
    *,
    tasks: Sequence[str] | None = None,
    n_resamples: int = 2000,
    random_state: int = 0,
) -> Resampled:
    """A metric per task for several models, on all items and on paired bootstrap resamples.

    Parameters
    ----------
    items : DataFrame
        The per-item table (:data:`ITEM_COLUMNS`; :func:`moecollab.evaluation.item_table`).
        With a ``cluster`` column (no missing value in a task), a task's resample draws its
        clusters with replacement, each with all its items (clusters are read from the first
        model's rows: they are a property of the document).
    models : sequence of str
        Values of ``items["mask"]`` to compare; each must have the same documents in every
        task (refused otherwise: an unpaired comparison is not what this computes).
    metric : str
        ``acc``, ``acc_norm``, ``word_perplexity``, ``byte_perplexity``, ``bits_per_byte`` or
        :data:`PAPER_ACCURACY` (``acc_norm`` per task where it exists, else ``acc``).
    tasks : sequence of str, optional
        Tasks to use (default: every task of the models with a value for the metric).
    n_resamples : int, default 2000
    random_state : int, default 0
        Seeds one local generator; tasks draw in sorted order, so results are reproducible.

    Returns
    -------
    Resampled

    Examples
    --------
    >>> items = pd.DataFrame({"mask": ["a"] * 4 + ["b"] * 4, "task": ["t"] * 8,
    ...                       "doc_id": [0, 1, 2, 3] * 2,
    ...                       "acc": [1, 1, 0, 0, 1, 0, 0, 0.0]})
    >>> resampled = resample_tasks(items, ["a", "b"], "acc", n_resamples=200)
    >>> resampled.point["a"].tolist(), resampled.point["b"].tolist()
    ([0.5], [0.25])
    """
    models = list(dict.fromkeys(models))
    if not models:
        raise ValueError("models must name at least one model; got none")
    unknown = sorted(set(models) - set(items["mask"]))
    if unknown:
        raise ValueError(f"models {unknown} have no rows in items")
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int) or n_resamples < 1:
        raise ValueError(f"n_resamples must be a positive int; got {n_resamples!r}")
    if metric != PAPER_ACCURACY:
        _metric_columns(metric)
    chosen = items[items["mask"].isin(models)]
    if tasks is None:
        present = []
        for task in sorted(set(chosen["task"])):
            column, _ = _metric_columns(_chosen_metric(chosen, task, metric))
            if chosen.loc[chosen["task"] == task, column].notna().any():
                present.append(task)
        tasks = present
    tasks = list(dict.fromkeys(tasks))
    if not tasks:
        raise ValueError(f"items have no task with values for metric {metric!r}")
    rng = np.random.default_rng(random_state)
    point = {name: np.empty(len(tasks)) for name in models}
    resamples = {name: np.empty((n_resamples, len(tasks))) for name in models}
    n_items = {}
    for task in sorted(tasks):  # a fixed drawing order, whatever order tasks came in
        column_index = tasks.index(task)
        task_metric = _chosen_metric(chosen, task, metric)
        column, units_column = _metric_columns(task_metric)
        values, units = _aligned_task(chosen, task, models, column, units_column)
        n_task = values.shape[1]
        n_items[task] = n_task
        for index, name in enumerate(models):
            point[name][column_index] = _task_metric(
                task_metric, values[index], units[index] if units is not None else None)
        clusters = _task_clusters(chosen, task, models[0])
        if clusters is not None:
            # A cluster's items enter together: per model, the sums of the cluster's values
            # (and units, or item counts) are what the metric adds up.
            n_clusters = int(clusters.max()) + 1
            values = np.stack([np.bincount(clusters, row, n_clusters) for row in values])
            units = (np.stack([np.bincount(clusters, row, n_clusters) for row in units])
                     if units is not None else
                     np.broadcast_to(np.bincount(clusters, minlength=n_clusters).astype(float),
                                     values.shape))
            n_task = n_clusters
        chunk = max(1, _CHUNK_ENTRIES // n_task)
        for start in range(0, n_resamples, chunk):
            stop = min(start + chunk, n_resamples)
            draw = rng.integers(0, n_task, size=(stop - start, n_task))
            for index, name in enumerate(models):
                if clusters is not None and task_metric in ("acc", "acc_norm"):
                    resamples[name][start:stop, column_index] = (
                        values[index][draw].sum(axis=-1) / units[index][draw].sum(axis=-1))
                    continue
                resamples[name][start:stop, column_index] = _task_metric(
                    task_metric, values[index][draw],
                    units[index][draw] if units is not None else None)
    return Resampled(metric, tuple(tasks), point, resamples, n_items)


def paired_difference(resampled: Resampled, model: str, reference: str | Sequence[str], *,
                      confidence: float = 0.95) -> Interval:
    """``model`` minus ``reference`` on the group value (mean over tasks), with its interval.

    ``reference`` may be several models (the random masks of several seeds): their mean.

    Examples
    --------
    >>> items = pd.DataFrame({"mask": ["a"] * 4 + ["b"] * 4, "task": ["t"] * 8,
    ...                       "doc_id": [0, 1, 2, 3] * 2,
    ...                       "acc": [1, 1, 1, 0, 1, 1, 1, 0.0]})
    >>> paired_difference(resample_tasks(items, ["a", "b"], "acc"), "a", "b")
    Interval(estimate=0.0, low=0.0, high=0.0, confidence=0.95)
    """
    point_a, resamples_a = resampled.group(model)
    point_b, resamples_b = resampled.group(reference)
    return interval(point_a - point_b, resamples_a - resamples_b, confidence)


def separation(resampled: Resampled, methods: Mapping[str, str | Sequence[str]], *,
               confidence: float = 0.95) -> dict[str, object]:
    """How far apart the best and the worst of several methods are, on the same items.

    A study that compares methods needs room for them to differ: this is the check. Each
    method may be several models (random masks of several seeds: their mean).

    Returns
    -------
    dict
        ``values`` (method → group value), ``best`` and ``worst`` (names), ``difference``
        (best minus worst, an :class:`Interval`), ``standard_error`` (the standard deviation of
        that difference over the paired resamples) and ``z`` (difference / standard error).

    Examples
    --------
    >>> items = pd.DataFrame({"mask": ["a"] * 4 + ["b"] * 4, "task": ["t"] * 8,
    ...                       "doc_id": [0, 1, 2, 3] * 2,
    ...                       "acc": [1, 1, 1, 0, 1, 0, 0, 0.0]})
    >>> found = separation(resample_tasks(items, ["a", "b"], "acc", n_resamples=200),
    ...                    {"first": "a", "second": "b"})
    >>> found["best"], found["worst"], found["difference"].estimate
    ('first', 'second', 0.5)
    """
    if len(methods) < 2:
        raise ValueError(f"separation needs at least two methods; got {list(methods)}")
    groups = {name: resampled.group(models) for name, models in methods.items()}
    values = {name: point for name, (point, _) in groups.items()}
    best = max(values, key=values.get)
    worst = min((name for name in values if name != best), key=values.get)
    differences = groups[best][1] - groups[worst][1]
    standard_error = float(np.std(differences, ddof=1))
    estimate = values[best] - values[worst]
    return {"values": values, "best": best, "worst": worst,
            "difference": interval(estimate, differences, confidence),
            "standard_error": standard_error,
            "z": (estimate / standard_error if standard_error > 0
                  else 0.0 if estimate == 0 else math.inf)}


def separation_table(
    items: pd.DataFrame,
    methods_at: Mapping[float, Mapping[str, Sequence[str]]],
    tasks_of_family: Mapping[str, Sequence[str]],
    metric_of_family: Mapping[str, str],
    *,
    method: str = "caep",
    n_resamples: int = 2000,
    random_state: int = 0,
    confidence: float = 0.95,
) -> pd.DataFrame:
    """Can the methods be told apart? One row per item family and ratio.

    For each family (its held-out tasks, scored by its metric) and ratio (the methods compared
    there: method -> its models), the :func:`separation` of the best and the worst method, and
    the widest paired interval of ``method`` against each other one: how small an effect the
    items could show.

    Returns
    -------
    DataFrame
        ``family``, ``ratio``, ``best``, ``worst``, ``best minus worst``, ``standard error``,
        ``z`` and ``widest CAEP interval (±)`` (the half-width, in the metric's units).
    """
    rows = []
    for family, tasks in tasks_of_family.items():
        for ratio, methods in methods_at.items():
            resampled = resample_tasks(
                items, [model for group in methods.values() for model in group],
                metric_of_family[family], tasks=tasks, n_resamples=n_resamples,
                random_state=random_state)
            found = separation(resampled, methods, confidence=confidence)
            against_others = [paired_difference(resampled, methods[method], group,
                                                confidence=confidence)
                              for name, group in methods.items() if name != method]
            rows.append({
                "family": family, "ratio": ratio, "best": found["best"],
                "worst": found["worst"], "best minus worst": found["difference"].estimate,
                "standard error": found["standard_error"], "z": found["z"],
                "widest CAEP interval (±)": max((difference.high - difference.low) / 2
                                                for difference in against_others)})
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class Comparison:
    """One model against one baseline: the baseline's score and the paired difference.

    ``difference`` is the model minus the baseline, in the metric's own units.
    """

    baseline: str
    baseline_value: float
    difference: Interval


def compare_with_baselines(
    items: pd.DataFrame,
    model: str,
    baselines: Mapping[str, str | Sequence[str]],
    metric: str,
    *,
    tasks: Sequence[str] | None = None,
    reference: str = "unpruned",
    n_resamples: int = 2000,
    random_state: int = 0,
    confidence: float = 0.95,
) -> dict[str, object]:
    """A model against each baseline on the same items, with paired intervals.

    Parameters
    ----------
    items : DataFrame
        The per-item table.
    model : str
        The model compared (e.g. ``"caep@0.25"``).
    baselines : mapping of str to str or sequence of str
        Baseline name → its model(s); several models (random masks of several seeds) count as
        one baseline, their mean.
    metric, tasks, n_resamples, random_state
        As in :func:`resample_tasks`.
    reference : str, default "unpruned"
        Also resampled and returned (e.g. to check that accuracy is above chance).
    confidence : float, default 0.95

    Returns
    -------
    dict
        ``value`` (the model's group score), ``reference`` (an :class:`Interval` of the
        reference's score), ``comparisons`` (one :class:`Comparison` per baseline, in order)
        and ``n_items`` (items per task).

    Examples
    --------
    >>> items = pd.DataFrame({"mask": ["u"] * 4 + ["m"] * 4 + ["b"] * 4, "task": ["t"] * 12,
    ...                       "doc_id": [0, 1, 2, 3] * 3,
    ...                       "acc": [1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0.0]})
    >>> found = compare_with_baselines(items, "m", {"b": "b"}, "acc", reference="u")
    >>> comparison = found["comparisons"][0]
    >>> found["value"], comparison.baseline_value, comparison.difference.low
    (0.75, 0.0, 0.25)
    """
    members = {name: [value] if isinstance(value, str) else list(value)
               for name, value in baselines.items()}
    models = list(dict.fromkeys([reference, model, *(m for group in members.values()
                                                      for m in group)]))
    resampled = resample_tasks(items, models, metric, tasks=tasks, n_resamples=n_resamples,
                               random_state=random_state)
    comparisons = [Comparison(name, resampled.group(group)[0],
                              paired_difference(resampled, model, group, confidence=confidence))
                   for name, group in members.items()]
    return {"value": resampled.group(model)[0],
            "reference": interval(*resampled.group(reference), confidence),
            "comparisons": comparisons, "n_items": resampled.n_items}


def chance_accuracy(items: pd.DataFrame, tasks: Sequence[str]) -> float:
    """Accuracy of guessing, as a group value: the mean over tasks of the mean ``1/n_choices``.

    Examples
    --------
    >>> items = pd.DataFrame({"task": ["a", "a", "b"], "n_choices": [4, 4, 2]})
    >>> chance_accuracy(items, ["a", "b"])
    0.375
    """
    per_task = []
    for task in tasks:
        choices = items.loc[items["task"] == task, "n_choices"].to_numpy(np.float64)
        choices = choices[np.isfinite(choices) & (choices > 0)]
        if choices.size == 0:
            raise ValueError(f"task {task!r} has no n_choices; it is not a multiple-choice task")
        per_task.append(float(np.mean(1.0 / choices)))
    if not per_task:
        raise ValueError("tasks must name at least one task; got none")
    return float(np.mean(per_task))


# --------------------------------------------------------------------------------------------
# Pruning with one field's data (the paper's Fig. 9)
# --------------------------------------------------------------------------------------------


def domain_pruning_costs(
    resampled: Resampled,
    calibration_models: Mapping[str, str],
    task_fields: Mapping[str, str],
    *,
    reference: str = "unpruned",
    higher_is_better: bool,
    confidence: float = 0.95,
) -> dict[str, Interval]:
    """Relative cost of per-field pruning on its own field and on the others, with intervals.

    Parameters
    ----------
    resampled : Resampled
        Holding ``reference`` and every model of ``calibration_models``.
    calibration_models : mapping of str to str
        Calibration field → model pruned with that field's data.
    task_fields : mapping of str to str
        Task → the field it evaluates (only tasks of ``resampled`` count).
    reference : str, default "unpruned"
    higher_is_better : bool
        True for accuracy (cost = relative drop), False for perplexity (cost = relative rise).

    Returns
    -------
    dict
        ``own`` (mean cost on the calibration field), ``others`` (mean cost on every other
        field) and ``difference`` (``others - own``: positive = the own field suffers less),
        each an :class:`Interval`. Costs are relative, 0.05 = 5% worse than ``reference``.

    Examples
    --------
    >>> items = pd.DataFrame({
    ...     "mask": ["unpruned"] * 4 + ["x"] * 4 + ["y"] * 4,
    ...     "task": ["tx", "tx", "ty", "ty"] * 3, "doc_id": [0, 1, 0, 1] * 3,
    ...     "acc": [1, 1, 1, 1, 1, 1, 0, 1, 0, 1, 1, 1.0]})
    >>> resampled = resample_tasks(items, ["unpruned", "x", "y"], "acc", n_resamples=50)
    >>> costs = domain_pruning_costs(resampled, {"x": "x", "y": "y"}, {"tx": "x", "ty": "y"},
    ...                              higher_is_better=True)
    >>> costs["own"].estimate, costs["others"].estimate
    (0.0, 0.5)
    """
    column = {field: position for position, task in enumerate(resampled.tasks)
              if (field := task_fields.get(task)) is not None}
    fields = [field for field in calibration_models if field in column]
    if len(fields) < 2:
        raise ValueError(f"need at least two calibration fields that are also evaluated; got "
                         f"{fields} of calibration {sorted(calibration_models)} and evaluated "
                         f"{sorted(column)}")
    sign = -1.0 if higher_is_better else 1.0

    def costs(values: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        base = values[reference]
        own, others = [], []
        for field in fields:
            pruned = values[calibration_models[field]]
            with np.errstate(divide="ignore", invalid="ignore"):
                relative = sign * (pruned - base) / base
            for other in fields:
                (own if other == field else others).append(relative[..., column[other]])
        return np.mean(own, axis=0), np.mean(others, axis=0)

    own_point, others_point = costs(resampled.point)
    own_resampled, others_resampled = costs(resampled.resamples)
    return {
        "own": interval(float(own_point), own_resampled, confidence),
        "others": interval(float(others_point), others_resampled, confidence),
        "difference": interval(float(others_point - own_point),
                               others_resampled - own_resampled, confidence),
    }


# --------------------------------------------------------------------------------------------
# Atom purity: trained model against its untrained twin
# --------------------------------------------------------------------------------------------


def _purity_counts(atoms: np.ndarray, fields: np.ndarray, clusters: np.ndarray,
                   n_fields: int, n_clusters: int):
    from scipy import sparse

    keep = atoms >= 0
    _, atom_index = np.unique(atoms[keep], return_inverse=True)
    n_atoms = int(atom_index.max()) + 1 if atom_index.size else 0
    return sparse.csr_array(
        (np.ones(int(keep.sum())), (clusters[keep], atom_index * n_fields + fields[keep])),
        shape=(n_clusters, max(n_atoms, 1) * n_fields)), max(n_atoms, 1)


def _purity(joint: np.ndarray, n_atoms: int, n_fields: int) -> np.ndarray:
    joint = joint.reshape(*joint.shape[:-1], n_atoms, n_fields)
    total = joint.sum(axis=(-1, -2))
    with np.errstate(divide="ignore", invalid="ignore"):
        return joint.max(axis=-1).sum(axis=-1) / total


def paired_purity_difference(
    atoms: np.ndarray,
    control_atoms: np.ndarray,
    fields: Sequence[str] | np.ndarray,
    clusters: Sequence[object] | np.ndarray,
    *,
    n_resamples: int = 1000,
    random_state: int = 0,
    confidence: float = 0.95,
) -> dict[str, Interval]:
    """Domain purity of two atom assignments of the same tokens, and their paired difference.

    Parameters
    ----------
    atoms, control_atoms : array of int, shape (n_tokens,)
        Atom of every token for the trained model and for its untrained control (``-1`` =
        unassigned, left out as in :func:`moecollab.annotation.domain_purity`).
    fields : array of str, shape (n_tokens,)
        Field of every token.
    clusters : array, shape (n_tokens,)
        Document of every token (e.g. ``entry_id``): resampling draws whole documents, since
        tokens of one text are not independent.
    n_resamples, random_state, confidence
        The paired bootstrap (same documents for both assignments).

    Returns
    -------
    dict
        ``trained`` and ``control`` (the two purities, floats) and ``difference`` (trained minus
        control, an :class:`Interval`).

    Notes
    -----
    Purity takes a maximum over fields, which resampling documents pushes up (a field's share
    of an atom fluctuates, and the maximum picks the fluctuations up), so the resampled
    purity of one model sits above its estimate when documents are few. Both models read the
    same resampled documents, so the bias largely cancels in the difference, which is the
    only interval returned.

    Examples
    --------
    >>> fields = np.array(["a", "a", "b", "b"] * 5)
    >>> trained = np.array([0, 0, 1, 1] * 5)          # atoms follow the field
    >>> control = np.array([0, 1, 0, 1] * 5)          # atoms ignore it
    >>> result = paired_purity_difference(trained, control, fields, np.arange(20) // 4,
    ...                                   n_resamples=100)
    >>> result["trained"], result["control"], result["difference"].low > 0
    (1.0, 0.5, True)
    """
    atoms = np.asarray(atoms, dtype=np.int64)
    control_atoms = np.asarray(control_atoms, dtype=np.int64)
    field_codes, field_names = pd.factorize(np.asarray(fields, dtype=object))
    cluster_codes, cluster_names = pd.factorize(np.asarray(clusters, dtype=object))
    if not (len(atoms) == len(control_atoms) == len(field_codes) == len(cluster_codes)):
        raise ValueError(f"atoms, control_atoms, fields and clusters must have one entry per "
                         f"token; got lengths {len(atoms)}, {len(control_atoms)}, "
                         f"{len(field_codes)}, {len(cluster_codes)}")
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int) or n_resamples < 1:
        raise ValueError(f"n_resamples must be a positive int; got {n_resamples!r}")
    n_fields, n_clusters = len(field_names), len(cluster_names)
    rng = np.random.default_rng(random_state)
    weights = rng.multinomial(n_clusters, np.full(n_clusters, 1.0 / n_clusters),
                              size=n_resamples).astype(np.float64)
    values = {}
    for name, assignment in (("trained", atoms), ("control", control_atoms)):
        counts, n_atoms = _purity_counts(assignment, field_codes, cluster_codes, n_fields,
                                         n_clusters)
        point = float(_purity(np.asarray(counts.sum(axis=0)), n_atoms, n_fields))
        resampled = _purity(np.asarray((counts.T @ weights.T).T), n_atoms, n_fields)
        values[name] = (point, resampled)
    return {"trained": values["trained"][0], "control": values["control"][0],
            "difference": interval(values["trained"][0] - values["control"][0],
                                   values["trained"][1] - values["control"][1], confidence)}
