"""Apply an expert keep-mask to a transformers MoE model; save and reload pruned checkpoints.

Two modes (:func:`apply_keep_mask`), giving the same outputs:

- ``remove``: per MoE layer, slice the router's rows (and its bias / DeepSeek-V3
  ``e_score_correction_bias``) and dim 0 of every fused expert tensor, and update every
  ``num_experts``-like attribute of router, experts and block (a stale ``experts.num_experts``
  breaks the grouped_mm kernel). Layers may keep different counts. The kept **original** expert
  ids are recorded in ``config.kept_experts = {"<decoder layer>": [ids]}``; when every MoE layer
  keeps the same count the family's config count key is set to it, so stock
  ``AutoModelForCausalLM.from_pretrained`` (and lm-eval, vLLM) load the checkpoint.
- ``mask``: weights stay; pruned experts become unselectable. Routers with a bias that only
  steers the choice get ``-1e9`` on the masked entries (GPT-OSS ``router.bias``, DeepSeek-V3
  ``e_score_correction_bias``): exact, and it survives any save/load. Other routers get their
  masked **logits set to -inf before the family's own softmax / top-k / normalisation**: an
  instance-level ``forward`` wrapper runs the router's own forward under a torch function mode
  that adds ``(0 | -inf)`` to the output of its logit projection (``F.linear`` whose weight has
  one row per expert), so routing is never re-implemented. Recorded in
  ``config.masked_experts = {"<decoder layer>": [ids]}``; :func:`reapply_masks` re-installs the
  wrappers after loading.

Checkpoints: :func:`save_pruned` writes safetensors, the tokenizer and a model card;
:func:`load_pruned` reloads per-layer counts exactly with a model subclass that shrinks each
MoE block to its stored count before the weights are loaded (stock ``from_pretrained`` cannot;
``ignore_mismatched_sizes`` would silently re-initialise the experts, so it is never used).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import types
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from moecollab.artifacts import replace_folder
from moecollab.moe_arch import MoEArchitecture, MoELayer, find_moe_layers

logger = logging.getLogger(__name__)

__all__ = [
    "KEPT_EXPERTS_KEY",
    "MASKED_EXPERTS_KEY",
    "apply_keep_mask",
    "count_parameters_pruned",
    "load_pruned",
    "reapply_masks",
    "save_pruned",
]

#: Config key: kept original expert ids per decoder layer (``{"3": [0, 2, 5]}``).
KEPT_EXPERTS_KEY = "kept_experts"
#: Config key: masked expert ids (current numbering) per decoder layer.
MASKED_EXPERTS_KEY = "masked_experts"
#: Config key: how the model was pruned (method, ratio, calibration), set by save_pruned.
PRUNING_KEY = "pruning"

# Attributes holding a layer's routed-expert count on routers, experts and blocks.
_COUNT_ATTRS = ("num_experts", "num_local_experts", "n_routed_experts", "n_experts",
                "out_features")
# Router biases that only steer the choice: -1e9 there masks exactly.
_SELECTION_BIASES = {"gpt_oss": "bias", "deepseek_v3": "e_score_correction_bias"}
_MASK_BIAS = -1e9


# --------------------------------------------------------------------------------------------
# Mask checks
# --------------------------------------------------------------------------------------------


def _kept_ids_per_layer(keep_mask: Any, architecture: MoEArchitecture) -> list[np.ndarray]:
    """Validate a keep-mask against the model; the kept ids of each MoE layer."""
    keep_mask = np.asarray(keep_mask)
    n_layers = len(architecture.moe_layers)
    width = architecture.n_experts
    if keep_mask.dtype != bool:
        raise ValueError(f"keep_mask must be boolean; got dtype {keep_mask.dtype}")
    if keep_mask.shape != (n_layers, width):
        raise ValueError(
            f"keep_mask must have shape (n_moe_layers, n_experts) = ({n_layers}, {width}); "
            f"got {keep_mask.shape}"
        )
    kept: list[np.ndarray] = []
    for layer, row in zip(architecture.moe_layers, keep_mask, strict=True):
        if row[layer.n_experts:].any():
            extra = np.flatnonzero(row[layer.n_experts:]) + layer.n_experts
            raise ValueError(
                f"keep_mask must be False past the {layer.n_experts} experts of decoder layer "
                f"{layer.layer_id}; got True at ids {extra.tolist()}"
            )
        ids = np.flatnonzero(row[: layer.n_experts])
        if ids.size < layer.top_k:
            raise ValueError(
                f"keep_mask must keep at least top_k={layer.top_k} experts in every MoE layer; "
                f"got {ids.size} in decoder layer {layer.layer_id}"
            )
        kept.append(ids)
    return kept


def _config_dict(config: Any, key: str) -> dict[str, list[int]]:
    value = getattr(config, key, None)
    if not value:
        return {}
    return {str(k): [int(i) for i in v] for k, v in dict(value).items()}


# --------------------------------------------------------------------------------------------
# Removal
# --------------------------------------------------------------------------------------------


def _slice_rows(module: nn.Module, n_old: int, ids: torch.Tensor) -> None:
    """Slice dim 0 of every direct parameter and buffer of ``module`` that has ``n_old`` rows."""
    for name, param in list(module.named_parameters(recurse=False)):
        if param.ndim >= 1 and param.shape[0] == n_old:
            new = nn.Parameter(param.data.index_select(0, ids.to(param.device)).clone(),
                               requires_grad=param.requires_grad)
            setattr(module, name, new)
    for name, buffer in list(module.named_buffers(recurse=False)):
        if buffer is not None and buffer.ndim >= 1 and buffer.shape[0] == n_old:
            setattr(module, name, buffer.index_select(0, ids.to(buffer.device)).clone())


def _set_counts(module: nn.Module, n_old: int, n_new: int) -> None:
    for attr in _COUNT_ATTRS:
        if isinstance(getattr(module, attr, None), int) and getattr(module, attr) == n_old:
            setattr(module, attr, n_new)


def _shrink_layer(layer: MoELayer, ids: np.ndarray) -> None:
    """Keep experts ``ids`` of one MoE layer (router rows, fused tensors, counts)."""
    n_old = layer.n_experts
    index = torch.as_tensor(np.asarray(ids), dtype=torch.long)
    _slice_rows(layer.router, n_old, index)
    if layer.experts is not None:
        _slice_rows(layer.experts, n_old, index)
    for module in (layer.router, layer.experts, layer.block):
        if module is not None:
            _set_counts(module, n_old, len(ids))


def _check_groups(config: Any, model_type: str, counts: list[int]) -> None:
    n_group = getattr(config, "n_group", None) or 1
    if model_type == "deepseek_v3" and n_group > 1:
        bad = [n for n in counts if n % n_group]
        if bad:
            raise ValueError(
                f"keep_mask must keep a multiple of n_group={n_group} experts per layer for "
                f"DeepSeek-V3 group routing; got counts {sorted(set(bad))}"
            )


def _set_config_count(model: nn.Module, architecture: MoEArchitecture) -> None:
    counts = architecture.n_experts_per_layer
    config = model.config
    # Uniform: the count every layer has, so stock from_pretrained loads the checkpoint.
    # Per-layer counts: the largest (load_pruned builds that, then shrinks smaller layers).
    for key in architecture.family.n_experts_keys:
        if hasattr(config, key):
            setattr(config, key, max(counts))
    if len(set(counts)) > 1:
        logger.info("per-layer expert counts %s: reload with load_pruned (stock "
                    "from_pretrained needs equal counts)", counts)


# --------------------------------------------------------------------------------------------
# Masking
# --------------------------------------------------------------------------------------------


class _MaskedLogits(TorchFunctionMode):
    """Adds ``additive`` to the first router-logit projection (an ``F.linear`` with n rows)."""

    def __init__(self, additive: torch.Tensor) -> None:
        super().__init__()
        self.additive = additive
        self.done = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        output = func(*args, **kwargs)
        if func is F.linear and not self.done:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            if weight is not None and weight.shape[0] == self.additive.shape[0]:
                self.done = True
                output = output + self.additive.to(device=output.device, dtype=output.dtype)
        return output


def _masked_router_forward(router: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The router's class forward with its masked logits at -inf (bound as instance forward).

    Bound with ``types.MethodType`` so that ``copy.deepcopy`` rebinds it to the copy.
    """
    additive = torch.zeros(router.weight.shape[0], dtype=torch.float32)
    additive[router._moecollab_masked_ids] = float("-inf")
    mode = _MaskedLogits(additive)
    with mode:
        output = type(router).forward(router, *args, **kwargs)
    if not mode.done:
        raise RuntimeError(
            f"{type(router).__name__}: no logit projection found to mask; "
            "use mode='remove' for this model"
        )
    return output


