"""The routing trace: which experts every token was sent to, with what weight (no torch).

A :class:`RoutingTrace` holds, for every token and every MoE layer, the ``top_k`` expert ids and
weights its router chose (recorded by :func:`moecollab.capture.capture_routing`), with a token
table (text, field, document). :meth:`RoutingTrace.to_matrix` builds the expert activation
matrix ``X`` of the paper (Eq. 1), token- or sample-level. This module needs numpy, pandas and
SciPy only, so the analysis chapters read traces without importing torch.

On-disk form (:meth:`RoutingTrace.save`, or streamed by ``capture_routing(..., out_dir=...)``):
a folder with ``metadata.json`` and numbered shards, ``routing-00000.safetensors`` (tensors
``expert_ids`` and ``weights``) and ``tokens-00000.parquet`` (the token table). No pickle.
Stage 01 writes two such folders, one per model (:func:`stage_trace_folder`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from safetensors.numpy import load_file, save_file
from scipy import sparse

from moecollab import layout
from moecollab.artifacts import replace_folder

logger = logging.getLogger(__name__)

__all__ = ["RoutingTrace", "load_stage_trace", "stage_trace_folder"]

TRACE_FORMAT = "moecollab.routing_trace"
TRACE_FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
BASE_TOKEN_COLUMNS = ("token_id", "position", "sequence_index")


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


# Stage 01's two traces, by model: the folder names are the contract with stages 02-04.
STAGE_TRACE_FOLDERS = {"trained": "trace", "control": "control_trace"}


def stage_trace_folder(capture_folder: str | os.PathLike, of: str = "trained") -> Path:
    """Where stage 01 writes the trace of ``of`` (``trained`` or ``control``).

    ``of`` names the model as every per-stage reader and writer does
    (:func:`moecollab.models.save_stage_model`, :func:`moecollab.hsdl.load_stage_fit`).
    """
    if of not in STAGE_TRACE_FOLDERS:
        raise ValueError(f"of must be one of {sorted(STAGE_TRACE_FOLDERS)}; got {of!r}")
    return Path(capture_folder) / STAGE_TRACE_FOLDERS[of]


def load_stage_trace(capture_folder: str | os.PathLike,
                     of: str = "trained") -> RoutingTrace | None:
    """Stage 01's trace of ``of``; None for a control that was not captured
    (``capture_control`` off). The trained model's trace is always there: a missing one is an
    error."""
    folder = stage_trace_folder(capture_folder, of)
    if of == "control" and not folder.is_dir():
        return None
    return RoutingTrace.load(folder)
