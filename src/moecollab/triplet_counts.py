"""Exact statistics of co-activated expert triplets, without listing every triplet.

Coverage (paper Eq. 8) asks where an atom's strongest three experts stand in the ranking of all
co-occurring expert triplets. At the paper's scale (DeepSeek-MoE-16B: 27 MoE layers x 64
experts, top-6, so 162 experts fire on every token and each token holds C(162, 3) = 695,520
triplets; 604k tokens) that ranking has about 8.6e8 entries and 4.2e11 (token, triplet)
incidences: listing and sorting it does not fit in memory, and counting it with NumPy took
days (``benchmarks/bench_scaling.py``). Coverage does not need the list, only

- how many distinct triplets co-occur (the length of the ranking),
- how many triplets have each count (a histogram), which gives the count at any rank, and
- for an atom's triplet: its count and, among triplets of equal count, how many come before it in
  the ranking's tie order (``(a, b, c)`` ascending, as in
  :func:`moecollab.coactivation.triplet_ranking`).

:func:`triplet_census` computes all of it exactly in one pass. It visits the first expert ``a``
of every triplet in turn ("block" ``a``). The tokens on which ``a`` fires are numbered
``0 … n_a - 1`` and every later expert ``b > a`` gets a bit set over them (64 tokens per
machine word), so the count of ``(a, b, c)`` is ``popcount(bits_b AND bits_c)`` summed over the
words: the 4.2e11 increments of a plain tally become about 7.6e11 word operations that the
compiler vectorises, about four times faster per incidence than the best tally measured
(``benchmarks/bench_scaling.py`` records both). Blocks are independent, so threads share them
out (``n_jobs``). Each block's counts are reduced at once to a histogram of the block, and
optionally to the block's ``n_top`` best triplets, so memory stays at one
``n_columns x n_columns`` table per thread.

The kernels are compiled with numba (cached on disk after the first call).
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numba
import numpy as np
from numba import types
from numba.extending import intrinsic
from scipy import sparse
from tqdm import tqdm

logger = logging.getLogger(__name__)

__all__ = ["TripletCensus", "triplet_census"]

# Tokens of a block handled at once: 128 words of 64 tokens. Measured at the paper's shape on
# 2 cores: 64 words took 15% longer, 256 words 16% longer (the bit table stops fitting in cache).
_CHUNK_WORDS = 128


# --------------------------------------------------------------------------------------------
# Compiled kernels
# --------------------------------------------------------------------------------------------


@intrinsic
def _popcount(typingctx, value):
    """LLVM's ``ctpop`` on a uint64 (one instruction, vectorised inside loops)."""
    signature = types.uint64(types.uint64)

    def codegen(context, builder, sig, args):
        import llvmlite.ir as ir

        function_type = ir.FunctionType(ir.IntType(64), [ir.IntType(64)])
        function = builder.module.declare_intrinsic("llvm.ctpop", [ir.IntType(64)],
                                                    function_type)
        return builder.call(function, args)

    return signature, codegen


@numba.njit(nogil=True, cache=True)
def _fill_bits(first, start, n_chunk, row_ptr, row_columns, column_ptr, column_rows, bits,
               n_words, n_later):
    """Bit ``i`` of ``bits[b - first - 1]``: the ``start + i``-th token of ``first`` has ``b``."""
    for column in range(n_later):
        for word in range(n_words):
            bits[column, word] = 0
    for i in range(n_chunk):
        token = column_rows[column_ptr[first] + start + i]
        low = row_ptr[token]
        high = row_ptr[token + 1]
        while low < high:  # binary search for `first` in the token's sorted columns
            middle = (low + high) >> 1
            if row_columns[middle] < first:
                low = middle + 1
            else:
                high = middle
        word = i >> 6
        bit = np.uint64(1) << np.uint64(i & 63)
        for entry in range(low + 1, row_ptr[token + 1]):
            bits[row_columns[entry] - first - 1, word] |= bit


@numba.njit(nogil=True, cache=True)
def _block_counts(first, row_ptr, row_columns, column_ptr, column_rows, partner_start, bits,
                  counts):
    """Tokens shared by ``first`` and every later pair: ``counts[b', c']`` for the triplet
    ``(first, first + 1 + b', first + 1 + c')``; only cells with ``c' >= partner_start[b']``
    and ``b' >= partner_start[-1]`` (the first valid second expert) are filled."""
    n_later = counts.shape[0]
    n_first = column_ptr[first + 1] - column_ptr[first]
    b_start = partner_start[n_later]
    for b in range(b_start, n_later):
        for c in range(partner_start[b], n_later):
            counts[b, c] = 0
    chunk = 64 * bits.shape[1]
    for start in range(0, n_first, chunk):
        n_chunk = min(chunk, n_first - start)
        n_words = (n_chunk + 63) // 64
        _fill_bits(first, start, n_chunk, row_ptr, row_columns, column_ptr, column_rows, bits,
                   n_words, n_later)
        for b in range(b_start, n_later):
            for c in range(partner_start[b], n_later):
                shared = np.uint64(0)
                for word in range(n_words):
                    shared += _popcount(bits[b, word] & bits[c, word])
                counts[b, c] += shared


