"""Where each routed expert sits in the study's matrices: one column per expert, layer by layer.

Every activation matrix (:meth:`moecollab.trace.RoutingTrace.to_matrix`), co-activation
table, HSDL dictionary and pruning mask of the study has one column per routed expert: the
experts of the first MoE layer, then those of the second, and so on. Column ``c`` is expert
``e`` of MoE layer ``l`` when ``c = offsets[l] + e``, where ``offsets[l]`` counts the experts of
the layers before ``l`` (``l * n_experts`` when every layer has ``n_experts``). Layers are
numbered among MoE layers (``MoEArchitecture.moe_layer_ids``), not among decoder layers.

This module is the one place that layout is written down; the others ask it. ``n_experts`` is
either one count for every layer or one count per layer (models whose MoE layers differ).

Examples
--------
>>> column_offsets(3, n_layers=2).tolist()
[0, 3, 6]
>>> layers, experts = column_layout([2, 3], n_columns=5)
>>> layers.tolist(), experts.tolist()
([0, 0, 1, 1, 1], [0, 1, 0, 1, 2])
>>> column_of(1, 2, [2, 3])
4
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["ExpertCounts", "column_layout", "column_of", "column_offsets", "per_layer_counts"]

#: One count of routed experts for every MoE layer, or one count per MoE layer.
ExpertCounts = int | Sequence[int]


def per_layer_counts(n_experts: ExpertCounts, *, n_layers: int | None = None,
                     n_columns: int | None = None) -> np.ndarray:
    """Experts of each MoE layer, int64 of shape (n_layers,), checked against the shape given.

    Parameters
    ----------
    n_experts : int or sequence of int
        One positive count for every layer, or one per layer.
    n_layers : int, optional
        Layers the counts must cover (needed for one count unless ``n_columns`` is given).
    n_columns : int, optional
        Columns the counts must add up to (one count must divide it).

    Examples
    --------
    >>> per_layer_counts(4, n_columns=12).tolist()
    [4, 4, 4]
    >>> per_layer_counts(5, n_columns=12)
    Traceback (most recent call last):
    ...
    ValueError: n_experts must be a positive divisor of the number of columns (12); got 5
    """
    if isinstance(n_experts, int | np.integer) and not isinstance(n_experts, bool):
        if n_experts < 1:
            raise ValueError(f"n_experts must be a positive int; got {n_experts!r}")
        if n_columns is not None and n_columns % int(n_experts):
            raise ValueError(f"n_experts must be a positive divisor of the number of columns "
                             f"({n_columns}); got {n_experts!r}")
        if n_layers is None:
            if n_columns is None:
                raise ValueError("one count of experts for every layer needs n_layers or "
                                 "n_columns")
            n_layers = n_columns // int(n_experts)
        counts = np.full(n_layers, int(n_experts), dtype=np.int64)
        if n_columns is not None and counts.sum() != n_columns:
            raise ValueError(f"{n_layers} layers of {n_experts} experts are not the {n_columns} "
                             "columns")
        return counts
    counts = np.asarray(n_experts, dtype=np.int64)
    if counts.ndim != 1 or counts.size == 0 or (counts < 1).any():
        raise ValueError(f"n_experts must be a positive int or one positive count per layer; "
                         f"got {n_experts!r}")
    if n_layers is not None and len(counts) != n_layers:
        raise ValueError(f"n_experts must be a positive int or one positive count per layer "
                         f"({n_layers}); got {list(counts)!r}")
    if n_columns is not None and counts.sum() != n_columns:
        raise ValueError(f"n_experts per layer must sum to the number of columns ({n_columns}); "
                         f"got {list(counts)!r} (sum {int(counts.sum())})")
    return counts


def column_offsets(n_experts: ExpertCounts, *, n_layers: int | None = None,
                   n_columns: int | None = None) -> np.ndarray:
    """First column of every MoE layer, int64 of shape (n_layers + 1,); the last is the number
    of columns. Arguments as in :func:`per_layer_counts`."""
    counts = per_layer_counts(n_experts, n_layers=n_layers, n_columns=n_columns)
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def column_layout(n_experts: ExpertCounts, n_columns: int) -> tuple[np.ndarray, np.ndarray]:
    """MoE layer and within-layer expert of every column, each int64 of shape (n_columns,)."""
    counts = per_layer_counts(n_experts, n_columns=n_columns)
    layer = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return layer, np.arange(n_columns, dtype=np.int64) - offsets[layer]


def column_of(layer: int, expert: int, n_experts: ExpertCounts) -> int:
    """The column of ``expert`` of MoE layer ``layer``."""
    counts = (per_layer_counts(n_experts, n_layers=layer + 1)
              if isinstance(n_experts, int | np.integer) else per_layer_counts(n_experts))
    if not 0 <= layer < len(counts) or not 0 <= expert < counts[layer]:
        raise ValueError(f"no expert {expert} in MoE layer {layer} of a model with "
                         f"{list(counts)} experts per layer")
    return int(counts[:layer].sum() + expert)
