"""Coverage of HSDL atoms by frequent co-activations (paper Eq. 8).

Each atom is mapped to its strongest 2 (or 3) experts; expert pairs (triplets) that fire on the
same token are ranked by frequency; coverage@k% is the share of atoms whose pair (triplet) is
among the top ``k%`` of that ranking. The ranking holds only sets that co-occur at least once, so
"top 10%" means the top 10% of the co-occurring pairs (triplets), not of all ``C(n_experts, 2)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from moecollab.triplet_counts import TripletCensus

__all__ = [
    "atom_top_experts",
    "coverage_at",
    "coverage_curve",
    "random_expert_sets",
]


def atom_top_experts(dictionary: np.ndarray, n: int = 2) -> list[tuple[int, ...]]:
    """The ``n`` strongest experts of every atom.

    Parameters
    ----------
    dictionary : ndarray, shape (n_atoms, n_experts)
        One atom per row (``HSDL.dictionaries_[l]`` or a flat baseline's dictionary).
    n : int
        2 for pairs, 3 for triplets.

    Returns
    -------
    list of tuple of int, length n_atoms
        Expert ids of each atom's ``n`` largest weights, sorted ascending (ties broken by the
        lower expert id).

    Examples
    --------
    >>> atom_top_experts(np.array([[0.1, 0.9, 0.0, 0.8], [0.7, 0.0, 0.6, 0.1]]), n=2)
    [(1, 3), (0, 2)]
    """
    dictionary = np.asarray(dictionary)
    if dictionary.ndim != 2:
        raise ValueError(f"dictionary must be 2-D (n_atoms, n_experts); got ndim={dictionary.ndim}")
    if not isinstance(n, int) or not 1 <= n <= dictionary.shape[1]:
        raise ValueError(f"n must be an int in [1, n_experts={dictionary.shape[1]}]; got {n!r}")
    # Stable sort on the negated weights: ties go to the lower expert id.
    order = np.argsort(-dictionary, axis=1, kind="stable")[:, :n]
    return [tuple(sorted(int(e) for e in row)) for row in order]


def coverage_at(
    atoms_top_sets: Sequence[Sequence[int]],
    ranked_sets: Sequence[Sequence[int]],
    top_fraction: float,
) -> float:
    """Share of atoms whose top-expert set lies in the top ``top_fraction`` of a ranking.

    Parameters
    ----------
    atoms_top_sets : sequence of tuples of int, length n_atoms
        Each atom's strongest experts (from `atom_top_experts`).
    ranked_sets : sequence of tuples of int
        Expert pairs (or triplets), most frequent first (from
        :func:`moecollab.coactivation.pair_ranking` or ``triplet_ranking``).
    top_fraction : float in (0, 1]
        The top ``ceil(top_fraction * len(ranked_sets))`` entries count.

    Returns
    -------
    float
        Coverage in [0, 1] (paper Eq. 8); NaN when there are no atoms.

    Examples
    --------
    >>> ranked = [(0, 1), (2, 3), (1, 2), (0, 3)]
    >>> coverage_at([(0, 1), (1, 2), (3, 2)], ranked, 0.5)  # top 2: (0, 1), (2, 3)
    0.6666666666666666
    """
    if not 0 < top_fraction <= 1:
        raise ValueError(f"top_fraction must be in (0, 1]; got {top_fraction!r}")
    if len(atoms_top_sets) == 0:
        return float("nan")
    n_top = math.ceil(top_fraction * len(ranked_sets))
    top = {tuple(sorted(s)) for s in ranked_sets[:n_top]}
    hits = sum(tuple(sorted(s)) in top for s in atoms_top_sets)
    return hits / len(atoms_top_sets)


def coverage_curve(atoms_top_sets: Sequence[Sequence[int]],
                   ranked_sets: Sequence[Sequence[int]] | TripletCensus,
                   fractions: Sequence[float]) -> np.ndarray:
    """:func:`coverage_at` at each of ``fractions`` (ranks are looked up once).

    ``ranked_sets`` is the ranking as a list, or a
    :class:`~moecollab.triplet_counts.TripletCensus` of it (the same numbers without listing
    the triplets; what stage 03 uses at scale).

    Examples
    --------
    >>> coverage_curve([(0, 1), (2, 3)], [(0, 1), (1, 2), (2, 3)], [0.34, 1.0]).tolist()
    [0.5, 1.0]
    """
    if isinstance(ranked_sets, TripletCensus):
        return ranked_sets.coverage_curve(atoms_top_sets, fractions)
    rank = {tuple(sorted(s)): position for position, s in enumerate(ranked_sets)}
    positions = np.array([rank.get(tuple(sorted(s)), np.inf) for s in atoms_top_sets])
    if len(positions) == 0:
        return np.full(len(fractions), np.nan)
    for fraction in fractions:
        if not 0 < fraction <= 1:
            raise ValueError(f"fractions must lie in (0, 1]; got {fraction!r}")
    limits = np.array([math.ceil(f * len(ranked_sets)) for f in fractions])
    return (positions[None, :] < limits[:, None]).mean(axis=1)


def random_expert_sets(n_sets: int, size: int, expert_frequency: np.ndarray,
                       random_state: int | None = None) -> list[tuple[int, ...]]:
    """Random "atoms": ``size`` distinct experts drawn in proportion to how often they fire.

    The baseline for coverage: an atom's strongest experts tend to be busy experts, and busy
    experts co-fire often by chance, so uniform random sets would flatter HSDL.
    """
    rng = np.random.default_rng(random_state)
    weights = np.asarray(expert_frequency, dtype=float)
    probabilities = weights / weights.sum()
    return [tuple(sorted(int(e) for e in rng.choice(len(weights), size=size, replace=False,
                                                     p=probabilities)))
            for _ in range(n_sets)]
