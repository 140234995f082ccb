"""Record which experts a Mixture-of-Experts model routes every token to.

:func:`capture_routing` runs a supported transformers model (see
:data:`moecollab.moe_arch.SUPPORTED_FAMILIES`) over batches of token ids and records, for every
non-pad token and every MoE layer, the ``top_k`` expert ids and weights chosen by the model's own
router: a forward hook on each router module keeps its output ``(router_logits, topk_weights,
topk_index)``, so routing is never re-implemented. The result is a
:class:`~moecollab.trace.RoutingTrace` (its own torch-free module, re-exported here), stored
sparse (ids and weights per token, layer and rank).

Weights are what the router returns and the MoE block applies to the expert outputs (METHOD.md
§1), per family (transformers 5.24):

- OLMoE, FlexOlmo, Qwen2-MoE, Qwen3-MoE, Qwen3-Next: softmax over all routed experts, top-k,
  divided by the sum of the k only if ``norm_topk_prob`` (OLMoE's default is ``False``, so its
  weights sum to less than 1). The Qwen shared expert (sigmoid-gated) is not recorded.
- Mixtral: softmax, top-k, always renormalised (sums to 1).
- DeepSeek-V2: softmax, greedy or group-limited top-k, times ``routed_scaling_factor``; not
  renormalised.
- DeepSeek-V3: sigmoid scores; ``e_score_correction_bias`` only influences the choice; weights are
  the unbiased sigmoid scores of the chosen experts, divided by their sum if ``norm_topk_prob``,
  **times** ``routed_scaling_factor`` (2.5 by default, so weights sum to 2.5).
- GPT-OSS, GraniteMoe(Shared): top-k on the (biased) logits, softmax over the k (sums to 1).
- PhiMoE: sparsemixer in inference mode.

Shared experts and dense layers (DeepSeek ``first_k_dense_replace``, Qwen ``mlp_only_layers``)
are never part of the trace; the trace names them (``dense_layer_ids``, ``shared_experts``).

On disk, a trace is the folder :mod:`moecollab.trace` describes.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence, Sized
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from moecollab.moe_arch import MoEArchitecture, find_moe_layers
from moecollab.trace import (  # noqa: F401  (RoutingTrace and the stage helpers: re-exported)
    BASE_TOKEN_COLUMNS,
    METADATA_FILE,
    RoutingTrace,
    _MemorySink,
    _ShardWriter,
    load_stage_trace,
    stage_trace_folder,
)

logger = logging.getLogger(__name__)

__all__ = ["RoutingTrace", "capture_routing", "load_stage_trace", "stage_trace_folder"]

_WEIGHT_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64}


# --------------------------------------------------------------------------------------------
# Hooks
# --------------------------------------------------------------------------------------------


class _RouterRecorder:
    """Forward hooks on every router, keeping its ``(topk_index, topk_weights)`` per call."""

    def __init__(self, architecture: MoEArchitecture) -> None:
        self.architecture = architecture
        self.outputs: list[list[tuple[torch.Tensor, torch.Tensor]]] = [
            [] for _ in architecture.moe_layers
        ]
        self.handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> _RouterRecorder:
        for position, layer in enumerate(self.architecture.moe_layers):
            self.handles.append(layer.router.register_forward_hook(self._hook(position)))
        return self

    def __exit__(self, *exc_info: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.clear()

    def _hook(self, position: int):
        store = self.outputs[position]
        layer_id = self.architecture.moe_layers[position].layer_id

        def keep_router_output(module: torch.nn.Module, args: tuple, output: Any) -> None:
            if not (isinstance(output, tuple) and len(output) == 3):
                raise RuntimeError(
                    f"router of layer {layer_id} ({type(module).__name__}) returned "
                    f"{type(output).__name__}, not (router_logits, topk_weights, topk_index)"
                )
            store.append((output[2], output[1]))

        return keep_router_output

    def clear(self) -> None:
        for store in self.outputs:
            store.clear()

    def collect(self, n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Ids and weights of the last forward pass, each of shape (n_rows, n_moe_layers, k)."""
        expert_ids, weights = [], []
        top_k = self.architecture.top_k
        for layer, store in zip(self.architecture.moe_layers, self.outputs, strict=True):
            if len(store) != 1:
                raise RuntimeError(
                    f"router of layer {layer.layer_id} ran {len(store)} times in one forward "
                    "pass, expected once (a replaced block forward or gradient checkpointing "
                    "re-run would make the capture wrong)"
                )
            index, weight = store[0]
            if index.numel() != n_rows * top_k or weight.numel() != n_rows * top_k:
                raise RuntimeError(
                    f"router of layer {layer.layer_id} returned {index.numel()} ids for "
                    f"{n_rows} token positions and top_k={top_k}"
                )
            # With device_map="auto" layers live on different devices: gather on the first.
            device = expert_ids[0].device if expert_ids else index.device
            expert_ids.append(index.reshape(n_rows, top_k).to(device))
            weights.append(weight.reshape(n_rows, top_k).to(device))
        return torch.stack(expert_ids, dim=1), torch.stack(weights, dim=1)


