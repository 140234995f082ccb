"""The entry points that run lm-eval: one model, many keep-masks, checkpoints on disk.

Every accuracy number of the study comes from lm-evaluation-harness (``lm_eval``).
:func:`evaluate` runs tasks (local or standard lm-eval ones) on the **in-memory** model through
``HFLM(pretrained=model, tokenizer=tokenizer)``, so a masked or per-layer-pruned model needs no
checkpoint on disk; :func:`evaluate_masks` does this for many keep-masks of one base model
(:func:`evaluate_masks_in_workers` fills its cache from several processes) and
:func:`evaluate_checkpoints` for the checkpoints stage 05 exported
(:func:`exported_checkpoints`), with lm-eval's ``vllm`` or ``hf`` model type in a child
process. All of them share one cached run (:mod:`moecollab.evaluation.cache`) inside
:func:`~moecollab.evaluation.hub_environment.hf_environment`, and return lm-eval-shaped
results or the long tables of :mod:`moecollab.evaluation.tables`.
"""

from __future__ import annotations

import copy
import gc
import json
import logging
import os
import sys
import tempfile
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from moecollab.artifacts import read_json, text_sha256, write_json
from moecollab.evaluation.cache import (
    cache_key_dicts,
    compact_samples,
    definition_hashes,
    descendants,
    entries_of_raw,
    is_cached,
    json_value,
    key_digest,
    lm_eval_version,
    load_cached,
    mask_key,
    store_cached,
)
from moecollab.evaluation.hub_environment import hf_environment
from moecollab.evaluation.local_tasks import read_task_manifests
from moecollab.evaluation.standard_tasks import check_backend
from moecollab.evaluation.tables import ITEM_TABLE_COLUMNS, item_table, results_table
from moecollab.mask_set import mask_name

logger = logging.getLogger(__name__)

__all__ = [
    "evaluate",
    "evaluate_checkpoints",
    "evaluate_masks",
    "evaluate_masks_in_workers",
    "exported_checkpoints",
]


