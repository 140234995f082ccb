"""lm-eval runs on unpruned and pruned models, and tidy result tables.

Every accuracy number of the study comes from lm-evaluation-harness (``lm_eval``), run on the
**in-memory** model through ``HFLM(pretrained=model, tokenizer=tokenizer)``, so a masked or
per-layer-pruned model needs no checkpoint on disk.

- :func:`write_mcq_tasks` and :func:`write_perplexity_tasks` turn the embedded corpus into local
  lm-eval tasks: one JSONL file and one task YAML per (domain, split) or domain, a shared
  template, one group per split, and a small JSON manifest naming the files of every task
  (and its family, domain and split: :func:`task_families` reads it back).
- :func:`evaluate` runs tasks (local or standard lm-eval ones) and caches each task's result as
  JSON, keyed by the model, the task definition (hash of the generated files), ``limit``,
  ``num_fewshot`` and the lm-eval version; :func:`evaluate_masks` does this for many keep-masks.
- :func:`results_table` and :func:`relative_drop` make long tables out of the raw results;
  :func:`item_table` keeps every task's per-document scores (lm-eval's ``log_samples``), so that
  two models can be compared item by item (:mod:`moecollab.paired`).

lm-eval and ``datasets`` read their offline switches and cache folder when they are imported.
:func:`evaluate` and :func:`check_tasks_resolve` set ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE``
and a project-local ``HF_DATASETS_CACHE`` inside a context manager that also patches the
already-imported ``datasets``/``huggingface_hub`` constants and restores everything afterwards.
Setting ``HF_HUB_OFFLINE=1`` and ``HF_DATASETS_OFFLINE=1`` in the environment before anything
imports ``datasets`` remains the most reliable way to run offline.
"""

from __future__ import annotations

import copy
import gc
import hashlib
import importlib.util
import json
import logging
import math
import os
import re
import sys
import tempfile
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from moecollab.artifacts import atomic_path, file_sha256, read_json, text_sha256, write_json
from moecollab.mask_set import MaskSet, mask_name
from moecollab.preflight import dataset_downloads_offline

logger = logging.getLogger(__name__)

__all__ = [
    "MCQ_METRICS",
    "PAPER_TASKS",
    "PERPLEXITY_METRICS",
    "BACKENDS",
    "LOCAL_TASKS",
    "add_method_columns",
    "check_backend",
    "check_standard_tasks",
    "check_tasks_resolve",
    "evaluate",
    "evaluate_checkpoints",
    "evaluate_masks",
    "evaluate_masks_in_workers",
    "exported_checkpoints",
    "item_table",
    "mask_key",
    "relative_drop",
    "results_table",
    "standard_table",
    "standard_task_names",
    "standard_tasks_of",
    "task_cache_keys",
    "task_families",
    "write_mcq_tasks",
    "write_perplexity_tasks",
]

#: Metrics of the multiple-choice tasks (``acc_norm`` divides by the choice's length in bytes).
MCQ_METRICS: tuple[str, ...] = ("acc", "acc_norm")
#: Metrics lm-eval computes for ``loglikelihood_rolling`` tasks.
PERPLEXITY_METRICS: tuple[str, ...] = ("word_perplexity", "byte_perplexity", "bits_per_byte")
#: The paper's zero-shot tasks (PIQA only in its first version; METHOD.md §6).
PAPER_TASKS: tuple[str, ...] = (
    "arc_challenge", "hellaswag", "winogrande", "rte", "openbookqa", "piqa",
)
#: Aliases accepted by :func:`standard_task_names`.
TASK_ALIASES: dict[str, tuple[str, ...]] = {
    "paper": PAPER_TASKS,
    "paper_v2": PAPER_TASKS[:5],
}

#: The entry of a ``tasks`` list that stands for this study's own corpus tasks.
LOCAL_TASKS = "local"
#: lm-eval model types for standard tasks: ``hf`` (in memory, any mask) or ``vllm``.
BACKENDS: tuple[str, ...] = ("hf", "vllm")

MCQ_PROMPT = "{{question}}\nAnswer:"
#: ``doc_to_text`` per item family: a Jinja template, or a feature name lm-eval reads as is.
MCQ_PROMPTS = {"mcq": MCQ_PROMPT, "cloze": "question", "word": "question"}
#: The accuracy each item family is judged by: ``acc_norm`` for term-to-definition items (as
#: the paper reads its tasks), ``acc`` for cloze items, whose options are single tokens that a
#: per-byte normalisation would only rank by length (field cloze, and word cloze:
#: :mod:`moecollab.data.word_cloze`).
ACCURACY_METRICS = {"mcq": "acc_norm", "cloze": "acc", "word": "acc"}
# Bumped whenever the layout of a cache entry changes (2: per-document samples).
CACHE_FORMAT = 2
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_MANIFEST_SUFFIX = "_tasks.json"


# --------------------------------------------------------------------------------------------
# Writing local tasks
# --------------------------------------------------------------------------------------------


def _check_name(kind: str, value: Any) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise ValueError(f"{kind} must be letters, digits, '_' or '-' (starting with a letter or "
                         f"digit); got {value!r}")
    return value