def _mask_layer(model_type: str, layer: MoELayer, masked_ids: list[int]) -> None:
    """Make ``masked_ids`` of one layer unselectable (idempotent)."""
    if not masked_ids:
        return
    bias_name = _SELECTION_BIASES.get(model_type)
    bias = getattr(layer.router, bias_name, None) if bias_name else None
    if isinstance(bias, torch.Tensor):
        with torch.no_grad():
            bias[torch.as_tensor(masked_ids, dtype=torch.long)] = _MASK_BIAS
        return
    layer.router._moecollab_masked_ids = torch.as_tensor(sorted(masked_ids), dtype=torch.long)
    if "forward" not in vars(layer.router):
        layer.router.forward = types.MethodType(_masked_router_forward, layer.router)


def reapply_masks(model: nn.Module) -> nn.Module:
    """Re-install the masks recorded in ``config.masked_experts`` (after loading a checkpoint).

    Parameters
    ----------
    model : transformers.PreTrainedModel

    Returns
    -------
    The same model (changed in place). A model without recorded masks is returned untouched.
    """
    masked = _config_dict(model.config, MASKED_EXPERTS_KEY)
    if not masked:
        return model
    architecture = find_moe_layers(model)
    for layer in architecture.moe_layers:
        _mask_layer(architecture.model_type, layer, masked.get(str(layer.layer_id), []))
    return model


