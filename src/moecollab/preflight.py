"""Checks across stages that can be made from parameters and small files before anything runs.

:mod:`moecollab.params` checks each value on its own and relations inside one stage. Some
mistakes only show when stages are read together, or need a look at the model's ``config.json``:

- the model to load does not exist, has no safetensors weights, or has no router we can read;
- a pruning ratio leaves a layer fewer experts than the router picks per token (``top_k``),
  which a transformers model cannot run;
- evaluation through vLLM is asked for, but stage 05 exports no pruned checkpoints;
- stage 05 would calibrate on the corpus split whose entries stage 06 evaluates;
- stage 03 fits at sample level while stage 04 needs token-level codes.

Each is reported as one :class:`~moecollab.params.ParameterError` line, before stage 00 trains
or loads anything.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .budget import n_kept
from .data.cloze import EVALUATED_SPLITS
from .params import ParameterError


def check_plan(parameters: dict[str, dict[str, Any]],
               cache_dir: str | os.PathLike | None = None,
               stages: Sequence[str] | None = None) -> None:
    """Check a resolved plan (stage name → parameter values) across stages.

    ``cache_dir`` is the profile's cache (``artifacts/<profile>/cache``), where the paper's
    datasets are kept once prepared (see :func:`check_data_sources`). ``stages`` are the
    stages that will run (default: all); a stage that reads another's output is checked
    against that stage's parameters only when it runs.

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
        for name in ("prune_ratios", "domain_prune_ratio"):
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


    check_data_sources(parameters, cache_dir)
    running = set(parameters if stages is None else stages)
    if "04_annotation" in running and parameters.get("03_hsdl", {}).get("level") == "sample":
        raise ParameterError(
            "parameter 'level' of stage 03_hsdl: 'sample' fits one row per sequence, and stage "
            "04_annotation needs token-level codes; use level token, or run stages up to "
            "03_hsdl only (--only 03_hsdl)")
    pruning = parameters.get("05_pruning", {})
    if (pruning.get("data_source", "embedded") == "embedded"
            and pruning.get("calibration_split") in EVALUATED_SPLITS):
        raise ParameterError(
            f"parameter 'calibration_split' of stage 05_pruning: "
            f"{pruning['calibration_split']!r} holds the held-out entries whose cloze items "
            "stage 06 evaluates, and no pruning method may calibrate on evaluation text; "
            "calibrate on train")
    evaluation = parameters.get("06_evaluation", {})
    if evaluation.get("backend") == "vllm" and not parameters.get("05_pruning", {}).get("export"):
        raise ParameterError(
            "parameter 'backend' of stage 06_evaluation: vllm evaluates the checkpoints stage "
            "05_pruning exports, and export is off; set 05_pruning.export: true, or use "
            "backend hf")


#: The datasets each stage reads with ``data_source: paper`` (see moecollab.data.paper).
PAPER_DATASETS = {"01_capture": ("TIGER-Lab/MMLU-Pro",),
                  "05_pruning": ("cais/mmlu", "TIGER-Lab/MMLU-Pro"),
                  "06_evaluation": ("TIGER-Lab/MMLU-Pro",)}


def check_data_sources(parameters: dict[str, dict[str, Any]],
                       cache_dir: str | os.PathLike | None = None) -> None:
    """Each stage's text can be read: its fields exist in its ``data_source``, and the paper's
    datasets are reachable (a local folder with the right columns, the hub, or the profile's
    cache), one line otherwise, before any model loads.

    Examples
    --------
    >>> check_data_sources({"01_capture": {"data_source": "embedded",
    ...                                    "domains": ["law", "psychology"]}})
    Traceback (most recent call last):
    ...
    moecollab.params.ParameterError: parameter 'domains' of stage 01_capture: psychology is not a \
field of the embedded corpus; with data_source 'paper' the fields are mathematics, ...
    """
    from .data import paper
    from .data.corpus import DOMAINS

    capture = parameters.get("01_capture", {})
    if "domains" in capture:
        if capture.get("data_source", "embedded") == "paper":
            allowed, where, other = paper.FIELDS, "among the paper's fields", ("embedded",
                                                                             DOMAINS)
        else:
            allowed, where, other = DOMAINS, "a field of the embedded corpus", ("paper",
                                                                               paper.FIELDS)
        foreign = [field for field in capture["domains"] if field not in allowed]
        if foreign:
            raise ParameterError(
                f"parameter 'domains' of stage 01_capture: {', '.join(foreign)} "
                f"{'is' if len(foreign) == 1 else 'are'} not {where}; with data_source "
                f"{other[0]!r} the fields are {', '.join(other[1])}")
    offline = dataset_downloads_offline()
    for stage, needed in PAPER_DATASETS.items():
        values = parameters.get(stage, {})
        if values.get("data_source") != "paper":
            continue
        try:
            paper.check_available(values.get("paper_data_dir", ""), cache_dir, needed,
                                  offline=offline)
        except paper.PaperDataError as error:
            raise ParameterError(f"parameter 'data_source' of stage {stage}: {error}") from None


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
    from . import deepseek_v1
    from .moe_arch import SUPPORTED_FAMILIES  # torch: only when a checkpoint is named

    if deepseek_v1.is_deepseek_v1(config):
        return deepseek_v1.shape(config)

    family = SUPPORTED_FAMILIES[config["model_type"]]
    n_experts = next((config[key] for key in family.n_experts_keys if key in config), None)
    top_k = config.get("num_experts_per_tok")
    if isinstance(n_experts, int) and isinstance(top_k, int):
        return n_experts, top_k
    return None


