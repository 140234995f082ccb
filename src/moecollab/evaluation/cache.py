"""The result cache: what identifies an lm-eval result, and what of it is kept.

Each task's result is cached as JSON, keyed by the model (:func:`mask_key` names a pruned
one), the task definition (hash of the files :mod:`~moecollab.evaluation.local_tasks` wrote),
``limit``, ``num_fewshot``, ``max_length``, ``bootstrap_iters`` and the lm-eval version
(:func:`task_cache_keys`). An entry keeps lm-eval's results of the task and of the tasks below
it, and its logged samples compacted to what :func:`~moecollab.evaluation.tables.item_table`
needs (:func:`entries_of_raw`, :func:`compact_samples`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import numpy as np

from moecollab.artifacts import file_sha256, read_json, text_sha256, write_json
from moecollab.evaluation.local_tasks import read_task_manifests

logger = logging.getLogger(__name__)

__all__ = [
    "CACHE_FORMAT",
    "cache_key_dicts",
    "compact_samples",
    "descendants",
    "entries_of_raw",
    "float_or_nan",
    "json_value",
    "key_digest",
    "lm_eval_version",
    "load_cached",
    "mask_key",
    "store_cached",
    "task_cache_keys",
]

# Bumped whenever the layout of a cache entry changes (2: per-document samples).
CACHE_FORMAT = 2


@functools.cache   # read from the package metadata once per process, not once per key
def lm_eval_version() -> str:
    """The installed lm-eval's version (part of every cache key)."""
    try:
        return metadata.version("lm_eval")
    except metadata.PackageNotFoundError:  # pragma: no cover - lm-eval is a dependency
        return "unknown"


def mask_key(base_key: str, keep_mask: np.ndarray | None,
             mode: Literal["remove", "mask"] = "mask") -> str:
    """Identifier of a model pruned from the model ``base_key`` names.

    Parameters
    ----------
    base_key : str
        Identifier of the unpruned model (e.g. a hash of its checkpoint).
    keep_mask : array of bool, shape (n_moe_layers, n_experts), or None
        True = keep. None, or a mask that keeps every expert, is the unpruned model itself and
        gives ``base_key`` back.
    mode : {"remove", "mask"}

    Returns
    -------
    str
        ``"<base_key>|<mode>:<16 hex digits of the mask's hash>"``.

    Examples
    --------
    >>> mask_key("base", None)
    'base'
    >>> mask_key("base", np.array([[True, False]])).startswith("base|mask:")
    True
    """
    if mode not in ("remove", "mask"):
        raise ValueError(f"mode must be 'remove' or 'mask'; got {mode!r}")
    if not isinstance(base_key, str) or not base_key:
        raise ValueError(f"base_key must be a non-empty str; got {base_key!r}")
    if keep_mask is None:
        return base_key
    mask = np.asarray(keep_mask)
    if mask.dtype != bool:
        raise ValueError(f"keep_mask must be a boolean array; got dtype {mask.dtype}")
    if mask.all():
        return base_key
    digest = hashlib.sha256(repr(mask.shape).encode() + np.packbits(mask, axis=None).tobytes())
    return f"{base_key}|{mode}:{digest.hexdigest()[:16]}"


