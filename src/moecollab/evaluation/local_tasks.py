"""This study's corpus as local lm-eval tasks: writing their folders, reading them back.

:func:`write_mcq_tasks` and :func:`write_perplexity_tasks` turn the embedded corpus into local
lm-eval tasks: one JSONL file and one task YAML per (domain, split) or domain, a shared
template, one group per split, and a small JSON manifest naming the files of every task (and
its family, domain and split). :func:`read_task_manifests` and :func:`task_families` read the
manifests back; :func:`document_clusters` says which documents of a task share their text.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from moecollab.artifacts import atomic_path, read_json
from moecollab.data.sources import ITEM_COLUMNS

logger = logging.getLogger(__name__)

__all__ = [
    "ACCURACY_METRICS",
    "MCQ_METRICS",
    "MCQ_PROMPT",
    "MCQ_PROMPTS",
    "PERPLEXITY_METRICS",
    "document_clusters",
    "read_task_manifests",
    "task_families",
    "write_mcq_tasks",
    "write_perplexity_tasks",
]

#: Metrics of the multiple-choice tasks (``acc_norm`` divides by the choice's length in bytes).
MCQ_METRICS: tuple[str, ...] = ("acc", "acc_norm")
#: Metrics lm-eval computes for ``loglikelihood_rolling`` tasks.
PERPLEXITY_METRICS: tuple[str, ...] = ("word_perplexity", "byte_perplexity", "bits_per_byte")

MCQ_PROMPT = "{{question}}\nAnswer:"
#: ``doc_to_text`` per item family: a Jinja template, or a feature name lm-eval reads as is.
MCQ_PROMPTS = {"mcq": MCQ_PROMPT, "cloze": "question", "word": "question"}
#: The accuracy each item family is judged by: ``acc_norm`` for term-to-definition items (as
#: the paper reads its tasks), ``acc`` for cloze items, whose options are single tokens that a
#: per-byte normalisation would only rank by length (field cloze, and word cloze:
#: :mod:`moecollab.data.word_cloze`).
ACCURACY_METRICS = {"mcq": "acc_norm", "cloze": "acc", "word": "acc"}
# The "format" of a task manifest: 2, the result cache's format when both lived in one module
# (moecollab.evaluation.cache.CACHE_FORMAT); nothing reads it back.
_MANIFEST_FORMAT = 2
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
# The item columns a task is written from: every item's (moecollab.data.sources), less
# ``entry_id``, which is copied when present and only groups documents (document_clusters).
_TASK_ITEM_COLUMNS = tuple(column for column in ITEM_COLUMNS if column != "entry_id")
_MANIFEST_SUFFIX = "_tasks.json"


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
        As made by :func:`moecollab.data.make_mcq_items`: the columns every item has
        (:data:`moecollab.data.sources.ITEM_COLUMNS`: ``item_id``, ``domain``, ``split``,
        ``question``, ``choices`` (list of str), ``answer`` (int index of the right choice)
        and ``entry_id``, which may be missing here); ``term`` is copied when present.
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
    missing = sorted(set(_TASK_ITEM_COLUMNS) - set(items.columns))
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
    manifest = {"format": _MANIFEST_FORMAT, "tasks": tasks, "groups": groups}
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


def read_task_manifests(task_dir: str | os.PathLike | None) -> dict[str, dict[str, Any]]:
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
    info = read_task_manifests(task_dir)
    unknown = [name for name in dict.fromkeys(names) if name not in info]
    if unknown:
        known = sorted(info)
        shown = ", ".join(known[:6]) + (f", … ({len(known)} in all)" if len(known) > 6 else "")
        raise ValueError(f"unknown local task(s) {', '.join(map(repr, unknown))}: not in the "
                         f"task manifests of {task_dir}; known: {shown or 'none'}")
    return {name: info[name].get("family") for name in names}
