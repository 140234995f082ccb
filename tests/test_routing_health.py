"""Routing-health statistics on hand-sized cases."""

import numpy as np
import pytest

from moecollab import routing_health


def test_expert_share_is_relative_to_uniform():
    ids = np.array([[[0, 1]], [[0, 1]], [[0, 2]], [[0, 3]]])  # 4 tokens, 1 layer, top-2
    share = routing_health.expert_share(ids, n_experts=4)
    # expert 0 has 4 of 8 selections = 0.5, uniform is 0.25 → share 2.0
    assert share.tolist() == [[2.0, 1.0, 0.5, 0.5]]


def test_domain_usage_rows_sum_to_one_per_layer():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 4, size=(30, 3, 2))
    domains = ["a"] * 10 + ["b"] * 20
    usage = routing_health.domain_usage(ids, domains, 4, ["a", "b"])
    assert usage.shape == (2, 12)
    np.testing.assert_allclose(usage.reshape(2, 3, 4).sum(axis=2), 1.0)


def test_mutual_information_is_zero_when_experts_ignore_the_domain():
    ids = np.array([[[0]], [[1]], [[0]], [[1]]])
    assert routing_health.expert_domain_mutual_information(ids, ["a", "a", "b", "b"], 2) \
        == pytest.approx([0.0])


def test_verdict_names_starved_experts_and_a_missing_specialisation():
    trained = {"n_starved_experts": 3, "min_expert_share": 0.1, "domain_cosine_mean": 0.95,
               "mutual_information_bits": [0.1, 0.1]}
    control = {"n_starved_experts": 0, "min_expert_share": 0.5, "domain_cosine_mean": 0.9,
               "mutual_information_bits": [0.1, 0.05]}
    verdict = routing_health.verdict(trained, control)
    assert not verdict["no_starved_experts"]
    assert not verdict["more_domain_specific_than_control"]
    assert verdict["layers_with_mutual_information_above_control"] == [1]
    assert "3 experts are starved" in verdict["text"]
    assert "not lower" in verdict["text"]


def _summary(information, starved=0, cosine=0.5):
    return {"n_starved_experts": starved, "min_expert_share": 0.6, "domain_cosine_mean": cosine,
            "mutual_information_bits": information}


def test_one_field_specific_layer_does_not_make_routing_healthy():
    control = _summary([0.1, 0.1, 0.1], cosine=0.9)
    one_layer = routing_health.verdict(_summary([0.3, 0.12, 0.1]), control)
    assert one_layer["layers_with_mutual_information_above_control"] == [0]
    assert not one_layer["mutual_information_above_control_in_every_layer"]
    assert not one_layer["healthy"]
    assert one_layer["text"].splitlines()[-1].startswith("**Verdict:** not healthy")
    every_layer = routing_health.verdict(_summary([0.3, 0.16, 0.17]), control)
    assert every_layer["healthy"]
    assert "**Verdict:** healthy" in every_layer["text"]
    starved = routing_health.verdict(_summary([0.3, 0.16, 0.17], starved=1), control)
    assert not starved["healthy"]