def read_model_config(source: str | os.PathLike) -> dict[str, Any] | None:
    """The ``config.json`` of a checkpoint folder or a cached hub id, checked.

    Returns None for a hub id that is not cached while the hub is reachable (its config is not
    downloaded just to check it).

    Raises
    ------
    ParameterError
        A folder without ``config.json`` or safetensors weights, a model family without a
        router moecollab can read, or a hub id that is neither cached nor reachable.
    """
    folder = Path(source).expanduser()
    if folder.exists():
        config_path = _checked_folder(folder, str(source))
    else:
        config_path = check_hub_reachable(str(source))
        if config_path is None:
            return None
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as error:
        raise ParameterError(f"model {str(source)!r}: config.json is not valid JSON "
                             f"({error})") from None
    from . import deepseek_v1
    from .moe_arch import SUPPORTED_FAMILIES  # torch: only when a checkpoint is named

    model_type = config.get("model_type")
    if deepseek_v1.is_deepseek_v1(config):  # converted to a native class when loaded
        try:
            deepseek_v1.check_convertible(config, f"model {str(source)!r}")
        except deepseek_v1.ConversionError as error:
            raise ParameterError(str(error)) from None
    elif model_type not in SUPPORTED_FAMILIES:
        raise ParameterError(
            f"model {str(source)!r} has model_type {model_type!r}, which has no router "
            f"moecollab can read; supported: {', '.join(SUPPORTED_FAMILIES)}, and "
            f"{deepseek_v1.MODEL_TYPE} (converted to qwen2_moe)")
    return config


def _checked_folder(folder: Path, source: str) -> Path:
    if not folder.is_dir():
        raise ParameterError(f"model {source!r} is a file; give a checkpoint folder "
                             "with config.json and *.safetensors")
    if not (folder / "config.json").is_file():
        raise ParameterError(f"model folder {source!r} has no config.json")
    if not any(folder.glob("*.safetensors")):
        raise ParameterError(f"model folder {source!r} has no .safetensors weights "
                             "(only safetensors checkpoints are loaded, never pickles)")
    return folder / "config.json"


def env_flag(name: str) -> bool:
    """Whether environment variable ``name`` is on (1, ON, YES or TRUE, as huggingface_hub reads
    its switches)."""
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def model_downloads_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` is on: no model can be downloaded. (Datasets also stop at
    ``HF_DATASETS_OFFLINE``: :func:`dataset_downloads_offline`.)"""
    return env_flag("HF_HUB_OFFLINE")


def dataset_downloads_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` or ``HF_DATASETS_OFFLINE`` is on: no dataset (a standard
    task's or the paper's) can be downloaded."""
    return env_flag("HF_HUB_OFFLINE") or env_flag("HF_DATASETS_OFFLINE")


def check_hub_reachable(name: str) -> Path | None:
    """The cached ``config.json`` of hub id ``name``, or None when it is not cached.

    Raises :class:`ParameterError` when it is not cached and the hub is offline.
    """
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json")
    except Exception:  # not a valid repo id (an absolute path, say): certainly not cached
        cached = None
    if isinstance(cached, str):
        return Path(cached)
    if model_downloads_offline():
        raise ParameterError(
            f"model {name!r} is not a folder here and the hub is offline (HF_HUB_OFFLINE=1); "
            "give a local checkpoint folder, or set HF_HUB_OFFLINE=0 to download a hub id")
    return None


def hub_config(name: str) -> dict[str, Any] | None:
    """The ``config.json`` of hub id ``name``: from the cache, else downloaded (that file
    only) when the hub is reachable; None if it cannot be had (loading then says why)."""
    cached = check_hub_reachable(name)
    if cached is None:
        try:
            from huggingface_hub import hf_hub_download

            cached = Path(hf_hub_download(name, "config.json"))
        except Exception:  # not on the hub, gated, no network: from_pretrained reports it
            return None
    try:
        return json.loads(Path(cached).read_text())
    except (OSError, ValueError):
        return None


def _largest_ratio(n_experts: int, top_k: int) -> float:
    """The largest ratio on a 1/n_experts grid that still keeps top_k experts per layer."""
    return (n_experts - top_k) / n_experts
