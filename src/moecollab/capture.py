"""Record which experts a Mixture-of-Experts model routes every token to.

:func:`capture_routing` runs a supported transformers model (see
:data:`moecollab.moe_arch.SUPPORTED_FAMILIES`) over batches of token ids and records, for every
non-pad token and every MoE layer, the ``top_k`` expert ids and weights chosen by the model's own
router: a forward hook on each router module keeps its output ``(router_logits, topk_weights,
topk_index)``, so routing is never re-implemented. The result is a :class:`RoutingTrace`, stored
sparse (ids and weights per token, layer and rank), from which :meth:`RoutingTrace.to_matrix`
builds the expert activation matrix ``X`` of the paper (Eq. 1), token- or sample-level.

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

On-disk form (:meth:`RoutingTrace.save`, or streamed by ``capture_routing(..., out_dir=...)``):
a folder with ``metadata.json`` and numbered shards, ``routing-00000.safetensors`` (tensors
``expert_ids`` and ``weights``) and ``tokens-00000.parquet`` (the token table). No pickle.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from safetensors.numpy import load_file, save_file
from scipy import sparse
from tqdm import tqdm

from moecollab import layout
from moecollab.artifacts import replace_folder
from moecollab.moe_arch import MoEArchitecture, find_moe_layers

logger = logging.getLogger(__name__)

__all__ = ["RoutingTrace", "capture_routing"]

TRACE_FORMAT = "moecollab.routing_trace"
TRACE_FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
BASE_TOKEN_COLUMNS = ("token_id", "position", "sequence_index")
_WEIGHT_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64}


# --------------------------------------------------------------------------------------------
# The trace
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class RoutingTrace:
    """Per-token routing of a MoE model: top-k expert ids and weights in every MoE layer.

    Attributes
    ----------
    expert_ids : ndarray of int16, shape (n_tokens, n_moe_layers, top_k)
        Routed expert chosen at each rank, numbered within its layer, in the router's own order.
    weights : ndarray of float32, shape (n_tokens, n_moe_layers, top_k)
        Weight the model applied to that expert's output (see the module docstring per family).
    n_experts : int
        Routed experts per MoE layer (the largest count when layers differ).
    top_k : int
        Experts chosen per token and layer.
    moe_layer_ids : list of int
        Decoder-layer index of each MoE layer (dense layers are skipped).
    model_type : str
        ``config.model_type`` of the model that was run.
    tokens : DataFrame or None
        One row per token: ``token_id``, ``position`` (index among the sequence's non-pad
        tokens), ``sequence_index`` (running index of the sequence over all batches), plus any
        metadata columns given at capture (text piece, document id, domain, split, ...).
    n_experts_per_layer : list of int or None
        Routed experts in each MoE layer; ``[n_experts] * n_moe_layers`` when not given.
    dense_layer_ids : list of int
        Decoder layers with a dense feed-forward block (not in the trace).
    shared_experts : bool
        Whether the MoE layers also have shared experts (not in the trace).
    metadata : dict
        Further JSON-serialisable facts: ``model_class``, ``n_layers`` (decoder layers),
        ``weight_semantics``, ``routing_config`` (the config keys that shape the weights, e.g.
        ``norm_topk_prob``, ``routed_scaling_factor``) and ``transformers_version``.

    Notes
    -----
    Column ``c`` of :meth:`to_matrix` is expert ``e`` of MoE layer ``j`` (position in
    ``moe_layer_ids``, not the decoder index) with ``c = j * n_experts + e`` when every layer has
    ``n_experts`` experts, and ``c = sum(n_experts_per_layer[:j]) + e`` in general. The paper
    writes ``X`` as experts × samples; here, as in scikit-learn, it is samples × experts.

    Examples
    --------
    Two tokens of one sequence, two MoE layers of three experts, top-2:

    >>> trace = RoutingTrace(
    ...     expert_ids=np.array([[[0, 2], [1, 0]], [[2, 1], [1, 2]]], dtype=np.int16),
    ...     weights=np.array([[[0.7, 0.3], [0.6, 0.4]], [[0.5, 0.5], [0.9, 0.1]]], np.float32),
    ...     n_experts=3, top_k=2, moe_layer_ids=[0, 1], model_type="olmoe",
    ...     tokens=pd.DataFrame({"sequence_index": [0, 0]}),
    ... )
    >>> trace.to_matrix().toarray()  # column = layer * 3 + expert
    array([[0.7, 0. , 0.3, 0.4, 0.6, 0. ],
           [0. , 0.5, 0.5, 0. , 0.9, 0.1]], dtype=float32)
    >>> trace.to_matrix(level="sample", value="binary").toarray()  # Eq. 1 on selections
    array([[1., 1., 2., 1., 2., 1.]], dtype=float32)
    """

    expert_ids: np.ndarray
    weights: np.ndarray
    n_experts: int
    top_k: int
    moe_layer_ids: list[int]
    model_type: str
    tokens: pd.DataFrame | None = None
    n_experts_per_layer: list[int] | None = None
    dense_layer_ids: list[int] = field(default_factory=list)
    shared_experts: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.expert_ids = np.asarray(self.expert_ids)
        self.weights = np.asarray(self.weights)
        if self.expert_ids.ndim != 3:
            raise ValueError(
                "expert_ids must have shape (n_tokens, n_moe_layers, top_k); "
                f"got shape {self.expert_ids.shape}"
            )
        if self.weights.shape != self.expert_ids.shape:
            raise ValueError(
                f"weights must have the shape of expert_ids {self.expert_ids.shape}; "
                f"got {self.weights.shape}"
            )
        if not np.issubdtype(self.expert_ids.dtype, np.integer):
            raise ValueError(f"expert_ids must be integers; got dtype {self.expert_ids.dtype}")
        if self.expert_ids.dtype != np.int16:
            self.expert_ids = self.expert_ids.astype(np.int16)
        if not np.issubdtype(self.weights.dtype, np.floating):
            raise ValueError(f"weights must be floats; got dtype {self.weights.dtype}")
        self.moe_layer_ids = [int(layer_id) for layer_id in self.moe_layer_ids]
        self.dense_layer_ids = [int(layer_id) for layer_id in self.dense_layer_ids]
        n_tokens, n_moe_layers, top_k = self.expert_ids.shape
        if len(self.moe_layer_ids) != n_moe_layers:
            raise ValueError(
                f"moe_layer_ids must have one entry per MoE layer ({n_moe_layers}); "
                f"got {len(self.moe_layer_ids)}"
            )
        if int(self.top_k) != top_k:
            raise ValueError(f"top_k must equal expert_ids.shape[2] ({top_k}); got {self.top_k}")
        self.top_k = int(self.top_k)
        if self.n_experts_per_layer is None:
            self.n_experts_per_layer = [int(self.n_experts)] * n_moe_layers
        self.n_experts_per_layer = [int(n) for n in self.n_experts_per_layer]
        if len(self.n_experts_per_layer) != n_moe_layers:
            raise ValueError(
                f"n_experts_per_layer must have one entry per MoE layer ({n_moe_layers}); "
                f"got {len(self.n_experts_per_layer)}"
            )
        if n_moe_layers and int(self.n_experts) != max(self.n_experts_per_layer):
            raise ValueError(
                f"n_experts must be the largest of n_experts_per_layer "
                f"({max(self.n_experts_per_layer)}); got {self.n_experts}"
            )
        self.n_experts = int(self.n_experts)
        if n_tokens:
            highest = self.expert_ids.max(axis=(0, 2))
            lowest = self.expert_ids.min(axis=(0, 2))
            limits = np.asarray(self.n_experts_per_layer)
            if (lowest < 0).any() or (highest >= limits).any():
                layer = int(np.flatnonzero((lowest < 0) | (highest >= limits))[0])
                raise ValueError(
                    f"expert_ids of MoE layer {layer} must be in [0, "
                    f"{limits[layer]}); got values in [{lowest[layer]}, {highest[layer]}]"
                )
        if self.tokens is not None and len(self.tokens) != n_tokens:
            raise ValueError(
                f"tokens must have one row per token ({n_tokens}); got {len(self.tokens)} rows"
            )

    def __repr__(self) -> str:
        columns = None if self.tokens is None else [str(c) for c in self.tokens.columns]
        return (
            f"RoutingTrace(model_type={self.model_type!r}, n_tokens={len(self)}, "
            f"moe_layer_ids={self.moe_layer_ids}, n_experts={self.n_experts}, "
            f"top_k={self.top_k}, weights={self.weights.dtype}, token_columns={columns})"
        )

    # -- sizes -----------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self.expert_ids.shape[0])

    @property
    def n_tokens(self) -> int:
        """Number of tokens (rows of the token-level matrix)."""
        return len(self)

    @property
    def n_moe_layers(self) -> int:
        """Number of MoE layers."""
        return int(self.expert_ids.shape[1])

    @property
    def column_offsets(self) -> np.ndarray:
        """First column of each MoE layer in :meth:`to_matrix`, int64 of shape (n_moe_layers,)."""
        return layout.column_offsets(list(self.n_experts_per_layer))[:-1]

    @property
    def n_columns(self) -> int:
        """Columns of :meth:`to_matrix`: routed experts over all MoE layers (``N_e``)."""
        return int(sum(self.n_experts_per_layer))

    def columns(self) -> pd.DataFrame:
        """What each column of :meth:`to_matrix` is.

        Returns
        -------
        DataFrame
            One row per column: ``moe_layer`` (position among MoE layers), ``layer_id``
            (decoder-layer index) and ``expert`` (index within the layer).
        """
        moe_layer = np.repeat(np.arange(self.n_moe_layers), self.n_experts_per_layer)
        expert = np.concatenate([np.arange(n) for n in self.n_experts_per_layer])
        return pd.DataFrame(
            {
                "moe_layer": moe_layer,
                "layer_id": np.asarray(self.moe_layer_ids)[moe_layer],
                "expert": expert,
            }
        )

    # -- the activation matrix ---------------------------------------------------------------

    def to_matrix(
        self,
        level: Literal["token", "sample"] = "token",
        value: Literal["weight", "binary"] = "weight",
        sample_ids: str | Sequence[Any] | np.ndarray | None = None,
        *,
        return_labels: bool = False,
    ) -> sparse.csr_array | tuple[sparse.csr_array, np.ndarray]:
        """The expert activation matrix ``X``, sparse, one column per (MoE layer, expert).

        Parameters
        ----------
        level : {"token", "sample"}
            ``"token"``: one row per token. ``"sample"``: one row per sample, the sum of its
            tokens' rows (paper Eq. 1, ``v_{i,j,k} = sum_t alpha_{t,j,k}``).
        value : {"weight", "binary"}
            ``"weight"``: the routing weight the model applied. ``"binary"``: 1 per selection
            (at sample level: how many of the sample's tokens selected the expert).
        sample_ids : str or array-like, optional
            Sample level only: a column of the token table, or one label per token. Default
            ``"sequence_index"``.
        return_labels : bool
            Also return the label of each row (sample level: the sorted distinct sample ids;
            token level: ``arange(n_tokens)``).

        Returns
        -------
        csr_array of float32, shape (n_samples, n_columns)
            Column ``layer * n_experts + expert`` (see the class Notes for per-layer counts).
        labels : ndarray, shape (n_samples,)
            Only with ``return_labels``.
        """
        if level not in ("token", "sample"):
            raise ValueError(f"level must be 'token' or 'sample'; got {level!r}")
        if value not in ("weight", "binary"):
            raise ValueError(f"value must be 'weight' or 'binary'; got {value!r}")
        if level == "token" and sample_ids is not None:
            raise ValueError("sample_ids is only used with level='sample'; got level='token'")
        n_tokens, n_moe_layers, top_k = self.expert_ids.shape
        per_token = n_moe_layers * top_k
        nnz = n_tokens * per_token
        index_dtype = np.int32 if max(nnz, self.n_columns) < 2**31 else np.int64
        columns = self.expert_ids.astype(index_dtype) + self.column_offsets.astype(index_dtype)[
            None, :, None
        ]
        if value == "weight":
            # A copy: sort_indices below permutes data in place, never the trace's own weights.
            data = self.weights.reshape(-1).astype(np.float32, copy=True)
        else:
            data = np.ones(nnz, dtype=np.float32)
        indptr = np.arange(n_tokens + 1, dtype=index_dtype) * per_token
        matrix = sparse.csr_array(
            (data, columns.reshape(-1), indptr), shape=(n_tokens, self.n_columns)
        )
        matrix.sort_indices()  # canonical CSR (sorted in place, no extra copy of the indices)
        labels = np.arange(n_tokens)
        if level == "sample":
            codes, labels = self._sample_codes(sample_ids)
            # Eq. 1 as a product: (n_samples x n_tokens) 0/1 membership times the token rows.
            membership = sparse.csr_array(
                (np.ones(n_tokens, dtype=np.float32), (codes, np.arange(n_tokens))),
                shape=(len(labels), n_tokens),
            )
            matrix = sparse.csr_array(membership @ matrix)
            matrix.sort_indices()
        return (matrix, labels) if return_labels else matrix

    def _sample_codes(self, sample_ids: Any) -> tuple[np.ndarray, np.ndarray]:
        """Row of each token in a sample-level matrix, and the sorted labels of the rows."""
        if sample_ids is None or isinstance(sample_ids, str):
            column = "sequence_index" if sample_ids is None else sample_ids
            if self.tokens is None:
                raise ValueError(
                    f"sample_ids={column!r} needs a token table; this trace has none, so pass "
                    "one label per token"
                )
            if column not in self.tokens.columns:
                raise ValueError(
                    f"sample_ids must name a token-table column "
                    f"({', '.join(map(str, self.tokens.columns))}); got {column!r}"
                )
            values = self.tokens[column].to_numpy()
        else:
            values = np.asarray(sample_ids)
            if values.shape != (len(self),):
                raise ValueError(
                    f"sample_ids must have one label per token ({len(self)}); "
                    f"got shape {values.shape}"
                )
        codes, labels = pd.factorize(values, sort=True)
        if (codes < 0).any():
            raise ValueError("sample_ids must not contain missing values (NaN/None)")
        return codes.astype(np.int64), np.asarray(labels)

    # -- subsets and concatenation -----------------------------------------------------------

    def _with(self, expert_ids: np.ndarray, weights: np.ndarray, tokens: pd.DataFrame | None):
        return RoutingTrace(
            expert_ids=expert_ids,
            weights=weights,
            n_experts=self.n_experts,
            top_k=self.top_k,
            moe_layer_ids=list(self.moe_layer_ids),
            model_type=self.model_type,
            tokens=tokens,
            n_experts_per_layer=list(self.n_experts_per_layer),
            dense_layer_ids=list(self.dense_layer_ids),
            shared_experts=self.shared_experts,
            metadata=dict(self.metadata),
        )

    def select(self, mask: np.ndarray | Sequence[bool] | Sequence[int] | pd.Series) -> RoutingTrace:
        """A trace of a subset of tokens.

        Parameters
        ----------
        mask : array-like of bool, shape (n_tokens,), or of int
            Boolean mask over tokens, or token indices (in the order wanted).

        Returns
        -------
        RoutingTrace
            The selected tokens (copied), with the token table re-indexed from 0.
        """
        selector = np.asarray(mask)
        if selector.dtype == bool:
            if selector.shape != (len(self),):
                raise ValueError(
                    f"mask must have one entry per token ({len(self)}); got shape {selector.shape}"
                )
            selector = np.flatnonzero(selector)
        elif not np.issubdtype(selector.dtype, np.integer) and selector.size:
            raise ValueError(f"mask must be booleans or token indices; got dtype {selector.dtype}")
        selector = selector.astype(np.int64).reshape(-1)
        tokens = None
        if self.tokens is not None:
            tokens = self.tokens.iloc[selector].reset_index(drop=True)
        return self._with(self.expert_ids[selector], self.weights[selector], tokens)

    @classmethod
    def concatenate(cls, traces: Sequence[RoutingTrace]) -> RoutingTrace:
        """Tokens of several traces of the same model, one after another.

        Parameters
        ----------
        traces : sequence of RoutingTrace
            Traces with the same layers, expert counts and ``top_k``.

        Returns
        -------
        RoutingTrace
            Metadata of the first trace; token tables concatenated (all or none must have one).
        """
        if not traces:
            raise ValueError("traces must hold at least one RoutingTrace; got none")
        first = traces[0]
        for trace in traces[1:]:
            if (
                trace.moe_layer_ids != first.moe_layer_ids
                or trace.n_experts_per_layer != first.n_experts_per_layer
                or trace.top_k != first.top_k
            ):
                raise ValueError(
                    "traces must share moe_layer_ids, n_experts_per_layer and top_k; "
                    f"got {trace.moe_layer_ids}/{trace.n_experts_per_layer}/{trace.top_k} vs "
                    f"{first.moe_layer_ids}/{first.n_experts_per_layer}/{first.top_k}"
                )
        has_tokens = {trace.tokens is not None for trace in traces}
        if len(has_tokens) > 1:
            raise ValueError("either every trace or none must have a token table")
        tokens = None
        if first.tokens is not None:
            tokens = pd.concat([trace.tokens for trace in traces], ignore_index=True)
        return first._with(
            np.concatenate([trace.expert_ids for trace in traces]),
            np.concatenate([trace.weights for trace in traces]),
            tokens,
        )

    # -- files -----------------------------------------------------------------------------

    def _header(self) -> dict[str, Any]:
        return {
            "model_type": self.model_type,
            "n_experts": self.n_experts,
            "n_experts_per_layer": list(self.n_experts_per_layer),
            "top_k": self.top_k,
            "moe_layer_ids": list(self.moe_layer_ids),
            "dense_layer_ids": list(self.dense_layer_ids),
            "shared_experts": bool(self.shared_experts),
            "weights_dtype": str(self.weights.dtype),
            "metadata": self.metadata,
        }

    def save(
        self, path: str | os.PathLike, *, overwrite: bool = False, max_shard_tokens: int = 1 << 20
    ) -> Path:
        """Write the trace to a folder, atomically (temporary folder, then rename).

        Parameters
        ----------
        path : path-like
            Folder to create: ``metadata.json``, ``routing-NNNNN.safetensors`` and
            ``tokens-NNNNN.parquet`` shards.
        overwrite : bool
            Replace an existing folder; otherwise an existing non-empty folder is an error.
        max_shard_tokens : int
            Most tokens per shard.

        Returns
        -------
        Path
            The folder written.
        """
        if max_shard_tokens < 1:
            raise ValueError(f"max_shard_tokens must be >= 1; got {max_shard_tokens!r}")
        writer = _ShardWriter(path, overwrite=overwrite)
        try:
            for start in range(0, len(self), max_shard_tokens):
                stop = min(start + max_shard_tokens, len(self))
                tokens = None
                if self.tokens is not None:
                    tokens = self.tokens.iloc[start:stop].reset_index(drop=True)
                writer.append(self.expert_ids[start:stop], self.weights[start:stop], tokens)
            return writer.finish(self._header())
        except BaseException:
            writer.abort()
            raise

    @staticmethod
    def read_header(path: str | os.PathLike) -> dict[str, Any]:
        """The ``metadata.json`` of a saved trace (layers, counts, shards), without the arrays."""
        metadata_path = Path(path) / METADATA_FILE
        if not metadata_path.is_file():
            raise FileNotFoundError(
                f"no routing trace at {path}: {METADATA_FILE} is missing (re-run the capture)"
            )
        header = json.loads(metadata_path.read_text())
        if header.get("format") != TRACE_FORMAT:
            raise ValueError(
                f"{metadata_path} is not a routing trace: format is {header.get('format')!r}, "
                f"expected {TRACE_FORMAT!r}"
            )
        if header.get("format_version", 0) > TRACE_FORMAT_VERSION:
            raise ValueError(
                f"{metadata_path} has format_version {header['format_version']}; this code "
                f"reads up to {TRACE_FORMAT_VERSION}"
            )
        return header

    @classmethod
    def iter_shards(cls, path: str | os.PathLike) -> Iterator[RoutingTrace]:
        """Read a saved trace one shard at a time (memory of one shard).

        Parameters
        ----------
        path : path-like
            A folder written by :meth:`save` or by :func:`capture_routing` with ``out_dir``.

        Yields
        ------
        RoutingTrace
            The tokens of each shard in order; ``sequence_index`` stays global.
        """
        folder = Path(path)
        header = cls.read_header(folder)
        for shard in header["shards"]:
            arrays = load_file(folder / shard["routing"])
            tokens = None
            if shard.get("tokens"):
                tokens = pd.read_parquet(folder / shard["tokens"])
            yield cls._from_header(header, arrays["expert_ids"], arrays["weights"], tokens)

    @classmethod
    def load(cls, path: str | os.PathLike) -> RoutingTrace:
        """Read a saved trace (all shards, concatenated).

        Parameters
        ----------
        path : path-like
            A folder written by :meth:`save` or by :func:`capture_routing` with ``out_dir``.

        Returns
        -------
        RoutingTrace
        """
        folder = Path(path)
        header = cls.read_header(folder)
        shards = list(cls.iter_shards(folder))
        if not shards:
            n_moe_layers, top_k = len(header["moe_layer_ids"]), header["top_k"]
            empty_ids = np.zeros((0, n_moe_layers, top_k), dtype=np.int16)
            empty_weights = np.zeros((0, n_moe_layers, top_k), dtype=header["weights_dtype"])
            tokens = None
            if header.get("token_columns"):
                tokens = pd.DataFrame({column: [] for column in header["token_columns"]})
            return cls._from_header(header, empty_ids, empty_weights, tokens)
        if len(shards) == 1:
            return shards[0]
        return cls.concatenate(shards)

    @classmethod
    def _from_header(
        cls,
        header: Mapping[str, Any],
        expert_ids: np.ndarray,
        weights: np.ndarray,
        tokens: pd.DataFrame | None,
    ) -> RoutingTrace:
        return cls(
            expert_ids=expert_ids,
            weights=weights,
            n_experts=header["n_experts"],
            top_k=header["top_k"],
            moe_layer_ids=list(header["moe_layer_ids"]),
            model_type=header["model_type"],
            tokens=tokens,
            n_experts_per_layer=list(header["n_experts_per_layer"]),
            dense_layer_ids=list(header["dense_layer_ids"]),
            shared_experts=bool(header["shared_experts"]),
            metadata=dict(header.get("metadata", {})),
        )


# --------------------------------------------------------------------------------------------
# Writing shards
# --------------------------------------------------------------------------------------------


class _ShardWriter:
    """Appends shards to a temporary folder beside ``path``; ``finish`` renames it into place."""

    def __init__(self, path: str | os.PathLike, *, overwrite: bool) -> None:
        self.path = Path(path)
        self.overwrite = overwrite
        if self.path.exists() and not overwrite:
            if not self.path.is_dir() or any(self.path.iterdir()):
                raise FileExistsError(
                    f"out_dir {self.path} already exists and is not empty; pass overwrite=True "
                    "to replace it"
                )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp_path = self.path.parent / f".{self.path.name}.partial-{uuid.uuid4().hex[:8]}"
        self.tmp_path.mkdir()
        self.shards: list[dict[str, Any]] = []
        self.n_tokens = 0
        self.token_columns: list[str] | None = None

    def append(
        self, expert_ids: np.ndarray, weights: np.ndarray, tokens: pd.DataFrame | None
    ) -> None:
        if len(expert_ids) == 0:
            return
        index = len(self.shards)
        routing_name = f"routing-{index:05d}.safetensors"
        save_file(
            {
                "expert_ids": np.ascontiguousarray(expert_ids),
                "weights": np.ascontiguousarray(weights),
            },
            str(self.tmp_path / routing_name),
        )
        tokens_name = None
        if tokens is not None:
            tokens_name = f"tokens-{index:05d}.parquet"
            tokens.to_parquet(self.tmp_path / tokens_name, index=False)
            if self.token_columns is None:
                self.token_columns = [str(column) for column in tokens.columns]
        self.shards.append(
            {"routing": routing_name, "tokens": tokens_name, "n_tokens": int(len(expert_ids))}
        )
        self.n_tokens += int(len(expert_ids))

    def finish(self, header: dict[str, Any]) -> Path:
        header = {
            "format": TRACE_FORMAT,
            "format_version": TRACE_FORMAT_VERSION,
            **header,
            "n_tokens": self.n_tokens,
            "token_columns": self.token_columns,
            "shards": self.shards,
        }
        (self.tmp_path / METADATA_FILE).write_text(json.dumps(header, indent=1) + "\n")
        replace_folder(self.tmp_path, self.path)
        logger.info(
            "wrote %d tokens in %d shards to %s", self.n_tokens, len(self.shards), self.path
        )
        return self.path

    def abort(self) -> None:
        shutil.rmtree(self.tmp_path, ignore_errors=True)


class _MemorySink:
    """Keeps every batch in memory; ``finish`` concatenates."""

    def __init__(self) -> None:
        self.expert_ids: list[np.ndarray] = []
        self.weights: list[np.ndarray] = []
        self.tokens: list[pd.DataFrame] = []

    def append(
        self, expert_ids: np.ndarray, weights: np.ndarray, tokens: pd.DataFrame | None
    ) -> None:
        self.expert_ids.append(expert_ids)
        self.weights.append(weights)
        if tokens is not None:
            self.tokens.append(tokens)

    def abort(self) -> None:
        self.expert_ids.clear()
        self.weights.clear()
        self.tokens.clear()


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


# Stage 01's two traces, by model: the folder names are the contract with stages 02-04.
STAGE_TRACE_FOLDERS = {"trained": "trace", "control": "control_trace"}


def stage_trace_folder(capture_folder: str | os.PathLike, model: str = "trained") -> Path:
    """Where stage 01 writes the trace of ``model`` (``trained`` or ``control``)."""
    if model not in STAGE_TRACE_FOLDERS:
        raise ValueError(f"model must be one of {sorted(STAGE_TRACE_FOLDERS)}; got {model!r}")
    return Path(capture_folder) / STAGE_TRACE_FOLDERS[model]


def load_stage_trace(capture_folder: str | os.PathLike,
                     model: str = "trained") -> RoutingTrace | None:
    """Stage 01's trace of ``model``; None for a control that was not captured
    (``capture_control`` off). The trained model's trace is always there: a missing one is an
    error."""
    folder = stage_trace_folder(capture_folder, model)
    if model == "control" and not folder.is_dir():
        return None
    return RoutingTrace.load(folder)


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