# --------------------------------------------------------------------------------------------
# apply_keep_mask
# --------------------------------------------------------------------------------------------


def apply_keep_mask(
    model: nn.Module,
    keep_mask: Any,
    mode: Literal["remove", "mask"] = "remove",
) -> nn.Module:
    """Prune the experts a keep-mask drops, by removing them or masking them out of routing.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A model of a family in :data:`moecollab.moe_arch.SUPPORTED_FAMILIES`.
    keep_mask : array of bool, shape (n_moe_layers, n_experts)
        True = keep; row ``i`` is the ``i``-th MoE layer (dense layers are skipped). For a
        model already pruned to per-layer counts, ``n_experts`` is the largest count and
        entries past a layer's count must be False.
    mode : {"remove", "mask"}, default="remove"
        ``remove`` slices the weights (memory and FLOPs saved); ``mask`` keeps them and makes
        the pruned experts unselectable. Both give the same logits; see the module docstring.

    Returns
    -------
    The same model, changed in place.

    Raises
    ------
    ValueError
        On a mask of the wrong shape or dtype, a layer keeping fewer than ``top_k`` experts,
        DeepSeek-V3 counts that are not a multiple of ``n_group`` (remove only), or removal on
        a model that already has masked experts.

    Notes
    -----
    After pruning the router re-routes among surviving experts with the model's own top-k and
    normalisation (METHOD.md §5): equivalent to -inf logits for the pruned experts. OLMoE with
    ``norm_topk_prob=False`` therefore changes output even when a pruned expert was never
    chosen (the softmax denominator changes). Masked logits are -inf in the router's logit
    output too (an auxiliary loss computed from them is not meaningful).

    Re-pruning composes: ``config.kept_experts`` always holds ids of the original model.
    For DeepSeek-V3 with ``n_group > 1``, removal regroups the surviving experts
    (consecutive blocks of ``n / n_group``); masking leaves the groups as they were, so the two
    modes agree only when every group keeps the same number of experts.
    """
    if mode not in ("remove", "mask"):
        raise ValueError(f"mode must be 'remove' or 'mask'; got {mode!r}")
    architecture = find_moe_layers(model)
    kept = _kept_ids_per_layer(keep_mask, architecture)
    config = model.config
    model_type = architecture.model_type
    if mode == "mask":
        masked = _config_dict(config, MASKED_EXPERTS_KEY)
        for layer, ids in zip(architecture.moe_layers, kept, strict=True):
            dropped = sorted(set(range(layer.n_experts)) - set(ids.tolist()))
            if not dropped:
                continue
            key = str(layer.layer_id)
            union = sorted(set(masked.get(key, [])) | set(dropped))
            if layer.n_experts - len(union) < layer.top_k:
                raise ValueError(
                    f"keep_mask must leave at least top_k={layer.top_k} unmasked experts; got "
                    f"{layer.n_experts - len(union)} in decoder layer {layer.layer_id}"
                )
            masked[key] = union
            _mask_layer(model_type, layer, union)
        if masked:
            setattr(config, MASKED_EXPERTS_KEY, masked)
        return model

    if _config_dict(config, MASKED_EXPERTS_KEY):
        raise ValueError(
            "mode='remove' needs a model without masked experts; got config.masked_experts set "
            "(remove on the unmasked model instead)"
        )
    new_counts = [len(ids) for ids in kept]
    if new_counts != architecture.n_experts_per_layer:
        _check_groups(config, model_type, new_counts)
    kept_original = _config_dict(config, KEPT_EXPERTS_KEY)
    changed = False
    for layer, ids in zip(architecture.moe_layers, kept, strict=True):
        if len(ids) == layer.n_experts:
            continue
        key = str(layer.layer_id)
        previous = kept_original.get(key, list(range(layer.n_experts)))
        kept_original[key] = [int(previous[i]) for i in ids]
        _shrink_layer(layer, ids)
        changed = True
    if changed:
        setattr(config, KEPT_EXPERTS_KEY, kept_original)
        _set_config_count(model, find_moe_layers(model))
        if model_type == "deepseek_v3" and (getattr(config, "n_group", 1) or 1) > 1:
            logger.warning("DeepSeek-V3 removal regroups experts into consecutive blocks of "
                           "n / n_group; routing equals masking only if every group kept the "
                           "same count")
    return model


