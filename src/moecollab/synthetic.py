"""Planted data with a known answer, for tests and for the HSDL chapter's sanity checks.

`make_planted_hierarchy` builds an activation matrix ``X`` of shape ``(n_samples, n_experts)``
from a known two-level hierarchy of expert collaboration patterns:

- *fine* patterns (the level-2 truth): disjoint sets of experts with weights in ``[0.5, 1]``;
- *coarse* patterns (the level-1 truth): each the union (sum) of ``fine_per_coarse`` fine
  patterns plus ``private_experts`` experts of its own;
- samples: non-negative combinations of a few coarse patterns, with multiplicative jitter and a
  sparse background of small spurious activations.

The private experts make the coarse patterns linearly independent. Without them the coarse
patterns are exact sums of fewer fine patterns, the data has the rank of the fine level, and no
factorisation of ``X`` can tell the coarse level from the fine one except through a sparsity
prior; with them, both levels are identifiable and a test can demand that both are found.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import numpy as np
from scipy import sparse

__all__ = ["PlantedHierarchy", "make_planted_hierarchy", "match_patterns"]


@dataclass(frozen=True)
class PlantedHierarchy:
    """A planted matrix and the hierarchy it was drawn from.

    Attributes
    ----------
    X : ndarray or scipy sparse CSR matrix of float32, shape (n_samples, n_experts)
        The activation matrix (non-negative).
    coarse_patterns : ndarray of float32, shape (n_coarse, n_experts)
        Level-1 truth. Row ``i`` equals ``composition[i] @ fine_patterns`` plus its private
        experts.
    fine_patterns : ndarray of float32, shape (n_fine, n_experts)
        Level-2 truth, disjoint supports.
    composition : ndarray of float32, shape (n_coarse, n_fine)
        0/1 matrix: which fine patterns make up each coarse pattern.
    codes : ndarray of float32, shape (n_samples, n_coarse)
        The coefficients each sample gives the coarse patterns.
    """

    X: np.ndarray | sparse.csr_matrix
    coarse_patterns: np.ndarray
    fine_patterns: np.ndarray
    composition: np.ndarray
    codes: np.ndarray


def make_planted_hierarchy(
    n_samples: int = 4000,
    n_experts: int = 96,
    *,
    n_fine: int = 8,
    n_coarse: int = 12,
    fine_per_coarse: int = 2,
    experts_per_fine: int = 6,
    private_experts: int = 2,
    max_active: int = 2,
    jitter: float = 0.1,
    background_density: float = 0.02,
    background_scale: float = 0.1,
    sparse_output: bool = False,
    random_state: int | None = 0,
) -> PlantedHierarchy:
    """Draw a non-negative activation matrix from a planted two-level pattern hierarchy.

    Parameters
    ----------
    n_samples : int
        Rows of ``X`` (tokens or samples).
    n_experts : int
        Columns of ``X``. Must hold the fine and private supports:
        ``n_fine * experts_per_fine + n_coarse * private_experts <= n_experts``.
    n_fine : int
        Number of fine (level-2) patterns.
    n_coarse : int
        Number of coarse (level-1) patterns; each is a distinct set of ``fine_per_coarse`` fine
        patterns, so ``n_coarse <= comb(n_fine, fine_per_coarse)``.
    fine_per_coarse : int
        Fine patterns per coarse pattern.
    experts_per_fine : int
        Experts in each fine pattern.
    private_experts : int
        Experts that belong to one coarse pattern only (0 makes the levels non-identifiable from
        ``X`` without a sparsity prior; see the module docstring).
    max_active : int
        Each sample combines between 1 and ``max_active`` coarse patterns (uniformly drawn), with
        coefficients uniform in ``[0.5, 1.5]``.
    jitter : float
        Multiplicative noise: active entries are multiplied by ``1 + jitter * N(0, 1)``, then
        clipped at 0.
    background_density, background_scale : float
        A ``background_density`` fraction of all entries gets an extra activation uniform in
        ``[0, background_scale]``.
    sparse_output : bool
        Return ``X`` as a scipy CSR matrix instead of a dense array.
    random_state : int or None
        Seed of a local ``numpy.random.Generator`` (no global seeding).

    Returns
    -------
    PlantedHierarchy
        ``X`` and the truth it came from.

    Examples
    --------
    >>> planted = make_planted_hierarchy(n_samples=100, n_experts=96, random_state=0)
    >>> planted.X.shape, planted.coarse_patterns.shape, planted.fine_patterns.shape
    ((100, 96), (12, 96), (8, 96))
    """
    for name, value in [
        ("n_samples", n_samples),
        ("n_experts", n_experts),
        ("n_fine", n_fine),
        ("n_coarse", n_coarse),
        ("fine_per_coarse", fine_per_coarse),
        ("experts_per_fine", experts_per_fine),
        ("max_active", max_active),
    ]:
        if not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{name} must be a positive int; got {value!r}")
    if private_experts < 0:
        raise ValueError(f"private_experts must be >= 0; got {private_experts!r}")
    needed = n_fine * experts_per_fine + n_coarse * private_experts
    if needed > n_experts:
        raise ValueError(
            f"n_experts must be >= n_fine*experts_per_fine + n_coarse*private_experts = {needed}; "
            f"got {n_experts}"
        )
    all_sets = list(combinations(range(n_fine), fine_per_coarse))
    if n_coarse > len(all_sets):
        raise ValueError(
            f"n_coarse must be <= comb(n_fine, fine_per_coarse) = {len(all_sets)}; got {n_coarse}"
        )
    if max_active > n_coarse:
        raise ValueError(f"max_active must be <= n_coarse = {n_coarse}; got {max_active}")

    rng = np.random.default_rng(random_state)
    expert_order = rng.permutation(n_experts)

    fine_patterns = np.zeros((n_fine, n_experts), dtype=np.float32)
    for f in range(n_fine):
        support = expert_order[f * experts_per_fine : (f + 1) * experts_per_fine]
        fine_patterns[f, support] = rng.uniform(0.5, 1.0, size=experts_per_fine)

    # Distinct fine-pattern sets; redraw until every fine pattern is used (so each is visible).
    composition = np.zeros((n_coarse, n_fine), dtype=np.float32)
    for _ in range(1000):
        chosen = rng.choice(len(all_sets), size=n_coarse, replace=False)
        composition[:] = 0
        for i, set_id in enumerate(chosen):
            composition[i, list(all_sets[set_id])] = 1.0
        if composition.sum(axis=0).min() > 0 or n_coarse * fine_per_coarse < n_fine:
            break

    coarse_patterns = composition @ fine_patterns
    private_start = n_fine * experts_per_fine
    for i in range(n_coarse):
        begin = private_start + i * private_experts
        support = expert_order[begin : begin + private_experts]
        coarse_patterns[i, support] = rng.uniform(0.5, 1.0, size=private_experts)

    codes = np.zeros((n_samples, n_coarse), dtype=np.float32)
    n_active = rng.integers(1, max_active + 1, size=n_samples)
    for s in range(n_samples):
        active = rng.choice(n_coarse, size=n_active[s], replace=False)
        codes[s, active] = rng.uniform(0.5, 1.5, size=n_active[s])

    X = codes @ coarse_patterns
    X *= 1.0 + jitter * rng.standard_normal(X.shape)
    np.clip(X, 0.0, None, out=X)
    background = rng.random(X.shape) < background_density
    X[background] += rng.uniform(0.0, background_scale, size=int(background.sum()))
    X = X.astype(np.float32)
    return PlantedHierarchy(
        X=sparse.csr_matrix(X) if sparse_output else X,
        coarse_patterns=coarse_patterns.astype(np.float32),
        fine_patterns=fine_patterns,
        composition=composition,
        codes=codes,
    )


def match_patterns(learned: np.ndarray, planted: np.ndarray) -> np.ndarray:
    """Best cosine similarity of each planted pattern with any learned atom.

    Parameters
    ----------
    learned : ndarray, shape (n_atoms, n_experts)
    planted : ndarray, shape (n_patterns, n_experts)

    Returns
    -------
    ndarray of float, shape (n_patterns,)
        ``max_j cos(planted[i], learned[j])`` (0 for an all-zero row).

    Examples
    --------
    >>> match_patterns(np.eye(3), np.array([[1.0, 1.0, 0.0]])).round(3)
    array([0.707])
    """
    learned = np.asarray(learned, dtype=np.float64)
    planted = np.asarray(planted, dtype=np.float64)
    learned_norm = np.linalg.norm(learned, axis=1, keepdims=True)
    planted_norm = np.linalg.norm(planted, axis=1, keepdims=True)
    cosine = (planted / np.maximum(planted_norm, 1e-12)) @ (
        learned / np.maximum(learned_norm, 1e-12)
    ).T
    return cosine.max(axis=1)