@numba.njit(nogil=True, cache=True)
def _block_histogram(counts, partner_start, min_count, scratch):
    """Distinct count values of a block's valid cells (>= min_count) and how many cells have
    each; ``scratch`` is a zeroed int64 buffer longer than the largest count, left zeroed."""
    n_later = counts.shape[0]
    largest = 0
    for b in range(partner_start[n_later], n_later):
        for c in range(partner_start[b], n_later):
            value = counts[b, c]
            if value >= min_count:
                scratch[value] += 1
                if value > largest:
                    largest = value
    n_values = 0
    for value in range(largest + 1):
        if scratch[value] > 0:
            n_values += 1
    values = np.empty(n_values, dtype=np.int64)
    frequencies = np.empty(n_values, dtype=np.int64)
    position = 0
    for value in range(largest + 1):
        if scratch[value] > 0:
            values[position] = value
            frequencies[position] = scratch[value]
            scratch[value] = 0
            position += 1
    return values, frequencies


@numba.njit(nogil=True, cache=True)
def _block_top(counts, partner_start, floor, n_at_floor):
    """The block's cells with count > floor, then the first ``n_at_floor`` cells (in (b, c)
    order) with count == floor: its share of the top of the ranking. Returns (b', c', count)."""
    n_later = counts.shape[0]
    n_above = 0
    for b in range(partner_start[n_later], n_later):
        for c in range(partner_start[b], n_later):
            if counts[b, c] > floor:
                n_above += 1
    size = n_above + n_at_floor
    second = np.empty(size, dtype=np.int64)
    third = np.empty(size, dtype=np.int64)
    found = np.empty(size, dtype=np.int64)
    position = 0
    left_at_floor = n_at_floor
    for b in range(partner_start[n_later], n_later):
        for c in range(partner_start[b], n_later):
            value = counts[b, c]
            if value > floor or (value == floor and left_at_floor > 0):
                if value == floor:
                    left_at_floor -= 1
                second[position] = b
                third[position] = c
                found[position] = value
                position += 1
    return second[:position], third[:position], found[:position]