def _files_hash(task_dir: Path, files: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for name in sorted(set(files)):
        path = task_dir / name
        digest.update(f"{name}\0{file_sha256(path) if path.is_file() else 'missing'}\0"
                      .encode())
    return digest.hexdigest()


def definition_hashes(names: Sequence[str], task_dir: str | os.PathLike | None
                       ) -> dict[str, str]:
    """Hash of the files that define each task; lm-eval's own tasks are keyed by name only."""
    info = read_task_manifests(task_dir)
    hashes = {}
    for name in names:
        entry = info.get(name)
        if entry is None:
            hashes[name] = "lm-eval"  # with the lm-eval version in the key
            continue
        files = list(entry["files"])
        for subtask in entry.get("subtasks", []):
            files.extend(info.get(subtask, {}).get("files", []))
        hashes[name] = _files_hash(Path(task_dir), files)
    return hashes


def cache_key_dicts(tasks: Sequence[str], task_dir: str | os.PathLike | None, *,
                    model_key: str, limit: int | float | None, num_fewshot: int,
                    max_length: int | None, bootstrap_iters: int) -> dict[str, dict[str, Any]]:
    """The cache key of each task, as a dict (:func:`key_digest` hashes it)."""
    hashes = definition_hashes(tasks, task_dir)
    version = lm_eval_version()
    return {
        name: {
            "format": CACHE_FORMAT,
            "model_key": model_key,
            "task": name,
            "task_definition": hashes[name],
            "limit": limit,
            "num_fewshot": num_fewshot,
            "max_length": max_length,
            "bootstrap_iters": bootstrap_iters,
            "lm_eval": version,
        }
        for name in tasks
    }


def key_digest(key: Mapping[str, Any]) -> str:
    """The sha256 hex digest of a key from :func:`cache_key_dicts`."""
    return text_sha256(json.dumps(key, sort_keys=True))


def task_cache_keys(
    tasks: Sequence[str],
    task_dir: str | os.PathLike | None,
    *,
    model_key: str,
    limit: int | float | None = None,
    num_fewshot: int = 0,
    max_length: int | None = None,
    bootstrap_iters: int = 100,
) -> dict[str, str]:
    """The cache key (a sha256 hex digest) :func:`evaluate` uses for each task.

    A key covers the model (``model_key``), the task name, the bytes of every file that defines
    the task (YAML, template and JSONL data; a group also its subtasks' files), ``limit``,
    ``num_fewshot``, ``max_length``, ``bootstrap_iters`` and the lm-eval version. Tasks not
    written by :func:`write_mcq_tasks` / :func:`write_perplexity_tasks` (lm-eval's own) are
    covered by their name and the lm-eval version.
    """
    keys = cache_key_dicts(tasks, task_dir, model_key=model_key, limit=limit,
                           num_fewshot=num_fewshot, max_length=max_length,
                           bootstrap_iters=bootstrap_iters)
    return {name: key_digest(key) for name, key in keys.items()}


def _cache_path(cache_dir: Path, name: str, key: Mapping[str, Any]) -> Path:
    return cache_dir / "lm_eval_results" / f"{name}.{key_digest(key)[:20]}.json"


def is_cached(cache_dir: Path, name: str, key: Mapping[str, Any]) -> bool:
    """Whether task ``name`` has a cached result file under ``key`` (not read: a stale or
    unreadable one is found, and evaluated again, by :func:`load_cached`)."""
    return _cache_path(cache_dir, name, key).is_file()


def load_cached(cache_dir: Path, name: str, key: Mapping[str, Any]) -> dict[str, Any] | None:
    """The cached entry of task ``name`` under ``key``; None when absent, unreadable or stale."""
    path = _cache_path(cache_dir, name, key)
    if not path.is_file():
        return None
    try:
        stored = read_json(path)
    except (OSError, ValueError) as error:
        logger.warning("ignoring unreadable cached result %s (%s); evaluating again", path,
                       error)
        return None
    if stored.get("key") != json.loads(json.dumps(key)):
        logger.warning("cached result %s has another key; evaluating again", path)
        return None
    return stored["entry"]


def store_cached(cache_dir: Path, name: str, key: Mapping[str, Any],
                 entry: Mapping[str, Any]) -> None:
    """Write the entry of task ``name`` (from :func:`entries_of_raw`) with its ``key``."""
    write_json(_cache_path(cache_dir, name, key), {"key": key, "entry": entry})


# --------------------------------------------------------------------------------------------
# Cached entries
# --------------------------------------------------------------------------------------------


def json_value(value: Any) -> Any:
    """``value`` with numpy scalars as Python numbers and anything else unknown as str."""
    if isinstance(value, (bool, str)) or value is None:
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if isinstance(value, Mapping):
        return {str(k): json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_value(v) for v in value]
    return str(value)


def descendants(name: str, group_subtasks: Mapping[str, Sequence[str]]) -> list[str]:
    """``name`` and every task or group below it in lm-eval's ``group_subtasks``, depth first."""
    names = [name]
    for child in group_subtasks.get(name, []):
        names.extend(descendants(child, group_subtasks))
    return names


def entries_of_raw(raw: Mapping[str, Any], names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Split lm-eval's output into one self-contained entry per requested task or group."""
    results = raw.get("results", {})
    groups = raw.get("groups", {})
    group_subtasks = raw.get("group_subtasks", {})
    n_samples = raw.get("n-samples", {})
    samples = raw.get("samples") or {}
    entries = {}
    for name in names:
        subtree = [member for member in descendants(name, group_subtasks) if member in results]
        if name not in subtree:
            raise RuntimeError(f"lm-eval returned no result for task {name!r}")
        entries[name] = json_value({
            "results": {member: results[member] for member in subtree},
            "groups": {member: groups[member] for member in subtree if member in groups},
            "group_subtasks": {member: list(group_subtasks[member]) for member in subtree
                               if member in group_subtasks},
            "n_samples": {member: n_samples[member] for member in subtree
                          if member in n_samples},
            "samples": {member: compact_samples(samples[member]) for member in subtree
                        if member in samples},
        })
    return entries


def compact_samples(samples: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """What :func:`item_table` needs of lm-eval's logged samples: per document, its id, the
    number of choices and each metric's per-document value (pairs such as perplexity's
    ``(loglikelihood, words)`` kept as pairs). Documents, prompts and responses are dropped.
    Rows that are already compact (no ``metrics`` list: a child process compacted them) are
    kept as they are."""
    rows: dict[int, dict[str, Any]] = {}
    for sample in samples:
        doc_id = int(sample["doc_id"])
        if doc_id in rows:  # a second filter of the same document: keep the first
            continue
        if "metrics" not in sample:
            rows[doc_id] = dict(sample)
            continue
        row: dict[str, Any] = {"doc_id": doc_id}
        metrics = list(sample.get("metrics", []))
        if "acc" in metrics:
            row["n_choices"] = len(sample.get("arguments", []))
        for metric in metrics:
            value = sample.get(metric)
            if isinstance(value, (list, tuple)) and len(value) == 2:
                row[metric] = [float_or_nan(value[0]), float_or_nan(value[1])]
            elif isinstance(value, (bool, int, float, np.integer, np.floating)):
                row[metric] = float(value)
        rows[doc_id] = row
    return [rows[doc_id] for doc_id in sorted(rows)]


def float_or_nan(value: Any) -> float:
    """A number lm-eval wrote, as a float; NaN for anything else (a bool, None, "N/A")."""
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        return float(value)
    return math.nan  # lm-eval writes "N/A" where it has no standard error