def _yaml_text(obj: Mapping[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(dict(obj), sort_keys=True, allow_unicode=True,
                          default_flow_style=False, width=10_000)


def _write_text(path: Path, text: str) -> None:
    """Write ``text`` atomically, leaving an identical file untouched (stable mtimes)."""
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _jsonl_text(rows: Sequence[Mapping[str, Any]]) -> str:
    return "".join(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n" for row in rows)


def _remove_stale(task_dir: Path, manifest_name: str, keep: set[str]) -> None:
    """Delete files a previous write listed in its manifest that the new write does not use."""
    path = task_dir / manifest_name
    if not path.is_file():
        return
    try:
        previous = read_json(path)
    except (OSError, ValueError):
        return
    old_files = {name for entry in (*previous.get("tasks", {}).values(),
                                    *previous.get("groups", {}).values())
                 for name in entry.get("files", [])}
    for name in sorted(old_files - keep):
        stale = task_dir / name
        if stale.is_file() and stale.parent == task_dir:
            stale.unlink()


def _group_yaml(group: str, subtasks: list[str], metrics: Sequence[str]) -> dict[str, Any]:
    return {
        "group": group,
        "task": subtasks,
        "aggregate_metric_list": [
            {"metric": metric, "aggregation": "mean", "weight_by_size": False}
            for metric in metrics
        ],
        "metadata": {"version": 1.0},
    }


def write_mcq_tasks(
    items: pd.DataFrame,
    task_dir: str | os.PathLike,
    *,
    prefix: str = "moecollab",
    splits: Sequence[str] = ("train", "test"),
    family: str = "mcq",
) -> list[str]:
    """Write multiple-choice items as local lm-eval tasks, one per (domain, split).

    Parameters
    ----------
    items : DataFrame
        As made by :func:`moecollab.data.make_mcq_items`: columns ``item_id``, ``domain``,
        ``split``, ``term``, ``question``, ``choices`` (list of str) and ``answer`` (int index
        of the right choice).
    task_dir : path
        Folder for the files (created). Files of an earlier call with the same ``prefix`` that
        this call no longer writes are removed.
    prefix : str, default "moecollab"
        First part of every file, task and group name.
    splits : sequence of str, default ("train", "test")
        Splits to write; ``train`` items ask about headwords the model was trained on (recall),
        ``test`` items about held-out headwords.
    family : {"mcq", "cloze", "word"}, default "mcq"
        ``mcq``: a question answered after ``"\\nAnswer:"``. ``cloze``
        (:func:`moecollab.data.make_cloze_items`) and ``word``
        (:func:`moecollab.data.word_cloze.make_word_cloze_items`): the question is an unfinished
        text that each choice continues directly. The family is the second part of every name.

    Returns
    -------
    list of str
        Task names ``<prefix>_<family>_<domain>_<split>`` (by split, then domain in the
        corpus's order, unknown domains sorted after), then group names
        ``<prefix>_<family>_<split>``.

    Notes
    -----
    Per ``mcq`` task the prompt is ``"<question>\\nAnswer:"``, per ``cloze`` task the question
    itself (given to lm-eval as a feature name, which skips a template per document), and
    each choice is scored as the continuation ``" <choice>"``; metrics ``acc`` and
    ``acc_norm`` (lm-eval's ``multiple_choice``). A group averages its domains without
    weighting by size (``weight_by_size: false``). The YAML files carry **absolute**
    ``data_files`` paths: ``datasets`` resolves relative ones against the working directory,
    not the YAML folder.
    Items are written in ``item_id`` order with sorted JSON keys, so the same items give the
    same bytes.
    """
    prefix = _check_name("prefix", prefix)
    needed = {"item_id", "domain", "split", "question", "choices", "answer"}
    missing = sorted(needed - set(items.columns))
    if missing:
        raise ValueError(f"items lacks column(s) {', '.join(missing)}; expected the output of "
                         "moecollab.data.make_mcq_items")
    if isinstance(splits, str) or not splits:
        raise ValueError(f"splits must be a non-empty sequence of split names; got {splits!r}")
    for split in splits:
        _check_name("split", split)
    if family not in MCQ_PROMPTS:
        raise ValueError(f"family must be one of {', '.join(MCQ_PROMPTS)}; got {family!r}")
    task_dir = Path(task_dir).resolve()
    task_dir.mkdir(parents=True, exist_ok=True)

    template_name = f"_{prefix}_{family}_template_yaml"
    template = {
        "dataset_path": "json",
        "output_type": "multiple_choice",
        "test_split": "train",  # the data_files key, not the corpus split
        "doc_to_text": MCQ_PROMPTS[family],
        "doc_to_choice": "choices",  # a feature name: the list is used as is
        "doc_to_target": "answer",
        "metric_list": [
            {"metric": metric, "aggregation": "mean", "higher_is_better": True}
            for metric in MCQ_METRICS
        ],
        "metadata": {"version": 1.0},
    }
    domain_order = _domain_order(items["domain"])
    tasks: dict[str, dict[str, Any]] = {}
    groups: dict[str, dict[str, Any]] = {}
    texts: dict[str, str] = {template_name: _yaml_text(template)}
    for split in splits:
        subtasks = []
        for domain in domain_order:
            _check_name("domain", domain)
            rows = _task_rows(items, domain, split)
            if rows.empty:
                continue
            name = f"{prefix}_{family}_{domain}_{split}"
            data_name, yaml_name = f"{name}.jsonl", f"{name}.yaml"
            texts[data_name] = _jsonl_text([_mcq_row(row) for row in rows.to_dict("records")])
            texts[yaml_name] = _yaml_text({
                "include": template_name,
                "task": name,
                "dataset_kwargs": {"data_files": {"train": str(task_dir / data_name)}},
            })
            tasks[name] = {"kind": "mcq", "family": family, "domain": domain, "split": split,
                           "n_docs": len(rows), "files": [template_name, yaml_name, data_name]}
            subtasks.append(name)
        if not subtasks:
            logger.warning("no MCQ items in split %r; no tasks written for it", split)
            continue
        group = f"{prefix}_{family}_{split}"
        texts[f"{group}.yaml"] = _yaml_text(_group_yaml(group, subtasks, MCQ_METRICS))
        groups[group] = {"kind": "mcq", "family": family, "domain": "all", "split": split,
                         "subtasks": subtasks,
                         "files": [f"{group}.yaml"]}
    if not tasks:
        raise ValueError(f"items has no rows in splits {list(splits)}; got splits "
                         f"{sorted(set(items['split']))}")
    _write_task_files(task_dir, f"{prefix}_{family}{_MANIFEST_SUFFIX}", texts, tasks, groups)
    return [*tasks, *groups]


def _task_rows(items: pd.DataFrame, domain: str, split: str) -> pd.DataFrame:
    """The items of one task, in the order of its documents (lm-eval's ``doc_id``)."""
    rows = items[(items["domain"] == domain) & (items["split"] == split)]
    return rows.sort_values("item_id", kind="stable")


def document_clusters(items: pd.DataFrame, *, splits: Sequence[str], family: str = "mcq",
                      prefix: str = "moecollab") -> pd.DataFrame:
    """Which cluster each document of :func:`write_mcq_tasks`'s tasks belongs to.

    Items cut from one entry (several cloze blanks of one definition) share their text, so an
    interval must resample them together; the cluster is the item's ``entry_id`` where items
    have one, else the item itself. Same arguments as :func:`write_mcq_tasks`.

    Returns
    -------
    DataFrame
        ``task``, ``doc_id`` and ``cluster`` (a string), one row per document: the column
        :func:`moecollab.paired.resample_tasks` resamples whole when the per-item table has it.

    Examples
    --------
    >>> items = pd.DataFrame({"item_id": ["c-e1-4", "c-e1-2", "c-e2-3"],
    ...                       "entry_id": ["e1", "e1", "e2"], "domain": "law", "split": "test"})
    >>> found = document_clusters(items, splits=["test"], family="cloze")
    >>> found["task"].unique().tolist(), found["doc_id"].tolist(), found["cluster"].tolist()
    (['moecollab_cloze_law_test'], [0, 1, 2], ['e1', 'e1', 'e2'])
    """
    rows = []
    for split in splits:
        for domain in _domain_order(items["domain"]):
            task_items = _task_rows(items, domain, split)
            clusters = (task_items["entry_id"] if "entry_id" in task_items
                        else task_items["item_id"])
            rows += [{"task": f"{prefix}_{family}_{domain}_{split}", "doc_id": doc_id,
                      "cluster": str(cluster)} for doc_id, cluster in enumerate(clusters)]
    return pd.DataFrame(rows, columns=["task", "doc_id", "cluster"])


def _domain_order(domains: pd.Series) -> list[str]:
    """The corpus's domain order (``moecollab.data.DOMAINS``), then other names sorted."""
    from moecollab.data.corpus import DOMAINS

    rank = {name: index for index, name in enumerate(DOMAINS)}
    return sorted(set(domains.tolist()), key=lambda name: (rank.get(name, len(rank)), str(name)))


def _mcq_row(row: Mapping[str, Any]) -> dict[str, Any]:
    choices = [str(choice) for choice in row["choices"]]
    answer = int(row["answer"])
    if len(choices) < 2 or not 0 <= answer < len(choices):
        raise ValueError(f"item {row['item_id']!r}: answer must index one of at least two "
                         f"choices; got answer={answer} with {len(choices)} choices")
    out = {key: str(row[key]) for key in ("item_id", "domain", "split", "question")}
    for key in ("term", "entry_id"):
        if key in row:
            out[key] = str(row[key])
    return {**out, "choices": choices, "answer": answer}


def _write_task_files(task_dir: Path, manifest_name: str, texts: dict[str, str],
                      tasks: dict[str, Any], groups: dict[str, Any]) -> None:
    _remove_stale(task_dir, manifest_name, set(texts))
    for name, text in texts.items():
        _write_text(task_dir / name, text)
    manifest = {"format": CACHE_FORMAT, "tasks": tasks, "groups": groups}
    _write_text(task_dir / manifest_name,
                json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def write_perplexity_tasks(
    texts_by_domain: Mapping[str, Sequence[str]],
    task_dir: str | os.PathLike,
    *,
    prefix: str = "moecollab",
) -> list[str]:
    """Write held-out text as local lm-eval perplexity tasks, one per domain, plus a group.

    Parameters
    ----------
    texts_by_domain : mapping of str to sequence of str
        Held-out documents per domain; each document is scored as a whole
        (``loglikelihood_rolling``, in windows of the model's maximum length). Empty documents
        are skipped.
    task_dir : path
        Folder for the files (created); may be the folder of :func:`write_mcq_tasks`.
    prefix : str, default "moecollab"

    Returns
    -------
    list of str
        Task names ``<prefix>_ppl_<domain>``, then the group ``<prefix>_ppl``.

    Notes
    -----
    Metrics are lm-eval's ``word_perplexity``, ``byte_perplexity`` and ``bits_per_byte``
    (lower is better). The group reports their unweighted mean over domains.
    """
    prefix = _check_name("prefix", prefix)
    if not texts_by_domain:
        raise ValueError("texts_by_domain must name at least one domain; got an empty mapping")
    task_dir = Path(task_dir).resolve()
    task_dir.mkdir(parents=True, exist_ok=True)
    template_name = f"_{prefix}_ppl_template_yaml"
    template = {
        "dataset_path": "json",
        "output_type": "loglikelihood_rolling",
        "test_split": "train",
        "doc_to_text": "",
        "doc_to_target": "text",
        "metric_list": [
            {"metric": metric, "aggregation": aggregation, "higher_is_better": False}
            for metric, aggregation in zip(
                PERPLEXITY_METRICS, ("weighted_perplexity", "weighted_perplexity",
                                     "bits_per_byte"), strict=True)
        ],
        "metadata": {"version": 1.0},
    }
    texts: dict[str, str] = {template_name: _yaml_text(template)}
    tasks: dict[str, dict[str, Any]] = {}
    for domain, documents in texts_by_domain.items():
        _check_name("domain", domain)
        if isinstance(documents, str):
            raise ValueError(f"texts_by_domain[{domain!r}] must be a list of documents; got a "
                             "single str")
        rows = [{"domain": domain, "text": str(text)} for text in documents if str(text).strip()]
        if not rows:
            raise ValueError(f"texts_by_domain[{domain!r}] has no non-empty document")
        name = f"{prefix}_ppl_{domain}"
        data_name, yaml_name = f"{name}.jsonl", f"{name}.yaml"
        texts[data_name] = _jsonl_text(rows)
        texts[yaml_name] = _yaml_text({
            "include": template_name,
            "task": name,
            "dataset_kwargs": {"data_files": {"train": str(task_dir / data_name)}},
        })
        tasks[name] = {"kind": "perplexity", "domain": domain, "split": "heldout",
                       "n_docs": len(rows), "files": [template_name, yaml_name, data_name]}
    group = f"{prefix}_ppl"
    texts[f"{group}.yaml"] = _yaml_text(_group_yaml(group, list(tasks), PERPLEXITY_METRICS))
    groups = {group: {"kind": "perplexity", "domain": "all", "split": "heldout",
                      "subtasks": list(tasks), "files": [f"{group}.yaml"]}}
    _write_task_files(task_dir, f"{prefix}_ppl{_MANIFEST_SUFFIX}", texts, tasks, groups)
    return [*tasks, group]


def _read_task_manifests(task_dir: str | os.PathLike | None) -> dict[str, dict[str, Any]]:
    """Name → {kind, domain, split, files, subtasks?} for every task written by this module."""
    if task_dir is None:
        return {}
    info: dict[str, dict[str, Any]] = {}
    for path in sorted(Path(task_dir).glob(f"*{_MANIFEST_SUFFIX}")):
        manifest = read_json(path)
        for section in ("tasks", "groups"):
            for name, entry in manifest.get(section, {}).items():
                info[name] = {**entry, "is_group": section == "groups"}
    return info


def task_families(names: str | Iterable[str], task_dir: str | os.PathLike
                  ) -> dict[str, str | None]:
    """The item family of local tasks and groups, as their task manifests record it.

    Parameters
    ----------
    names : str or iterable of str
        Task or group names written by :func:`write_mcq_tasks` or
        :func:`write_perplexity_tasks` into ``task_dir``.
    task_dir : path
        The folder those functions wrote (its ``*_tasks.json`` manifests are read once).

    Returns
    -------
    dict of str to str or None
        Name → ``"mcq"``, ``"cloze"`` or ``"word"`` (the ``family`` given to
        :func:`write_mcq_tasks`); None for a perplexity task or group, which has no item
        family. Read from the manifests, never parsed out of the name: a prefix or domain may
        itself contain ``_``.

    Raises
    ------
    ValueError
        A name that no manifest in ``task_dir`` lists.
    """
    names = [names] if isinstance(names, str) else list(names)
    info = _read_task_manifests(task_dir)
    unknown = [name for name in dict.fromkeys(names) if name not in info]
    if unknown:
        known = sorted(info)
        shown = ", ".join(known[:6]) + (f", … ({len(known)} in all)" if len(known) > 6 else "")
        raise ValueError(f"unknown local task(s) {', '.join(map(repr, unknown))}: not in the "
                         f"task manifests of {task_dir}; known: {shown or 'none'}")
    return {name: info[name].get("family") for name in names}


# --------------------------------------------------------------------------------------------
# Standard tasks
# --------------------------------------------------------------------------------------------


def standard_task_names(profile_tasks: Sequence[str] | None) -> list[str]:
    """The standard lm-eval tasks a profile asks for, aliases expanded, duplicates dropped.

    Parameters
    ----------
    profile_tasks : sequence of str or None
        lm-eval task or group names, or the aliases ``"paper"`` (the six zero-shot tasks of
        the paper's first version: :data:`PAPER_TASKS`) and ``"paper_v2"`` (the five of the
        revised version, without PIQA). None or empty gives no tasks.

    Returns
    -------
    list of str
        In the order given. Whether lm-eval knows them is checked by
        :func:`check_tasks_resolve`.

    Examples
    --------
    >>> standard_task_names(["paper_v2", "rte", "mmlu"])
    ['arc_challenge', 'hellaswag', 'winogrande', 'rte', 'openbookqa', 'mmlu']
    """
    if profile_tasks is None:
        return []
    if isinstance(profile_tasks, str):
        raise ValueError(f"profile_tasks must be a list of task names; got the str "
                         f"{profile_tasks!r} (write [{profile_tasks!r}])")
    names: list[str] = []
    for entry in profile_tasks:
        if not isinstance(entry, str) or not entry.strip():
            raise ValueError(f"profile_tasks entries must be non-empty str; got {entry!r}")
        for name in TASK_ALIASES.get(entry.strip(), (entry.strip(),)):
            if name not in names:
                names.append(name)
    return names


def check_tasks_resolve(
    names: Sequence[str],
    *,
    include_path: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> list[str]:
    """The names lm-eval does not know as a task, group or tag (downloads nothing).

    Parameters
    ----------
    names : sequence of str
    include_path : path, optional
        A folder of local task YAMLs to index as well (e.g. the ``task_dir`` of
        :func:`write_mcq_tasks`).
    cache_dir : path, optional
        Parent of the ``datasets`` cache used while lm-eval is imported (default: a
        temporary folder).

    Returns
    -------
    list of str
        Unknown names, in the order given; empty when every name resolves.
    """
    with _hf_environment(cache_dir, offline=True):
        from lm_eval.tasks import TaskManager

        task_manager = TaskManager(
            include_path=str(include_path) if include_path is not None else None)
        known = set(task_manager.all_tasks)
    return [name for name in names if name not in known]


def standard_tasks_of(tasks: Sequence[str]) -> list[str]:
    """The standard lm-eval tasks in an evaluation ``tasks`` list (``local`` must be in it).

    Parameters
    ----------
    tasks : sequence of str
        :data:`LOCAL_TASKS` (``"local"``: this study's corpus tasks, which every table of the
        evaluation chapter is built from) plus lm-eval task, group or tag names and the aliases
        of :func:`standard_task_names`.

    Returns
    -------
    list of str
        The standard names, aliases expanded, in order; empty for ``["local"]``.

    Examples
    --------
    >>> standard_tasks_of(["local", "paper_v2"])
    ['arc_challenge', 'hellaswag', 'winogrande', 'rte', 'openbookqa']
    """
    if isinstance(tasks, str) or not isinstance(tasks, Sequence):
        raise ValueError(f"tasks must be a list of task names; got {tasks!r}")
    if LOCAL_TASKS not in tasks:
        raise ValueError(f"tasks must include {LOCAL_TASKS!r} (the chapter's tables are built from "
                         f"the corpus tasks); got {list(tasks)!r}, e.g. [local, paper]")
    return standard_task_names([name for name in tasks if name != LOCAL_TASKS])


def check_backend(backend: str) -> str:
    """``backend`` if lm-eval can run it here; one clear line otherwise (vLLM not installed)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if backend == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ValueError("backend 'vllm' needs the vllm package, which is not installed here: "
                         "pip install 'lm_eval[vllm]' (Linux with a CUDA GPU), or use backend hf")
    return backend


def check_standard_tasks(names: Sequence[str], *, cache_dir: str | os.PathLike | None = None,
                         offline: bool | None = None) -> None:
    """Check before any heavy work that lm-eval knows ``names`` and can load their datasets.

    Unknown names and datasets that cannot be loaded (the hub offline and the data not cached,
    say) each raise a ``ValueError`` of one line. With the hub reachable this downloads the
    datasets into ``<cache_dir>/hf``, where :func:`evaluate` finds them.

    Parameters
    ----------
    names : sequence of str
        Standard task names (aliases expanded, see :func:`standard_tasks_of`); empty: no check.
    cache_dir : path, optional
        As in :func:`evaluate`.
    offline : bool, optional
        Default: :func:`moecollab.preflight.dataset_downloads_offline`.
    """
    names = list(names)
    if not names:
        return
    offline = dataset_downloads_offline() if offline is None else offline
    with _hf_environment(cache_dir, offline=offline):
        from lm_eval.tasks import TaskManager

        task_manager = TaskManager()
        unknown = [name for name in names if name not in set(task_manager.all_tasks)]
        if unknown:
            raise ValueError(f"tasks: lm-eval knows no task, group or tag named "
                             f"{', '.join(unknown)} (aliases here: local, "
                             f"{', '.join(TASK_ALIASES)})")
        try:
            task_manager.load(names)
        except Exception as error:  # datasets raises many kinds; the first line says which
            reason = (str(error).splitlines() or [type(error).__name__])[0]
            where = ("the hub is offline here (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set) "
                     "and they are not in the cache" if offline else "loading them failed")
            raise ValueError(
                f"the standard tasks {', '.join(names)} need their datasets from the hub; "
                f"{where} ({reason}); run with HF_HUB_OFFLINE=0 HF_DATASETS_OFFLINE=0 and hub "
                "access, or set tasks to [local]") from None


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


# --------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------


@contextmanager
def _hf_environment(cache_dir: str | os.PathLike | None, *, offline: bool) -> Iterator[Path]:
    """Offline switches and a project-local ``datasets`` cache, restored on exit.

    ``datasets`` and ``huggingface_hub`` copy the environment into module constants at import
    time, so the constants of already-imported modules are patched as well.
    """
    with tempfile.TemporaryDirectory(prefix="moecollab-hf-") as scratch:
        hf_home = Path(cache_dir) / "hf" if cache_dir is not None else Path(scratch)
        datasets_cache = hf_home / "datasets"
        datasets_cache.mkdir(parents=True, exist_ok=True)
        env = {"HF_HOME": str(hf_home), "HF_DATASETS_CACHE": str(datasets_cache)}
        if offline:
            env |= {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        saved_env = {key: os.environ.get(key) for key in env}
        patches: list[tuple[Any, str, Any]] = []
        datasets_config = sys.modules.get("datasets.config")
        if datasets_config is not None:
            patches.append((datasets_config, "HF_DATASETS_CACHE", datasets_cache))
            if offline:
                patches.append((datasets_config, "HF_HUB_OFFLINE", True))
                patches.append((datasets_config, "HF_DATASETS_OFFLINE", True))
        hub_constants = sys.modules.get("huggingface_hub.constants")
        if hub_constants is not None and offline:
            patches.append((hub_constants, "HF_HUB_OFFLINE", True))
        saved_attrs = [(module, attr, getattr(module, attr)) for module, attr, _ in patches
                       if hasattr(module, attr)]
        os.environ.update(env)
        for module, attr, value in patches:
            setattr(module, attr, value)
        try:
            yield datasets_cache
        finally:
            for module, attr, value in saved_attrs:
                setattr(module, attr, value)
            for key, value in saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def _lm_eval_version() -> str:
    try:
        return metadata.version("lm_eval")
    except metadata.PackageNotFoundError:  # pragma: no cover - lm-eval is a dependency
        return "unknown"


# --------------------------------------------------------------------------------------------
# Cache keys
# --------------------------------------------------------------------------------------------


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


def _definition_hashes(names: Sequence[str], task_dir: str | os.PathLike | None
                       ) -> dict[str, str]:
    """Hash of the files that define each task; lm-eval's own tasks are keyed by name only."""
    info = _read_task_manifests(task_dir)
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


def _cache_key_dicts(tasks: Sequence[str], task_dir: str | os.PathLike | None, *,
                     model_key: str, limit: int | float | None, num_fewshot: int,
                     max_length: int | None, bootstrap_iters: int) -> dict[str, dict[str, Any]]:
    hashes = _definition_hashes(tasks, task_dir)
    version = _lm_eval_version()
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


def _digest(key: Mapping[str, Any]) -> str:
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
    keys = _cache_key_dicts(tasks, task_dir, model_key=model_key, limit=limit,
                            num_fewshot=num_fewshot, max_length=max_length,
                            bootstrap_iters=bootstrap_iters)
    return {name: _digest(key) for name, key in keys.items()}


def _cache_path(cache_dir: Path, name: str, key: Mapping[str, Any]) -> Path:
    return cache_dir / "lm_eval_results" / f"{name}.{_digest(key)[:20]}.json"


def _load_cached(path: Path, key: Mapping[str, Any]) -> dict[str, Any] | None:
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


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def _json_value(value: Any) -> Any:
    if isinstance(value, (bool, str)) or value is None:
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if isinstance(value, Mapping):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    return str(value)


def _descendants(name: str, group_subtasks: Mapping[str, Sequence[str]]) -> list[str]:
    names = [name]
    for child in group_subtasks.get(name, []):
        names.extend(_descendants(child, group_subtasks))
    return names


def _entries_of_raw(raw: Mapping[str, Any], names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Split lm-eval's output into one self-contained entry per requested task or group."""
    results = raw.get("results", {})
    groups = raw.get("groups", {})
    group_subtasks = raw.get("group_subtasks", {})
    n_samples = raw.get("n-samples", {})
    samples = raw.get("samples") or {}
    entries = {}
    for name in names:
        subtree = [member for member in _descendants(name, group_subtasks) if member in results]
        if name not in subtree:
            raise RuntimeError(f"lm-eval returned no result for task {name!r}")
        entries[name] = _json_value({
            "results": {member: results[member] for member in subtree},
            "groups": {member: groups[member] for member in subtree if member in groups},
            "group_subtasks": {member: list(group_subtasks[member]) for member in subtree
                               if member in group_subtasks},
            "n_samples": {member: n_samples[member] for member in subtree
                          if member in n_samples},
            "samples": {member: _compact_samples(samples[member]) for member in subtree
                        if member in samples},
        })
    return entries


def _compact_samples(samples: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
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
                row[metric] = [_number(value[0]), _number(value[1])]
            elif isinstance(value, (bool, int, float, np.integer, np.floating)):
                row[metric] = float(value)
        rows[doc_id] = row
    return [rows[doc_id] for doc_id in sorted(rows)]


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


def _run_lm_eval(model: Any, tokenizer: Any, tasks: list[str], task_dir: str | os.PathLike |
                 None, *, limit: int | float | None, batch_size: int, max_length: int | None,
                 num_fewshot: int, bootstrap_iters: int, random_seed: int) -> dict[str, Any]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    from moecollab.scoring import SharedContextLM

    # lm-eval's HFLM with identical inputs shared and text tokenized once per tokenizer, for
    # all the masks of a study (same numbers: tests/test_scoring.py). With a model object HFLM
    # ignores its `device` argument and uses the model's device.
    language_model = SharedContextLM(pretrained=model, tokenizer=tokenizer,
                                     batch_size=batch_size, max_length=max_length,
                                     encodings=_shared_encodings(tokenizer))
    # Indexing lm-eval's own few thousand YAMLs takes ~5 s: skip it when every task is local.
    local = _read_task_manifests(task_dir)
    task_manager = TaskManager(include_path=str(task_dir) if task_dir is not None else None,
                               include_defaults=not all(name in local for name in tasks))
    with _preserved_global_rngs():  # simple_evaluate seeds python's, numpy's and torch's RNGs
        raw = lm_eval.simple_evaluate(
            model=language_model, tasks=list(tasks), task_manager=task_manager, limit=limit,
            num_fewshot=num_fewshot, log_samples=True, bootstrap_iters=bootstrap_iters,
            random_seed=random_seed, numpy_random_seed=random_seed,
            torch_random_seed=random_seed, fewshot_random_seed=random_seed)
    if raw is None:  # only on non-zero ranks of a distributed run
        raise RuntimeError("lm_eval.simple_evaluate returned no results")
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
    keys = _cache_key_dicts(tasks, task_dir, model_key=model_key, limit=limit,
                            num_fewshot=num_fewshot, max_length=max_length,
                            bootstrap_iters=bootstrap_iters)
    cache = Path(cache_dir) if cache_dir is not None else None
    entries: dict[str, dict[str, Any]] = {}
    if cache is not None:
        for name in tasks:
            entry = _load_cached(_cache_path(cache, name, keys[name]), keys[name])
            if entry is not None:
                entries[name] = entry
    missing = [name for name in tasks if name not in entries]
    if missing:
        logger.info("evaluating %s on %s (cached: %d)", ", ".join(missing), model_key,
                    len(entries))
        # lm-eval refuses a group together with one of its members ("Duplicate task"): run
        # the group only; the member's result is part of the group's.
        to_run = _without_members(missing, _read_task_manifests(task_dir))
        with _hf_environment(cache, offline=offline):
            if run is not None:
                raw = run(to_run)
            else:
                raw = _run_lm_eval(model_factory(), tokenizer, to_run, task_dir, limit=limit,
                                   batch_size=batch_size, max_length=max_length,
                                   num_fewshot=num_fewshot, bootstrap_iters=bootstrap_iters,
                                   random_seed=random_seed)
        fresh = _entries_of_raw(raw, missing)
        if cache is not None:
            for name, entry in fresh.items():
                write_json(_cache_path(cache, name, keys[name]), {"key": keys[name],
                                                                   "entry": entry})
        entries.update(fresh)
    info = _read_task_manifests(task_dir)
    merged: dict[str, Any] = {"results": {}, "groups": {}, "group_subtasks": {},
                              "n_samples": {}, "samples": {}}
    for name in tasks:
        entry = entries[name]
        # Requested order, each group followed by its members (cached JSON has sorted keys).
        for member in _descendants(name, entry["group_subtasks"]):
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
        "lm_eval": _lm_eval_version(), "cache_keys": {name: _digest(keys[name])
                                                      for name in tasks},
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
        Run with ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` set (see the module docstring).
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
    unknown = sorted(set(kwargs) - {"batch_size", "device", "max_length", "num_fewshot",
                                    "bootstrap_iters", "offline", "random_seed"})
    if unknown:
        raise ValueError(f"unknown keyword argument(s) for evaluate: {', '.join(unknown)}")
    device = kwargs.pop("device", None)
    if device is not None:
        from moecollab.models import resolve_device

        base_model.to(resolve_device(device))
    tables, items = [], []
    for name, keep_mask in tqdm(masks.items(), desc="keep-masks", disable=not progress):
        key = mask_key(base_key, keep_mask, mode)

        def model_factory(keep_mask: np.ndarray | None = keep_mask) -> Any:
            return _pruned_copy(base_model, keep_mask, mode).eval()

        raw = _evaluate(model_factory, tokenizer, tasks, task_dir, model_key=key, limit=limit,
                        cache_dir=cache_dir, **_evaluate_defaults(kwargs))
        table = results_table(raw)
        table.insert(0, "model_key", key)
        table.insert(0, "mask", name)
        tables.append(table)
        items.append(item_table(raw).assign(mask=name))
        gc.collect()  # the pruned copy is unreachable now
    return _with_items(tables, items, return_items)


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
    itself (:func:`moecollab.models.load_reference_model`, on the CPU) and runs
    :func:`evaluate_masks` on its share, writing the cache; :func:`evaluate_masks` called
    afterwards with the same arguments reads every result from it. Masks with the same key are
    evaluated once; masks already cached are skipped.

    Returns
    -------
    int
        The number of distinct masks handed to workers.
    """
    import subprocess

    if isinstance(n_workers, bool) or not isinstance(n_workers, int) or n_workers < 1:
        raise ValueError(f"n_workers must be a positive int; got {n_workers!r}")
    distinct: dict[str, tuple[str, np.ndarray | None]] = {}
    for name, keep_mask in masks.items():
        distinct.setdefault(mask_key(base_key, keep_mask, mode), (name, keep_mask))
    shares = [list(distinct.values())[index::n_workers] for index in range(n_workers)]
    shares = [share for share in shares if share]
    code = ("import sys; from moecollab.evaluation import _mask_worker; "
            "_mask_worker(sys.argv[1])")
    with tempfile.TemporaryDirectory(prefix="moecollab-masks-") as scratch:
        running = []
        for index, share in enumerate(shares):
            arrays = {name: keep_mask for name, keep_mask in share if keep_mask is not None}
            np.savez(Path(scratch) / f"masks{index}.npz", **arrays)
            spec = {"stage_00_folder": str(stage_00_folder), "tasks": list(tasks),
                    "task_dir": str(task_dir), "base_key": base_key, "mode": mode,
                    "cache_dir": str(cache_dir), "limit": limit, "kwargs": dict(kwargs),
                    "masks": str(Path(scratch) / f"masks{index}.npz"),
                    "unpruned": [name for name, keep_mask in share if keep_mask is None]}
            spec_path = Path(scratch) / f"spec{index}.json"
            write_json(spec_path, spec)
            environment = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
            running.append(subprocess.Popen(
                [sys.executable, "-c", code, str(spec_path)], env=environment,
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
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
    """One worker of :func:`evaluate_masks_in_workers` (a child process)."""
    import torch

    from moecollab.models import load_reference_model

    torch.set_num_threads(1)
    spec = read_json(spec_path)
    with np.load(spec["masks"]) as stored:
        masks: dict[str, np.ndarray | None] = {name: stored[name] for name in stored.files}
    masks |= {name: None for name in spec["unpruned"]}
    model, tokenizer = load_reference_model(spec["stage_00_folder"], device="cpu")
    evaluate_masks(model, tokenizer, masks, spec["tasks"], spec["task_dir"],
                   base_key=spec["base_key"], mode=spec["mode"], cache_dir=spec["cache_dir"],
                   limit=spec["limit"], progress=False, **spec["kwargs"])


def _with_items(tables: list[pd.DataFrame], items: list[pd.DataFrame], return_items: bool
                ) -> pd.DataFrame | tuple[pd.DataFrame, pd.DataFrame]:
    results = pd.concat(tables, ignore_index=True)
    if not return_items:
        return results
    per_item = pd.concat(items, ignore_index=True)
    return results, per_item[["mask", *_ITEM_COLUMNS]]


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
    output["samples"] = {task: _compact_samples(samples)
                         for task, samples in (raw.get("samples") or {}).items()}
    write_json(spec["output"], _json_value(output))


def _run_in_child(spec: dict[str, Any]) -> dict[str, Any]:
    """lm-eval in a child process, so that each model (vLLM's above all) frees its GPU memory."""
    import subprocess

    with tempfile.TemporaryDirectory(prefix="moecollab-lm-eval-") as scratch:
        spec = {**spec, "output": str(Path(scratch) / "results.json")}
        spec_path = Path(scratch) / "spec.json"
        write_json(spec_path, spec)
        code = ("import sys; from moecollab.evaluation import _lm_eval_worker; "
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
    local = _read_task_manifests(task_dir)
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


def _evaluate_defaults(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    defaults = {"batch_size": 32, "max_length": None, "num_fewshot": 0, "bootstrap_iters": 100,
                "offline": True, "random_seed": 0}
    return {**defaults, **kwargs}


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


_TABLE_COLUMNS = ["task", "kind", "domain", "split", "metric", "value", "stderr", "n_samples"]


def _number(value: Any) -> float:
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        return float(value)
    return math.nan  # lm-eval writes "N/A" where it has no standard error


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
                "value": _number(value),
                "stderr": _number(stderr),
                "n_samples": _number(count.get("effective")) if isinstance(count, Mapping)
                else math.nan,
            })
    return pd.DataFrame(rows, columns=_TABLE_COLUMNS)


_ITEM_COLUMNS = ["task", "domain", "split", "doc_id", "n_choices", "acc", "acc_norm",
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
                "n_choices": _number(sample.get("n_choices")),
                "acc": _number(sample.get("acc")),
                "acc_norm": _number(sample.get("acc_norm")),
                "loglikelihood": _number(pair[0]) if pair else math.nan,
                "n_words": _number(words[1]) if words else math.nan,
                "n_bytes": _number(size[1]) if size else math.nan,
            })
    return pd.DataFrame(rows, columns=_ITEM_COLUMNS)


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
