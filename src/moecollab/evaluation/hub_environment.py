"""The Hugging Face environment lm-eval runs in: offline switches and a project-local cache.

lm-eval and ``datasets`` read their offline switches and cache folder when they are imported.
:func:`hf_environment` sets ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` and a project-local
``HF_DATASETS_CACHE`` inside a context manager that also patches the already-imported
``datasets``/``huggingface_hub`` constants and restores everything afterwards; every lm-eval
run and task check of :mod:`moecollab.evaluation` happens inside it. Setting
``HF_HUB_OFFLINE=1`` and ``HF_DATASETS_OFFLINE=1`` in the environment before anything imports
``datasets`` remains the most reliable way to run offline.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["hf_environment"]


@contextmanager
def hf_environment(cache_dir: str | os.PathLike | None, *, offline: bool) -> Iterator[Path]:
    """Offline switches and a project-local ``datasets`` cache, restored on exit.

    ``datasets`` and ``huggingface_hub`` copy the environment into module constants at import
    time, so the constants of already-imported modules are patched as well.

    Parameters
    ----------
    cache_dir : path or None
        ``HF_HOME`` becomes ``<cache_dir>/hf`` and the ``datasets`` cache
        ``<cache_dir>/hf/datasets``; None: a temporary folder, removed on exit.
    offline : bool
        Also set ``HF_HUB_OFFLINE`` and ``HF_DATASETS_OFFLINE``.

    Yields
    ------
    Path
        The ``datasets`` cache folder.
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