# --------------------------------------------------------------------------------------------
# Parameter counts
# --------------------------------------------------------------------------------------------


def count_parameters_pruned(keep_mask: Any, model: nn.Module) -> dict[str, int]:
    """Parameters of ``model`` before and after removing the experts ``keep_mask`` drops.

    Parameters
    ----------
    keep_mask : array of bool, shape (n_moe_layers, n_experts)
    model : transformers.PreTrainedModel
        The model the mask applies to (not yet pruned).

    Returns
    -------
    dict
        ``total_before``, ``total_after``, ``removed`` (all parameters), ``experts_before``,
        ``experts_after`` (routed-expert tensors and router rows only).

    Notes
    -----
    Per removed expert: one slice of every fused expert parameter (``gate_up_proj``,
    ``down_proj`` and their biases) and its router row (+ router bias entry). Buffers (the
    DeepSeek-V3 correction bias) are not parameters and are not counted.
    """
    architecture = find_moe_layers(model)
    kept = _kept_ids_per_layer(keep_mask, architecture)
    total = sum(p.numel() for p in model.parameters())
    experts_before = removed = 0
    for layer, ids in zip(architecture.moe_layers, kept, strict=True):
        per_expert = sum(layer.parameters_per_expert())
        experts_before += per_expert * layer.n_experts
        removed += per_expert * (layer.n_experts - len(ids))
    return {
        "total_before": total,
        "total_after": total - removed,
        "removed": removed,
        "experts_before": experts_before,
        "experts_after": experts_before - removed,
    }


# --------------------------------------------------------------------------------------------
# Save / load
# --------------------------------------------------------------------------------------------


def _model_card(config: Any, info: Mapping[str, Any]) -> str:
    kept = _config_dict(config, KEPT_EXPERTS_KEY)
    masked = _config_dict(config, MASKED_EXPERTS_KEY)
    lines = [
        "# Expert-pruned Mixture-of-Experts model",
        "",
        f"- base architecture: `{config.model_type}` ({', '.join(config.architectures or [])})",
        f"- pruning method: `{info['method']}`",
        f"- prune ratio: {info['prune_ratio']}",
        f"- calibration: `{json.dumps(info['calibration'], sort_keys=True)}`",
        f"- pruned by: {'removal' if kept else 'masking' if masked else 'nothing pruned'}",
        "",
        "Made with `moecollab.pruning` (reproduction of Tang et al. 2025, arXiv:2504.12359).",
        "Kept experts are original expert ids; pruned experts' router logits behave as -inf, so",
        "tokens re-route among the survivors with the model's own top-k and normalisation.",
        "",
    ]
    if kept:
        counts = sorted({len(v) for v in kept.values()})
        loader = ("stock `AutoModelForCausalLM.from_pretrained` (equal counts per layer)"
                  if len(counts) == 1 else "`moecollab.pruning.load_pruned` (per-layer counts)")
        lines += [f"Load with {loader}.", "", "| decoder layer | kept | kept expert ids |",
                  "|---|---|---|"]
        lines += [f"| {k} | {len(v)} | {', '.join(map(str, v))} |"
                  for k, v in sorted(kept.items(), key=lambda item: int(item[0]))]
    if masked:
        lines += ["Masked experts are recorded in `config.masked_experts`; reload with",
                  "`moecollab.pruning.load_pruned` to re-apply the masks.", "",
                  "| decoder layer | masked expert ids |", "|---|---|"]
        lines += [f"| {k} | {', '.join(map(str, v))} |"
                  for k, v in sorted(masked.items(), key=lambda item: int(item[0]))]
    return "\n".join(lines) + "\n"


