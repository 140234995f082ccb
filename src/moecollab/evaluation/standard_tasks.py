"""Standard lm-eval tasks: which ones a run asks for, and whether they can run here.

:func:`standard_task_names` and :func:`standard_tasks_of` expand a profile's task list
(the aliases ``paper`` and ``paper_v2``, the entry ``local`` for this study's own tasks);
:func:`check_tasks_resolve`, :func:`check_standard_tasks` and :func:`check_backend` check,
before any heavy work, that lm-eval knows the names, can load their datasets and has the model
type asked for. lm-eval is imported inside
:func:`~moecollab.evaluation.hub_environment.hf_environment`, so that its offline switches and
``datasets`` cache are the project's.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence

from moecollab.evaluation.hub_environment import hf_environment
from moecollab.preflight import dataset_downloads_offline

__all__ = [
    "BACKENDS",
    "LOCAL_TASKS",
    "PAPER_TASKS",
    "TASK_ALIASES",
    "check_backend",
    "check_standard_tasks",
    "check_tasks_resolve",
    "standard_task_names",
    "standard_tasks_of",
]

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
    with hf_environment(cache_dir, offline=True):
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
    with hf_environment(cache_dir, offline=offline):
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