# --------------------------------------------------------------------------------------------
# Batches and token tables
# --------------------------------------------------------------------------------------------


def _as_2d_long(value: Any, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(value)
    if tensor.ndim == 1:
        tensor = tensor.unsqueeze(0)
    if tensor.ndim != 2:
        raise ValueError(f"{name} must have shape (batch, seq); got shape {tuple(tensor.shape)}")
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex:
        raise ValueError(f"{name} must hold integers; got dtype {tensor.dtype}")
    return tensor.long()


def _iter_batches(
    batches: Iterable[Any],
    attention_masks: Iterable[Any] | None,
    token_metadata: Iterable[Mapping[str, Any]] | None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None, dict[str, Any]]]:
    """Normalise batches to ``(input_ids, attention_mask or None, extra per-batch metadata)``."""
    mask_iter = iter(attention_masks) if attention_masks is not None else None
    metadata_iter = iter(token_metadata) if token_metadata is not None else None
    for batch_index, batch in enumerate(batches):
        extra: dict[str, Any] = {}
        if isinstance(batch, Mapping):
            if "input_ids" not in batch:
                raise ValueError(
                    f"batch {batch_index} must have an 'input_ids' key; got keys {list(batch)}"
                )
            input_ids = _as_2d_long(batch["input_ids"], "input_ids")
            mask = batch.get("attention_mask")
            extra = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
        else:
            input_ids = _as_2d_long(batch, "input_ids")
            mask = None
        if mask_iter is not None:
            try:
                given_mask = next(mask_iter)
            except StopIteration:
                raise ValueError(
                    f"attention_masks ran out at batch {batch_index}: give one mask per batch"
                ) from None
            if mask is not None:
                raise ValueError(
                    f"batch {batch_index} has an attention_mask and attention_masks was given too"
                )
            mask = given_mask
        if metadata_iter is not None:
            try:
                given = next(metadata_iter)
            except StopIteration:
                raise ValueError(
                    f"token_metadata ran out at batch {batch_index}: give one mapping per batch"
                ) from None
            clash = set(extra) & set(given)
            if clash:
                raise ValueError(f"metadata columns {sorted(clash)} given twice at {batch_index}")
            extra.update(given)
        if mask is not None:
            mask = torch.as_tensor(mask)
            mask = (mask.unsqueeze(0) if mask.ndim == 1 else mask) != 0
            mask = mask.long()
            if mask.shape != input_ids.shape:
                raise ValueError(
                    f"attention_mask of batch {batch_index} must have the shape of input_ids "
                    f"{tuple(input_ids.shape)}; got {tuple(mask.shape)}"
                )
        yield input_ids, mask, extra