# --------------------------------------------------------------------------------------------
# The census
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class TripletCensus:
    """How often every co-occurring expert triplet fires, summarised without listing them.

    Built by :func:`triplet_census`. The ranking it describes is that of
    :func:`moecollab.coactivation.triplet_ranking` with the same options: triplets ``a < b < c``
    of column ids that fire together on at least ``min_count`` tokens, by count descending, ties
    by ``(a, b, c)`` ascending.

    Attributes
    ----------
    histogram : ndarray of int64, shape (max_count + 1,)
        ``histogram[v]``: triplets in the ranking that fire together on exactly ``v`` tokens.
    n_tokens, n_columns : int
        Rows and columns of the selection matrix.
    cross_layer_only : bool
    min_count : int
    top_triplets : ndarray of int64, shape (n_top, 3)
        The first ``n_top`` triplets of the ranking (empty unless asked for).
    top_counts : ndarray of int64, shape (n_top,)
    """

    histogram: np.ndarray
    n_tokens: int
    n_columns: int
    cross_layer_only: bool
    min_count: int
    top_triplets: np.ndarray
    top_counts: np.ndarray
    _block_values: list[np.ndarray] = field(repr=False)
    _block_frequencies: list[np.ndarray] = field(repr=False)
    _layout: _Layout = field(repr=False)

    @property
    def n_ranked(self) -> int:
        """Length of the ranking: distinct triplets firing together on >= min_count tokens."""
        return int(self.histogram.sum())

    def count_at(self, position: int) -> int:
        """Count of the triplet at 0-based ``position`` of the ranking."""
        if not 0 <= position < self.n_ranked:
            raise ValueError(f"position must be in [0, {self.n_ranked}); got {position!r}")
        from_top = np.cumsum(self.histogram[::-1])
        return int(len(self.histogram) - 1 - np.searchsorted(from_top, position + 1))

    def counts_of(self, triplets: Sequence[Sequence[int]]) -> np.ndarray:
        """Tokens on which each given set of three columns fires together (any order)."""
        return np.array([self._layout.count_of(t) for t in triplets], dtype=np.int64)

    def positions(self, triplets: Sequence[Sequence[int]]) -> np.ndarray:
        """0-based position of each triplet in the ranking; ``inf`` where it is not ranked.

        Equal to the triplet's index in the list :func:`~moecollab.coactivation.triplet_ranking`
        returns (a test checks this against brute force). Placing a triplet among the others of
        equal count recounts its first expert's block, about ``1 / n_columns`` of the census;
        :meth:`coverage_curve` only does so where a cut falls among those ties.
        """
        keys, counts, ranked = self._lookup(triplets)
        result = np.full(len(keys), np.inf)
        for index in np.flatnonzero(ranked):
            result[index] = self._above(counts[index]) + self._tie_offset(keys[index],
                                                                          counts[index])
        return result

    def coverage_curve(self, triplets: Sequence[Sequence[int]],
                       fractions: Sequence[float]) -> np.ndarray:
        """Share of ``triplets`` in the top ``ceil(f * n_ranked)`` of the ranking, per fraction.

        The same numbers as :func:`moecollab.hsdl_coverage.coverage_curve` on the listed
        ranking: a triplet whose count is above (below) the count at the cut is in (out); only
        a triplet tied with the cut is placed exactly among its ties.
        """
        for fraction in fractions:
            if not 0 < fraction <= 1:
                raise ValueError(f"fractions must lie in (0, 1]; got {fraction!r}")
        if len(triplets) == 0:
            return np.full(len(fractions), np.nan)
        keys, counts, ranked = self._lookup(triplets)
        limits = np.array([math.ceil(f * self.n_ranked) for f in fractions])
        first_position = np.array([self._above(c) if r else np.inf
                                   for c, r in zip(counts, ranked, strict=True)])
        last_position = np.array([self._above(c) + self.histogram[c] - 1 if r else np.inf
                                  for c, r in zip(counts, ranked, strict=True)])
        inside = np.zeros((len(fractions), len(keys)), dtype=bool)
        for row, limit in enumerate(limits):
            inside[row] = last_position < limit
            for index in np.flatnonzero((first_position < limit) & (last_position >= limit)):
                position = first_position[index] + self._tie_offset(keys[index], counts[index])
                inside[row, index] = position < limit
        return inside.mean(axis=1)

    # ---- helpers ---------------------------------------------------------------------------

    def _lookup(self, triplets):
        keys = [tuple(sorted(int(e) for e in t)) for t in triplets]
        counts = self.counts_of(keys)
        ranked = np.array([len(set(key)) == 3 and count >= self.min_count
                           and self._layout.ranks(key)
                           for key, count in zip(keys, counts, strict=True)], dtype=bool)
        return keys, counts, ranked

    def _above(self, count: int) -> int:
        """Triplets in the ranking with a count above ``count``."""
        return int(self.histogram[count + 1:].sum())

    def _tie_offset(self, key: tuple[int, int, int], count: int) -> int:
        """Triplets with exactly ``count`` that the ranking puts before ``key``."""
        first, second, third = key
        earlier = 0
        for values, frequencies in zip(self._block_values[:first],
                                       self._block_frequencies[:first], strict=True):
            at = np.searchsorted(values, count)
            if at < len(values) and values[at] == count:
                earlier += int(frequencies[at])
        tied = (self._layout.block(first) == count) & self._layout.valid_cells(first)
        b, c = second - first - 1, third - first - 1
        return earlier + int(tied[:b].sum()) + int(tied[b, :c].sum())


