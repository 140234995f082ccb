"""Where the Mixture-of-Experts parts of a transformers model live.

One table, :data:`SUPPORTED_FAMILIES`, keyed by ``config.model_type``, says for each supported
family which attribute of a decoder layer holds the sparse MoE block, which child of that block is
the router, where the fused experts and any shared expert are, and which config key holds the
number of routed experts. :func:`find_moe_layers` walks a model's decoder layers with it and
returns a :class:`MoEArchitecture`: every MoE layer with its decoder-layer index, router, experts,
number of routed experts and ``top_k``, plus the dense layers.

Every supported router follows the same output contract (transformers 5.24): called on the block
input, it returns ``(router_logits, topk_weights, topk_index)``, with ``router_logits`` of shape
(n_tokens, n_experts) and the other two of shape (n_tokens, top_k), tokens flattened
batch-major (row ``b * seq_len + s``). ``topk_weights`` are the weights the block applies to the
expert outputs. Families whose router differs (Llama4 returns ``(scores, logits)`` and runs every
expert on every token) are not in the table and raise :class:`UnsupportedModelError`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "SUPPORTED_FAMILIES",
    "FamilySpec",
    "MoEArchitecture",
    "MoELayer",
    "UnsupportedModelError",
    "decoder_layers",
    "find_moe_layers",
]


class UnsupportedModelError(ValueError):
    """The model has no known router layout (raised before any forward pass)."""


@dataclass(frozen=True)
class FamilySpec:
    """How one model family lays out its MoE blocks.

    Attributes
    ----------
    model_type : str
        ``config.model_type`` of the family.
    block_attr : str
        Attribute of a decoder layer holding the sparse MoE block (a dense MLP in dense layers).
    router_attr : str
        Attribute of the block holding the router.
    experts_attr : str
        Attribute of the block holding the fused routed experts.
    shared_expert_paths : tuple of str
        Dotted paths, relative to the decoder layer, where a shared (always-on) expert may live.
    n_experts_keys : tuple of str
        Config keys holding the number of routed experts, canonical key first.
    weight_semantics : str
        What the router's ``topk_weights`` are, in one sentence.
    """

    model_type: str
    block_attr: str
    router_attr: str
    experts_attr: str
    shared_expert_paths: tuple[str, ...]
    n_experts_keys: tuple[str, ...]
    weight_semantics: str


def _spec(
    model_type: str,
    *,
    block_attr: str = "mlp",
    router_attr: str = "gate",
    shared_expert_paths: tuple[str, ...] = (),
    n_experts_keys: tuple[str, ...] = ("num_local_experts", "num_experts"),
    weight_semantics: str,
) -> FamilySpec:
    return FamilySpec(
        model_type=model_type,
        block_attr=block_attr,
        router_attr=router_attr,
        experts_attr="experts",
        shared_expert_paths=shared_expert_paths,
        n_experts_keys=n_experts_keys,
        weight_semantics=weight_semantics,
    )


_SOFTMAX_TOPK_OPTIONAL_NORM = (
    "softmax over all routed experts, top-k, divided by their sum only if norm_topk_prob"
)

#: Supported families, keyed by ``config.model_type`` (read-only).
SUPPORTED_FAMILIES: Mapping[str, FamilySpec] = MappingProxyType(
    {
        spec.model_type: spec
        for spec in (
            _spec(
                "olmoe",
                n_experts_keys=("num_experts", "num_local_experts"),
                weight_semantics=_SOFTMAX_TOPK_OPTIONAL_NORM + " (OLMoE default: not normalised)",
            ),
            _spec(
                "flex_olmo",
                n_experts_keys=("num_experts", "num_local_experts"),
                weight_semantics=_SOFTMAX_TOPK_OPTIONAL_NORM,
            ),
            _spec(
                "mixtral",
                weight_semantics="softmax over all routed experts, top-k, always renormalised",
            ),
            _spec(
                "qwen2_moe",
                shared_expert_paths=("mlp.shared_expert",),
                n_experts_keys=("num_experts", "num_local_experts"),
                weight_semantics=_SOFTMAX_TOPK_OPTIONAL_NORM
                + "; the sigmoid-gated shared expert is not included",
            ),
            _spec(
                "qwen3_moe",
                weight_semantics=_SOFTMAX_TOPK_OPTIONAL_NORM,
            ),
            _spec(
                "qwen3_next",
                shared_expert_paths=("mlp.shared_expert",),
                n_experts_keys=("num_experts", "num_local_experts"),
                weight_semantics=_SOFTMAX_TOPK_OPTIONAL_NORM
                + "; the sigmoid-gated shared expert is not included",
            ),
            _spec(
                "deepseek_v2",
                shared_expert_paths=("mlp.shared_experts",),
                n_experts_keys=("n_routed_experts", "num_experts"),
                weight_semantics="softmax over all routed experts, greedy or group-limited top-k, "
                "times routed_scaling_factor, never renormalised",
            ),
            _spec(
                "deepseek_v3",
                shared_expert_paths=("mlp.shared_experts",),
                n_experts_keys=("n_routed_experts", "num_local_experts"),
                weight_semantics="sigmoid scores; e_score_correction_bias added for the choice "
                "only (group-limited top-k); weights = unbiased sigmoid of the chosen experts, "
                "divided by their sum if norm_topk_prob, times routed_scaling_factor "
                "(so they sum to routed_scaling_factor, 2.5 by default)",
            ),
            _spec(
                "phimoe",
                router_attr="router",
                weight_semantics="sparsemixer (inference path): each of the two picks is the "
                "softmax weight of its expert among the logits left after masking",
            ),
            _spec(
                "gpt_oss",
                router_attr="router",
                weight_semantics="top-k on the biased logits, softmax over the k (sums to 1)",
            ),
            _spec(
                "granitemoe",
                block_attr="block_sparse_moe",
                router_attr="router",
                weight_semantics="top-k on the logits, softmax over the k (sums to 1)",
            ),
            _spec(
                "granitemoeshared",
                block_attr="block_sparse_moe",
                router_attr="router",
                shared_expert_paths=("shared_mlp",),
                weight_semantics="top-k on the logits, softmax over the k (sums to 1); "
                "the shared MLP is not included",
            ),
        )
    }
)


@dataclass(frozen=True)
class MoELayer:
    """One sparse MoE layer of a model.

    Attributes
    ----------
    layer_id : int
        Index of the decoder layer holding the block.
    block : nn.Module
        The sparse MoE block.
    router : nn.Module
        The router; its forward output is ``(router_logits, topk_weights, topk_index)``.
    experts : nn.Module or None
        The routed experts (fused tensors), when the family has them at ``experts``.
    n_experts : int
        Number of routed experts (rows of the router weight, so pruned models are right).
    top_k : int
        Experts chosen per token.
    shared_expert : nn.Module or None
        The shared expert of this layer, if any (never part of routing traces).
    """

    layer_id: int
    block: nn.Module
    router: nn.Module
    experts: nn.Module | None
    n_experts: int
    top_k: int
    shared_expert: nn.Module | None

    def parameters_per_expert(self) -> tuple[int, int]:
        """Parameters one routed expert owns: ``(in the expert tensors, in the router)``.

        A parameter belongs to the experts when its first dimension runs over them: one slice
        of every fused expert tensor (``gate_up_proj``, ``down_proj`` and their biases) and
        one router row (and router bias entry). Buffers are not parameters and are not counted.
        The one rule behind :func:`moecollab.models.count_parameters` and
        :func:`moecollab.pruning_apply.count_parameters_pruned`.
        """
        def per_expert(module: nn.Module | None) -> int:
            if module is None:
                return 0
            return sum(param[0].numel() for param in module.parameters(recurse=False)
                       if param.ndim >= 1 and param.shape[0] == self.n_experts)

        return per_expert(self.experts), per_expert(self.router)


@dataclass(frozen=True)
class MoEArchitecture:
    """The MoE layout of one model, as found by :func:`find_moe_layers`.

    Attributes
    ----------
    model_type : str
        ``config.model_type``.
    model_class : str
        Class name of the model.
    family : FamilySpec
        The family's entry in :data:`SUPPORTED_FAMILIES`.
    moe_layers : tuple of MoELayer
        The sparse layers, in decoder order.
    dense_layer_ids : tuple of int
        Decoder layers whose feed-forward block is dense (e.g. DeepSeek's
        ``first_k_dense_replace``, Qwen's ``mlp_only_layers``).
    n_layers : int
        Number of decoder layers.
    """

    model_type: str
    model_class: str
    family: FamilySpec
    moe_layers: tuple[MoELayer, ...]
    dense_layer_ids: tuple[int, ...]
    n_layers: int

    @property
    def moe_layer_ids(self) -> list[int]:
        """Decoder-layer index of each MoE layer."""
        return [layer.layer_id for layer in self.moe_layers]

    @property
    def n_experts_per_layer(self) -> list[int]:
        """Routed experts in each MoE layer (may differ after pruning)."""
        return [layer.n_experts for layer in self.moe_layers]

    @property
    def n_experts(self) -> int:
        """Routed experts per layer; the largest count when layers differ."""
        return max(self.n_experts_per_layer)

    @property
    def top_k(self) -> int:
        """Experts chosen per token (the same in every MoE layer)."""
        return self.moe_layers[0].top_k

    @property
    def shared_experts(self) -> bool:
        """Whether any MoE layer has a shared expert beside its routed ones."""
        return any(layer.shared_expert is not None for layer in self.moe_layers)


def _supported_list() -> str:
    return ", ".join(SUPPORTED_FAMILIES)


def _unsupported(model: nn.Module, reason: str) -> UnsupportedModelError:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return UnsupportedModelError(
        f"{type(model).__name__} (model_type={model_type!r}) is not a supported MoE model: "
        f"{reason}; supported families: {_supported_list()}"
    )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a causal LM or of its base model.

    Parameters
    ----------
    model : nn.Module
        A transformers ``*ForCausalLM`` or ``*Model``.

    Returns
    -------
    nn.ModuleList
        ``model.model.layers`` (or ``model.layers`` for a base model).
    """
    candidates = [getattr(model, "base_model", None), getattr(model, "model", None), model]
    for candidate in candidates:
        layers = getattr(candidate, "layers", None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise _unsupported(model, "no decoder layers found at model.model.layers")


def _get_path(module: nn.Module, dotted: str) -> nn.Module | None:
    for name in dotted.split("."):
        module = getattr(module, name, None)
        if module is None:
            return None
    return module if isinstance(module, nn.Module) else None


def find_moe_layers(model: nn.Module) -> MoEArchitecture:
    """Find every sparse MoE layer of a supported model, without running it.

    Parameters
    ----------
    model : nn.Module
        A transformers model whose ``config.model_type`` is in :data:`SUPPORTED_FAMILIES`.

    Returns
    -------
    MoEArchitecture
        MoE layers (decoder index, router, experts, counts) and dense layer indices.

    Raises
    ------
    UnsupportedModelError
        If the family is not in :data:`SUPPORTED_FAMILIES`, the model has no MoE layer, a
        router does not look like the family's router, or MoE layers disagree on ``top_k``.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    family = SUPPORTED_FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if family is None:
        raise _unsupported(model, "its family has no known router layout")

    layers = decoder_layers(model)
    moe_layers: list[MoELayer] = []
    dense_layer_ids: list[int] = []
    for layer_id, layer in enumerate(layers):
        block = getattr(layer, family.block_attr, None)
        router = getattr(block, family.router_attr, None) if block is not None else None
        if router is None:
            dense_layer_ids.append(layer_id)
            continue
        weight = getattr(router, "weight", None)
        top_k = getattr(router, "top_k", None)
        if weight is None or weight.ndim != 2 or not isinstance(top_k, int):
            raise _unsupported(
                model,
                f"layer {layer_id}: {family.block_attr}.{family.router_attr} "
                f"({type(router).__name__}) has no 2-D weight and integer top_k",
            )
        shared_expert = None
        for path in family.shared_expert_paths:
            shared_expert = _get_path(layer, path)
            if shared_expert is not None:
                break
        moe_layers.append(
            MoELayer(
                layer_id=layer_id,
                block=block,
                router=router,
                experts=getattr(block, family.experts_attr, None),
                n_experts=int(weight.shape[0]),
                top_k=top_k,
                shared_expert=shared_expert,
            )
        )
    if not moe_layers:
        raise _unsupported(model, "no layer has a sparse MoE block")
    top_ks = sorted({layer.top_k for layer in moe_layers})
    if len(top_ks) > 1:
        raise _unsupported(model, f"MoE layers disagree on top_k ({top_ks})")
    architecture = MoEArchitecture(
        model_type=model_type,
        model_class=type(model).__name__,
        family=family,
        moe_layers=tuple(moe_layers),
        dense_layer_ids=tuple(dense_layer_ids),
        n_layers=len(layers),
    )
    logger.debug(
        "%s: %d MoE layers %s, dense layers %s, %s experts per layer, top_k=%d",
        architecture.model_class,
        len(moe_layers),
        architecture.moe_layer_ids,
        list(dense_layer_ids),
        architecture.n_experts_per_layer,
        architecture.top_k,
    )
    return architecture
