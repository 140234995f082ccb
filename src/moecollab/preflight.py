"""Checks across stages that can be made from parameters and small files before anything runs.

:mod:`moecollab.params` checks each value on its own and relations inside one stage. Some
mistakes only show when stages are read together, or need a look at the model's ``config.json``:

- the model to load does not exist, has no safetensors weights, or has no router we can read;
- a pruning ratio leaves a layer fewer experts than the router picks per token (``top_k``),
  which a transformers model cannot run.

Each is reported as one :class:`~moecollab.params.ParameterError` line, before stage 00 trains
or loads anything.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .budget import n_kept
from .params import ParameterError


def check_plan(parameters: dict[str, dict[str, Any]]) -> None:
    """Check a resolved plan (stage name → parameter values) across stages.

    Examples
    --------
    >>> plan = {"00_model": {"model": "", "n_experts": 4, "top_k": 2},
    ...         "05_pruning": {"prune_ratios": [0.25, 0.75], "domain_prune_ratio": 0.5}}
    >>> check_plan(plan)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    moecollab.params.ParameterError: ... 0.75 leaves 1 of 4 experts per layer, fewer than top_k...
    """
    model_settings = parameters.get("00_model", {})
    shape = model_shape(model_settings)
    if shape is not None and "05_pruning" in parameters:
        n_experts, top_k = shape
        pruning = parameters["05_pruning"]
        for name in ("prune_ratios", "domain_prune_ratio", "ablation_ratio"):
            if name not in pruning:
                continue
            values = pruning[name] if isinstance(pruning[name], list) else [pruning[name]]
            for ratio in values:
                if n_kept(n_experts, ratio) < top_k:
                    raise ParameterError(
                        f"parameter {name!r} of stage 05_pruning: {ratio!r} leaves "
                        f"{n_kept(n_experts, ratio)} of {n_experts} experts per layer, fewer "
                        f"than top_k ({top_k}); allowed: ratios <= "
                        f"{_largest_ratio(n_experts, top_k):g}")


def model_shape(model_settings: dict[str, Any]) -> tuple[int, int] | None:
    """(routed experts per layer, top_k) of the model stage 00 trains or loads, when known.

    None for a hub id (its config is not fetched here) or a pruned checkpoint whose layers
    differ. Raises :class:`ParameterError` for a checkpoint that cannot be used.
    """
    source = model_settings.get("model", "")
    if not source:
        if {"n_experts", "top_k"} <= model_settings.keys():
            return int(model_settings["n_experts"]), int(model_settings["top_k"])
        return None
    config = read_model_config(source)
    if config is None or "kept_experts" in config:
        return None
    from .moe_arch import SUPPORTED_FAMILIES  # torch: only when a checkpoint is named

    family = SUPPORTED_FAMILIES[config["model_type"]]
    n_experts = next((config[key] for key in family.n_experts_keys if key in config), None)
    top_k = config.get("num_experts_per_tok")
    if isinstance(n_experts, int) and isinstance(top_k, int):
        return n_experts, top_k
    return None


def read_model_config(source: str | os.PathLike) -> dict[str, Any] | None:
    """The ``config.json`` of a local checkpoint, checked; None for a hub id the hub may serve.

    Raises
    ------
    ParameterError
        A folder without ``config.json`` or safetensors weights, a model family without a
        readable router, or a name that is neither a folder nor reachable (hub offline).
    """
    folder = Path(source).expanduser()
    if not folder.exists():
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
            raise ParameterError(
                f"model {str(source)!r} is not a folder here and the hub is offline "
                "(HF_HUB_OFFLINE=1); give a local checkpoint folder, or set HF_HUB_OFFLINE=0 "
                "to download a hub id")
        return None
    if not folder.is_dir():
        raise ParameterError(f"model {str(source)!r} is a file; give a checkpoint folder "
                             "with config.json and *.safetensors")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ParameterError(f"model folder {str(source)!r} has no config.json")
    if not any(folder.glob("*.safetensors")):
        raise ParameterError(f"model folder {str(source)!r} has no .safetensors weights "
                             "(only safetensors checkpoints are loaded, never pickles)")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as error:
        raise ParameterError(f"model folder {str(source)!r}: config.json is not valid JSON "
                             f"({error})") from None
    from .moe_arch import SUPPORTED_FAMILIES  # torch: only when a checkpoint is named

    model_type = config.get("model_type")
    if model_type not in SUPPORTED_FAMILIES:
        raise ParameterError(
            f"model {str(source)!r} has model_type {model_type!r}, which has no router "
            f"moecollab can read; supported: {', '.join(SUPPORTED_FAMILIES)}")
    return config


def _largest_ratio(n_experts: int, top_k: int) -> float:
    """The largest ratio on a 1/n_experts grid that still keeps top_k experts per layer."""
    return (n_experts - top_k) / n_experts