class _Layout:
    """The selection in the two forms the kernels read, and the rules of which cells count."""

    def __init__(self, matrix: sparse.csr_array, layer_of: np.ndarray | None) -> None:
        self.n_tokens, self.n_columns = matrix.shape
        column_dtype = np.int16 if self.n_columns < 2**15 else np.int32
        self.row_ptr = matrix.indptr.astype(np.int64)
        self.row_columns = matrix.indices.astype(column_dtype)
        by_column = sparse.csc_array(matrix)
        by_column.sort_indices()
        self.column_ptr = by_column.indptr.astype(np.int64)
        self.column_rows = by_column.indices.astype(np.int32)
        columns = np.arange(self.n_columns, dtype=np.int64)
        if layer_of is None:
            self.layer_of = np.zeros(self.n_columns, dtype=np.int64)
            self.next_partner = columns + 1  # any later column
        else:
            self.layer_of = np.asarray(layer_of, dtype=np.int64)
            # first column of the next layer (columns of a layer are contiguous and ordered)
            last_of_layer = np.searchsorted(self.layer_of, self.layer_of, side="right")
            self.next_partner = last_of_layer.astype(np.int64)
        self.cross_layer_only = layer_of is not None

    def partner_start(self, first: int) -> np.ndarray:
        """Per later column b' (local), the first valid c'; last entry: the first valid b'."""
        n_later = self.n_columns - first - 1
        starts = np.empty(n_later + 1, dtype=np.int64)
        starts[:n_later] = self.next_partner[first + 1:] - first - 1
        starts[n_later] = self.next_partner[first] - first - 1
        return np.minimum(starts, n_later)

    def valid_cells(self, first: int) -> np.ndarray:
        starts = self.partner_start(first)
        n_later = len(starts) - 1
        local = np.arange(n_later)
        valid = local[None, :] >= starts[:n_later, None]
        valid[: starts[n_later]] = False
        return valid

    def block(self, first: int, buffers: _Buffers | None = None) -> np.ndarray:
        """The counts table of block ``first`` (a fresh array when no buffers are given)."""
        n_later = self.n_columns - first - 1
        working = buffers or _Buffers(self, n_later)
        counts = working.counts[:n_later, :n_later]
        _block_counts(first, self.row_ptr, self.row_columns, self.column_ptr, self.column_rows,
                      self.partner_start(first), working.bits, counts)
        return counts

    def ranks(self, key: tuple[int, int, int]) -> bool:
        """Whether this kind of triplet belongs in the ranking (three layers if cross-layer)."""
        if not self.cross_layer_only:
            return True
        layers = self.layer_of[list(key)]
        return len(set(layers.tolist())) == 3

    def count_of(self, triplet: Sequence[int]) -> int:
        columns = sorted(int(e) for e in triplet)
        if len(columns) != 3 or columns[0] < 0 or columns[-1] >= self.n_columns:
            raise ValueError(f"a triplet must be three column ids in [0, {self.n_columns}); "
                             f"got {tuple(triplet)!r}")
        tokens = [self.column_rows[self.column_ptr[c]:self.column_ptr[c + 1]] for c in columns]
        shared = np.intersect1d(tokens[0], tokens[1], assume_unique=True)
        return int(len(np.intersect1d(shared, tokens[2], assume_unique=True)))


class _Buffers:
    """One thread's working memory: the bit table, the counts table and a histogram buffer."""

    def __init__(self, layout: _Layout, n_later: int | None = None) -> None:
        n_later = max(layout.n_columns - 1 if n_later is None else n_later, 1)
        self.bits = np.zeros((n_later, _CHUNK_WORDS), dtype=np.uint64)
        self.counts = np.zeros((n_later, n_later), dtype=np.int32)
        self.scratch = np.zeros(layout.n_tokens + 2, dtype=np.int64)


