"""Which experts fire together on the same token, and how much more often than chance.

Every analysis function here takes one input, the token-level selection matrix ``selected``: an
array of shape ``(n_tokens, n_columns)``, scipy sparse (as built) or dense, with one column per
(MoE layer, expert), column ``layer * n_experts + expert``, and a nonzero entry where the token
selected that expert. Build it with :func:`selection_matrix` from top-k expert ids or with
``RoutingTrace.to_matrix(level="token", value="binary")`` (the same matrix); any nonzero counts
as one selection. Functions that need to know which columns form a layer also take
``n_experts``. Tokens × experts is never densified; the ``(n_columns, n_columns)``
co-occurrence matrix is (a few thousand columns at most).

Statistics for a pair of experts ``a``, ``b`` (paper Fig. 2, Fig. 6):

- ``P(a)``: share of tokens on which ``a`` fires (:func:`expert_frequency`);
- ``P(a and b)``: share of tokens on which both fire (:func:`coactivation_probability`);
- ``P(b | a)`` (:func:`conditional_probability`);
- lift ``P(a and b) / (P(a) P(b))`` (:func:`coactivation_lift`): 1 when the two fire
  independently, above 1 when they collaborate, 0 when they never meet.

Read every statistic against a control (METHOD.md §2): independence
(:func:`expected_under_independence`, lift 1 by definition), the shuffled-token null
(:func:`shuffled_selection`, which keeps every layer's usage and top-k structure but breaks the
link between layers on the same token), and the untrained model of the same architecture.

Two experts of the same layer are never independent: a token picks exactly ``top_k`` distinct
experts per layer, so within-layer lifts mostly reflect that constraint. Cross-layer pairs are
the ones that say something about collaboration; :func:`top_pairs` keeps only those by default.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import sparse
from scipy.cluster import hierarchy
from scipy.spatial.distance import squareform

from moecollab import layout, routing_health
from moecollab.triplet_counts import triplet_census

logger = logging.getLogger(__name__)

__all__ = [
    "adjacent_layer_lift",
    "cluster_order",
    "coactivation_lift",
    "coactivation_probability",
    "conditional_probability",
    "cooccurrence_counts",
    "cross_layer_lift_values",
    "domain_similarity",
    "expected_under_independence",
    "expert_frequency",
    "lift_summary",
    "load_balance",
    "pair_ranking",
    "selection_matrix",
    "shuffled_selection",
    "top_pairs",
    "top_triplets",
    "triplet_ranking",
]

# Triplet counting keeps a dense tally over every possible (a, b, c) code when there are at most
# this many codes (int64: 128 MiB); above it, it counts each chunk with np.unique and merges.
_MAX_DENSE_TRIPLET_CODES = 2**24
# Triplet codes materialised at once (int64: 64 MiB per array).
_TRIPLET_CHUNK_CODES = 2**23


# --------------------------------------------------------------------------------------------
# Building and checking the selection matrix
# --------------------------------------------------------------------------------------------


_BUILD_HINT = ("; build the selection matrix with selection_matrix(expert_ids, n_experts) or "
               "RoutingTrace.to_matrix(level='token', value='binary')")


def _as_selection(selected: Any) -> sparse.csr_array:
    """``selected`` as canonical CSR of int64 zeros and ones (duplicates summed first)."""
    if sparse.issparse(selected):
        matrix = sparse.csr_array(selected, copy=True)
    else:
        array = np.asarray(selected)
        if array.ndim != 2:
            raise ValueError(f"selected must be 2-D (n_tokens, n_columns); got shape "
                             f"{array.shape}{_BUILD_HINT}")
        matrix = sparse.csr_array(array)
    if matrix.ndim != 2:
        raise ValueError(f"selected must be 2-D (n_tokens, n_columns); got shape "
                         f"{matrix.shape}{_BUILD_HINT}")
    if matrix.shape[0] == 0:
        raise ValueError("selected must have at least one token (row); got 0 rows")
    matrix.sum_duplicates()
    matrix = sparse.csr_array((matrix != 0).astype(np.int64))
    matrix.eliminate_zeros()
    matrix.sort_indices()
    return matrix


def selection_matrix(
    expert_ids: np.ndarray, n_experts: int | Sequence[int]
) -> sparse.csr_array:
    """The token-level binary selection matrix from top-k expert ids.

    Parameters
    ----------
    expert_ids : ndarray of int, shape (n_tokens, n_layers, top_k)
        Expert chosen at each rank, numbered within its layer.
    n_experts : int or sequence of int
        Routed experts per layer (one count per layer when layers differ).

    Returns
    -------
    csr_array of bool, shape (n_tokens, n_columns)
        True where the token selected the expert; column ``layer * n_experts + expert``.
        The same matrix as ``RoutingTrace.to_matrix(level="token", value="binary") != 0``.

    Examples
    --------
    >>> ids = np.array([[[0, 1], [2, 0]], [[1, 2], [2, 1]]])  # 2 tokens, 2 layers, top-2
    >>> selection_matrix(ids, 3).toarray().astype(int).tolist()
    [[1, 1, 0, 1, 0, 1], [0, 1, 1, 0, 1, 1]]
    """
    expert_ids = np.asarray(expert_ids)
    if expert_ids.ndim != 3:
        raise ValueError(
            f"expert_ids must have shape (n_tokens, n_layers, top_k); got shape {expert_ids.shape}"
        )
    n_tokens, n_layers, top_k = expert_ids.shape
    offsets = layout.column_offsets(n_experts, n_layers=n_layers)
    sizes = np.diff(offsets)
    if n_tokens and ((expert_ids < 0).any() or (expert_ids >= sizes[None, :, None]).any()):
        raise ValueError(
            f"expert_ids must lie in [0, n_experts) in every layer; got values in "
            f"[{expert_ids.min()}, {expert_ids.max()}] for n_experts={n_experts!r}"
        )
    columns = expert_ids.astype(np.int64) + offsets[:-1][None, :, None]
    per_token = n_layers * top_k
    matrix = sparse.csr_array(
        (
            np.ones(n_tokens * per_token, dtype=bool),
            columns.reshape(-1),
            np.arange(n_tokens + 1, dtype=np.int64) * per_token,
        ),
        shape=(n_tokens, int(offsets[-1])),
    )
    matrix.sum_duplicates()  # sorts the indices; a repeated id within a layer stays one selection
    return matrix


# --------------------------------------------------------------------------------------------
# Frequencies, probabilities and lift
# --------------------------------------------------------------------------------------------


def expert_frequency(selected: Any) -> np.ndarray:
    """How often each expert fires: ``P(a)``, the share of tokens that select it.

    Parameters
    ----------
    selected : sparse array of bool, shape (n_tokens, n_columns)
        Token-level selections, one column per (layer, expert); any nonzero counts.

    Returns
    -------
    ndarray of float, shape (n_columns,)

    Examples
    --------
    >>> selected = sparse.csr_array([[1, 1, 0], [1, 0, 0], [0, 1, 1], [1, 0, 1]], dtype=bool)
    >>> expert_frequency(selected).tolist()
    [0.75, 0.5, 0.5]
    """
    matrix = _as_selection(selected)
    return np.asarray(matrix.sum(axis=0), dtype=float).ravel() / matrix.shape[0]


def _counts(matrix: sparse.csr_array) -> np.ndarray:
    return np.asarray((matrix.T @ matrix).toarray(), dtype=np.int64)


def cooccurrence_counts(selected: Any) -> np.ndarray:
    """Number of tokens on which each pair of experts fires together.

    Computed as the sparse product ``selectedᵀ selected``.

    Parameters
    ----------
    selected : sparse array of bool, shape (n_tokens, n_columns)
        Token-level selections, one column per (layer, expert).

    Returns
    -------
    ndarray of int64, shape (n_columns, n_columns)
        Symmetric; the diagonal holds each expert's own count.

    Examples
    --------
    >>> selected = sparse.csr_array([[1, 1, 0], [1, 0, 0], [0, 1, 1], [1, 0, 1]], dtype=bool)
    >>> cooccurrence_counts(selected).tolist()
    [[3, 1, 1], [1, 2, 1], [1, 1, 2]]
    """
    return _counts(_as_selection(selected))


def coactivation_probability(selected: Any) -> np.ndarray:
    """How often each pair of experts fires on the same token: ``P(a and b)``.

    Parameters
    ----------
    selected : sparse array of bool, shape (n_tokens, n_columns)
        Token-level selections, one column per (layer, expert).

    Returns
    -------
    ndarray of float, shape (n_columns, n_columns)
        Symmetric; the diagonal is ``P(a)``.

    Examples
    --------
    >>> selected = sparse.csr_array([[1, 1, 0], [1, 0, 0], [0, 1, 1], [1, 0, 1]], dtype=bool)
    >>> coactivation_probability(selected)[0].tolist()
    [0.75, 0.25, 0.25]
    """
    matrix = _as_selection(selected)
    return _counts(matrix) / matrix.shape[0]


def conditional_probability(selected: Any) -> np.ndarray:
    """How often expert ``b`` fires on the tokens where expert ``a`` fires: ``P(b | a)``.

    Parameters
    ----------
    selected : sparse array of bool, shape (n_tokens, n_columns)
        Token-level selections, one column per (layer, expert).

    Returns
    -------
    ndarray of float, shape (n_columns, n_columns)
        Row ``a``, column ``b``: ``P(a and b) / P(a)``. Not symmetric; the diagonal is 1 and a
        row is NaN where expert ``a`` never fires.

    Examples
    --------
    >>> selected = sparse.csr_array([[1, 1, 0], [1, 0, 0], [0, 0, 1]], dtype=bool)
    >>> conditional_probability(selected).round(2).tolist()
    [[1.0, 0.5, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    >>> bool(np.isnan(conditional_probability(np.array([[1, 0], [1, 0]]))[1, 0]))
    True
    """
    counts = _counts(_as_selection(selected)).astype(float)
    own = np.diag(counts).copy()
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(own[:, None] > 0, counts / own[:, None], np.nan)


def expected_under_independence(selected: Any) -> np.ndarray:
    """``P(a) P(b)``: the co-activation probability if experts fired independently.

    The independence control: ``coactivation_probability / expected_under_independence`` is the
    lift, which is 1 by definition for independent experts.

    Parameters
    ----------
    selected : sparse array of bool, shape (n_tokens, n_columns)
        Token-level selections, one column per (layer, expert).

    Returns
    -------
    ndarray of float, shape (n_columns, n_columns)

    Examples
    --------
    >>> selected = sparse.csr_array([[1, 1], [1, 0], [0, 0], [1, 1]], dtype=bool)
    >>> expected_under_independence(selected).tolist()
    [[0.5625, 0.375], [0.375, 0.25]]
    """
    frequency = expert_frequency(selected)
    return np.outer(frequency, frequency)


def _lift_from_counts(counts: np.ndarray, n_tokens: int, rows: np.ndarray | None = None,
                      cols: np.ndarray | None = None) -> np.ndarray:
    """Lift from co-occurrence counts as ``count_ab * n / (count_a * count_b)`` (exact ratios)."""
    row_counts = np.diag(counts) if rows is None else rows
    col_counts = np.diag(counts) if cols is None else cols
    expected = np.outer(row_counts, col_counts).astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(expected > 0, counts * float(n_tokens) / expected, np.nan)


def coactivation_lift(selected: Any) -> np.ndarray:
    """How much more often each pair of experts fires together than chance.

    Parameters
    ----------
    selected : sparse array of bool, shape (n_tokens, n_experts)
        Token-level selections, one column per (layer, expert).

    Returns
    -------
    ndarray of float, shape (n_experts, n_experts)
        ``P(a and b) / (P(a) P(b))``; NaN where an expert never fires.

    Notes
    -----
    The diagonal is ``1 / P(a)``. Within one layer the lift is shaped by top-k routing itself
    (a token picks ``top_k`` distinct experts), so read cross-layer pairs for collaboration.

    Examples
    --------
    >>> selected = sparse.csr_array([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=bool)
    >>> float(coactivation_lift(selected)[0, 1])  # (2/3) / (2/3 * 2/3)
    1.5
    """
    matrix = _as_selection(selected)
    return _lift_from_counts(_counts(matrix), matrix.shape[0])


def adjacent_layer_lift(selected: Any, n_experts: int | Sequence[int], layer: int) -> np.ndarray:
    """Lift between every expert of ``layer`` and every expert of ``layer + 1`` (paper Fig. 2).

    Only the two layers' column blocks are multiplied, so this is cheap on large models.

    Parameters
    ----------
    selected : sparse array of bool, shape (n_tokens, n_columns)
        Token-level selections, one column per (layer, expert).
    n_experts : int or sequence of int
        Routed experts per layer (one count per layer when layers differ).
    layer : int
        The first of the two layers, in ``[0, n_layers - 2]``.

    Returns
    -------
    ndarray of float, shape (n_experts of layer, n_experts of layer + 1)
        Row: expert of ``layer``; column: expert of ``layer + 1``; NaN where one never fires.

    Examples
    --------
    >>> ids = np.array([[[0], [1]], [[0], [1]], [[1], [0]], [[1], [1]]])  # 4 tokens, top-1
    >>> adjacent_layer_lift(selection_matrix(ids, 2), 2, 0).round(3).tolist()
    [[0.0, 1.333], [2.0, 0.667]]
    """
    matrix = _as_selection(selected)
    layer_of, _ = layout.column_layout(n_experts, matrix.shape[1])
    n_layers = int(layer_of[-1]) + 1
    if not isinstance(layer, int | np.integer) or not 0 <= layer < n_layers - 1:
        raise ValueError(f"layer must be an int in [0, {n_layers - 2}]; got {layer!r}")
    first = np.flatnonzero(layer_of == layer)
    second = np.flatnonzero(layer_of == layer + 1)
    block_a = matrix[:, first[0] : first[-1] + 1]
    block_b = matrix[:, second[0] : second[-1] + 1]
    counts = np.asarray((block_a.T @ block_b).toarray(), dtype=np.int64)
    return _lift_from_counts(
        counts,
        matrix.shape[0],
        rows=np.asarray(block_a.sum(axis=0)).ravel(),
        cols=np.asarray(block_b.sum(axis=0)).ravel(),
    )


# --------------------------------------------------------------------------------------------
# The shuffled-token null
# --------------------------------------------------------------------------------------------


def shuffled_selection(
    selected: Any,
    n_experts: int | Sequence[int],
    random_state: int | np.random.Generator | None = None,
) -> sparse.csr_array:
    """A null model for co-activation: each layer's routing reassigned to a random token.

    Each layer's rows are permuted with its own random permutation of the tokens. This keeps
    every layer's usage of every expert exactly and keeps the within-layer structure (each
    token still has ``top_k`` distinct experts per layer, since whole rows of a layer move
    together), but destroys any association between layers on the same token: the expected
    cross-layer lift is 1.

    Parameters
    ----------
    selected : sparse array of bool, shape (n_tokens, n_columns)
        Token-level selections, one column per (layer, expert).
    n_experts : int or sequence of int
        Routed experts per layer (which columns form each layer).
    random_state : int, Generator or None
        Seed of the permutations (one per layer, drawn in layer order); the same seed gives
        the same matrix.

    Returns
    -------
    csr_array of bool, shape (n_tokens, n_columns)
        The shuffled selections, in the layout of :func:`selection_matrix`.

    Examples
    --------
    >>> ids = np.array([[[0], [0]], [[0], [0]], [[1], [1]], [[1], [1]]])
    >>> selected = selection_matrix(ids, 2)
    >>> null = shuffled_selection(selected, 2, random_state=0)
    >>> expert_frequency(null).tolist() == expert_frequency(selected).tolist()
    True
    """
    rng = np.random.default_rng(random_state)
    matrix = _as_selection(selected)
    layer_of, _ = layout.column_layout(n_experts, matrix.shape[1])
    n_tokens = matrix.shape[0]
    blocks = []
    for layer in range(int(layer_of[-1]) + 1):
        columns = np.flatnonzero(layer_of == layer)
        block = matrix[:, columns[0] : columns[-1] + 1]
        blocks.append(block[rng.permutation(n_tokens)])
    shuffled = sparse.csr_array(sparse.hstack(blocks, format="csr") != 0)
    shuffled.sort_indices()
    return shuffled


# --------------------------------------------------------------------------------------------
# Ranked pairs
# --------------------------------------------------------------------------------------------


def _ranked_pairs(
    counts: np.ndarray, layer_of: np.ndarray | None, cross_layer_only: bool, min_count: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs a < b with count >= min_count, by count descending then (a, b) ascending."""
    rows, cols = np.triu_indices(counts.shape[0], k=1)
    pair_counts = counts[rows, cols]
    keep = pair_counts >= max(int(min_count), 1)
    if cross_layer_only:
        keep &= layer_of[rows] != layer_of[cols]
    rows, cols, pair_counts = rows[keep], cols[keep], pair_counts[keep]
    order = np.lexsort((cols, rows, -pair_counts))
    return rows[order].astype(np.int64), cols[order].astype(np.int64), pair_counts[order]


def _check_min_count(min_count: int) -> None:
    if not isinstance(min_count, int | np.integer) or min_count < 1:
        raise ValueError(f"min_count must be an int >= 1; got {min_count!r}")


def pair_ranking(
    selected: Any,
    *,
    n_experts: int | Sequence[int] | None = None,
    cross_layer_only: bool,
    min_count: int = 1,
) -> tuple[list[tuple[int, int]], np.ndarray]:
    """Every pair of experts that fires on the same token, most frequent first (paper Eq. 8).

    The ranking that coverage@k% is read against. It holds only pairs that co-occur at least
    ``min_count`` times, so "top 10%" means the top 10% of co-occurring pairs.

    Parameters
    ----------
    selected : sparse array of bool, shape (n_tokens, n_columns)
        Token-level selections, one column per (layer, expert).
    n_experts : int or sequence of int, optional
        Routed experts per layer; needed only with ``cross_layer_only``.
    cross_layer_only : bool
        Keep only pairs of experts in different layers; False: all pairs, as in the paper's
        enumeration. Required, as in `top_pairs`, so that no call relies on a default.
    min_count : int
        Keep pairs that fire together on at least this many tokens.

    Returns
    -------
    pairs : list of tuple (a, b) of column ids with a < b
        Sorted by count descending, ties by ``(a, b)`` ascending.
    counts : ndarray of int64, shape (n_pairs,)
        Tokens on which each pair fired together.

    Examples
    --------
    >>> selected = sparse.csr_array([[1, 1, 0], [1, 1, 1], [0, 1, 1]], dtype=bool)
    >>> pair_ranking(selected, cross_layer_only=False)
    ([(0, 1), (1, 2), (0, 2)], array([2, 2, 1]))
    """
    _check_min_count(min_count)
    matrix = _as_selection(selected)
    layer_of = None
    if cross_layer_only:
        if n_experts is None:
            raise ValueError("n_experts is required with cross_layer_only=True; got None")
        layer_of, _ = layout.column_layout(n_experts, matrix.shape[1])
    rows, cols, pair_counts = _ranked_pairs(_counts(matrix), layer_of, cross_layer_only,
                                            min_count)
    return list(zip(rows.tolist(), cols.tolist(), strict=True)), pair_counts


def top_pairs(
    selected: Any,
    n: int | None = 20,
    *,
    n_experts: int | Sequence[int],
    cross_layer_only: bool,
    min_count: int = 1,
) -> pd.DataFrame:
    """The most frequently co-activated expert pairs, with their probabilities and lift.

    Parameters
    ----------
    selected : sparse array of bool, shape (n_tokens, n_columns)
        Token-level selections, one column per (layer, expert).
    n : int or None
        Number of pairs to return; None for all.
    n_experts : int or sequence of int
        Routed experts per layer (to name each column's layer and expert).
    cross_layer_only : bool
        Keep only pairs of experts in different layers (what stage 02 reports: within a
        layer, top-k routing alone shapes co-activation). Required.
    min_count : int
        Keep pairs that fire together on at least this many tokens.

    Returns
    -------
    DataFrame
        One row per pair, ranked by ``count`` (ties by column ids): ``expert_a``, ``expert_b``
        (column ids, ``a < b``), ``layer_a``, ``expert_in_layer_a``, ``layer_b``,
        ``expert_in_layer_b``, ``count`` (tokens), ``p_joint`` (``P(a and b)``),
        ``p_b_given_a`` and ``lift``.

    Examples
    --------
    >>> ids = np.array([[[0], [1]], [[0], [1]], [[1], [0]], [[0], [1]]])  # 4 tokens, top-1
    >>> table = top_pairs(selection_matrix(ids, 2), 1, n_experts=2, cross_layer_only=True)
    >>> table[["layer_a", "expert_in_layer_a", "layer_b", "expert_in_layer_b", "count",
    ...        "lift"]].to_dict("records")
    [{'layer_a': 0, 'expert_in_layer_a': 0, 'layer_b': 1, 'expert_in_layer_b': 1, 'count': 3, \
'lift': 1.3333333333333333}]
    """
    _check_min_count(min_count)
    if n is not None and (not isinstance(n, int | np.integer) or n < 1):
        raise ValueError(f"n must be a positive int or None; got {n!r}")
    matrix = _as_selection(selected)
    layer_of, expert_of = layout.column_layout(n_experts, matrix.shape[1])
    counts = _counts(matrix)
    rows, cols, pair_counts = _ranked_pairs(counts, layer_of, cross_layer_only, min_count)
    rows, cols, pair_counts = rows[:n], cols[:n], pair_counts[:n]
    own = np.diag(counts)
    n_tokens = matrix.shape[0]
    return pd.DataFrame(
        {
            "expert_a": rows,
            "expert_b": cols,
            "layer_a": layer_of[rows],
            "expert_in_layer_a": expert_of[rows],
            "layer_b": layer_of[cols],
            "expert_in_layer_b": expert_of[cols],
            "count": pair_counts,
            "p_joint": pair_counts / n_tokens,
            "p_b_given_a": pair_counts / own[rows],
            "lift": pair_counts * float(n_tokens) / (own[rows] * own[cols]).astype(float),
        }
    )


# --------------------------------------------------------------------------------------------
# Ranked triplets
# --------------------------------------------------------------------------------------------


def _triplet_plan(
    width: int, position_layers: np.ndarray | None
) -> list[tuple[int, np.ndarray, int]]:
    """Position triples ``i < j < k`` of a row, grouped by the middle position ``j``.

    Returns ``(j, first_positions, k_start)`` per ``j``: the triples are every ``i`` in
    ``first_positions`` with every ``k`` in ``range(k_start, width)``. With ``position_layers``
    (the layer at each position, nondecreasing) only triples from three different layers are
    kept: ``i`` in an earlier layer than ``j`` and ``k`` in a later one.
    """
    plan = []
    for middle in range(1, width - 1):
        if position_layers is None:
            firsts, k_start = np.arange(middle), middle + 1
        else:
            firsts = np.flatnonzero(position_layers[:middle] != position_layers[middle])
            later = np.flatnonzero(position_layers[middle + 1 :] != position_layers[middle])
            k_start = middle + 1 + int(later[0]) if len(later) else width
        if len(firsts) and k_start < width:
            plan.append((middle, firsts, k_start))
    return plan


def _count_triplets(
    matrix: sparse.csr_array,
    layer_of: np.ndarray | None,
    *,
    cross_layer_only: bool,
    min_expert_count: int = 0,
    max_dense_codes: int = _MAX_DENSE_TRIPLET_CODES,
    chunk_codes: int = _TRIPLET_CHUNK_CODES,
) -> tuple[np.ndarray, np.ndarray]:
    """Every co-occurring triplet (a < b < c) and its count, unsorted.

    Each token's active columns are laid out in a padded ``(n_tokens, width)`` array (sorted,
    padding = ``n_columns``). Chunk by chunk of tokens, every position triple becomes one integer
    code ``(a * base + b) * base + c`` (built pair-first by broadcasting, which avoids three
    fancy-index gathers), and codes are tallied with ``bincount`` over all possible codes (small
    models) or with ``unique``.
    """
    n_tokens, n_columns = matrix.shape
    if min_expert_count > 0:
        keep = (np.asarray(matrix.sum(axis=0)).ravel() >= min_expert_count).astype(np.int64)
        matrix = sparse.csr_array(matrix @ sparse.diags_array(keep, dtype=np.int64))
        matrix.eliminate_zeros()
        matrix.sort_indices()
    empty = np.empty((0, 3), dtype=np.int64), np.empty(0, dtype=np.int64)
    lengths = np.diff(matrix.indptr)
    width = int(lengths.max()) if n_tokens else 0
    if width < 3:
        return empty
    sentinel, base = n_columns, n_columns + 1
    # int32 codes halve the memory traffic, which is what this loop is bound by.
    code_dtype = np.int32 if base**3 < 2**31 else np.int64
    uniform = bool((lengths == width).all())
    if uniform:
        active = matrix.indices.astype(code_dtype).reshape(n_tokens, width)
    else:
        active = np.full((n_tokens, width), sentinel, dtype=code_dtype)
        active[np.arange(width)[None, :] < lengths[:, None]] = matrix.indices
    # Padding gets layer -1, so a padded slot never passes as a layer of its own.
    layer_ext = np.concatenate([layer_of, [-1]]) if layer_of is not None else None
    position_layers = None
    filter_codes = not uniform
    if cross_layer_only:
        pattern = layer_ext[active]
        if uniform and (pattern == pattern[0]).all():
            # Every token has the same layer at each position (a trace's matrix: top_k sorted
            # columns per layer), so the cross-layer position triples are chosen once for all.
            position_layers = pattern[0]
        else:
            filter_codes = True
    plan = _triplet_plan(width, position_layers)
    per_token = sum(len(firsts) * (width - k_start) for _, firsts, k_start in plan)
    if per_token == 0:
        return empty
    dense = base**3 <= max_dense_codes
    tally = np.zeros(base**3 if dense else 0, dtype=np.int64)
    partial_codes: list[np.ndarray] = []
    partial_counts: list[np.ndarray] = []
    chunk = max(1, chunk_codes // per_token)
    for start in range(0, n_tokens, chunk):
        rows = active[start : start + chunk]
        pieces = []
        for middle, firsts, k_start in plan:
            pair_codes = rows[:, firsts] * base + rows[:, middle : middle + 1]
            pieces.append((pair_codes[:, :, None] * base + rows[:, None, k_start:]).ravel())
        codes = np.concatenate(pieces)
        if filter_codes:
            first, second, third = codes // (base * base), (codes // base) % base, codes % base
            valid = third != sentinel  # sorted rows: padding reaches the last slot first
            if cross_layer_only:
                valid &= (layer_ext[first] != layer_ext[second]) & (
                    layer_ext[second] != layer_ext[third]
                )
            codes = codes[valid]
        if dense:
            tally += np.bincount(codes, minlength=base**3)
        else:
            unique_codes, unique_counts = np.unique(codes, return_counts=True)
            partial_codes.append(unique_codes.astype(np.int64))
            partial_counts.append(unique_counts)
    if dense:
        codes = np.flatnonzero(tally)
        counts = tally[codes]
    else:
        codes, inverse = np.unique(np.concatenate(partial_codes), return_inverse=True)
        counts = np.bincount(inverse, weights=np.concatenate(partial_counts))
    codes = codes.astype(np.int64)
    triplets = np.stack([codes // (base * base), (codes // base) % base, codes % base], axis=1)
    return triplets, counts.astype(np.int64)


def _ranked_triplets(
    selected: Any,
    n_experts: int | Sequence[int] | None,
    cross_layer_only: bool,
    min_count: int,
    min_expert_frequency: float,
) -> tuple[sparse.csr_array, np.ndarray | None, np.ndarray, np.ndarray]:
    _check_min_count(min_count)
    if not 0 <= min_expert_frequency <= 1:
        raise ValueError(f"min_expert_frequency must be in [0, 1]; got {min_expert_frequency!r}")
    matrix = _as_selection(selected)
    layer_of = None
    if cross_layer_only:
        if n_experts is None:
            raise ValueError("n_experts is required with cross_layer_only=True; got None")
        layer_of, _ = layout.column_layout(n_experts, matrix.shape[1])
    min_expert_count = math.ceil(min_expert_frequency * matrix.shape[0])
    triplets, counts = _count_triplets(
        matrix, layer_of, cross_layer_only=cross_layer_only, min_expert_count=min_expert_count
    )
    keep = counts >= min_count
    triplets, counts = triplets[keep], counts[keep]
    order = np.lexsort((triplets[:, 2], triplets[:, 1], triplets[:, 0], -counts))
    return matrix, layer_of, triplets[order], counts[order]


def triplet_ranking(
    selected: Any,
    *,
    n_experts: int | Sequence[int] | None = None,
    cross_layer_only: bool,
    min_count: int = 1,
    min_expert_frequency: float = 0.0,
) -> tuple[list[tuple[int, int, int]], np.ndarray]:
    """Every triplet of experts that fires on the same token, most frequent first (paper Eq. 8).

    Enumerates the ``C(n_active, 3)`` triplets of each token's active set (``n_active =
    n_layers * top_k``), vectorised in chunks of tokens. The cost grows as
    ``n_tokens * C(n_active, 3)``: measured on one CPU core for 100k tokens of 6 layers × 32
    experts, top-4 (24 active, 2,024 triplets per token), about 3 s for all triplets and 1.5 s
    for cross-layer ones (1,280 per token), in memory bounded by the chunk size. With more than
    about 256 columns the tally switches from ``bincount`` to ``unique`` (about 6× slower).
    For large models (DeepSeek-MoE: 162 active, 695k triplets per token, 8.6e8 distinct
    triplets) the list itself does not fit in memory: use
    :func:`moecollab.triplet_counts.triplet_census`, which gives the same ranking's length,
    counts, top entries and any triplet's position exactly without listing it.

    Parameters
    ----------
    selected : sparse array of bool, shape (n_tokens, n_columns)
        Token-level selections, one column per (layer, expert).
    n_experts : int or sequence of int, optional
        Routed experts per layer; needed only with ``cross_layer_only``.
    cross_layer_only : bool
        Keep only triplets whose three experts lie in three different layers; False: all
        triplets, as in the paper's enumeration. Required.
    min_count : int
        Keep triplets that fire together on at least this many tokens.
    min_expert_frequency : float in [0, 1]
        Ignore experts that fire on fewer than this share of tokens (a triplet can never be
        more frequent than its rarest expert, so a floor below the frequency of the triplets
        of interest changes nothing above it).

    Returns
    -------
    triplets : list of tuple (a, b, c) of column ids with a < b < c
        Sorted by count descending, ties by ``(a, b, c)`` ascending.
    counts : ndarray of int64, shape (n_triplets,)

    Examples
    --------
    >>> selected = sparse.csr_array([[1, 1, 1, 0], [1, 1, 1, 1], [0, 1, 1, 1]], dtype=bool)
    >>> triplet_ranking(selected, cross_layer_only=False)
    ([(0, 1, 2), (1, 2, 3), (0, 1, 3), (0, 2, 3)], array([2, 2, 1, 1]))
    """
    _, _, triplets, counts = _ranked_triplets(
        selected, n_experts, cross_layer_only, min_count, min_expert_frequency
    )
    return [tuple(row) for row in triplets.tolist()], counts


def top_triplets(
    selected: Any,
    n: int | None = 20,
    *,
    n_experts: int | Sequence[int],
    cross_layer_only: bool,
    min_count: int = 1,
    min_expert_frequency: float = 0.0,
    n_jobs: int | None = None,
) -> pd.DataFrame:
    """The most frequently co-activated expert triplets, with their probability and lift.

    Parameters
    ----------
    selected : sparse array of bool, shape (n_tokens, n_columns)
        Token-level selections, one column per (layer, expert).
    n : int or None
        Number of triplets to return; None for all.
    n_experts : int or sequence of int
        Routed experts per layer.
    cross_layer_only : bool
        Keep only triplets from three different layers. Required.
    min_count, min_expert_frequency
        As in :func:`triplet_ranking`.
    n_jobs : int or None
        Threads for counting (None: one; -1: every core). With ``n`` given the triplets are
        counted by :func:`moecollab.triplet_counts.triplet_census`, which keeps only the best
        ``n`` (minutes at the paper's scale); ``n=None`` lists and sorts every triplet.

    Returns
    -------
    DataFrame
        One row per triplet, ranked by ``count``: ``expert_a``, ``expert_b``, ``expert_c``
        (column ids, ascending), ``layer_*`` and ``expert_in_layer_*`` for each, ``count``,
        ``p_joint`` and ``lift`` ``P(a and b and c) / (P(a) P(b) P(c))``.

    Examples
    --------
    >>> ids = np.array([[[0], [1], [0]], [[0], [1], [0]], [[1], [0], [1]]])  # 3 layers, top-1
    >>> table = top_triplets(selection_matrix(ids, 2), 1, n_experts=2, cross_layer_only=True)
    >>> table[["expert_a", "expert_b", "expert_c", "count", "lift"]].to_dict("records")
    [{'expert_a': 0, 'expert_b': 3, 'expert_c': 4, 'count': 2, 'lift': 2.25}]
    """
    if n is not None and (not isinstance(n, int | np.integer) or n < 1):
        raise ValueError(f"n must be a positive int or None; got {n!r}")
    if n is None:
        matrix, _, triplets, counts = _ranked_triplets(
            selected, n_experts, cross_layer_only, min_count, min_expert_frequency
        )
    else:
        # The first n of the ranking without listing it (exact; see moecollab.triplet_counts).
        matrix = _as_selection(selected)
        census = triplet_census(matrix, n_experts=n_experts, cross_layer_only=cross_layer_only,
                                min_count=min_count, min_expert_frequency=min_expert_frequency,
                                n_top=int(n), n_jobs=n_jobs)
        triplets, counts = census.top_triplets, census.top_counts
    layer_of, expert_of = layout.column_layout(n_experts, matrix.shape[1])
    triplets, counts = triplets[:n], counts[:n]
    own = np.asarray(matrix.sum(axis=0)).ravel().astype(float)
    n_tokens = matrix.shape[0]
    table: dict[str, np.ndarray] = {}
    for i, name in enumerate("abc"):
        table[f"expert_{name}"] = triplets[:, i]
    for i, name in enumerate("abc"):
        table[f"layer_{name}"] = layer_of[triplets[:, i]]
        table[f"expert_in_layer_{name}"] = expert_of[triplets[:, i]]
    table["count"] = counts
    table["p_joint"] = counts / n_tokens
    table["lift"] = counts * float(n_tokens) ** 2 / own[triplets].prod(axis=1)
    return pd.DataFrame(table)


# --------------------------------------------------------------------------------------------
# Lift against the null
# --------------------------------------------------------------------------------------------


def cross_layer_lift_values(selected: Any, n_experts: int | Sequence[int]) -> np.ndarray:
    """Lift of every cross-layer pair whose experts both fire, flattened.

    Parameters
    ----------
    selected : sparse array of bool, shape (n_tokens, n_columns)
        Token-level selections, one column per (layer, expert).
    n_experts : int or sequence of int
        Routed experts per layer.

    Returns
    -------
    ndarray of float, shape (n_pairs,)
        One value per pair ``a < b`` in different layers (0 where they never meet); pairs with
        an expert that never fires are left out.

    Examples
    --------
    >>> ids = np.array([[[0], [1]], [[0], [1]], [[1], [0]], [[1], [1]]])
    >>> cross_layer_lift_values(selection_matrix(ids, 2), 2).round(3).tolist()
    [0.0, 1.333, 2.0, 0.667]
    """
    matrix = _as_selection(selected)
    layer_of, _ = layout.column_layout(n_experts, matrix.shape[1])
    lift = _lift_from_counts(_counts(matrix), matrix.shape[0])
    rows, cols = np.triu_indices(matrix.shape[1], k=1)
    values = lift[rows, cols][layer_of[rows] != layer_of[cols]]
    return values[~np.isnan(values)]


def lift_summary(
    selected: Any,
    null_selected: Any,
    n_experts: int | Sequence[int],
    *,
    labels: tuple[str, str] = ("observed", "shuffled null"),
    threshold: float = 2.0,
) -> pd.DataFrame:
    """Cross-layer lift of the real routing beside a null model, as a few numbers.

    Parameters
    ----------
    selected : sparse array of bool, shape (n_tokens, n_columns)
        Observed token-level selections.
    null_selected : sparse array of bool, shape (n_null_tokens, n_columns)
        The control: :func:`shuffled_selection` of the same routing, or the untrained model's.
    n_experts : int or sequence of int
        Routed experts per layer.
    labels : tuple of two str
        Column names for the two.
    threshold : float
        Lift above which a pair counts as strongly co-activated.

    Returns
    -------
    DataFrame
        Index: ``n_pairs`` (cross-layer pairs whose experts both fire),
        ``share_lift_above_<threshold>``, ``share_never_together``, ``max_lift``,
        ``mean_abs_log2_lift`` (over pairs that meet at least once); one column per label.
        Under independence the last three would be 0, 1 and 0.

    Examples
    --------
    >>> linked = np.array([[[0], [0]], [[0], [0]], [[1], [1]], [[1], [1]]])
    >>> mixed = np.array([[[0], [0]], [[0], [1]], [[1], [0]], [[1], [1]]])
    >>> summary = lift_summary(selection_matrix(linked, 2), selection_matrix(mixed, 2), 2,
    ...                        labels=("linked", "mixed"))
    >>> summary.loc["max_lift"].tolist()
    [2.0, 1.0]
    """
    if threshold <= 0:
        raise ValueError(f"threshold must be > 0; got {threshold!r}")
    columns = {}
    for label, matrix in zip(labels, (selected, null_selected), strict=True):
        values = cross_layer_lift_values(matrix, n_experts)
        met = values[values > 0]
        columns[label] = {
            "n_pairs": float(len(values)),
            f"share_lift_above_{threshold:g}": float((values > threshold).mean())
            if len(values) else np.nan,
            "share_never_together": float((values == 0).mean()) if len(values) else np.nan,
            "max_lift": float(values.max()) if len(values) else np.nan,
            "mean_abs_log2_lift": float(np.abs(np.log2(met)).mean()) if len(met) else np.nan,
        }
    table = pd.DataFrame(columns)
    table.index.name = "statistic"
    return table


# --------------------------------------------------------------------------------------------
# Domains and load
# --------------------------------------------------------------------------------------------


def _layer_counts(matrix: sparse.csr_array, n_experts: int) -> np.ndarray:
    """Selections per expert in each layer, int64 of shape ``(n_layers, n_experts)``."""
    n_layers = len(layout.per_layer_counts(n_experts, n_columns=matrix.shape[1]))
    return np.asarray(matrix.sum(axis=0), dtype=np.int64).reshape(n_layers, n_experts)


def domain_similarity(
    selected: Any, token_domains: Sequence[str], n_experts: int, domains: Sequence[str]
) -> np.ndarray:
    """Cosine similarity between the domains' expert-usage vectors (paper Fig. 7).

    The usage vectors of :func:`moecollab.routing_health.domain_usage` (each domain's
    selections, as shares of every layer's), counted from the selection matrix, and their
    :func:`~moecollab.routing_health.cosine_matrix`; read it beside the untrained control.

    Parameters
    ----------
    selected : sparse array of bool, shape (n_tokens, n_columns)
        Token-level selections, one column per (layer, expert).
    token_domains : sequence of str, length n_tokens
    n_experts : int
        Routed experts per layer.
    domains : sequence of str
        Domains to compare, in this order.

    Returns
    -------
    ndarray of float, shape (n_domains, n_domains)

    Examples
    --------
    >>> ids = np.array([[[0]], [[0]], [[1]], [[0]]])
    >>> domain_similarity(selection_matrix(ids, 2), ["a", "a", "b", "b"], 2, ["a", "b"]
    ...                   ).round(3).tolist()
    [[1.0, 0.707], [0.707, 1.0]]
    """
    matrix = _as_selection(selected)
    token_domains = np.asarray(token_domains)
    usage = np.vstack([
        routing_health.layer_shares(_layer_counts(matrix[token_domains == domain], n_experts))
        .ravel() for domain in domains])
    return routing_health.cosine_matrix(usage)


def cluster_order(similarity: np.ndarray, method: str = "average") -> np.ndarray:
    """An order of the rows that puts similar ones next to each other, for a clustered heatmap.

    Hierarchical clustering (scipy ``linkage`` with optimal leaf ordering) on the distance
    ``1 - similarity``.

    Parameters
    ----------
    similarity : ndarray of float, shape (n, n)
        Symmetric similarity, 1 on the diagonal (a cosine matrix).
    method : str
        Linkage method of :func:`scipy.cluster.hierarchy.linkage`.

    Returns
    -------
    ndarray of int, shape (n,)
        A permutation of ``range(n)``.

    Examples
    --------
    >>> similarity = np.array([[1.0, 0.1, 0.9], [0.1, 1.0, 0.2], [0.9, 0.2, 1.0]])
    >>> cluster_order(similarity).tolist()
    [1, 2, 0]
    """
    similarity = np.asarray(similarity, dtype=float)
    if similarity.ndim != 2 or similarity.shape[0] != similarity.shape[1]:
        raise ValueError(f"similarity must be a square matrix; got shape {similarity.shape}")
    size = similarity.shape[0]
    if size <= 2:
        return np.arange(size)
    distance = np.clip(1.0 - (similarity + similarity.T) / 2, 0.0, None)
    np.fill_diagonal(distance, 0.0)
    linkage = hierarchy.linkage(squareform(distance, checks=False), method=method,
                                optimal_ordering=True)
    return hierarchy.leaves_list(linkage).astype(np.int64)


def load_balance(selected: Any, n_experts: int) -> pd.DataFrame:
    """How evenly each layer spreads its tokens over its experts.

    Parameters
    ----------
    selected : sparse array of bool, shape (n_tokens, n_columns)
        Token-level selections, one column per (layer, expert).
    n_experts : int
        Routed experts per layer.

    Returns
    -------
    DataFrame
        One row per layer: ``layer``, ``entropy_bits`` of the experts' shares of the layer's
        selections, ``normalised_entropy`` (divided by ``log2(n_experts)``: 1 = perfectly
        even), ``max_share`` and ``min_share`` relative to the uniform share (as
        :func:`moecollab.routing_health.expert_share`: 1 = even), ``coefficient_of_variation``
        of the counts (std / mean) and ``n_unused_experts``.

    Examples
    --------
    >>> ids = np.array([[[0, 1]], [[0, 1]], [[0, 2]], [[0, 3]]])  # 1 layer, top-2
    >>> load_balance(selection_matrix(ids, 4), 4)[
    ...     ["entropy_bits", "normalised_entropy", "max_share"]].to_dict("records")
    [{'entropy_bits': 1.75, 'normalised_entropy': 0.875, 'max_share': 2.0}]
    """
    if n_experts < 2:
        raise ValueError(f"n_experts must be >= 2 for a balance statistic; got {n_experts!r}")
    counts = _layer_counts(_as_selection(selected), n_experts).astype(float)
    fraction = routing_health.layer_shares(counts)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(fraction > 0, fraction * np.log2(fraction), 0.0).sum(axis=1)
    share = fraction * n_experts
    mean = counts.mean(axis=1)
    return pd.DataFrame(
        {
            "layer": np.arange(counts.shape[0]),
            "entropy_bits": entropy,
            "normalised_entropy": entropy / np.log2(n_experts),
            "max_share": share.max(axis=1),
            "min_share": share.min(axis=1),
            "coefficient_of_variation": counts.std(axis=1) / np.where(mean == 0, 1, mean),
            "n_unused_experts": (counts == 0).sum(axis=1),
        }
    )


def stem_versus_law(similarity: np.ndarray, domains: Sequence[str],
                    stem: Sequence[str] = ("mathematics", "physics", "computer_science"),
                    far: str = "law") -> dict[str, float | bool]:
    """The paper's Fig. 7 reading: STEM fields use experts alike, law differs from them.

    Returns the mean cosine within the STEM fields present, the mean cosine between ``far`` and
    them, and whether the first is larger (NaN and False when fields are missing).

    Examples
    --------
    >>> similarity = np.array([[1, .9, .5], [.9, 1, .6], [.5, .6, 1]])
    >>> result = stem_versus_law(similarity, ["mathematics", "physics", "law"])
    >>> result["stem_within"], result["law_to_stem"], result["pattern_holds"]
    (0.9, 0.55, True)
    """
    index = {domain: i for i, domain in enumerate(domains)}
    present = [index[name] for name in stem if name in index]
    if len(present) < 2 or far not in index:
        return {"stem_within": float("nan"), "law_to_stem": float("nan"),
                "pattern_holds": False}
    within = [similarity[a, b] for n, a in enumerate(present) for b in present[n + 1:]]
    across = [similarity[index[far], a] for a in present]
    stem_within, law_to_stem = float(np.mean(within)), float(np.mean(across))
    return {"stem_within": round(stem_within, 12), "law_to_stem": round(law_to_stem, 12),
            "pattern_holds": stem_within > law_to_stem}
