"""lm-eval runs on unpruned and pruned models, and tidy result tables.

Every accuracy number of the study comes from lm-evaluation-harness (``lm_eval``), run on the
in-memory model, so a masked or per-layer-pruned model needs no checkpoint on disk. One job per
module, every public name importable from here (``evaluation.evaluate``):

- :mod:`~moecollab.evaluation.local_tasks`: this study's corpus as local lm-eval tasks
  (:func:`write_mcq_tasks`, :func:`write_perplexity_tasks`) and their manifests
  (:func:`task_families`, :func:`document_clusters`).
- :mod:`~moecollab.evaluation.standard_tasks`: lm-eval's own tasks a run asks for (the paper's
  among them) and the checks that they, and the backend, can run here.
- :mod:`~moecollab.evaluation.hub_environment`: the offline switches and project-local
  ``datasets`` cache every lm-eval run happens in.
- :mod:`~moecollab.evaluation.cache`: cache keys (:func:`mask_key`, :func:`task_cache_keys`)
  and the cached result of each task.
- :mod:`~moecollab.evaluation.harness`: the entry points, :func:`evaluate`,
  :func:`evaluate_masks`, :func:`evaluate_masks_in_workers` and :func:`evaluate_checkpoints`.
- :mod:`~moecollab.evaluation.tables`: :func:`results_table`, :func:`item_table` (per-document
  scores, for :mod:`moecollab.paired`), :func:`standard_table`, :func:`add_method_columns` and
  :func:`relative_drop`.
"""

from moecollab.evaluation.cache import CACHE_FORMAT, mask_key, task_cache_keys
from moecollab.evaluation.harness import (
    evaluate,
    evaluate_checkpoints,
    evaluate_masks,
    evaluate_masks_in_workers,
    exported_checkpoints,
)
from moecollab.evaluation.local_tasks import (
    ACCURACY_METRICS,
    MCQ_METRICS,
    MCQ_PROMPT,
    MCQ_PROMPTS,
    PERPLEXITY_METRICS,
    document_clusters,
    task_families,
    write_mcq_tasks,
    write_perplexity_tasks,
)
from moecollab.evaluation.standard_tasks import (
    BACKENDS,
    LOCAL_TASKS,
    PAPER_TASKS,
    TASK_ALIASES,
    check_backend,
    check_standard_tasks,
    check_tasks_resolve,
    standard_task_names,
    standard_tasks_of,
)
from moecollab.evaluation.tables import (
    add_method_columns,
    item_table,
    relative_drop,
    results_table,
    standard_table,
)

__all__ = [
    "ACCURACY_METRICS",
    "BACKENDS",
    "CACHE_FORMAT",
    "LOCAL_TASKS",
    "MCQ_METRICS",
    "MCQ_PROMPT",
    "MCQ_PROMPTS",
    "PAPER_TASKS",
    "PERPLEXITY_METRICS",
    "TASK_ALIASES",
    "add_method_columns",
    "check_backend",
    "check_standard_tasks",
    "check_tasks_resolve",
    "document_clusters",
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