def triplet_census(
    selected: Any,
    *,
    n_experts: int | Sequence[int] | None = None,
    cross_layer_only: bool = False,
    min_count: int = 1,
    min_expert_frequency: float = 0.0,
    n_top: int = 0,
    n_jobs: int | None = None,
    progress: bool = False,
) -> TripletCensus:
    """Count every co-occurring expert triplet exactly and summarise the ranking they form.

    Parameters
    ----------
    selected : sparse array of bool, shape (n_tokens, n_columns)
        Token-level selections, one column per (layer, expert)
        (:func:`moecollab.coactivation.selection_matrix`).
    n_experts : int or sequence of int, optional
        Routed experts per layer; needed only with ``cross_layer_only``.
    cross_layer_only : bool
        Rank only triplets from three different layers. Default False: all triplets, as in the
        paper's enumeration.
    min_count : int
        Rank triplets that fire together on at least this many tokens.
    min_expert_frequency : float in [0, 1]
        Ignore experts that fire on fewer than this share of tokens (as
        :func:`~moecollab.coactivation.triplet_ranking`).
    n_top : int
        Also keep the first ``n_top`` triplets of the ranking (``top_triplets``).
    n_jobs : int or None
        Threads; None or 1 for one, -1 for every core.
    progress : bool
        Show a text progress bar over the first experts.

    Returns
    -------
    TripletCensus

    Examples
    --------
    >>> selected = sparse.csr_array([[1, 1, 1, 0], [1, 1, 1, 1], [0, 1, 1, 1]], dtype=bool)
    >>> census = triplet_census(selected, n_top=2)
    >>> census.histogram.tolist(), census.top_triplets.tolist(), census.top_counts.tolist()
    ([0, 2, 2], [[0, 1, 2], [1, 2, 3]], [2, 2])
    >>> census.positions([(0, 2, 3), (3, 2, 1)]).tolist()  # as in triplet_ranking's list
    [3.0, 1.0]
    """
    from moecollab.coactivation import (  # here: coactivation imports this module
        _as_selection,
        _check_min_count,
    )
    from moecollab.layout import column_layout

    _check_min_count(min_count)
    if not 0 <= min_expert_frequency <= 1:
        raise ValueError(f"min_expert_frequency must be in [0, 1]; got {min_expert_frequency!r}")
    if not isinstance(n_top, int | np.integer) or n_top < 0:
        raise ValueError(f"n_top must be an int >= 0; got {n_top!r}")
    if n_jobs is not None and (not isinstance(n_jobs, int | np.integer)
                               or (n_jobs < 1 and n_jobs != -1)):
        raise ValueError(f"n_jobs must be None, -1 or a positive int; got {n_jobs!r}")
    matrix = _as_selection(selected)
    layer_of = None
    if cross_layer_only:
        if n_experts is None:
            raise ValueError("n_experts is required with cross_layer_only=True; got None")
        layer_of, _ = column_layout(n_experts, matrix.shape[1])
    if matrix.shape[0] >= 2**31:
        raise ValueError(f"selected must have fewer than 2**31 tokens; got {matrix.shape[0]}")
    min_expert_count = math.ceil(min_expert_frequency * matrix.shape[0])
    if min_expert_count > 0:
        keep = (np.asarray(matrix.sum(axis=0)).ravel() >= min_expert_count).astype(np.int64)
        matrix = sparse.csr_array(matrix @ sparse.diags_array(keep, dtype=np.int64))
        matrix.eliminate_zeros()
        matrix.sort_indices()
    layout = _Layout(matrix, layer_of)
    n_threads = (os.cpu_count() or 1) if n_jobs == -1 else (n_jobs or 1)
    local = threading.local()

    def run_block(first: int):
        buffers = getattr(local, "buffers", None)
        if buffers is None:
            buffers = local.buffers = _Buffers(layout)
        counts = layout.block(first, buffers)
        starts = layout.partner_start(first)
        values, frequencies = _block_histogram(counts, starts, min_count, buffers.scratch)
        top = None
        if n_top:
            # The block's own top n_top cells (count desc, then (b, c) asc).
            above = np.cumsum(frequencies[::-1])
            position = int(np.searchsorted(above, n_top))
            if position >= len(values):
                floor, n_at_floor = (int(values[0]), int(frequencies[0])) if len(values) else (
                    min_count, 0)
            else:
                floor = int(values[::-1][position])
                n_at_floor = n_top - (int(above[position - 1]) if position else 0)
            second, third, found = _block_top(counts, starts, floor, n_at_floor)
            top = (second + first + 1, third + first + 1, found)
        return values, frequencies, top

    blocks = range(layout.n_columns)
    bar = tqdm(total=layout.n_columns, desc="triplets", unit="expert", disable=not progress)
    results = []
    with ThreadPoolExecutor(max_workers=n_threads) as pool:
        for result in pool.map(run_block, blocks):
            results.append(result)
            bar.update(1)
    bar.close()
    block_values = [values for values, _, _ in results]
    block_frequencies = [frequencies for _, frequencies, _ in results]
    largest = max((int(values[-1]) for values in block_values if len(values)), default=0)
    histogram = np.zeros(largest + 1, dtype=np.int64)
    for values, frequencies in zip(block_values, block_frequencies, strict=True):
        np.add.at(histogram, values, frequencies)
    top_triplets = np.empty((0, 3), dtype=np.int64)
    top_counts = np.empty(0, dtype=np.int64)
    if n_top:
        firsts = np.concatenate([np.full(len(top[2]), first, dtype=np.int64)
                                 for first, (_, _, top) in enumerate(results)])
        seconds = np.concatenate([top[0] for _, _, top in results])
        thirds = np.concatenate([top[1] for _, _, top in results])
        found = np.concatenate([top[2] for _, _, top in results])
        order = np.lexsort((thirds, seconds, firsts, -found))[:n_top]
        top_triplets = np.stack([firsts[order], seconds[order], thirds[order]], axis=1)
        top_counts = found[order]
    return TripletCensus(histogram=histogram, n_tokens=layout.n_tokens,
                         n_columns=layout.n_columns, cross_layer_only=cross_layer_only,
                         min_count=min_count, top_triplets=top_triplets, top_counts=top_counts,
                         _block_values=block_values, _block_frequencies=block_frequencies,
                         _layout=layout)
