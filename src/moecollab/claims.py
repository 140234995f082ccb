"""The paper's claims, each judged from this study's numbers: supports, partly, or does not.

Every rule is written out here so a reader can check it, and each returns the verdict with a
one-line reason built from the numbers. The book's "paper vs ours" page quotes these.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Verdict:
    verdict: str   # "supports", "partly" or "does not support"
    reason: str

    def __str__(self) -> str:
        return f"{self.verdict}: {self.reason}"


def coactivation_claim(strong_trained: float, strong_null: float,
                       strong_control: float) -> Verdict:
    """Claim 1: experts co-activate far from independently, with strong cross-layer pairs.

    Inputs are shares of cross-layer pairs with a lift above the threshold. Beyond the shuffled
    null *and* the untrained control supports the claim; beyond the null only is partial,
    because a random router already produces that structure.

    Examples
    --------
    >>> coactivation_claim(0.10, 0.01, 0.05).verdict
    'supports'
    >>> coactivation_claim(0.04, 0.01, 0.05).verdict
    'partly'
    """
    numbers = (f"{100 * strong_trained:.1f}% of cross-layer pairs strong, null "
               f"{100 * strong_null:.1f}%, untrained control {100 * strong_control:.1f}%")
    if strong_trained > strong_null and strong_trained > strong_control:
        return Verdict("supports", numbers)
    if strong_trained > strong_null:
        return Verdict("partly", numbers + "; the untrained model shows as much")
    return Verdict("does not support", numbers)


def domain_similarity_claim(stem_within: float, law_to_stem: float,
                            control_holds: bool) -> Verdict:
    """Claim 2: STEM fields use experts alike and law is far from them.

    Examples
    --------
    >>> domain_similarity_claim(0.95, 0.90, control_holds=False).verdict
    'supports'
    """
    numbers = f"STEM within {stem_within:.3f}, law to STEM {law_to_stem:.3f}"
    if stem_within > law_to_stem and not control_holds:
        return Verdict("supports", numbers)
    if stem_within > law_to_stem:
        return Verdict("partly", numbers + "; the untrained control shows the same ordering")
    return Verdict("does not support", numbers)


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
    if coverage_hsdl >= paper_value - 0.10 and coverage_hsdl > coverage_random + 0.10:
        return Verdict("supports", numbers)
    if coverage_hsdl > coverage_random:
        return Verdict("partly", numbers)
    return Verdict("does not support", numbers)


def annotation_claim(purity: float, random_q95: float, n_labelled: int,
                     n_atoms: int) -> Verdict:
    """Claim 4: atoms correspond to recognisable groups of tokens.

    Examples
    --------
    >>> annotation_claim(0.5, 0.3, 10, 16).verdict
    'supports'
    """
    numbers = (f"purity {purity:.3f} vs {random_q95:.3f} (95th percentile of random atoms); "
               f"{n_labelled} of {n_atoms} atoms have a significantly enriched field")
    if purity > random_q95 and n_labelled >= n_atoms / 2:
        return Verdict("supports", numbers)
    if purity > random_q95 or n_labelled > 0:
        return Verdict("partly", numbers)
    return Verdict("does not support", numbers)


def pruning_claim(caep: float, best_baseline: float, best_name: str, ratio: float,
                  higher_is_better: bool = True, tolerance: float = 0.0) -> Verdict:
    """Claim 5: CAEP beats the baselines at a pruning ratio.

    ``tolerance`` is the difference below which the two count as tied (e.g. a standard error).

    Examples
    --------
    >>> pruning_claim(0.40, 0.35, "reap", 0.25).verdict
    'supports'
    >>> pruning_claim(0.35, 0.40, "reap", 0.25).verdict
    'does not support'
    """
    gap = (caep - best_baseline) if higher_is_better else (best_baseline - caep)
    numbers = (f"at {100 * ratio:.0f}% pruned, CAEP {caep:.3f} vs best baseline "
               f"({best_name}) {best_baseline:.3f}")
    if gap > tolerance:
        return Verdict("supports", numbers)
    if gap >= -tolerance:
        return Verdict("partly", numbers + " (within noise)")
    return Verdict("does not support", numbers)


def domain_pruning_claim(own_drop: float, other_drop: float, margin: float = 0.1) -> Verdict:
    """Claim 6: pruning with one field's data costs that field less than the others.

    Inputs are mean relative drops (positive = worse) on the calibration field and on the other
    fields. A difference smaller than ``margin`` times the other fields' drop counts as a tie.

    Examples
    --------
    >>> domain_pruning_claim(0.05, 0.12).verdict
    'supports'
    >>> domain_pruning_claim(0.115, 0.12).verdict
    'partly'
    """
    numbers = (f"mean relative drop {100 * own_drop:.1f}% on the calibration field, "
               f"{100 * other_drop:.1f}% on the others")
    tie = margin * abs(other_drop)
    if own_drop < other_drop - tie:
        return Verdict("supports", numbers)
    if own_drop <= other_drop + tie:
        return Verdict("partly", numbers + " (within noise)")
    return Verdict("does not support", numbers)
