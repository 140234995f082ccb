"""Expert pruning: keep-masks from CAEP and from baseline scores.

Every method returns a **keep-mask**, a boolean array of shape (n_moe_layers, n_experts) with
``True`` = keep (CAEP's core, :func:`caep_keep_mask`, works on the flat expert axis of the
paper and returns shape (N_e,)). Masks are applied to a model by
:func:`moecollab.pruning_apply.apply_keep_mask` (re-exported here), which removes the pruned
experts or masks them out of routing.

Methods
-------
- **CAEP** (Tang et al. 2025, Algorithm 1; METHOD.md §5): :func:`caep_keep_mask` on a dictionary
  and codes in the paper's orientation, :func:`caep_from_hsdl` on a fitted
  :class:`moecollab.hsdl.HSDL`.
- **Score baselines** (METHOD.md §6, ``notes/pruning-peers.md``): :func:`expert_scores` computes
  ``frequency``, ``seer``, ``reap`` and ``output_impact`` in one pass over calibration batches;
  :func:`scores_from_trace` computes ``frequency`` and ``seer`` from a
  :class:`moecollab.trace.RoutingTrace`; :func:`keep_mask_from_scores` turns scores into a
  mask under a global or per-layer budget; :func:`random_keep_mask` is the random baseline.

Budget convention: every method of a comparison keeps exactly
:func:`moecollab.budget.n_kept_in_all` experts, ``n_layers * floor((1 - k2) n_experts)``, the
budget of a method that prunes the same number in every layer (REAP as published). Methods that
rank over all layers (``scope="global"``) keep the same total. CAEP is brought to it by its own
contribution scores (``budget="exact"``); Algorithm 1 as written (``budget="as_written"``) stops
at the first step with at most ``floor((1 - k2) N_e)`` experts and may keep fewer.

The dictionary CAEP reads must be fitted on calibration text only:
:func:`fit_calibration_dictionary` refits a stage-03 HSDL's settings on calibration rows and
refuses rows from an evaluation split.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from moecollab.budget import n_kept, n_kept_in_all
from moecollab.moe_arch import find_moe_layers
from moecollab.pruning_apply import (
    apply_keep_mask,
    count_parameters_pruned,
    load_pruned,
    reapply_masks,
    save_pruned,
)

logger = logging.getLogger(__name__)

__all__ = [
    "SCORE_METHODS",
    "apply_keep_mask",
    "caep_from_hsdl",
    "caep_keep_mask",
    "count_parameters_pruned",
    "fit_calibration_dictionary",
    "expert_forward",
    "expert_scores",
    "jaccard_matrix",
    "keep_mask_from_scores",
    "load_pruned",
    "n_kept",
    "n_kept_in_all",
    "random_keep_mask",
    "reapply_masks",
    "save_pruned",
    "scores_from_trace",
]

#: Score methods of :func:`expert_scores`; the first two also work from a routing trace.
SCORE_METHODS: tuple[str, ...] = ("frequency", "seer", "reap", "output_impact")
#: How CAEP meets the budget: ``exact`` (the study's CAEP) or ``as_written`` (Algorithm 1).
CAEP_BUDGETS: tuple[str, ...] = ("exact", "as_written")
_TRACE_METHODS: tuple[str, ...] = ("frequency", "seer")


# --------------------------------------------------------------------------------------------
# Budget and argument checks
# --------------------------------------------------------------------------------------------


def _check_min_per_layer(min_per_layer: int, n_experts: int) -> int:
    if not isinstance(min_per_layer, int | np.integer) or not 0 <= min_per_layer <= n_experts:
        raise ValueError(
            f"min_per_layer must be an int in [0, {n_experts}]; got {min_per_layer!r}"
        )
    return int(min_per_layer)


# --------------------------------------------------------------------------------------------
# CAEP (Algorithm 1)
# --------------------------------------------------------------------------------------------


def caep_keep_mask(
    dictionary: np.ndarray,
    codes: np.ndarray,
    threshold_ratio: float,
    prune_ratio: float,
    *,
    n_experts_per_layer: int | None = None,
    min_per_layer: int = 0,
    budget: Literal["as_written", "exact"] = "as_written",
) -> np.ndarray:
    """Contribution-aware expert pruning, Algorithm 1 of Tang et al. (2025).

    Parameters
    ----------
    dictionary : array of float, shape (N_e, N_p)
        ``D``, in the **paper's orientation**: one row per expert (all layers stacked, column
        ``layer * n_experts + expert`` of the activation matrix), one column per pattern (atom).
        ``HSDL.dictionaries_[l]`` is its transpose; see :func:`caep_from_hsdl`.
    codes : array of float, shape (N_p, N_s)
        ``R``, one row per pattern, one column per sample (``HSDL.transform`` gives ``Rᵀ``).
    threshold_ratio : float in (0, 1]
        ``k1``: the threshold ``f`` is the ``ceil(k1 N_e)``-th largest contribution.
    prune_ratio : float in [0, 1)
        ``k2``: at most ``floor((1 - k2) N_e)`` experts are kept by the deletion loop.
    n_experts_per_layer : int, optional
        Experts per layer when ``N_e`` stacks several layers; needed for ``min_per_layer``.
    min_per_layer : int, default=0
        Project deviation, off at 0: after Algorithm 1, a layer left with fewer than this many
        experts (use the model's ``top_k``) gets its highest-contribution experts back.
    budget : {"as_written", "exact"}, default="as_written"
        ``as_written``: Algorithm 1 (with the floor above), which may keep fewer experts than
        the budget, or more when the floor restores some. ``exact``: then brought to exactly
        the shared budget (:func:`moecollab.budget.n_kept_in_all` when
        ``n_experts_per_layer`` is given, else ``floor((1 - k2) N_e)``) by its own
        contribution scores, never below the floor (Notes, 7).

    Returns
    -------
    ndarray of bool, shape (N_e,)
        ``m``, True = keep.

    Notes
    -----
    Algorithm 1, with the decisions it leaves open:

    1. ``r = R 1`` (total use of each pattern), ``e = D r`` (expert contribution).
    2. ``f`` = value at position ``ceil(k1 N_e)`` of ``e`` sorted descending; ``m = [e >= f]``.
       **Ties** at ``f`` are all kept, so ``m`` may start with more than ``ceil(k1 N_e)``.
    3. While ``sum(m) > (1 - k2) N_e``: delete the remaining pattern with the smallest ``r``
       (**ties: the lowest pattern index**), recompute ``e`` over the remaining patterns and
       ``m = [e >= f]`` with ``f`` fixed. ``D, R >= 0``, so ``e`` only falls and the count of
       kept experts never rises; one deletion may overshoot below the budget (as written).
    4. **The loop acts only when** ``k1 > 1 - k2`` (strictly more experts pass the threshold
       than the budget allows; ties aside). With ``k1 <= 1 - k2`` CAEP keeps about
       ``ceil(k1 N_e)`` experts, i.e. prunes *more* than ``k2`` (logged as a warning).
    5. **All patterns deleted**: the last remaining pattern is never deleted. If the count is
       still above the budget with one pattern left (e.g. ``f = 0`` because many experts have
       zero contribution), the top ``floor((1 - k2) N_e)`` experts by that last ``e`` are kept
       (ties: lowest index).
    6. **Deviation** (``min_per_layer > 0``): a layer left with fewer than ``min_per_layer``
       experts gets back its experts with the highest final ``e`` (ties broken by the initial
       ``e``, then the lowest index) until it has ``min_per_layer``; the total kept may then
       exceed the budget by the restored experts (logged). The paper does not say what happens
       to a layer pruned below ``top_k``; a transformers model cannot run such a layer.
    7. **Equal budget** (``budget="exact"``, project decision): every method of the study is
       compared at the same number of kept experts. Experts are ranked by their final
       contribution ``e`` (over the patterns the loop kept), ties by the initial ``e = D R 1``,
       then the lowest index. Below the budget, the best unkept experts are added; above it
       (the floor restored some), the worst kept experts are removed from layers that keep
       more than ``min_per_layer``.

    Examples
    --------
    Four experts, two patterns; ``r = (3, 1)``, ``e = (3, 3, 1, 0)``:

    >>> D = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    >>> R = np.array([[1.0, 2.0], [1.0, 0.0]])
    >>> caep_keep_mask(D, R, threshold_ratio=0.75, prune_ratio=0.5)
    array([ True,  True, False, False])

    When pattern 2 holds two experts, ``e = (3, 1, 1, 0)``, its deletion overshoots: one
    expert is left for a budget of two, and ``budget="exact"`` adds back the best unkept one
    (final ``e`` ties at 0; initial ``e`` 1, 1, 0; lowest index):

    >>> D2 = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 0.0]])
    >>> caep_keep_mask(D2, R, threshold_ratio=0.75, prune_ratio=0.5)
    array([ True, False, False, False])
    >>> caep_keep_mask(D2, R, threshold_ratio=0.75, prune_ratio=0.5, budget="exact")
    array([ True,  True, False, False])
    """
    dictionary = np.asarray(dictionary, dtype=np.float64)
    codes = np.asarray(codes, dtype=np.float64)
    if dictionary.ndim != 2:
        raise ValueError(f"dictionary must have shape (N_e, N_p); got shape {dictionary.shape}")
    if codes.ndim != 2 or codes.shape[0] != dictionary.shape[1]:
        raise ValueError(
            f"codes must have shape (N_p, N_s) with N_p = {dictionary.shape[1]}; "
            f"got shape {codes.shape}"
        )
    if not (np.isfinite(dictionary).all() and np.isfinite(codes).all()):
        raise ValueError("dictionary and codes must be finite; got NaN or inf values")
    if (dictionary < 0).any() or (codes < 0).any():
        raise ValueError("dictionary and codes must be non-negative; got negative values")
    if not isinstance(threshold_ratio, numbers.Real) or not 0 < threshold_ratio <= 1:
        raise ValueError(f"threshold_ratio must be in (0, 1]; got {threshold_ratio!r}")
    n_total, n_patterns = dictionary.shape
    if n_patterns == 0:
        raise ValueError("dictionary must have at least one pattern (column); got 0")
    n_keep = n_kept(n_total, prune_ratio)
    if n_experts_per_layer is not None and (
        n_experts_per_layer <= 0 or n_total % n_experts_per_layer
    ):
        raise ValueError(
            f"n_experts_per_layer must divide N_e = {n_total}; got {n_experts_per_layer!r}"
        )
    if min_per_layer and n_experts_per_layer is None:
        raise ValueError("min_per_layer > 0 needs n_experts_per_layer; got None")
    if n_experts_per_layer is not None:
        min_per_layer = _check_min_per_layer(min_per_layer, n_experts_per_layer)
    if budget not in CAEP_BUDGETS:
        raise ValueError(f"budget must be one of {', '.join(CAEP_BUDGETS)}; got {budget!r}")
    target = (n_kept_in_all(n_total // n_experts_per_layer, n_experts_per_layer, prune_ratio)
              if n_experts_per_layer is not None else n_keep)
    if budget == "exact" and n_experts_per_layer is not None and \
            target < min_per_layer * (n_total // n_experts_per_layer):
        raise ValueError(
            f"prune_ratio must leave at least min_per_layer={min_per_layer} experts per layer; "
            f"got {prune_ratio!r} (keeps {target} in all)")
    if threshold_ratio <= 1.0 - prune_ratio:
        logger.warning(
            "threshold_ratio=%s <= 1 - prune_ratio=%s: the deletion loop cannot act and CAEP "
            "keeps about ceil(k1 N_e)=%d experts, fewer than the budget %d",
            threshold_ratio, 1.0 - prune_ratio, math.ceil(threshold_ratio * n_total), n_keep,
        )

    pattern_use = codes.sum(axis=1)  # r = R 1
    initial_contribution = dictionary @ pattern_use  # e = D r
    n_threshold = min(max(math.ceil(threshold_ratio * n_total - 1e-9), 1), n_total)
    threshold = np.sort(initial_contribution)[::-1][n_threshold - 1]  # f
    contribution = initial_contribution
    keep_mask = contribution >= threshold
    remaining = np.ones(n_patterns, dtype=bool)
    n_deleted = 0
    while keep_mask.sum() > n_keep:
        if remaining.sum() == 1:
            # Never delete the last pattern: keep the budget's top experts by the last e.
            order = np.lexsort((np.arange(n_total), -contribution))
            keep_mask = np.zeros(n_total, dtype=bool)
            keep_mask[order[:n_keep]] = True
            logger.info("CAEP: one pattern left with %d experts over f; kept the top %d by e",
                        int((contribution >= threshold).sum()), n_keep)
            break
        candidates = np.flatnonzero(remaining)
        least_used = candidates[np.argmin(pattern_use[candidates])]  # argmin: lowest index on ties
        remaining[least_used] = False
        n_deleted += 1
        contribution = dictionary[:, remaining] @ pattern_use[remaining]
        keep_mask = contribution >= threshold
    logger.debug("CAEP: f=%.4g, %d patterns deleted, %d of %d experts kept",
                 threshold, n_deleted, int(keep_mask.sum()), n_total)

    if min_per_layer and n_experts_per_layer is not None:
        keep_mask = _restore_min_per_layer(
            keep_mask, contribution, initial_contribution, n_experts_per_layer, min_per_layer
        )
    if budget == "exact":
        keep_mask = _to_budget(keep_mask, contribution, initial_contribution, target,
                               n_experts_per_layer or n_total, min_per_layer)
    return keep_mask


def _to_budget(
    keep_mask: np.ndarray,
    contribution: np.ndarray,
    initial_contribution: np.ndarray,
    n_keep: int,
    n_experts_per_layer: int,
    min_per_layer: int,
) -> np.ndarray:
    """Add the best unkept, or remove the worst kept, experts until exactly ``n_keep`` remain.

    Rank: final contribution, then initial contribution, then the lowest index first. Removal
    skips layers at ``min_per_layer``.
    """
    keep_mask = keep_mask.copy()
    ids = np.arange(keep_mask.size)
    best_first = np.lexsort((ids, -initial_contribution, -contribution))
    n_kept_now = int(keep_mask.sum())
    if n_kept_now < n_keep:
        unkept = best_first[~keep_mask[best_first]]
        keep_mask[unkept[: n_keep - n_kept_now]] = True
    elif n_kept_now > n_keep:
        per_layer = keep_mask.reshape(-1, n_experts_per_layer).sum(axis=1)
        for expert in best_first[::-1]:
            if n_kept_now == n_keep:
                break
            layer = expert // n_experts_per_layer
            if keep_mask[expert] and per_layer[layer] > min_per_layer:
                keep_mask[expert] = False
                per_layer[layer] -= 1
                n_kept_now -= 1
    logger.debug("CAEP at the budget: %d -> %d experts", int(n_kept_now), n_keep)
    return keep_mask


def _restore_min_per_layer(
    keep_mask: np.ndarray,
    contribution: np.ndarray,
    initial_contribution: np.ndarray,
    n_experts_per_layer: int,
    min_per_layer: int,
) -> np.ndarray:
    """Give every layer back its best experts until it keeps ``min_per_layer`` (deviation)."""
    keep_mask = keep_mask.reshape(-1, n_experts_per_layer).copy()
    final = contribution.reshape(keep_mask.shape)
    initial = initial_contribution.reshape(keep_mask.shape)
    n_restored = 0
    for layer, layer_keep in enumerate(keep_mask):
        missing = min_per_layer - int(layer_keep.sum())
        if missing <= 0:
            continue
        ids = np.arange(n_experts_per_layer)
        order = np.lexsort((ids, -initial[layer], -final[layer]))
        order = order[~layer_keep[order]]
        layer_keep[order[:missing]] = True
        n_restored += missing
        logger.info("CAEP deviation: layer %d restored %d experts to keep %d",
                    layer, missing, min_per_layer)
    if n_restored:
        logger.warning("CAEP: %d experts restored so that every layer keeps at least %d "
                       "(project deviation from Algorithm 1)", n_restored, min_per_layer)
    return keep_mask.reshape(-1)


def caep_from_hsdl(
    fitted_hsdl: Any,
    X: Any,
    *,
    threshold_ratio: float,
    prune_ratio: float,
    n_experts: int,
    min_per_layer: int,
    level: int = 1,
    budget: Literal["as_written", "exact"] = "as_written",
) -> np.ndarray:
    """CAEP on a fitted :class:`moecollab.hsdl.HSDL`: a keep-mask per layer.

    Parameters
    ----------
    fitted_hsdl : HSDL
        Fitted on an activation matrix with columns ``layer * n_experts + expert``.
    X : array or sparse matrix, shape (n_samples, n_layers * n_experts)
        Calibration samples; their codes at ``level`` give ``R``.
    threshold_ratio, prune_ratio : float
        ``k1`` and ``k2`` of :func:`caep_keep_mask`.
    n_experts : int
        Routed experts per layer.
    min_per_layer : int
        Floor per layer (the model's ``top_k``; 0 = Algorithm 1 as written).
    level : int, default=1
        Dictionary level (1 = ``D_1, R_1`` as in the paper; 2 = the level-1 atoms' building
        blocks).
    budget : {"as_written", "exact"}, default="as_written"
        As in :func:`caep_keep_mask`; the study compares methods with ``exact``.

    Returns
    -------
    ndarray of bool, shape (n_layers, n_experts)
        True = keep.

    Notes
    -----
    ``HSDL`` stores samples as rows: ``dictionaries_[level-1]`` has shape (K, n_columns) and
    ``transform(X)[level-1]`` shape (n_samples, K). The paper's ``D`` (N_e × N_p) and
    ``R`` (N_p × N_s) are their transposes, which is what is passed to :func:`caep_keep_mask`.
    """
    dictionaries = getattr(fitted_hsdl, "dictionaries_", None)
    if dictionaries is None:
        raise ValueError("fitted_hsdl must be a fitted HSDL (no dictionaries_); call fit first")
    if not isinstance(level, int) or not 1 <= level <= len(dictionaries):
        raise ValueError(f"level must be an int in [1, {len(dictionaries)}]; got {level!r}")
    dictionary = np.asarray(dictionaries[level - 1])  # (K, n_columns)
    n_columns = dictionary.shape[1]
    if not isinstance(n_experts, int | np.integer) or n_experts <= 0 or n_columns % n_experts:
        raise ValueError(
            f"n_experts must divide the dictionary width {n_columns}; got {n_experts!r}"
        )
    codes = np.asarray(fitted_hsdl.transform(X)[level - 1])  # (n_samples, K)
    keep_mask = caep_keep_mask(
        dictionary.T,
        codes.T,
        threshold_ratio,
        prune_ratio,
        n_experts_per_layer=int(n_experts),
        min_per_layer=min_per_layer,
        budget=budget,
    )
    return keep_mask.reshape(-1, int(n_experts))


def fit_calibration_dictionary(
    template: Any,
    X: Any,
    token_splits: Sequence[str] | np.ndarray,
    *,
    calibration_split: str,
    evaluation_splits: Sequence[str] = ("test",),
) -> Any:
    """The dictionary CAEP prunes with: ``template``'s settings, fitted on calibration rows only.

    Parameters
    ----------
    template : HSDL
        Any HSDL (fitted or not) whose parameters (atom counts, weights, epochs, seed) to use;
        its fitted state, if any, is not used (``sklearn.base.clone``).
    X : array or sparse matrix, shape (n_samples, n_columns)
        Activation matrix of the calibration text.
    token_splits : sequence of str, length n_samples
        Corpus split of every row of ``X``.
    calibration_split : str
        The only split allowed among the rows.
    evaluation_splits : sequence of str, default ("test",)
        Splits the evaluation reads; ``calibration_split`` must not be one of them.

    Returns
    -------
    HSDL
        A new, fitted estimator.

    Raises
    ------
    ValueError
        When a row comes from another split than ``calibration_split`` (an evaluation split
        above all), or the calibration split is an evaluation split: no evaluation text may
        shape the masks of a method that is then evaluated on it.
    """
    from sklearn.base import clone

    token_splits = np.asarray(token_splits, dtype=object)
    if len(token_splits) != X.shape[0]:
        raise ValueError(f"token_splits must have one entry per row of X ({X.shape[0]}); got "
                         f"{len(token_splits)}")
    if calibration_split in evaluation_splits:
        raise ValueError(f"calibration_split must not be an evaluation split "
                         f"{list(evaluation_splits)}; got {calibration_split!r}")
    found = sorted({str(split) for split in token_splits})
    foreign = [split for split in found if split != calibration_split]
    if foreign:
        leaked = [split for split in foreign if split in evaluation_splits]
        raise ValueError(
            f"the pruning dictionary must be fitted on the {calibration_split!r} split only; "
            f"got rows from {foreign}" + (f", of which {leaked} is evaluation text" if leaked
                                          else ""))
    return clone(template).fit(X)


# --------------------------------------------------------------------------------------------
# Keep-masks from scores; random baseline
# --------------------------------------------------------------------------------------------


def keep_mask_from_scores(
    scores: np.ndarray,
    prune_ratio: float,
    *,
    scope: Literal["global", "per_layer"] = "global",
    min_per_layer: int,
) -> np.ndarray:
    """Keep the highest-scoring experts under a global or per-layer budget.

    Parameters
    ----------
    scores : array of float, shape (n_layers, n_experts)
        Higher = more important (any method of :func:`expert_scores`).
    prune_ratio : float in [0, 1)
        Fraction pruned: ``floor((1 - prune_ratio) N)`` experts are kept, ``N`` being all
        experts (``global``) or each layer's experts (``per_layer``).
    scope : {"global", "per_layer"}, default="global"
        ``global`` ranks all experts of all layers together (scores must be comparable across
        layers); ``per_layer`` prunes the same fraction from every layer.
    min_per_layer : int
        Every layer keeps at least this many (its best by score; pass the model's ``top_k``),
        taken out of the global budget before the rest is filled by global rank.

    Returns
    -------
    ndarray of bool, shape (n_layers, n_experts)
        True = keep.

    Notes
    -----
    Ties are broken deterministically: lower layer, then lower expert id, is kept first.

    Examples
    --------
    >>> scores = np.array([[4.0, 3.0, 2.0, 1.0], [0.5, 0.4, 0.3, 0.2]])
    >>> keep_mask_from_scores(scores, 0.5, min_per_layer=1).astype(int)
    array([[1, 1, 1, 0],
           [1, 0, 0, 0]])
    >>> keep_mask_from_scores(scores, 0.5, scope="per_layer", min_per_layer=1).astype(int)
    array([[1, 1, 0, 0],
           [1, 1, 0, 0]])
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or 0 in scores.shape:
        raise ValueError(f"scores must have shape (n_layers, n_experts); got {scores.shape}")
    if np.isnan(scores).any():
        raise ValueError("scores must not contain NaN; got NaN values")
    if scope not in ("global", "per_layer"):
        raise ValueError(f"scope must be 'global' or 'per_layer'; got {scope!r}")
    n_layers, n_experts = scores.shape
    min_per_layer = _check_min_per_layer(min_per_layer, n_experts)
    keep_mask = np.zeros(scores.shape, dtype=bool)
    expert_ids = np.arange(n_experts)
    if scope == "per_layer":
        n_keep = n_kept(n_experts, prune_ratio)
        if n_keep < min_per_layer:
            raise ValueError(
                f"prune_ratio must leave at least min_per_layer={min_per_layer} of {n_experts} "
                f"experts per layer; got {prune_ratio!r} (keeps {n_keep})"
            )
        for layer in range(n_layers):
            order = np.lexsort((expert_ids, -scores[layer]))
            keep_mask[layer, order[:n_keep]] = True
        return keep_mask
    n_keep = n_kept_in_all(n_layers, n_experts, prune_ratio)
    if n_keep < min_per_layer * n_layers:
        raise ValueError(
            f"prune_ratio must leave at least min_per_layer={min_per_layer} experts in each of "
            f"{n_layers} layers; got {prune_ratio!r} (keeps {n_keep} in all)"
        )
    for layer in range(n_layers):
        order = np.lexsort((expert_ids, -scores[layer]))
        keep_mask[layer, order[:min_per_layer]] = True
    flat_scores = scores.reshape(-1)
    order = np.lexsort((np.arange(flat_scores.size), -flat_scores))
    flat_keep = keep_mask.reshape(-1)
    n_left = n_keep - int(flat_keep.sum())
    free = order[~flat_keep[order]]
    flat_keep[free[:n_left]] = True
    return flat_keep.reshape(n_layers, n_experts)


def random_keep_mask(
    n_layers: int,
    n_experts: int,
    prune_ratio: float,
    *,
    random_state: int | np.random.Generator | None,
    scope: Literal["global", "per_layer"] = "global",
    min_per_layer: int,
) -> np.ndarray:
    """The random baseline: uniform random scores through :func:`keep_mask_from_scores`.

    Parameters
    ----------
    n_layers, n_experts : int
        Shape of the mask.
    prune_ratio : float in [0, 1)
        Fraction pruned.
    random_state : int, Generator or None
        Seed of a local ``numpy.random.default_rng`` (nothing global is seeded).
    scope : {"global", "per_layer"}, default="global"
    min_per_layer : int
        Floor per layer (the model's ``top_k``).

    Returns
    -------
    ndarray of bool, shape (n_layers, n_experts)
    """
    for name, value in (("n_layers", n_layers), ("n_experts", n_experts)):
        if not isinstance(value, int | np.integer) or value <= 0:
            raise ValueError(f"{name} must be a positive int; got {value!r}")
    rng = np.random.default_rng(random_state)
    scores = rng.random((int(n_layers), int(n_experts)))
    return keep_mask_from_scores(scores, prune_ratio, scope=scope, min_per_layer=min_per_layer)


# --------------------------------------------------------------------------------------------
# Expert outputs for routed tokens (fused weights, per family layout)
# --------------------------------------------------------------------------------------------


def expert_forward(experts: nn.Module, expert_id: int, hidden_states: torch.Tensor) -> torch.Tensor:
    """Run one routed expert of a fused experts module on some tokens (no gate weight).

    Parameters
    ----------
    experts : nn.Module
        The fused experts of a MoE block (``block.experts``).
    expert_id : int
        Expert index within the layer.
    hidden_states : Tensor, shape (n_tokens, hidden)
        Inputs of the MoE block for the tokens routed to the expert.

    Returns
    -------
    Tensor, shape (n_tokens, hidden)
        ``f_j(x)``, in the dtype of ``hidden_states``.

    Notes
    -----
    Layouts (transformers 5.24):

    - standard (OLMoE, Mixtral, Qwen2/3-MoE, DeepSeek-V2/V3, PhiMoE, GraniteMoe):
      ``gate_up_proj`` [E, 2I, H] with gate rows first, ``down_proj`` [E, H, I];
      ``f(x) = down · (act(gate·x) ⊙ up·x)`` with ``act = ACT2FN[config.hidden_act]``
      (the module's ``act_fn``).
    - GPT-OSS (``is_transposed``, interleaved): ``gate_up_proj`` [E, H, 2I] + bias [E, 2I],
      gate columns ``::2``, up ``1::2``; clamped SwiGLU ``(clamp(up, ±limit) + 1) ·
      g·sigmoid(alpha·g)`` with ``g = clamp(gate, max=limit)``; ``down_proj`` [E, I, H] + bias.
    """
    gate_up = experts.gate_up_proj[expert_id]
    down = experts.down_proj[expert_id]
    transposed = bool(getattr(experts, "is_transposed", False))
    concatenated = bool(getattr(experts, "is_concatenated", True))
    if getattr(experts, "has_post_expert_norm", False):
        raise NotImplementedError("experts with a post-expert norm are not supported")
    x = hidden_states.to(gate_up.dtype)
    projected = x @ gate_up if transposed else F.linear(x, gate_up)
    gate_up_bias = getattr(experts, "gate_up_proj_bias", None)
    if gate_up_bias is not None:
        projected = projected + gate_up_bias[expert_id]
    if concatenated:
        gate, up = projected.chunk(2, dim=-1)
        act_fn = getattr(experts, "act_fn", None)
        if act_fn is None:
            raise NotImplementedError(
                f"{type(experts).__name__} has no act_fn for its concatenated gate/up layout"
            )
        hidden = act_fn(gate) * up
    else:  # GPT-OSS: interleaved gate/up, clamped SwiGLU
        gate, up = projected[..., ::2], projected[..., 1::2]
        gate = gate.clamp(min=None, max=experts.limit)
        up = up.clamp(min=-experts.limit, max=experts.limit)
        hidden = (up + 1) * (gate * torch.sigmoid(gate * experts.alpha))
    output = hidden @ down if transposed else F.linear(hidden, down)
    down_bias = getattr(experts, "down_proj_bias", None)
    if down_bias is not None:
        output = output + down_bias[expert_id]
    return output.to(hidden_states.dtype)


# --------------------------------------------------------------------------------------------
# Scores in one pass
# --------------------------------------------------------------------------------------------


def _batch_inputs(batch: Any, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, Mapping):
        if "input_ids" not in batch:
            raise ValueError(f"batch {index} must have an 'input_ids' key; got keys {list(batch)}")
        input_ids, mask = batch["input_ids"], batch.get("attention_mask")
    else:
        input_ids, mask = batch, None
    input_ids = torch.as_tensor(input_ids).long()
    if input_ids.ndim == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids of batch {index} must be 1-D or 2-D; got {input_ids.ndim}-D")
    if mask is not None:
        mask = torch.as_tensor(mask)
        mask = (mask.unsqueeze(0) if mask.ndim == 1 else mask).long()
        if mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask of batch {index} must have shape "
                             f"{tuple(input_ids.shape)}; got {tuple(mask.shape)}")
    return input_ids, mask


def _check_methods(method: str | Sequence[str], allowed: tuple[str, ...]) -> list[str]:
    methods = [method] if isinstance(method, str) else list(method)
    for name in methods:
        if name not in allowed:
            raise ValueError(f"method must be one of {', '.join(allowed)}; got {name!r}")
    if not methods:
        raise ValueError(f"method must name at least one of {', '.join(allowed)}; got none")
    return methods


def expert_scores(
    model: nn.Module,
    batches: Iterable[Any],
    method: str | Sequence[str],
) -> np.ndarray | dict[str, np.ndarray]:
    """Importance of every routed expert from one pass over calibration batches.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        An unpruned model of a supported family (:data:`moecollab.moe_arch.SUPPORTED_FAMILIES`).
    batches : iterable
        Token ids ``(batch, seq)`` tensors, or mappings with ``input_ids`` and optionally
        ``attention_mask`` (pads, 0, are run but not counted).
    method : str or sequence of str
        One of, or several of, ``frequency``, ``seer``, ``reap``, ``output_impact``; all
        requested scores come from the same single pass.

    Returns
    -------
    ndarray of float64, shape (n_moe_layers, n_experts), or dict of them
        Higher = more important; a dict keyed by method when ``method`` is a sequence.

    Notes
    -----
    With ``g_{t,j}`` the weight the router returned and the block applied to expert ``j`` on
    token ``t`` (its ``topk_weights``: OLMoE's un-normalised softmax, DeepSeek's including
    ``routed_scaling_factor``; 0 when ``j`` is not among the token's top-k), ``T_j`` the
    non-pad tokens routed to ``j``, ``n_j = |T_j|``, ``N`` all non-pad tokens and ``f_j`` the
    expert's output:

    - ``frequency``: ``n_j`` (hard top-k count).
    - ``seer``: ``(1/N) Σ_t g_{t,j}``, SEER-MoE's averaged routing score on the **applied**
      top-k weight (REAP's soft count), not the full softmax.
    - ``reap``: ``(1/n_j) Σ_{t∈T_j} g_{t,j} ‖f_j(x_t)‖₂`` (REAP saliency); 0 if ``n_j = 0``.
    - ``output_impact``: ``(1/N) Σ_{t∈T_j} ‖g_{t,j} f_j(x_t)‖₂``, the mean size of the
      expert's contribution to the layer output. A GEM-like behaviour score: the paper's "GEM"
      (Zhang et al. 2024) is only described as "remove experts with minimal impact on the
      output" and its name is never explained (``notes/pruning-peers.md``). Equal to
      ``reap · n_j / N`` for non-negative weights, so it ranks by total, not mean, impact.

    Memory is bounded per batch: forward hooks on each layer's experts module read the block
    input and the router's choice, and each expert is re-run (:func:`expert_forward`) only on
    the tokens routed to it; no E × T × H buffer is built. ``seer`` and ``frequency`` skip the
    re-run. Runs under ``torch.inference_mode`` in eval mode (restored afterwards).
    """
    methods = _check_methods(method, SCORE_METHODS)
    architecture = find_moe_layers(model)
    n_layers = len(architecture.moe_layers)
    n_experts = architecture.n_experts
    need_outputs = any(name in ("reap", "output_impact") for name in methods)
    counts = torch.zeros(n_layers, n_experts, dtype=torch.float64)
    weight_sums = torch.zeros(n_layers, n_experts, dtype=torch.float64)
    weighted_norm_sums = torch.zeros(n_layers, n_experts, dtype=torch.float64)
    state: dict[str, Any] = {"valid_rows": None, "n_tokens": 0}

    def make_hook(position: int, experts: nn.Module):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            values = list(args) + [
                kwargs[k] for k in ("top_k_index", "top_k_weights", "router_indices",
                                    "routing_weights") if k in kwargs
            ]
            hidden_states, top_k_index, top_k_weights = values[0], values[1], values[2]
            valid_rows = state["valid_rows"]
            if valid_rows is not None:
                hidden_states = hidden_states[valid_rows]
                top_k_index = top_k_index[valid_rows]
                top_k_weights = top_k_weights[valid_rows]
            flat_ids = top_k_index.reshape(-1).long()
            flat_weights = top_k_weights.reshape(-1).double()
            counts[position].index_add_(0, flat_ids, torch.ones_like(flat_weights))
            weight_sums[position].index_add_(0, flat_ids, flat_weights)
            if not need_outputs:
                return
            for expert_id in torch.unique(flat_ids).tolist():
                token_rows, rank = torch.where(top_k_index == expert_id)
                outputs = expert_forward(experts, expert_id, hidden_states[token_rows])
                norms = outputs.double().norm(dim=-1)
                gate = top_k_weights[token_rows, rank].double()
                weighted_norm_sums[position, expert_id] += (gate.abs() * norms).sum()

        return hook

    handles = []
    was_training = model.training
    model.eval()
    try:
        for position, layer in enumerate(architecture.moe_layers):
            if layer.experts is None:
                raise NotImplementedError(
                    f"layer {layer.layer_id} has no fused experts module; cannot score it"
                )
            handles.append(layer.experts.register_forward_hook(
                make_hook(position, layer.experts), with_kwargs=True))
        device = next(model.parameters()).device
        with torch.inference_mode():
            for index, batch in enumerate(batches):
                input_ids, mask = _batch_inputs(batch, index)
                state["valid_rows"] = (mask.reshape(-1).bool().to(device)
                                       if mask is not None else None)
                state["n_tokens"] += int(mask.sum()) if mask is not None else input_ids.numel()
                model(input_ids=input_ids.to(device),
                      attention_mask=mask.to(device) if mask is not None else None,
                      use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    n_tokens = max(state["n_tokens"], 1)
    results: dict[str, np.ndarray] = {}
    for name in methods:
        if name == "frequency":
            values = counts
        elif name == "seer":
            values = weight_sums / n_tokens
        elif name == "reap":
            values = torch.where(counts > 0, weighted_norm_sums / counts.clamp(min=1), 0.0)
        else:
            values = weighted_norm_sums / n_tokens
        results[name] = values.numpy().copy()
    return results[methods[0]] if isinstance(method, str) else results


def scores_from_trace(
    trace: Any, method: str | Sequence[str]
) -> np.ndarray | dict[str, np.ndarray]:
    """``frequency`` or ``seer`` scores from a routing trace, without the model.

    Parameters
    ----------
    trace : RoutingTrace
        From :func:`moecollab.capture.capture_routing` (pads already dropped).
    method : {"frequency", "seer"} or a sequence of them

    Returns
    -------
    ndarray of float64, shape (n_moe_layers, n_experts), or dict of them
        Same definitions as :func:`expert_scores` (equal to its results on the same tokens).
    """
    methods = _check_methods(method, _TRACE_METHODS)
    expert_ids = np.asarray(trace.expert_ids).astype(np.int64)
    weights = np.asarray(trace.weights, dtype=np.float64)
    n_tokens, n_layers, _ = expert_ids.shape
    columns = (expert_ids + np.arange(n_layers)[None, :, None] * trace.n_experts).reshape(-1)
    size = n_layers * trace.n_experts
    counts = np.bincount(columns, minlength=size).astype(np.float64)
    weight_sums = np.bincount(columns, weights=weights.reshape(-1), minlength=size)
    results = {
        "frequency": counts.reshape(n_layers, trace.n_experts),
        "seer": (weight_sums / max(n_tokens, 1)).reshape(n_layers, trace.n_experts),
    }
    return results[methods[0]] if isinstance(method, str) else {m: results[m] for m in methods}


def jaccard_matrix(masks: Mapping[str, np.ndarray]) -> pd.DataFrame:
    """Jaccard similarity |A ∩ B| / |A ∪ B| between the kept sets of named keep-masks.

    Examples
    --------
    >>> jaccard_matrix({"a": np.array([True, True, False]),
    ...                 "b": np.array([True, False, True])}).loc["a", "b"]
    np.float64(0.3333333333333333)
    """
    names = list(masks)
    flat = np.stack([np.asarray(masks[name], dtype=bool).ravel() for name in names])
    intersection = flat.astype(int) @ flat.T.astype(int)
    sizes = flat.sum(axis=1)
    union = sizes[:, None] + sizes[None, :] - intersection
    return pd.DataFrame(np.where(union > 0, intersection / np.maximum(union, 1), 1.0),
                        index=names, columns=names)