def _metadata_column(
    name: str, value: Any, keep: np.ndarray, sequence_of_token: np.ndarray
) -> np.ndarray:
    """One per-token column from a per-sequence (batch,) or per-token (batch, seq) value."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    if array.dtype == object or array.ndim == 0:
        array = np.asarray(value, dtype=object)
    batch_size, seq_len = keep.shape
    if array.shape == (batch_size,):
        return array[sequence_of_token]
    if array.shape == (batch_size, seq_len):
        return array[keep]
    raise ValueError(
        f"metadata {name!r} must have shape (batch,) = ({batch_size},) or (batch, seq) = "
        f"({batch_size}, {seq_len}); got shape {array.shape}"
    )


def _token_table(
    input_ids: np.ndarray,
    keep: np.ndarray,
    first_sequence: int,
    extra: Mapping[str, Any],
) -> pd.DataFrame:
    """Token table of one batch: one row per kept (non-pad) token, batch-major order."""
    sequence_of_token = np.nonzero(keep)[0]
    position = np.cumsum(keep, axis=1) - 1
    table = {
        "token_id": input_ids[keep].astype(np.int32),
        "position": position[keep].astype(np.int32),
        "sequence_index": (sequence_of_token + first_sequence).astype(np.int64),
    }
    for name, value in extra.items():
        if name in BASE_TOKEN_COLUMNS:
            raise ValueError(
                f"metadata column {name!r} clashes with a built-in token column "
                f"({', '.join(BASE_TOKEN_COLUMNS)})"
            )
        table[name] = _metadata_column(name, value, keep, sequence_of_token)
    return pd.DataFrame(table)


def _input_device(model: torch.nn.Module) -> torch.device:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight.device
    return next(model.parameters()).device


def _count_tokens(batches: Sequence[Any], attention_masks: Sequence[Any] | None) -> int:
    """Non-pad tokens in a list of batches (used to check a token-metadata table early)."""
    total = 0
    for batch_index, batch in enumerate(batches):
        mask = None
        if isinstance(batch, Mapping):
            input_ids, mask = batch["input_ids"], batch.get("attention_mask")
        else:
            input_ids = batch
        if attention_masks is not None:
            mask = attention_masks[batch_index]
        if mask is not None:
            total += int(torch.as_tensor(mask).sum())
        else:
            total += int(torch.as_tensor(input_ids).numel())
    return total


# --------------------------------------------------------------------------------------------
# Capture
# --------------------------------------------------------------------------------------------


def capture_routing(
    model: torch.nn.Module,
    batches: Iterable[Any],
    *,
    attention_masks: Iterable[Any] | None = None,
    token_metadata: pd.DataFrame | Iterable[Mapping[str, Any]] | None = None,
    out_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
    dtype: torch.dtype = torch.float32,
    return_trace: bool = True,
    first_sequence_index: int = 0,
) -> RoutingTrace | None:
    """Run a MoE model over batches and record every token's routing in every MoE layer.

    Forward hooks on the model's own router modules record the ``top_k`` expert ids and weights
    the router returned and the block applied; nothing about routing is re-computed. The model
    runs under ``torch.inference_mode()`` in eval mode (restored afterwards).

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A model of a family in :data:`moecollab.moe_arch.SUPPORTED_FAMILIES`; an unsupported
        one raises :class:`moecollab.moe_arch.UnsupportedModelError` before anything runs.
    batches : iterable
        Token ids, each a tensor of shape (batch, seq) (or (seq,)), or a mapping with
        ``input_ids``, optionally ``attention_mask`` and further metadata keys (see
        ``token_metadata``).
    attention_masks : iterable, optional
        One mask of shape (batch, seq) per batch when batches are bare tensors; 0 marks pads,
        which are run through the model but dropped from the trace.
    token_metadata : DataFrame or iterable of mappings, optional
        Extra token-table columns. A DataFrame has one row per non-pad token in capture order
        (batch by batch, row by row, position by position). Otherwise one mapping per batch
        (as are extra keys of a mapping batch): each value is per sequence, shape (batch,), or
        per token, shape (batch, seq), e.g. ``{"document_id": [...], "text_piece": [[...]]}``.
    out_dir : path-like, optional
        Stream to this folder: each batch is written as a shard as soon as it is captured
        (memory proportional to a batch), into a temporary folder renamed to ``out_dir`` at the
        end. Read it back with :meth:`RoutingTrace.load` or :meth:`RoutingTrace.iter_shards`.
    overwrite : bool
        Replace an existing non-empty ``out_dir`` (checked before running).
    progress : bool
        Show a text progress bar (tqdm) over batches.
    dtype : torch.dtype
        Storage dtype of the weights: ``torch.float32`` (default), ``torch.float16`` or
        ``torch.float64``.
    return_trace : bool
        With ``out_dir``: load and return the written trace (False returns None, for corpora
        larger than memory). Without ``out_dir`` the trace is always returned.
    first_sequence_index : int
        ``sequence_index`` of the first sequence (a share of a larger capture, see
        :func:`moecollab.distributed.capture_routing_sharded`).

    Returns
    -------
    RoutingTrace or None
        ``expert_ids`` and ``weights`` of shape (n_tokens, n_moe_layers, top_k) over the
        non-pad tokens, and the token table.

    Raises
    ------
    UnsupportedModelError
        If the model has no known router layout.
    ValueError
        For malformed batches, masks or metadata (naming the batch).

    Examples
    --------
    >>> trace = capture_routing(model, [{"input_ids": ids, "attention_mask": mask}])
    ... # doctest: +SKIP
    >>> X = trace.to_matrix(level="sample", value="weight")  # doctest: +SKIP
    """
    architecture = find_moe_layers(model)
    if isinstance(batches, torch.Tensor | np.ndarray | Mapping):
        raise ValueError(
            "batches must be an iterable of batches (e.g. a list of input_ids tensors or of "
            f"dicts); got a single {type(batches).__name__}: wrap it in a list"
        )
    if dtype not in _WEIGHT_DTYPES:
        allowed = ", ".join(str(known) for known in _WEIGHT_DTYPES)
        raise ValueError(f"dtype must be one of {allowed}; got {dtype!r}")
    weight_numpy_dtype = _WEIGHT_DTYPES[dtype]

    metadata_table: pd.DataFrame | None = None
    per_batch_metadata: Iterable[Mapping[str, Any]] | None = None
    if isinstance(token_metadata, pd.DataFrame):
        metadata_table = token_metadata.reset_index(drop=True)
        clash = set(metadata_table.columns) & set(BASE_TOKEN_COLUMNS)
        if clash:
            raise ValueError(
                f"token_metadata columns {sorted(clash)} clash with built-in token columns"
            )
        if isinstance(batches, Sequence) and (
            attention_masks is None or isinstance(attention_masks, Sequence)
        ):
            expected = _count_tokens(batches, attention_masks)
            if expected != len(metadata_table):
                raise ValueError(
                    f"token_metadata must have one row per non-pad token ({expected}); "
                    f"got {len(metadata_table)} rows"
                )
    elif token_metadata is not None:
        per_batch_metadata = token_metadata

    sink: _ShardWriter | _MemorySink
    sink = _ShardWriter(out_dir, overwrite=overwrite) if out_dir is not None else _MemorySink()
    device = _input_device(model)
    forward_kwargs: dict[str, Any] = {"use_cache": False}
    try:
        if "logits_to_keep" in inspect.signature(model.forward).parameters:
            # Routing does not depend on the LM head: skip most of its work and memory.
            forward_kwargs["logits_to_keep"] = 1
    except (TypeError, ValueError):
        pass

    n_total_tokens = 0
    n_sequences = int(first_sequence_index)
    was_training = model.training
    model.eval()
    total = len(batches) if isinstance(batches, Sized) else None
    try:
        with _RouterRecorder(architecture) as recorder, torch.inference_mode():
            bar = tqdm(
                _iter_batches(batches, attention_masks, per_batch_metadata),
                total=total,
                desc="capture",
                unit="batch",
                disable=not progress,
            )
            for input_ids, attention_mask, extra in bar:
                batch_size, seq_len = input_ids.shape
                recorder.clear()
                model(
                    input_ids=input_ids.to(device),
                    attention_mask=None if attention_mask is None else attention_mask.to(device),
                    **forward_kwargs,
                )
                expert_ids, weights = recorder.collect(batch_size * seq_len)
                recorder.clear()
                if attention_mask is None:
                    keep = np.ones((batch_size, seq_len), dtype=bool)
                else:
                    keep = attention_mask.numpy() != 0
                keep_rows = torch.from_numpy(keep.reshape(-1)).to(expert_ids.device)
                batch_ids = expert_ids[keep_rows].to(torch.int16).cpu().numpy()
                batch_weights = weights[keep_rows].to(dtype).cpu().numpy()
                tokens = _token_table(input_ids.numpy(), keep, n_sequences, extra)
                if metadata_table is not None:
                    rows = metadata_table.iloc[n_total_tokens : n_total_tokens + len(tokens)]
                    if len(rows) != len(tokens):
                        raise ValueError(
                            f"token_metadata has {len(metadata_table)} rows, fewer than the "
                            f"non-pad tokens captured so far ({n_total_tokens + len(tokens)})"
                        )
                    tokens = pd.concat([tokens, rows.reset_index(drop=True)], axis=1)
                sink.append(batch_ids, batch_weights, tokens)
                n_total_tokens += len(tokens)
                n_sequences += batch_size
                bar.set_postfix(tokens=n_total_tokens, refresh=False)
            bar.close()
        if metadata_table is not None and n_total_tokens != len(metadata_table):
            raise ValueError(
                f"token_metadata must have one row per non-pad token ({n_total_tokens}); "
                f"got {len(metadata_table)} rows"
            )
    except BaseException:
        sink.abort()
        raise
    finally:
        model.train(was_training)

    logger.info(
        "captured %d tokens from %d sequences over %d MoE layers of %s",
        n_total_tokens,
        n_sequences - int(first_sequence_index),
        len(architecture.moe_layers),
        architecture.model_class,
    )
    header = _trace_header(architecture, weight_numpy_dtype, getattr(model, "config", None))
    if isinstance(sink, _ShardWriter):
        try:
            path = sink.finish(header)
        except BaseException:
            sink.abort()
            raise
        return RoutingTrace.load(path) if return_trace else None
    n_moe_layers, top_k = len(architecture.moe_layers), architecture.top_k
    if sink.expert_ids:
        all_ids = np.concatenate(sink.expert_ids)
        all_weights = np.concatenate(sink.weights)
        tokens = pd.concat(sink.tokens, ignore_index=True)
    else:
        all_ids = np.zeros((0, n_moe_layers, top_k), dtype=np.int16)
        all_weights = np.zeros((0, n_moe_layers, top_k), dtype=weight_numpy_dtype)
        tokens = pd.DataFrame({column: [] for column in BASE_TOKEN_COLUMNS})
    return RoutingTrace._from_header(header, all_ids, all_weights, tokens)


_ROUTING_CONFIG_KEYS = (
    "num_experts_per_tok",
    "norm_topk_prob",
    "routed_scaling_factor",
    "topk_method",
    "n_group",
    "topk_group",
    "router_jitter_noise",
)


def _trace_header(
    architecture: MoEArchitecture, weight_dtype: type, config: Any
) -> dict[str, Any]:
    import transformers

    routing_config = {}
    for key in _ROUTING_CONFIG_KEYS:
        setting = getattr(config, key, None)
        if isinstance(setting, bool | int | float | str):
            routing_config[key] = setting
    return {
        "model_type": architecture.model_type,
        "n_experts": architecture.n_experts,
        "n_experts_per_layer": architecture.n_experts_per_layer,
        "top_k": architecture.top_k,
        "moe_layer_ids": architecture.moe_layer_ids,
        "dense_layer_ids": list(architecture.dense_layer_ids),
        "shared_experts": architecture.shared_experts,
        "weights_dtype": np.dtype(weight_dtype).name,
        "metadata": {
            "model_class": architecture.model_class,
            "n_layers": architecture.n_layers,
            "weight_semantics": architecture.family.weight_semantics,
            "routing_config": routing_config,
            "transformers_version": transformers.__version__,
        },
    }
