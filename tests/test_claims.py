"""Tests of moecollab.claims: every verdict rule at its boundaries."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from moecollab import claims
from moecollab.claims import DOES_NOT_SUPPORT, NOT_JUDGED, PARTLY, SUPPORTS, Comparison
from moecollab.paired import Interval

NAN = math.nan
BETTER = Interval(0.05, 0.02, 0.08)
TIED = Interval(0.01, -0.02, 0.04)
WORSE = Interval(-0.05, -0.08, -0.02)
UNKNOWN = Interval(0.0, NAN, NAN)


# ---- gates ------------------------------------------------------------------------------------


def test_routing_health_gate_reads_stage_00s_verdict():
    assert claims.routing_health_passed({"healthy": True}) is True
    assert claims.routing_health_passed({"healthy": False}) is False
    with pytest.raises(ValueError, match="re-run 00_model"):
        claims.routing_health_passed({"no_starved_experts": True})
    kept = claims.Verdict(SUPPORTS, "lift 3.1")
    assert claims.unless_routing_healthy(kept, True) is kept
    gated = claims.unless_routing_healthy(kept, False)
    assert gated.verdict == NOT_JUDGED and "lift 3.1" in gated.reason
    assert "routing-health" in gated.reason


def test_accuracy_is_read_only_above_chance():
    assert claims.accuracy_is_informative(Interval(0.4, 0.30, 0.5), chance=0.25)
    assert not claims.accuracy_is_informative(Interval(0.3, 0.25, 0.35), chance=0.25)  # tie
    assert not claims.accuracy_is_informative(Interval(0.3, 0.2, 0.4), chance=0.25)
    assert not claims.accuracy_is_informative(UNKNOWN, chance=0.25)


# ---- claims 1-3 -------------------------------------------------------------------------------


def test_coactivation_claim_boundaries():
    assert claims.coactivation_claim(0.10, 0.01, 0.05).verdict == SUPPORTS
    assert claims.coactivation_claim(0.05, 0.01, 0.05).verdict == PARTLY  # tie with control
    assert claims.coactivation_claim(0.01, 0.01, 0.0).verdict == DOES_NOT_SUPPORT  # tie, null
    missing = claims.coactivation_claim(0.10, 0.01, None)
    assert missing.verdict == PARTLY and "no untrained control" in missing.reason
    assert claims.coactivation_claim(NAN, 0.01, 0.05).verdict == NOT_JUDGED


def test_domain_similarity_claim_boundaries():
    assert claims.domain_similarity_claim(0.95, 0.90, False).verdict == SUPPORTS
    assert claims.domain_similarity_claim(0.95, 0.90, True).verdict == PARTLY
    assert claims.domain_similarity_claim(0.95, 0.90, None).verdict == PARTLY
    assert claims.domain_similarity_claim(0.90, 0.90, False).verdict == DOES_NOT_SUPPORT
    assert claims.domain_similarity_claim(NAN, 0.90, False).verdict == NOT_JUDGED


def test_coverage_claim_boundaries():
    assert claims.coverage_claim(0.50, 0.39).verdict == SUPPORTS      # paper - 10 points
    assert claims.coverage_claim(0.50, 0.40).verdict == PARTLY        # gap of exactly 10
    assert claims.coverage_claim(0.20, 0.20).verdict == DOES_NOT_SUPPORT
    assert claims.coverage_claim(NAN, 0.20).verdict == NOT_JUDGED


# ---- claim 4 ----------------------------------------------------------------------------------


def test_annotation_claim_needs_the_untrained_twin():
    beyond = Interval(0.10, 0.05, 0.15)
    assert claims.annotation_claim(0.5, 0.3, 8, 16, control=beyond).verdict == SUPPORTS
    # At most partly when a random router gives as much purity, or there is no control.
    assert claims.annotation_claim(0.5, 0.3, 8, 16, control=TIED).verdict == PARTLY
    no_control = claims.annotation_claim(0.5, 0.3, 8, 16, control=None)
    assert no_control.verdict == PARTLY and "no untrained control" in no_control.reason
    assert claims.annotation_claim(0.5, 0.3, 8, 16, control=UNKNOWN).verdict == PARTLY
    # Half the atoms recognisable is enough; fewer is not.
    assert claims.annotation_claim(0.5, 0.3, 7, 16, control=beyond).verdict == PARTLY
    # Purity tied with shuffled atoms and nothing recognisable.
    assert claims.annotation_claim(0.3, 0.3, 0, 16, control=beyond).verdict == DOES_NOT_SUPPORT
    assert claims.annotation_claim(NAN, 0.3, 0, 16, control=None).verdict == NOT_JUDGED
    assert claims.annotation_claim(0.5, 0.3, 0, 0, control=None).verdict == NOT_JUDGED
    reason = claims.annotation_claim(0.5, 0.3, 8, 16, control=beyond, n_field_led=3).reason
    assert "3 by field, 5 by token kind" in reason and "+0.100 [+0.050, +0.150]" in reason


# ---- claim 5 ----------------------------------------------------------------------------------


def _claim5(*differences, higher_is_better=True, **kwargs):
    comparisons = [Comparison(f"b{index}", 0.3, difference)
                   for index, difference in enumerate(differences)]
    return claims.pruning_claim(0.35, comparisons, 0.25, metric="acc_norm",
                                higher_is_better=higher_is_better, **kwargs)


def test_claim_5_needs_every_baseline_beaten():
    assert _claim5(BETTER, BETTER).verdict == SUPPORTS
    assert _claim5(BETTER, TIED).verdict == PARTLY
    assert _claim5(TIED, TIED).verdict == DOES_NOT_SUPPORT           # straddles zero: no win
    assert _claim5(BETTER, BETTER, WORSE).verdict == DOES_NOT_SUPPORT  # one loss is enough
    assert "beats 2 of 3 baselines beyond noise, ties 0 and loses to 1" in _claim5(
        BETTER, BETTER, WORSE).reason
    assert "b2 0.300, -0.050 [-0.080, -0.020] worse" in _claim5(BETTER, BETTER, WORSE).reason
    assert _claim5(BETTER, UNKNOWN).verdict == PARTLY
    assert _claim5(UNKNOWN).verdict == NOT_JUDGED
    assert _claim5().verdict == NOT_JUDGED
    # An interval that touches zero is a tie, not a win.
    assert _claim5(Interval(0.03, 0.0, 0.06)).verdict == DOES_NOT_SUPPORT


def test_claim_5_on_perplexity_reads_lower_as_better():
    lower = Interval(-2.0, -3.0, -1.0)  # CAEP minus baseline: CAEP's perplexity is lower
    assert _claim5(lower, higher_is_better=False).verdict == SUPPORTS
    assert _claim5(BETTER, higher_is_better=False).verdict == DOES_NOT_SUPPORT


def test_claim_5_reports_intervals_best_baseline_and_chance():
    comparisons = [Comparison("random", 0.26, BETTER), Comparison("reap", 0.33, TIED)]
    verdict = claims.pruning_claim(0.35, comparisons, 0.25, metric="acc_norm")
    assert verdict.reason.startswith("at 25% pruned, on acc_norm, CAEP (0.350) beats 1 of 2 "
                                     "baselines beyond noise, ties 1 and loses to 0")
    assert "reap 0.330, +0.010 [-0.020, +0.040] tied" in verdict.reason
    assert "best baseline reap" in verdict.reason and "95% paired interval" in verdict.reason
    at_chance = claims.pruning_claim(0.35, comparisons, 0.25, metric="acc_norm",
                                     not_judged_reason="the unpruned model is at chance")
    assert at_chance.verdict == NOT_JUDGED and at_chance.reason.startswith("the unpruned")
    # Large perplexities are shown without spurious decimals.
    ppl = claims.pruning_claim(20427806.9, [Comparison("reap", 20446403.7,
                                                       Interval(-18596.7, -3.5e6, 3.3e5))],
                               0.25, metric="word perplexity", higher_is_better=False)
    assert "CAEP (20427807)" in ppl.reason and "-18597 [-3500000, +330000] tied" in ppl.reason


# ---- claim 6 ----------------------------------------------------------------------------------


def test_claim_6_weighs_the_size_of_the_own_field_cost():
    gap = Interval(0.07, 0.04, 0.10)
    small = Interval(0.05, 0.03, 0.07)
    assert claims.domain_pruning_claim(small, Interval(0.12, 0.1, 0.14), gap,
                                       metric="acc").verdict == SUPPORTS
    # The default run's numbers: +395% on the own field, +447% elsewhere. Never "little".
    huge = claims.domain_pruning_claim(Interval(3.95, 3.5, 4.4), Interval(4.47, 4.0, 5.0),
                                       Interval(0.52, 0.2, 0.8), metric="word perplexity")
    assert huge.verdict == DOES_NOT_SUPPORT
    assert "+395.0%" in huge.reason and "not little" in huge.reason
    assert "does suffer less" in huge.reason
    # Boundary: exactly the largest cost that counts as little.
    edge = Interval(claims.MAX_OWN_FIELD_COST, 0.08, 0.12)
    assert claims.domain_pruning_claim(edge, Interval(0.2, 0.18, 0.22), gap,
                                       metric="acc").verdict == SUPPORTS
    above = Interval(claims.MAX_OWN_FIELD_COST + 1e-9, 0.08, 0.12)
    assert claims.domain_pruning_claim(above, Interval(0.2, 0.18, 0.22), gap,
                                       metric="acc").verdict == DOES_NOT_SUPPORT


def test_claim_6_ties_and_reversals():
    small = Interval(0.05, 0.03, 0.07)
    assert claims.domain_pruning_claim(small, Interval(0.06, 0.04, 0.08), TIED,
                                       metric="acc").verdict == PARTLY
    assert claims.domain_pruning_claim(small, Interval(0.01, 0.0, 0.02), WORSE,
                                       metric="acc").verdict == DOES_NOT_SUPPORT
    improved = Interval(-0.02, -0.04, 0.0)  # pruning helped its own field
    assert claims.domain_pruning_claim(improved, Interval(0.1, 0.08, 0.12), BETTER,
                                       metric="acc").verdict == SUPPORTS
    assert claims.domain_pruning_claim(Interval(NAN, NAN, NAN), small, TIED,
                                       metric="acc").verdict == NOT_JUDGED


def test_accuracy_evidence_names_the_judged_item_family():
    """The reason names the family it was read on (passed in, not parsed from task names)."""
    from moecollab.data.sources import ITEM_FAMILIES

    local = pd.DataFrame({"mask": ["u", "c"], "task": ["t", "t"], "n_choices": [4, 4]})
    assert set(claims.ITEM_FAMILY_LABELS) == set(ITEM_FAMILIES)
    label = claims.accuracy_evidence(local, ["moecollab_word_law_held_out"], None, ["u", "c"],
                                     metric="acc", family="word")["label"]
    assert label == "acc, the corpus's word cloze items on held-out entries"
    with pytest.raises(ValueError, match="family must be one of mcq, cloze, word"):
        claims.accuracy_evidence(local, ["t"], None, ["u", "c"], family="gap")


def test_claim_5_from_items_is_not_judged_when_the_unpruned_model_is_at_chance():
    import numpy as np

    rng = np.random.default_rng(0)

    def items(p_unpruned):
        rows = []
        for mask, p in (("unpruned", p_unpruned), ("caep", 0.6), ("reap", 0.3)):
            rows += [{"mask": mask, "task": "t", "doc_id": doc,
                      "acc": float(rng.random() < p)} for doc in range(400)]
        return pd.DataFrame(rows)

    def judged(table, chance):
        return claims.judge_pruning(table, "caep", {"reap": "reap"}, 0.25, metric="acc",
                                    tasks=["t"], label="acc", chance=chance, n_resamples=300)

    above = judged(items(0.7), chance=0.25)
    assert above.verdict == SUPPORTS and "beats 1 of 1 baselines" in above.reason
    at_chance = judged(items(0.25), chance=0.25)
    assert at_chance.verdict == NOT_JUDGED
    assert at_chance.reason.startswith("the unpruned model's acc ")
    assert "does not exceed chance (0.250) beyond noise" in at_chance.reason
    assert judged(items(0.25), chance=None).verdict == SUPPORTS  # no chance given: judged