def _without_members(names: list[str], info: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """``names`` less those that belong to a local group also in ``names``."""
    members = {member for name in names for member in info.get(name, {}).get("subtasks", [])}
    return [name for name in names if name not in members]


@contextmanager
def _preserved_global_rngs() -> Iterator[None]:
    import random

    import torch

    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


_ENCODINGS: weakref.WeakKeyDictionary[Any, dict] = weakref.WeakKeyDictionary()


def _shared_encodings(tokenizer: Any) -> dict:
    """One memo of encoded text per tokenizer object, kept while the tokenizer lives."""
    try:
        return _ENCODINGS.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable: no sharing
        return {}


# Loaded lm-eval tasks, kept between the models of one process. Loading reads every task's
# dataset and simple_evaluate adds a report of the machine (subprocesses) each time: together
# several seconds per model, as much as scoring a small model. Keyed by the tasks' names and
# the hashes of the files that define them, so a rewritten task file is loaded again.
_LOADED_TASKS: dict[tuple, dict] = {}
_LOADED_TASKS_KEPT = 4


def _loaded_tasks(tasks: list[str], task_dir: str | os.PathLike | None) -> dict:
    """lm-eval's ``TaskManager.load`` of ``tasks``, memoised per process."""
    from lm_eval.tasks import TaskManager

    key = (str(task_dir), tuple(tasks), tuple(sorted(definition_hashes(tasks, task_dir).items())))
    if key not in _LOADED_TASKS:
        # Indexing lm-eval's own few thousand YAMLs takes ~5 s: skip it when every task is
        # local.
        local = read_task_manifests(task_dir)
        manager = TaskManager(include_path=str(task_dir) if task_dir is not None else None,
                              include_defaults=not all(name in local for name in tasks))
        if len(_LOADED_TASKS) >= _LOADED_TASKS_KEPT:
            _LOADED_TASKS.pop(next(iter(_LOADED_TASKS)))
        loaded = manager.load(tasks)
        for task in loaded["tasks"].values():
            _docs_as_rows(task)
        _LOADED_TASKS[key] = loaded
    return _LOADED_TASKS[key]


def _docs_as_rows(task: Any) -> None:
    """Keep a loaded task's evaluated documents as a list of dicts, which lm-eval accepts.

    lm-eval reads every document twice per model (to build requests, then to score them), and
    a ``datasets.Dataset`` decodes each row each time: ~1.3 s per model for stage 06's tasks.
    Only tasks whose documents go to lm-eval unprocessed (no ``process_docs``), as local ones.
    """
    import datasets

    config = getattr(task, "config", None)
    dataset = getattr(task, "dataset", None)
    if (config is None or not isinstance(dataset, dict)   # a DatasetDict is a dict
            or getattr(config, "process_docs", None) is not None):
        return
    split = config.test_split or config.validation_split
    if split is not None and isinstance(dataset.get(split), datasets.Dataset):
        dataset[split] = dataset[split].to_list()


def _reuse_requests(task: Any, fewshot_seed: int) -> None:
    """Let ``task`` hand out the requests it built for the previous model of this process.

    lm-eval builds every request of a task (prompt, few-shot context, one object per option)
    for each model it evaluates: ~7% of a model's time on tasks shaped like stage 06's
    (`benchmarks/bench_evaluation.py`'s). The requests depend
    on the task and on ``build_all_requests``'s arguments, not on the model, so a loaded task
    keeps the ones it built with each set of arguments and gives them back with their answers
    cleared (new lists, so the samples an earlier model logged keep theirs).
    """
    if "build_all_requests" in vars(task):   # already wrapped
        task._moecollab_fewshot_seed = fewshot_seed
        return
    build = task.build_all_requests
    built: dict[tuple, list] = {}
    task._moecollab_fewshot_seed = fewshot_seed

    def build_all_requests(**kwargs: Any) -> None:
        key = (task.get_config("num_fewshot"), task._moecollab_fewshot_seed,
               tuple(sorted((name, repr(value)) for name, value in kwargs.items())))
        if key not in built:
            build(**kwargs)
            built[key] = task._instances
            return
        for instance in built[key]:
            instance.resps = []
            instance.filtered_resps = {}
        task._instances = built[key]

    task.build_all_requests = build_all_requests


def _run_lm_eval(model: Any, tokenizer: Any, tasks: list[str], task_dir: str | os.PathLike |
                 None, *, limit: int | float | None, batch_size: int, max_length: int | None,
                 num_fewshot: int, bootstrap_iters: int, random_seed: int) -> dict[str, Any]:
    """lm-eval's ``simple_evaluate`` on an in-memory model, its steps done here so that the
    loaded tasks serve every model of a process (same numbers: tests/test_lm_eval_steps.py
    compares the two)."""
    import random

    import torch
    from lm_eval.evaluator import evaluate

    from moecollab.scoring import SharedContextLM

    # lm-eval's HFLM with identical inputs shared and text tokenized once per tokenizer, for
    # all the masks of a study (same numbers: tests/test_scoring.py). With a model object HFLM
    # ignores its `device` argument and uses the model's device.
    language_model = SharedContextLM(pretrained=model, tokenizer=tokenizer,
                                     batch_size=batch_size, max_length=max_length,
                                     encodings=_shared_encodings(tokenizer))
    with _preserved_global_rngs():
        # simple_evaluate's seeding, then its per-task settings, then its call of evaluate.
        random.seed(random_seed)
        np.random.seed(random_seed)
        torch.manual_seed(random_seed)
        loaded = _loaded_tasks(list(tasks), task_dir)
        for task in loaded["tasks"].values():
            if task.get_config("num_fewshot") != 0:  # a task's explicit 0 is never overridden
                task.set_config(key="num_fewshot", value=num_fewshot)
            task.set_fewshot_seed(seed=random_seed)
            _reuse_requests(task, random_seed)
        raw = evaluate(lm=language_model, task_dict=loaded, limit=limit,
                       bootstrap_iters=bootstrap_iters, log_samples=True,
                       fewshot_as_multiturn=True, verbosity=None)
    if raw is None:  # only on non-zero ranks of a distributed run
        raise RuntimeError("lm_eval.evaluator.evaluate returned no results")
    return raw


def _evaluate(model_factory: Callable[[], Any] | None, tokenizer: Any, tasks: Sequence[str],
              task_dir: str | os.PathLike | None, *, model_key: str,
              limit: int | float | None, batch_size: int | str, max_length: int | None,
              cache_dir: str | os.PathLike | None, num_fewshot: int, bootstrap_iters: int,
              offline: bool, random_seed: int,
              run: Callable[[list[str]], dict[str, Any]] | None = None) -> dict[str, Any]:
    """The cached evaluation shared by every entry point; ``run(tasks)`` (when given) replaces
    the in-process lm-eval run of ``model_factory()`` and returns lm-eval's raw output."""
    tasks = list(dict.fromkeys(tasks))
    if not tasks:
        raise ValueError("tasks must name at least one lm-eval task or group; got none")
    if limit is not None and (isinstance(limit, bool) or not limit > 0):
        raise ValueError(f"limit must be a positive int, a fraction in (0, 1] or None; "
                         f"got {limit!r}")
    if isinstance(limit, float) and limit > 1:
        raise ValueError(f"limit as a float is a fraction and must be <= 1; got {limit!r}")
    if isinstance(num_fewshot, bool) or not isinstance(num_fewshot, int) or num_fewshot < 0:
        raise ValueError(f"num_fewshot must be a non-negative int; got {num_fewshot!r}")
    if task_dir is not None and not Path(task_dir).is_dir():
        raise ValueError(f"task_dir must be an existing folder; got {str(task_dir)!r}")
    keys = cache_key_dicts(tasks, task_dir, model_key=model_key, limit=limit,
                           num_fewshot=num_fewshot, max_length=max_length,
                           bootstrap_iters=bootstrap_iters)
    cache = Path(cache_dir) if cache_dir is not None else None
    entries: dict[str, dict[str, Any]] = {}
    if cache is not None:
        for name in tasks:
            entry = load_cached(cache, name, keys[name])
            if entry is not None:
                entries[name] = entry
    missing = [name for name in tasks if name not in entries]
    if missing:
        logger.info("evaluating %s on %s (cached: %d)", ", ".join(missing), model_key,
                    len(entries))
        # lm-eval refuses a group together with one of its members ("Duplicate task"): run
        # the group only; the member's result is part of the group's.
        to_run = _without_members(missing, read_task_manifests(task_dir))
        with hf_environment(cache, offline=offline):
            if run is not None:
                raw = run(to_run)
            else:
                raw = _run_lm_eval(model_factory(), tokenizer, to_run, task_dir, limit=limit,
                                   batch_size=batch_size, max_length=max_length,
                                   num_fewshot=num_fewshot, bootstrap_iters=bootstrap_iters,
                                   random_seed=random_seed)
        fresh = entries_of_raw(raw, missing)
        if cache is not None:
            for name, entry in fresh.items():
                store_cached(cache, name, keys[name], entry)
        entries.update(fresh)
    info = read_task_manifests(task_dir)
    merged: dict[str, Any] = {"results": {}, "groups": {}, "group_subtasks": {},
                              "n_samples": {}, "samples": {}}
    for name in tasks:
        entry = entries[name]
        # Requested order, each group followed by its members (cached JSON has sorted keys).
        for member in descendants(name, entry["group_subtasks"]):
            if member in entry["results"]:
                merged["results"][member] = entry["results"][member]
        for section in ("groups", "group_subtasks", "n_samples", "samples"):
            merged[section].update(entry.get(section, {}))
    merged["task_info"] = {
        name: {key: info[name][key] for key in ("kind", "domain", "split")}
        for name in merged["results"] if name in info
    }
    merged["config"] = {
        "model_key": model_key, "tasks": tasks, "limit": limit, "num_fewshot": num_fewshot,
        "max_length": max_length, "bootstrap_iters": bootstrap_iters,
        "lm_eval": lm_eval_version(),
        "cache_keys": {name: key_digest(keys[name]) for name in tasks},
    }
    merged["cached"] = [name for name in tasks if name not in missing]
    merged["evaluated"] = missing
    return merged


def evaluate(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[str],
    task_dir: str | os.PathLike | None,
    *,
    model_key: str,
    limit: int | float | None = None,
    batch_size: int = 32,
    device: str | None = None,
    max_length: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    num_fewshot: int = 0,
    bootstrap_iters: int = 100,
    offline: bool = True,
    random_seed: int = 0,
) -> dict[str, Any]:
    """Evaluate an in-memory model on lm-eval tasks, reusing cached results.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        Evaluated as it is (masked or pruned models included); put in eval mode.
    tokenizer : transformers tokenizer
    tasks : sequence of str
        Task or group names: local ones from :func:`write_mcq_tasks` /
        :func:`write_perplexity_tasks` in ``task_dir``, or lm-eval's own (which need their
        datasets in the cache, or ``offline=False`` and hub access).
    task_dir : path or None
        Folder of local task YAMLs (lm-eval's ``include_path``).
    model_key : str
        The caller's identifier of the model, e.g. a hash of the checkpoint, extended by
        :func:`mask_key` for pruned variants. Two different models must never share a key.
    limit : int, float or None
        Per task: at most ``limit`` documents (int) or that fraction of them (float); None =
        all. For quick runs only: lm-eval warns that such numbers are not real metrics.
    batch_size : int, default 32
    device : str or None
        None evaluates on the model's own device; otherwise the model is moved there (in
        place). With a model object, lm-eval's own ``device`` argument is ignored.
    max_length : int or None
        Longest sequence fed to the model; None = the model config's
        ``max_position_embeddings`` (lm-eval's default).
    cache_dir : path or None
        Results are cached as JSON under ``<cache_dir>/lm_eval_results/`` (one file per task
        or group, keyed as in :func:`task_cache_keys`), and ``datasets`` caches under
        ``<cache_dir>/hf/``. None = no result cache and a temporary ``datasets`` cache.
    num_fewshot : int, default 0
    bootstrap_iters : int, default 100
        lm-eval's bootstrap resamples for the standard errors of non-mean metrics
        (perplexities); ``acc`` uses the closed form whenever this is > 0. 0 skips every
        standard error.
    offline : bool, default True
        Run with ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` set (see
        :mod:`~moecollab.evaluation.hub_environment`).
    random_seed : int, default 0
        lm-eval's python, numpy, torch and few-shot seeds.

    Returns
    -------
    dict
        lm-eval-shaped results: ``results`` (name → ``{"acc,none": …, "acc_stderr,none": …}``
        for tasks and groups), ``groups``, ``group_subtasks``, ``n_samples``, ``task_info``
        (kind, domain, split of local tasks), ``config`` (the run settings and cache keys),
        ``cached`` and ``evaluated`` (names from the cache and names run now). Tidy it with
        :func:`results_table`.
    """
    if not isinstance(model_key, str) or not model_key:
        raise ValueError(f"model_key must be a non-empty str; got {model_key!r}")

    def model_factory() -> Any:
        if device is not None:
            from moecollab.models import resolve_device

            model.to(resolve_device(device))
        return model.eval()

    return _evaluate(model_factory, tokenizer, tasks, task_dir, model_key=model_key,
                     limit=limit, batch_size=batch_size, max_length=max_length,
                     cache_dir=cache_dir, num_fewshot=num_fewshot,
                     bootstrap_iters=bootstrap_iters, offline=offline, random_seed=random_seed)


def _pruned_copy(base_model: Any, keep_mask: np.ndarray | None,
                 mode: Literal["remove", "mask"]) -> Any:
    """A copy of ``base_model`` with ``keep_mask`` applied; the base model is left untouched.

    ``mask`` only changes routers, so the copy shares every other parameter and buffer with
    the base model (memory stays flat); ``remove`` slices expert tensors and copies everything.
    """
    from moecollab.moe_arch import find_moe_layers
    from moecollab.pruning_apply import apply_keep_mask

    if keep_mask is None or np.asarray(keep_mask).all():
        return base_model
    if mode == "remove":
        return apply_keep_mask(copy.deepcopy(base_model), keep_mask, mode="remove")
    routers = [layer.router for layer in find_moe_layers(base_model).moe_layers]
    router_tensors = {id(tensor) for router in routers
                      for tensor in (*router.parameters(), *router.buffers())}
    memo: dict[int, Any] = {
        id(tensor): tensor
        for tensor in (*base_model.parameters(), *base_model.buffers())
        if id(tensor) not in router_tensors
    }
    return apply_keep_mask(copy.deepcopy(base_model, memo), keep_mask, mode="mask")


def evaluate_masks(
    base_model: Any,
    tokenizer: Any,
    masks: Mapping[str, np.ndarray | None],
    tasks: Sequence[str],
    task_dir: str | os.PathLike | None,
    *,
    base_key: str,
    mode: Literal["remove", "mask"] = "mask",
    cache_dir: str | os.PathLike | None = None,
    limit: int | float | None = None,
    progress: bool = True,
    return_items: bool = False,
    **kwargs: Any,
) -> pd.DataFrame | tuple[pd.DataFrame, pd.DataFrame]:
    """Evaluate the base model pruned by each named keep-mask; one long table.

    Parameters
    ----------
    base_model : transformers.PreTrainedModel
        The unpruned model; never changed.
    tokenizer : transformers tokenizer
    masks : mapping of str to (array of bool, shape (n_moe_layers, n_experts)) or None
        Name → keep-mask (True = keep); None is the unpruned model.
    tasks, task_dir
        As in :func:`evaluate`.
    base_key : str
        Identifier of the base model; each mask's key is ``mask_key(base_key, mask, mode)``.
    mode : {"mask", "remove"}, default "mask"
        ``mask`` copies only the routers (the copy shares all other weights with the base
        model); ``remove`` deep-copies the model and slices the pruned experts away.
    cache_dir, limit
        As in :func:`evaluate`; a mask whose tasks are all cached is not even applied.
    progress : bool, default True
        A text progress bar over masks.
    return_items : bool, default False
        Also return the per-document table (:func:`item_table`) of every mask.
    **kwargs
        Passed on to :func:`evaluate` (``batch_size``, ``max_length``, ``num_fewshot``, …).

    Returns
    -------
    DataFrame, or (DataFrame, DataFrame) with ``return_items``
        :func:`results_table` rows of every mask, with columns ``mask`` and ``model_key``
        first; then the :func:`item_table` rows of every mask, with ``mask`` first.
    """
    from tqdm import tqdm

    if mode not in ("remove", "mask"):
        raise ValueError(f"mode must be 'remove' or 'mask'; got {mode!r}")
    if not masks:
        raise ValueError("masks must name at least one keep-mask (None = unpruned); got none")
    _check_evaluate_kwargs(kwargs)
    device = kwargs.pop("device", None)
    if device is not None:
        from moecollab.models import resolve_device

        base_model.to(resolve_device(device))
    tables, items = [], []
    for name, keep_mask in tqdm(masks.items(), desc="keep-masks", disable=not progress):
        raw = _evaluate_mask(base_model, tokenizer, keep_mask, tasks, task_dir,
                             base_key=base_key, mode=mode, cache_dir=cache_dir, limit=limit,
                             **kwargs)
        table = results_table(raw)
        table.insert(0, "model_key", raw["config"]["model_key"])
        table.insert(0, "mask", name)
        tables.append(table)
        items.append(item_table(raw).assign(mask=name))
        if raw["evaluated"]:
            # The pruned copy is unreachable now. (Not after a cached result, which made no
            # copy: a full collection over the tables kept so far cost ~0.2 s a mask.)
            gc.collect()
    return _with_items(tables, items, return_items)


def _evaluate_mask(base_model: Any, tokenizer: Any, keep_mask: np.ndarray | None,
                   tasks: Sequence[str], task_dir: str | os.PathLike | None, *, base_key: str,
                   mode: Literal["remove", "mask"], cache_dir: str | os.PathLike | None,
                   limit: int | float | None, **kwargs: Any) -> dict[str, Any]:
    """:func:`_evaluate` of the base model pruned by one keep-mask (lm-eval's merged output)."""
    key = mask_key(base_key, keep_mask, mode)

    def model_factory() -> Any:
        return _pruned_copy(base_model, keep_mask, mode).eval()

    return _evaluate(model_factory, tokenizer, tasks, task_dir, model_key=key, limit=limit,
                     cache_dir=cache_dir, **_evaluate_defaults(kwargs))


def evaluate_masks_in_workers(
    stage_00_folder: str | os.PathLike,
    masks: Mapping[str, np.ndarray | None],
    tasks: Sequence[str],
    task_dir: str | os.PathLike,
    *,
    base_key: str,
    cache_dir: str | os.PathLike,
    n_workers: int = 2,
    mode: Literal["remove", "mask"] = "mask",
    limit: int | float | None = None,
    **kwargs: Any,
) -> int:
    """Fill the evaluation cache for ``masks`` from ``n_workers`` processes, one CPU thread each.

    On a CPU, small models use two threads poorly: two processes of one thread each evaluate
    about twice the masks of one process in the same time. Each worker loads stage 00's model
    itself (:func:`moecollab.models.load_reference_model`, on the CPU) and evaluates the masks
    one at a time, the next one that no other worker has taken, into the cache (it builds no
    tables); :func:`evaluate_masks` called afterwards with the same arguments reads every
    result from it. Masks with the same key are evaluated once; masks already cached are
    skipped.

    Returns
    -------
    int
        The number of distinct masks handed to workers (none whose tasks are all cached).
    """
    import subprocess

    if isinstance(n_workers, bool) or not isinstance(n_workers, int) or n_workers < 1:
        raise ValueError(f"n_workers must be a positive int; got {n_workers!r}")
    _check_evaluate_kwargs(kwargs)
    kwargs = {name: value for name, value in kwargs.items() if name != "device"}  # CPU workers
    distinct: dict[str, tuple[str, np.ndarray | None]] = {}
    for name, keep_mask in masks.items():
        distinct.setdefault(mask_key(base_key, keep_mask, mode), (name, keep_mask))
    # A model whose every task is cached needs no worker (a worker would load the model only to
    # find that out): re-running the stage after an unrelated change starts none.
    settings = _evaluate_defaults(kwargs)
    distinct = {key: value for key, value in distinct.items()
                if not all(is_cached(Path(cache_dir), name, task_key) for name, task_key in
                           cache_key_dicts(tasks, task_dir, model_key=key, limit=limit,
                                           num_fewshot=settings["num_fewshot"],
                                           max_length=settings["max_length"],
                                           bootstrap_iters=settings["bootstrap_iters"]).items())}
    # Every worker reads the whole list and claims one model at a time (a file created
    # exclusively in a shared folder), so a worker that finishes early takes the next model
    # instead of idling while the other works through a fixed share. Which worker evaluates a
    # model does not change its result (each run is seeded; tests/test_evaluation_harness.py).
    pending = list(distinct.values())
    n_started = min(n_workers, len(pending))
    code = ("import sys; from moecollab.evaluation.harness import _mask_worker; "
            "_mask_worker(sys.argv[1])")
    with tempfile.TemporaryDirectory(prefix="moecollab-masks-") as scratch:
        arrays = {name: keep_mask for name, keep_mask in pending if keep_mask is not None}
        np.savez(Path(scratch) / "masks.npz", **arrays)
        (Path(scratch) / "claims").mkdir()
        spec = {"stage_00_folder": str(stage_00_folder), "tasks": list(tasks),
                "task_dir": str(task_dir), "base_key": base_key, "mode": mode,
                "cache_dir": str(cache_dir), "limit": limit, "kwargs": dict(kwargs),
                "masks": str(Path(scratch) / "masks.npz"),
                "order": [name for name, _ in pending],   # not in masks.npz: unpruned
                "claims": str(Path(scratch) / "claims")}
        spec_path = Path(scratch) / "spec.json"
        write_json(spec_path, spec)
        environment = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        running = [subprocess.Popen([sys.executable, "-c", code, str(spec_path)],
                                    env=environment, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, text=True)
                   for _ in range(n_started)]
        failures = []
        for process in running:
            _, stderr = process.communicate()
            if process.returncode != 0:
                lines = [line for line in stderr.splitlines() if line.strip()]
                failures.append(lines[-1] if lines else f"exit status {process.returncode}")
    if failures:
        raise RuntimeError(f"a mask-evaluation worker failed: {failures[0]}")
    return len(distinct)


def _mask_worker(spec_path: str) -> None:
    """One worker of :func:`evaluate_masks_in_workers` (a child process): evaluates, into the
    cache, each model of the spec's list that no other worker has claimed yet."""
    import torch

    from moecollab.models import load_reference_model

    torch.set_num_threads(1)
    spec = read_json(spec_path)
    with np.load(spec["masks"]) as stored:
        arrays: dict[str, np.ndarray] = {name: stored[name] for name in stored.files}
    model, tokenizer = load_reference_model(spec["stage_00_folder"], device="cpu")
    for index, name in enumerate(spec["order"]):
        if not _claim(Path(spec["claims"]) / str(index)):
            continue
        keep_mask = arrays.get(name)   # not stored: the unpruned model
        _evaluate_mask(model, tokenizer, keep_mask, spec["tasks"], spec["task_dir"],
                       base_key=spec["base_key"], mode=spec["mode"], cache_dir=spec["cache_dir"],
                       limit=spec["limit"], **spec["kwargs"])
        gc.collect()   # the pruned copy (its routers' bound forwards make a cycle)
        # What survives (model, tasks, encodings, requests) lives as long as the worker: later
        # collections skip it (a full collection over it took 0.4 s a model, 0.02 s after).
        gc.freeze()


def _claim(path: Path) -> bool:
    """True for the one caller that creates ``path`` (atomic on a local file system)."""
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def _with_items(tables: list[pd.DataFrame], items: list[pd.DataFrame], return_items: bool
                ) -> pd.DataFrame | tuple[pd.DataFrame, pd.DataFrame]:
    results = pd.concat(tables, ignore_index=True)
    if not return_items:
        return results
    per_item = pd.concat(items, ignore_index=True)
    return results, per_item[["mask", *ITEM_TABLE_COLUMNS]]


def exported_checkpoints(pruning_folder: str | os.PathLike) -> pd.DataFrame:
    """The pruned checkpoints stage 05 exported (``checkpoint-<method>-<ratio>/``).

    Returns
    -------
    DataFrame
        One row per checkpoint, in name order: ``mask`` (``<method>@<ratio>``, the mask's name
        in ``masks.csv``), ``path``, ``uniform`` (every MoE layer keeps the same number of
        experts, so stock transformers and vLLM load it) and ``key`` (a hash of the
        checkpoint's files as listed in stage 05's manifest, else of its config).
    """
    folder = Path(pruning_folder)
    manifest_path = folder / "manifest.json"
    outputs = read_json(manifest_path).get("outputs", {}) if manifest_path.is_file() else {}
    rows = []
    for path in sorted(folder.glob("checkpoint-*")):
        config_path = path / "config.json"
        if not path.is_dir() or not config_path.is_file():
            continue
        config = read_json(config_path)
        info = config.get("pruning", {})
        kept = config.get("kept_experts", {})
        files = {name: digest for name, digest in sorted(outputs.items())
                 if name.startswith(f"{path.name}/")}
        rows.append({
            "mask": mask_name(info.get("method", path.name), float(info.get("prune_ratio", 0.0))),
            "path": str(path),
            "uniform": len({len(ids) for ids in kept.values()}) <= 1,
            "key": text_sha256(json.dumps(files or config, sort_keys=True)),
        })
    return pd.DataFrame(rows, columns=["mask", "path", "uniform", "key"])


def _lm_eval_worker(spec_path: str) -> None:
    """Run one ``lm_eval.simple_evaluate`` described by a JSON file (in a child process)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    spec = read_json(spec_path)
    task_manager = TaskManager(include_path=spec["include_path"],
                               include_defaults=spec["include_defaults"])
    raw = lm_eval.simple_evaluate(
        model=spec["backend"], model_args=spec["model_args"], tasks=spec["tasks"],
        task_manager=task_manager, limit=spec["limit"], num_fewshot=spec["num_fewshot"],
        batch_size=spec["batch_size"], device=spec["device"], log_samples=True,
        bootstrap_iters=spec["bootstrap_iters"], random_seed=spec["random_seed"],
        numpy_random_seed=spec["random_seed"], torch_random_seed=spec["random_seed"],
        fewshot_random_seed=spec["random_seed"])
    if raw is None:
        raise RuntimeError("lm_eval.simple_evaluate returned no results")
    output = {key: raw.get(key, {}) for key in ("results", "groups", "group_subtasks",
                                                "n-samples")}
    output["samples"] = {task: compact_samples(samples)
                         for task, samples in (raw.get("samples") or {}).items()}
    write_json(spec["output"], json_value(output))


def _run_in_child(spec: dict[str, Any]) -> dict[str, Any]:
    """lm-eval in a child process, so that each model (vLLM's above all) frees its GPU memory."""
    import subprocess

    with tempfile.TemporaryDirectory(prefix="moecollab-lm-eval-") as scratch:
        spec = {**spec, "output": str(Path(scratch) / "results.json")}
        spec_path = Path(scratch) / "spec.json"
        write_json(spec_path, spec)
        code = ("import sys; from moecollab.evaluation.harness import _lm_eval_worker; "
                "_lm_eval_worker(sys.argv[1])")
        done = subprocess.run([sys.executable, "-c", code, str(spec_path)], env=dict(os.environ),
                              capture_output=True, text=True)
        if done.returncode != 0:
            lines = [line for line in done.stderr.splitlines() if line.strip()]
            raise RuntimeError(f"lm-eval ({spec['backend']}) failed on "
                               f"{spec['model_args'].get('pretrained')}: "
                               f"{lines[-1] if lines else f'exit status {done.returncode}'}")
        return read_json(spec["output"])


def evaluate_checkpoints(
    checkpoints: Mapping[str, tuple[str, str]],
    tasks: Sequence[str],
    task_dir: str | os.PathLike | None = None,
    *,
    backend: str = "vllm",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    tensor_parallel_size: int = 1,
    gpu_memory_utilization: float = 0.85,
    device: str | None = None,
    batch_size: int | str = "auto",
    max_length: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    limit: int | float | None = None,
    num_fewshot: int = 0,
    bootstrap_iters: int = 100,
    offline: bool = True,
    random_seed: int = 0,
    progress: bool = True,
    return_items: bool = False,
) -> pd.DataFrame | tuple[pd.DataFrame, pd.DataFrame]:
    """Evaluate checkpoints on disk with lm-eval's ``vllm`` (or ``hf``) model type.

    Each checkpoint runs in a child process (lm-eval's ``simple_evaluate`` with
    ``model=backend``), so its GPU memory is returned before the next one loads; results are
    cached as in :func:`evaluate`.

    Parameters
    ----------
    checkpoints : mapping of str to (path, key)
        Name (e.g. ``unpruned``, ``caep@0.25``) → a folder or hub id that the backend loads
        as it is (for vLLM: a stock transformers checkpoint, every MoE layer with the same
        number of experts) and a key that identifies its weights.
    tasks, task_dir
        As in :func:`evaluate`.
    backend : {"vllm", "hf"}
        lm-eval's model type; see :func:`check_backend`.
    dtype, trust_remote_code
        Passed to the model type.
    tensor_parallel_size, gpu_memory_utilization
        vLLM only: GPUs one model is split over, and the share of their memory it may take.
    device : str or None
        ``hf`` only (``cpu``, ``cuda``); None lets lm-eval choose.
    batch_size, max_length, cache_dir, limit, num_fewshot, bootstrap_iters, offline,
    random_seed
        As in :func:`evaluate` (``batch_size`` may be ``"auto"``).
    progress : bool, default True
        A text progress bar over checkpoints.
    return_items : bool, default False
        Also return the per-document table, as :func:`evaluate_masks` does.

    Returns
    -------
    DataFrame, or (DataFrame, DataFrame) with ``return_items``
        Like :func:`evaluate_masks`: ``mask`` (the name), ``model_key`` (``<key>|<backend>``),
        then the :func:`results_table` columns.
    """
    from tqdm import tqdm

    check_backend(backend)
    if not checkpoints:
        raise ValueError("checkpoints must name at least one model; got none")
    tables, items = [], []
    local = read_task_manifests(task_dir)
    for name, (path, key) in tqdm(checkpoints.items(), desc="checkpoints",
                                  disable=not progress):
        model_key = f"{key}|{backend}"
        model_args: dict[str, Any] = {"pretrained": str(path), "dtype": dtype,
                                      "trust_remote_code": bool(trust_remote_code)}
        if backend == "vllm":
            model_args |= {"tensor_parallel_size": int(tensor_parallel_size),
                           "gpu_memory_utilization": float(gpu_memory_utilization)}
            if max_length is not None:
                model_args["max_model_len"] = int(max_length)
        elif max_length is not None:
            model_args["max_length"] = int(max_length)

        def run(to_run: list[str], model_args: dict[str, Any] = model_args) -> dict[str, Any]:
            return _run_in_child({
                "backend": backend, "model_args": model_args, "tasks": to_run,
                "include_path": str(task_dir) if task_dir is not None else None,
                "include_defaults": not all(task in local for task in to_run),
                "limit": limit, "num_fewshot": num_fewshot, "batch_size": batch_size,
                "device": device, "bootstrap_iters": bootstrap_iters,
                "random_seed": random_seed})

        raw = _evaluate(None, None, tasks, task_dir, model_key=model_key, limit=limit,
                        batch_size=batch_size, max_length=max_length, cache_dir=cache_dir,
                        num_fewshot=num_fewshot, bootstrap_iters=bootstrap_iters,
                        offline=offline, random_seed=random_seed, run=run)
        table = results_table(raw)
        table.insert(0, "model_key", model_key)
        table.insert(0, "mask", name)
        tables.append(table)
        items.append(item_table(raw).assign(mask=name))
    return _with_items(tables, items, return_items)


def _check_evaluate_kwargs(kwargs: Mapping[str, Any]) -> None:
    unknown = sorted(set(kwargs) - {"batch_size", "device", "max_length", "num_fewshot",
                                    "bootstrap_iters", "offline", "random_seed"})
    if unknown:
        raise ValueError(f"unknown keyword argument(s) for evaluate: {', '.join(unknown)}")


def _evaluate_defaults(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    defaults = {"batch_size": 32, "max_length": None, "num_fewshot": 0, "bootstrap_iters": 100,
                "offline": True, "random_seed": 0}
    return {**defaults, **kwargs}