def save_pruned(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    method: str,
    prune_ratio: float,
    calibration: Mapping[str, Any],
    tokenizer: Any = None,
    overwrite: bool = False,
) -> Path:
    """Save a pruned model as safetensors with its tokenizer and a model card.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        Pruned by :func:`apply_keep_mask`.
    path : path-like
        Output folder; written to a temporary sibling, then renamed.
    method : str
        Pruning method (``caep``, ``reap``, …), recorded in ``config.pruning`` and the card.
    prune_ratio : float
        Recorded as given.
    calibration : mapping
        JSON-serialisable description of the calibration data (name, samples, tokens, hash…).
    tokenizer : optional
        Saved beside the model when given.
    overwrite : bool, default=False
        Replace an existing non-empty folder.

    Returns
    -------
    Path
        The folder: ``config.json`` (with ``kept_experts`` / ``masked_experts`` /
        ``pruning``), ``model.safetensors``, tokenizer files, ``README.md``.
    """
    path = Path(path)
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"path {path!s} exists and is not empty; pass overwrite=True")
    try:
        json.dumps(dict(calibration))
    except (TypeError, ValueError) as error:
        raise ValueError(f"calibration must be JSON-serialisable; got {calibration!r}") from error
    info = {"method": str(method), "prune_ratio": float(prune_ratio),
            "calibration": dict(calibration)}
    setattr(model.config, PRUNING_KEY, info)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(_model_card(model.config, info), encoding="utf-8")
        replace_folder(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("saved pruned model (%s, ratio %s) to %s", method, prune_ratio, path)
    return path


def _shrinking_class(base_class: type) -> type:
    """A subclass of ``base_class`` whose ``__init__`` shrinks MoE layers to the config's counts."""

    def __init__(self, config, *args: Any, **kwargs: Any) -> None:
        base_class.__init__(self, config, *args, **kwargs)
        kept = _config_dict(config, KEPT_EXPERTS_KEY)
        for layer in find_moe_layers(self).moe_layers:
            ids = kept.get(str(layer.layer_id))
            if ids is not None and len(ids) != layer.n_experts:
                # Values are placeholders: the checkpoint's weights replace them.
                _shrink_layer(layer, np.arange(len(ids)))

    return type(base_class.__name__, (base_class,), {"__init__": __init__,
                                                     "__module__": base_class.__module__})


def load_pruned(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Load a checkpoint written by :func:`save_pruned` (any per-layer counts), masks included.

    Parameters
    ----------
    path : path-like
        Folder with ``config.json`` and safetensors weights.
    dtype : torch dtype, str or None
        Passed to ``from_pretrained`` (None: the checkpoint's own, ``"auto"``).
    device : str or torch.device, default="cpu"

    Returns
    -------
    transformers.PreTrainedModel
        In eval mode, with ``config.masked_experts`` re-applied.

    Notes
    -----
    When layers keep different counts the model class is subclassed so that ``__init__``
    shrinks each MoE block to ``len(config.kept_experts[layer])`` before the weights load, so
    every tensor matches the checkpoint exactly; uniform counts load with the stock class.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"path {path!s} has no config.json")
    config = AutoConfig.from_pretrained(path)
    kept = _config_dict(config, KEPT_EXPERTS_KEY)
    kwargs: dict[str, Any] = {"use_safetensors": True,
                              "dtype": dtype if dtype is not None else "auto"}
    if any(len(ids) != _config_count(config) for ids in kept.values()):
        base_class = AutoModelForCausalLM._model_mapping[type(config)]
        model = _shrinking_class(base_class).from_pretrained(path, config=config, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, config=config, **kwargs)
    reapply_masks(model)
    return model.to(device).eval()


def _config_count(config: Any) -> int | None:
    from moecollab.moe_arch import SUPPORTED_FAMILIES

    family = SUPPORTED_FAMILIES.get(config.model_type)
    if family is None:
        return None
    for key in family.n_experts_keys:
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None

