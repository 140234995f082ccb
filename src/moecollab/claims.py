"""The paper's claims, each judged from this study's numbers by a rule written out here.

A verdict is ``supports``, ``partly``, ``does not support`` or ``not judged``, with a one-line
reason built from the numbers it was judged on. The chapters compute the numbers and call these
functions; the book's "paper vs ours" page quotes the results. The rules, in one place:

- **Routing health gates structure** (:func:`unless_routing_healthy`): claims 1-4 read structure
  into the model's routing; when stage 00's routing-health verdict failed they are "not judged".
  Claims 5 and 6 measure pruned models' scores, which stay meaningful, and are judged.
- **Noise is judged on the paired difference.** Pruning comparisons carry a 95% interval from a
  paired bootstrap over the same items (:mod:`moecollab.paired`); an interval that straddles
  zero is a tie, never a win.
- **Accuracy only above chance** (:func:`accuracy_is_informative`): accuracy is read only where
  the unpruned model's interval lies above chance; otherwise the accuracy verdict is "not
  judged" and perplexity carries the comparison.
- **Claim 5 needs every baseline** (:func:`pruning_claim`): CAEP "beats the baselines" only if
  it beats each of them; losing to any one is "does not support".
- **Claim 6 weighs magnitude** (:func:`domain_pruning_claim`): the own-field cost must be small
  (at most :data:`MAX_OWN_FIELD_COST`) *and* below the other fields' cost.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pandas as pd

from moecollab.paired import PAPER_ACCURACY, Comparison, Interval, compare_with_baselines

__all__ = [
    "DOES_NOT_SUPPORT", "MAX_OWN_FIELD_COST", "NOT_JUDGED", "PARTLY", "SUPPORTS", "Comparison",
    "Verdict", "accuracy_evidence", "accuracy_is_informative", "annotation_claim",
    "coactivation_claim", "comparison_outcome", "coverage_claim", "domain_pruning_claim",
    "domain_similarity_claim", "pruning_claim", "routing_health_passed",
    "unless_masks_differ",
    "unless_routing_healthy",
]

SUPPORTS = "supports"
PARTLY = "partly"
DOES_NOT_SUPPORT = "does not support"
NOT_JUDGED = "not judged"
#: Largest relative own-field cost that claim 6 ("costs that field little") accepts: 10%,
#: the paper's best case (5.7%) with room for noise.
MAX_OWN_FIELD_COST = 0.10


@dataclass(frozen=True)
class Verdict:
    verdict: str   # SUPPORTS, PARTLY, DOES_NOT_SUPPORT or NOT_JUDGED
    reason: str

    def __str__(self) -> str:
        return f"{self.verdict}: {self.reason}"


def _is_nan(*values: float | None) -> bool:
    return any(value is None or (isinstance(value, float) and math.isnan(value))
               for value in values)


# --------------------------------------------------------------------------------------------
# Gates
# --------------------------------------------------------------------------------------------


def routing_health_passed(stage_00_verdict: Mapping[str, object]) -> bool:
    """Stage 00's own routing-health verdict (its ``verdict.json``), read, not redefined.

    Examples
    --------
    >>> routing_health_passed({"healthy": True, "text": "..."})
    True
    """
    if "healthy" not in stage_00_verdict:
        raise ValueError("stage 00's verdict.json has no 'healthy' entry (written by an older "
                         "version); re-run 00_model")
    return bool(stage_00_verdict["healthy"])


def unless_routing_healthy(verdict: Verdict, healthy: bool) -> Verdict:
    """``verdict`` when routing is healthy, otherwise "not judged" with the same numbers.

    Examples
    --------
    >>> unless_routing_healthy(Verdict(SUPPORTS, "lift 3.1"), healthy=False).verdict
    'not judged'
    """
    if healthy:
        return verdict
    return Verdict(NOT_JUDGED, "stage 00's routing-health check failed, so no structure is "
                               f"read into this model's routing ({verdict.reason})")


def unless_masks_differ(verdict: Verdict, n_distinct: int, n_masks: int) -> Verdict:
    """Claim 6's ``verdict`` when its per-field masks differ, otherwise "not judged".

    If every field's calibration gave the same mask, "pruning with one field's data" is the
    same model for every field, and own and other fields' costs are equal by construction.

    Examples
    --------
    >>> unless_masks_differ(Verdict(PARTLY, "cost +1.6%"), n_distinct=1, n_masks=10).verdict
    'not judged'
    >>> unless_masks_differ(Verdict(PARTLY, "cost +1.6%"), n_distinct=7, n_masks=10).verdict
    'partly'
    """
    if n_distinct > 1 or n_masks < 2:
        return verdict
    return Verdict(NOT_JUDGED, f"all {n_masks} per-field masks are the same mask, so "
                               "calibrating on one field changed nothing and no field can "
                               f"lose less than the others ({verdict.reason})")


def accuracy_is_informative(unpruned: Interval, chance: float) -> bool:
    """Accuracy is read only when the unpruned model's interval lies above chance.

    Examples
    --------
    >>> accuracy_is_informative(Interval(0.31, 0.27, 0.35), chance=0.25)
    True
    >>> accuracy_is_informative(Interval(0.27, 0.23, 0.31), chance=0.25)
    False
    """
    return not _is_nan(unpruned.low) and unpruned.low > chance


#: How a reason names the corpus's items of each family (moecollab.data.sources.ITEM_FAMILIES).
ITEM_FAMILY_LABELS = {"mcq": "multiple-choice items",
                      "cloze": "field cloze items", "word": "word cloze items"}


def accuracy_evidence(local_items: pd.DataFrame, local_tasks: Sequence[str],
                      standard_items: pd.DataFrame | None,
                      models: Sequence[str], metric: str = "acc_norm",
                      family: str = "mcq") -> dict[str, object]:
    """Which accuracy claims 5a/5b are read on: the paper's standard tasks when every compared
    model was evaluated on them, the corpus multiple choice (read by ``metric``) otherwise.

    Returns
    -------
    dict
        ``items``, ``tasks``, ``metric`` (for :func:`moecollab.paired.resample_tasks`) and
        ``label`` (for the reason).

    Examples
    --------
    >>> local = pd.DataFrame({"mask": ["u", "c"], "task": ["mcq", "mcq"], "n_choices": [4, 4]})
    >>> standard = pd.DataFrame({"mask": ["u"], "task": ["arc"], "n_choices": [4]})
    >>> accuracy_evidence(local, ["mcq"], standard, ["u", "c"])["tasks"]
    ['mcq']
    >>> accuracy_evidence(local, ["moecollab_cloze_law_held_out"], None, ["u", "c"],
    ...                   family="cloze")["label"]
    "acc_norm, the corpus's field cloze items on held-out entries"
    >>> standard = pd.concat([standard, standard.assign(mask="c")])
    >>> accuracy_evidence(local, ["mcq"], standard, ["u", "c"])["tasks"]
    ['arc']
    """
    if standard_items is not None and len(standard_items) and \
            set(models) <= set(standard_items["mask"]):
        tasks = sorted(standard_items.loc[standard_items["n_choices"].notna(), "task"].unique())
        if tasks:
            return {"items": standard_items, "tasks": tasks, "metric": PAPER_ACCURACY,
                    "label": "accuracy (acc_norm, acc where a task has none), the paper's "
                             "standard tasks"}
    if family not in ITEM_FAMILY_LABELS:
        raise ValueError(f"family must be one of {', '.join(ITEM_FAMILY_LABELS)}; got "
                         f"{family!r}")
    return {"items": local_items, "tasks": list(local_tasks), "metric": metric,
            "label": f"{metric}, the corpus's {ITEM_FAMILY_LABELS[family]} on held-out entries"}


# --------------------------------------------------------------------------------------------
# Claims 1-4: structure
# --------------------------------------------------------------------------------------------


def coactivation_claim(strong_trained: float, strong_null: float,
                       strong_control: float | None) -> Verdict:
    """Claim 1: experts co-activate far from independently, with strong cross-layer pairs.

    Inputs are shares of cross-layer pairs with a lift above the threshold. Beyond the shuffled
    null *and* the untrained control supports the claim; beyond the null only is partial,
    because a random router already produces that structure. Without a control (None) the
    claim is at most partly supported.

    Examples
    --------
    >>> coactivation_claim(0.10, 0.01, 0.05).verdict
    'supports'
    >>> coactivation_claim(0.04, 0.01, 0.05).verdict
    'partly'
    >>> coactivation_claim(0.10, 0.01, None).verdict
    'partly'
    """
    control_text = ("no untrained control" if strong_control is None
                    else f"untrained control {100 * strong_control:.1f}%")
    numbers = (f"{100 * strong_trained:.1f}% of cross-layer pairs strong, null "
               f"{100 * strong_null:.1f}%, {control_text}")
    if _is_nan(strong_trained, strong_null) or (
            strong_control is not None and _is_nan(strong_control)):
        return Verdict(NOT_JUDGED, numbers)
    beyond_control = strong_control is not None and strong_trained > strong_control
    if strong_trained > strong_null and beyond_control:
        return Verdict(SUPPORTS, numbers)
    if strong_trained > strong_null:
        detail = ("; beyond the null, but nothing to compare with a random router"
                  if strong_control is None else "; the untrained model shows as much")
        return Verdict(PARTLY, numbers + detail)
    return Verdict(DOES_NOT_SUPPORT, numbers)


def domain_similarity_claim(stem_within: float, law_to_stem: float,
                            control_holds: bool | None) -> Verdict:
    """Claim 2: STEM fields use experts alike and law is far from them.

    ``control_holds`` says whether the untrained control shows the same ordering (None: no
    control, so the claim is at most partly supported).

    Examples
    --------
    >>> domain_similarity_claim(0.95, 0.90, control_holds=False).verdict
    'supports'
    >>> domain_similarity_claim(0.95, 0.90, control_holds=None).verdict
    'partly'
    """
    numbers = f"STEM within {stem_within:.3f}, law to STEM {law_to_stem:.3f}"
    if _is_nan(stem_within, law_to_stem):
        return Verdict(NOT_JUDGED, numbers)
    if stem_within > law_to_stem and control_holds is False:
        return Verdict(SUPPORTS, numbers)
    if stem_within > law_to_stem:
        return Verdict(PARTLY, numbers + ("; no untrained control to compare with"
                                          if control_holds is None else
                                          "; the untrained control shows the same ordering"))
    return Verdict(DOES_NOT_SUPPORT, numbers)


def coverage_claim(coverage_hsdl: float, coverage_random: float,
                   paper_value: float = 0.60) -> Verdict:
    """Claim 3: about 60% of atoms fall among the top 10% co-activated pairs.

    Supported when our coverage reaches the paper's value less ten points and clearly beats the
    random baseline; partly when it beats the random baseline only.

    Examples
    --------
    >>> coverage_claim(0.62, 0.20).verdict, coverage_claim(0.30, 0.20).verdict
    ('supports', 'partly')
    """
    numbers = (f"{100 * coverage_hsdl:.0f}% of atoms in the top 10% of pairs, random sets "
               f"{100 * coverage_random:.0f}%, paper about {100 * paper_value:.0f}%")
    if _is_nan(coverage_hsdl, coverage_random):
        return Verdict(NOT_JUDGED, numbers)
    if coverage_hsdl >= paper_value - 0.10 and coverage_hsdl > coverage_random + 0.10:
        return Verdict(SUPPORTS, numbers)
    if coverage_hsdl > coverage_random:
        return Verdict(PARTLY, numbers)
    return Verdict(DOES_NOT_SUPPORT, numbers)


def annotation_claim(purity: float, random_q95: float, n_recognisable: int, n_atoms: int, *,
                     control: Interval | None, n_field_led: int | None = None) -> Verdict:
    """Claim 4: atoms correspond to recognisable groups of tokens.

    Parameters
    ----------
    purity : float
        Field purity of the trained model's atoms.
    random_q95 : float
        95th percentile of the purity of shuffled atoms of the same sizes.
    n_recognisable, n_atoms : int
        Atoms whose automatic label leads with a strongly enriched field or a dominant token
        kind, and all atoms.
    control : Interval or None
        Trained minus untrained-twin purity, with its paired interval; None when the control
        was not captured or fitted.
    n_field_led : int, optional
        Of the recognisable atoms, those led by a field (shown in the reason).

    Notes
    -----
    **supports**: purity above the shuffled 95th percentile, above the untrained twin's (the
    paired interval of the difference lies above zero), and at least half of the atoms
    recognisable. **partly**: some of it (e.g. a random router already gives as much purity,
    or no control to compare with). **does not support**: purity not above shuffled atoms and
    no recognisable atom. **not judged**: purity is NaN or there are no atoms.

    Examples
    --------
    >>> beyond = Interval(0.10, 0.05, 0.15)
    >>> annotation_claim(0.5, 0.3, 10, 16, control=beyond).verdict
    'supports'
    >>> annotation_claim(0.5, 0.3, 10, 16, control=Interval(0.01, -0.02, 0.04)).verdict
    'partly'
    >>> annotation_claim(0.5, 0.3, 10, 16, control=None).verdict
    'partly'
    """
    if n_field_led is None:
        recognised = f"{n_recognisable} of {n_atoms} atoms recognisable"
    else:
        recognised = (f"{n_recognisable} of {n_atoms} atoms recognisable ({n_field_led} by "
                      f"field, {n_recognisable - n_field_led} by token kind)")
    numbers = f"purity {purity:.3f} vs {random_q95:.3f} for shuffled atoms (95th percentile)"
    if control is None:
        numbers += "; no untrained control to compare with"
    else:
        numbers += (f"; trained minus untrained twin {control.text()}"
                    f" ({100 * control.confidence:.0f}% paired interval)")
    numbers += f"; {recognised}"
    if _is_nan(purity, random_q95) or n_atoms <= 0:
        return Verdict(NOT_JUDGED, numbers)
    beyond_shuffle = purity > random_q95
    beyond_control = control is not None and not _is_nan(control.low) and control.low > 0
    recognisable = n_recognisable >= n_atoms / 2
    if beyond_shuffle and beyond_control and recognisable:
        return Verdict(SUPPORTS, numbers)
    if beyond_shuffle or n_recognisable > 0:
        return Verdict(PARTLY, numbers)
    return Verdict(DOES_NOT_SUPPORT, numbers)


# --------------------------------------------------------------------------------------------
# Claim 5: CAEP against each baseline
# --------------------------------------------------------------------------------------------


def comparison_outcome(difference: Interval, higher_is_better: bool = True) -> str:
    """``better``, ``worse``, ``tied`` (the interval straddles zero) or ``unknown`` (NaN).

    Examples
    --------
    >>> comparison_outcome(Interval(0.02, 0.01, 0.03))
    'better'
    >>> comparison_outcome(Interval(0.02, -0.01, 0.05))
    'tied'
    >>> comparison_outcome(Interval(-2.0, -3.0, -1.0), higher_is_better=False)
    'better'
    """
    if _is_nan(difference.low, difference.high):
        return "unknown"
    if difference.low > 0:
        return "better" if higher_is_better else "worse"
    if difference.high < 0:
        return "worse" if higher_is_better else "better"
    return "tied"


def pruning_claim(caep_value: float, comparisons: Sequence[Comparison], ratio: float, *,
                  metric: str, higher_is_better: bool = True,
                  not_judged_reason: str = "") -> Verdict:
    """Claim 5: CAEP beats the baselines at a pruning ratio, judged against each one.

    Parameters
    ----------
    caep_value : float
        CAEP's score (group mean over tasks).
    comparisons : sequence of Comparison
        One per baseline (the random masks' mean counts as one baseline).
    ratio : float
    metric : str
        What was compared, for the reason (e.g. "acc_norm, corpus multiple choice").
    higher_is_better : bool, default True
    not_judged_reason : str, optional
        When set (e.g. the unpruned model is at chance), the verdict is "not judged".

    Notes
    -----
    **supports**: CAEP is better than *every* baseline (each paired interval excludes zero on
    the good side). **does not support**: worse than at least one baseline, or better than
    none. **partly**: better than some, tied with the rest, worse than none. **not judged**:
    no comparison has an interval, or ``not_judged_reason`` is given. The best baseline (the
    highest score, or lowest perplexity) is named for comparison with the paper's column, but
    does not decide the verdict.

    Examples
    --------
    >>> better, tied = Interval(0.05, 0.02, 0.08), Interval(0.01, -0.02, 0.04)
    >>> pruning_claim(0.40, [Comparison("reap", 0.35, better)], 0.25, metric="acc").verdict
    'supports'
    >>> pruning_claim(0.40, [Comparison("reap", 0.35, better), Comparison("seer", 0.39, tied)],
    ...               0.25, metric="acc").verdict
    'partly'
    """
    outcomes = [comparison_outcome(c.difference, higher_is_better) for c in comparisons]
    digits = _digits(caep_value, *(c.baseline_value for c in comparisons))
    parts = [f"{c.baseline} {c.baseline_value:.{digits}f}, {c.difference.text(digits=digits)} "
             f"{outcome}" for c, outcome in zip(comparisons, outcomes, strict=True)]
    known = [c for c, outcome in zip(comparisons, outcomes, strict=True) if outcome != "unknown"]
    counts = {name: outcomes.count(name) for name in ("better", "tied", "worse")}
    confidence = comparisons[0].difference.confidence if comparisons else 0.95
    summary = (f"at {100 * ratio:.0f}% pruned, on {metric}, CAEP ({caep_value:.{digits}f}) beats "
               f"{counts['better']} of {len(comparisons)} baselines beyond noise, ties "
               f"{counts['tied']} and loses to {counts['worse']}")
    details = (f"CAEP minus each baseline, {100 * confidence:.0f}% paired interval: "
               + "; ".join(parts))
    if known:
        pick = max if higher_is_better else min
        details += f"; best baseline {pick(known, key=lambda c: c.baseline_value).baseline}"
    numbers = f"{summary} ({details})"
    if not_judged_reason:
        return Verdict(NOT_JUDGED, f"{not_judged_reason}; {numbers}")
    if not known:
        return Verdict(NOT_JUDGED, numbers + "; no paired interval")
    if counts["worse"]:
        return Verdict(DOES_NOT_SUPPORT, numbers)
    if counts["better"] == len(comparisons):
        return Verdict(SUPPORTS, numbers)
    if counts["better"]:
        return Verdict(PARTLY, numbers)
    return Verdict(DOES_NOT_SUPPORT, numbers)


def judge_pruning(items: pd.DataFrame, caep: str, baselines: Mapping[str, str | Sequence[str]],
                  ratio: float, *, metric: str, tasks: Sequence[str], label: str,
                  higher_is_better: bool = True, chance: float | None = None,
                  n_resamples: int = 2000, random_state: int = 0,
                  confidence: float = 0.95) -> Verdict:
    """Claim 5 at one ratio, from the per-item scores: CAEP's mask against each baseline's
    (:func:`moecollab.paired.compare_with_baselines`, paired over the same items), judged by
    :func:`pruning_claim`. With ``chance`` given, an unpruned model whose interval does not lie
    above it leaves the claim not judged: a comparison of scores at chance says nothing."""
    found = compare_with_baselines(items, caep, baselines, metric, tasks=tasks,
                                   n_resamples=n_resamples, random_state=random_state,
                                   confidence=confidence)
    unpruned = found["reference"]
    at_chance = chance is not None and not accuracy_is_informative(unpruned, chance)
    return pruning_claim(
        found["value"], found["comparisons"], ratio, metric=label,
        higher_is_better=higher_is_better, not_judged_reason=(
            f"the unpruned model's {label} {unpruned.text(signed=False)} does not exceed "
            f"chance ({chance:.3f}) beyond noise" if at_chance else ""))


def _digits(*values: float) -> int:
    """Decimals that show a score: 3 for accuracies, fewer for large perplexities."""
    largest = max((abs(v) for v in values if not _is_nan(v)), default=0.0)
    return 3 if largest < 10 else 2 if largest < 1000 else 0


# --------------------------------------------------------------------------------------------
# Claim 6: pruning with one field's data
# --------------------------------------------------------------------------------------------


def domain_pruning_claim(own: Interval, others: Interval, difference: Interval, *,
                         metric: str, max_own_cost: float = MAX_OWN_FIELD_COST) -> Verdict:
    """Claim 6: pruning with one field's data costs that field little, and the others more.

    Parameters
    ----------
    own, others : Interval
        Mean relative cost (positive = worse than unpruned: a drop in accuracy or a rise in
        perplexity) on the calibration field, and on the other fields.
    difference : Interval
        ``others - own`` with its paired interval (positive = the own field suffers less).
    metric : str
        What the costs are measured on, for the reason.
    max_own_cost : float, default :data:`MAX_OWN_FIELD_COST`
        The largest own-field cost that counts as "little".

    Notes
    -----
    **does not support**: the own-field cost exceeds ``max_own_cost`` (a large cost is not
    "little", however much larger the others' is), or the own field suffers significantly
    *more* than the others. **supports**: the own-field cost is at most ``max_own_cost`` and
    significantly below the others'. **partly**: small, but not distinguishable from the
    others' cost. **not judged**: a cost is NaN.

    Examples
    --------
    >>> small, gap = Interval(0.05, 0.03, 0.07), Interval(0.07, 0.04, 0.10)
    >>> domain_pruning_claim(small, Interval(0.12, 0.1, 0.14), gap, metric="acc").verdict
    'supports'
    >>> huge = Interval(3.95, 3.5, 4.4)
    >>> domain_pruning_claim(huge, Interval(4.47, 4.0, 5.0), Interval(0.52, 0.2, 0.8),
    ...                      metric="word perplexity").verdict
    'does not support'
    """
    numbers = (f"{metric}: relative cost {own.text(100, 1, '%')} on the calibration field, "
               f"{others.text(100, 1, '%')} on the others (difference "
               f"{difference.text(100, 1, '%')}, {100 * difference.confidence:.0f}% paired "
               f"interval); at most {100 * max_own_cost:.0f}% counts as little")
    if _is_nan(own.estimate, others.estimate, difference.estimate):
        return Verdict(NOT_JUDGED, numbers)
    own_less = not _is_nan(difference.low) and difference.low > 0
    own_more = not _is_nan(difference.high) and difference.high < 0
    if own.estimate > max_own_cost:
        detail = ("the calibration field does suffer less than the others" if own_less
                  else "and it does not suffer less than the others")
        return Verdict(DOES_NOT_SUPPORT, numbers + f"; the own-field cost is not little ({detail})")
    if own_more:
        return Verdict(DOES_NOT_SUPPORT, numbers + "; the calibration field suffers more")
    if own_less:
        return Verdict(SUPPORTS, numbers)
    return Verdict(PARTLY, numbers + "; small, but not distinguishable from the others' cost")
