"""Tests of moecollab.pruning: CAEP, score baselines, applying masks, pruned checkpoints."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tiny_models import FAMILIES, N_EXPERTS, N_LAYERS, TOP_K, padded_batch, tiny_model
from transformers import AutoModelForCausalLM

from moecollab import models
from moecollab.capture import capture_routing
from moecollab.moe_arch import find_moe_layers
from moecollab.pruning import (
    apply_keep_mask,
    caep_from_hsdl,
    caep_keep_mask,
    count_parameters_pruned,
    expert_forward,
    expert_scores,
    fit_calibration_dictionary,
    keep_mask_from_scores,
    load_pruned,
    n_kept,
    n_kept_in_all,
    random_keep_mask,
    reapply_masks,
    save_pruned,
    scores_from_trace,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    return padded_batch(n_sequences=2, seq_len=12, n_pads=5, seed=0)


def logits(model, batch) -> torch.Tensor:
    with torch.inference_mode():
        return model(**batch).logits


def n_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


# A non-uniform keep-mask for the tiny models (3 MoE layers x 8 experts, top-2): the layers keep
# 6, 4 and 6 experts, and every DeepSeek-V3 group (n_group=2: experts 0-3, 4-7) keeps the same
# count, so masking and removal route identically there too.
NON_UNIFORM = np.ones((N_LAYERS, N_EXPERTS), dtype=bool)
NON_UNIFORM[0, [1, 5]] = False
NON_UNIFORM[1, [0, 2, 4, 7]] = False
NON_UNIFORM[2, [3, 6]] = False
UNIFORM = np.ones((N_LAYERS, N_EXPERTS), dtype=bool)
UNIFORM[:, [1, 6]] = False


# --------------------------------------------------------------------------------------------
# CAEP, worked on paper
# --------------------------------------------------------------------------------------------

# Six experts, three patterns (D is N_e x N_p, R is N_p x N_s, the paper's orientation).
D6 = np.array(
    [
        [1, 0, 0],  # expert 0: pattern 0
        [1, 1, 0],  # expert 1: patterns 0, 1
        [0, 1, 0],  # expert 2: pattern 1
        [0, 1, 1],  # expert 3: patterns 1, 2
        [0, 0, 1],  # expert 4: pattern 2
        [0, 0, 0],  # expert 5: nothing
    ],
    dtype=float,
)
R6 = np.array([[2, 2], [1, 0], [1, 1]], dtype=float)  # r = R 1 = (4, 1, 2)


def test_caep_deletion_loop_runs_twice():
    # e = D r = (4, 5, 1, 3, 2, 0). k1 = 5/6: f = 5th largest = 1, m = e >= 1 keeps 0-4 (5).
    # k2 = 0.5: budget floor(3) = 3.
    # Pass 1: delete pattern 1 (r=1, least used): e = (4, 4, 0, 2, 2, 0), m keeps 0,1,3,4 (4 > 3).
    # Pass 2: delete pattern 2 (r=2): e = (4, 4, 0, 0, 0, 0), m keeps 0,1 (2 <= 3): stop.
    # The second deletion overshoots below the budget, as Algorithm 1 is written.
    keep = caep_keep_mask(D6, R6, threshold_ratio=5 / 6, prune_ratio=0.5)
    assert keep.tolist() == [True, True, False, False, False, False]


def test_caep_loop_idle_when_threshold_within_budget(caplog):
    # k1 = 0.5: f = 3rd largest of (4, 5, 1, 3, 2, 0) = 3, m keeps 1, 0, 3 (3 experts).
    # k2 = 0.25: budget floor(4.5) = 4 >= 3, so the loop never acts (k1 <= 1 - k2) and CAEP
    # prunes more than asked (logged).
    with caplog.at_level("WARNING", logger="moecollab.pruning"):
        keep = caep_keep_mask(D6, R6, threshold_ratio=0.5, prune_ratio=0.25)
    assert keep.tolist() == [True, True, False, True, False, False]
    assert "cannot act" in caplog.text


def test_caep_one_deletion_within_budget():
    # k1 = 5/6 (f = 1, 5 kept), k2 = 1/3: budget 4. Deleting pattern 1 gives 0,1,3,4 kept: 4.
    keep = caep_keep_mask(D6, R6, threshold_ratio=5 / 6, prune_ratio=1 / 3)
    assert keep.tolist() == [True, True, False, True, True, False]


def test_caep_ties_at_threshold_are_kept():
    # e = (2, 2, 2, 1); k1 = 0.25: f = largest = 2, all three tied experts pass; budget 4.
    dictionary = np.array([[1.0], [1.0], [1.0], [0.5]])
    codes = np.array([[2.0]])
    keep = caep_keep_mask(dictionary, codes, threshold_ratio=0.25, prune_ratio=0.0)
    assert keep.tolist() == [True, True, True, False]


def test_caep_last_pattern_is_never_deleted():
    # e = (1, 0, 0, 3) from r = (1, 3). k1 = 1: f = 4th largest = 0, so all 4 pass; budget 2.
    # Delete pattern 0 (r=1): e = (0, 0, 0, 3), still 4 >= 0. One pattern left: keep the top 2
    # by that e: expert 3, then the lowest index among the zeros, expert 0.
    dictionary = np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 1.0]])
    codes = np.array([[1.0], [3.0]])
    keep = caep_keep_mask(dictionary, codes, threshold_ratio=1.0, prune_ratio=0.5)
    assert keep.tolist() == [True, False, False, True]


def test_caep_min_per_layer_restores_best_experts(caplog):
    # Two layers of three experts. e = D r with r = (1, 1): (3, 2, 1, 0, 0.5, 0).
    # k1 = 0.5: f = 3rd largest = 1, m keeps 0, 1, 2 (layer 1 empty); budget 3: no loop.
    # Deviation, min_per_layer=1: layer 1 gets back its best final-e expert, expert 4.
    dictionary = np.array([[3, 0], [2, 0], [1, 0], [0, 0], [0, 0.5], [0, 0]], dtype=float)
    codes = np.array([[1.0], [1.0]])
    plain = caep_keep_mask(dictionary, codes, threshold_ratio=0.5, prune_ratio=0.5)
    assert plain.tolist() == [True, True, True, False, False, False]
    with caplog.at_level("WARNING", logger="moecollab.pruning"):
        floored = caep_keep_mask(dictionary, codes, threshold_ratio=0.5, prune_ratio=0.5,
                                 n_experts_per_layer=3, min_per_layer=1)
    assert floored.tolist() == [True, True, True, False, True, False]
    assert "deviation" in caplog.text


def test_caep_from_hsdl_transposes():
    rng = np.random.default_rng(0)
    dictionary = rng.random((5, 2 * 6))  # HSDL orientation: (K, n_layers * n_experts)
    codes = rng.random((40, 5)) * (rng.random((40, 5)) < 0.4)  # (n_samples, K)
    fitted = SimpleNamespace(dictionaries_=[dictionary], transform=lambda X: [codes])
    keep = caep_from_hsdl(fitted, None, threshold_ratio=0.9, prune_ratio=0.5, n_experts=6,
                          min_per_layer=2)
    expected = caep_keep_mask(dictionary.T, codes.T, 0.9, 0.5, n_experts_per_layer=6,
                              min_per_layer=2)
    assert keep.shape == (2, 6)
    assert keep.reshape(-1).tolist() == expected.tolist()
    assert (keep.sum(axis=1) >= 2).all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"prune_ratio": 1.2}, "prune_ratio must be in"),
        ({"threshold_ratio": 0.0}, "threshold_ratio must be in"),
        ({"codes": np.ones((2, 3))}, "codes must have shape"),
        ({"codes": -np.ones((3, 2))}, "non-negative"),
        ({"min_per_layer": 1}, "needs n_experts_per_layer"),
    ],
)
def test_caep_rejects_bad_arguments(kwargs, match):
    arguments = {"dictionary": D6, "codes": R6, "threshold_ratio": 0.9, "prune_ratio": 0.5}
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=match):
        caep_keep_mask(**arguments)


# --------------------------------------------------------------------------------------------
# CAEP at the shared budget; the dictionary it prunes with
# --------------------------------------------------------------------------------------------


def _synthetic_fit(n_layers, n_experts, n_patterns, n_samples, seed):
    """A sparse non-negative dictionary (N_e x N_p) and codes (N_p x N_s), like an HSDL fit."""
    rng = np.random.default_rng(seed)
    n_total = n_layers * n_experts
    dictionary = rng.random((n_total, n_patterns)) * (rng.random((n_total, n_patterns)) < 0.2)
    codes = rng.exponential(size=(n_patterns, n_samples)) * (
        rng.random((n_patterns, n_samples)) < 0.3)
    return dictionary, codes


@pytest.mark.parametrize(("n_layers", "n_experts", "top_k"),
                         [(4, 16, 2), (2, 8, 2), (3, 10, 2), (6, 32, 4), (16, 64, 8)])
@pytest.mark.parametrize("prune_ratio", [0.25, 0.5, 0.75])
def test_caep_exact_keeps_the_shared_budget_on_synthetic_fits(n_layers, n_experts, top_k,
                                                              prune_ratio):
    budget = n_layers * n_kept(n_experts, prune_ratio)
    if n_kept(n_experts, prune_ratio) < top_k:
        pytest.skip("ratio leaves fewer than top_k experts per layer (refused at plan time)")
    off_budget = 0
    for seed in range(6):
        dictionary, codes = _synthetic_fit(n_layers, n_experts, 24, 50, seed)
        for k1 in (0.6, 0.9, 1.0):
            arguments = {"n_experts_per_layer": n_experts, "min_per_layer": top_k}
            exact = caep_keep_mask(dictionary, codes, k1, prune_ratio, budget="exact",
                                   **arguments)
            written = caep_keep_mask(dictionary, codes, k1, prune_ratio, **arguments)
            assert exact.sum() == budget, (seed, k1)
            assert (exact.reshape(n_layers, n_experts).sum(axis=1) >= top_k).all()
            off_budget += int(written.sum() != budget)
            # What Algorithm 1 kept stays kept when it is below the budget, and what it
            # dropped stays dropped when it is above.
            if written.sum() <= budget:
                assert exact[written].all()
            else:
                assert not exact[~written].any()
    if prune_ratio == 0.5 and (n_layers, n_experts) == (4, 16):
        assert off_budget > 0  # the as-written variant does miss the budget here


def test_caep_exact_trims_what_the_floor_restored():
    # Two layers of four experts, top-2 floor: Algorithm 1 keeps all of layer 0's experts and
    # none of layer 1's; the floor restores two in layer 1, so the as-written mask keeps 6
    # against a budget of 4, and the exact one trims layer 0's weakest experts.
    dictionary = np.array([[4.0], [3.0], [2.0], [1.0], [0.4], [0.3], [0.2], [0.1]])
    codes = np.ones((1, 3))
    arguments = {"n_experts_per_layer": 4, "min_per_layer": 2}
    written = caep_keep_mask(dictionary, codes, 0.5, 0.5, **arguments)
    assert written.astype(int).tolist() == [1, 1, 1, 1, 1, 1, 0, 0]
    exact = caep_keep_mask(dictionary, codes, 0.5, 0.5, budget="exact", **arguments)
    assert exact.astype(int).tolist() == [1, 1, 0, 0, 1, 1, 0, 0]
    with pytest.raises(ValueError, match="budget must be one of"):
        caep_keep_mask(dictionary, codes, 0.5, 0.5, budget="equal", **arguments)


def test_caep_from_hsdl_passes_the_budget():
    rng = np.random.default_rng(1)
    dictionary = rng.random((5, 12)) * (rng.random((5, 12)) < 0.4)
    codes = rng.random((30, 5))
    fitted = SimpleNamespace(dictionaries_=[dictionary], transform=lambda X: [codes])
    for budget in ("exact", "as_written"):
        keep = caep_from_hsdl(fitted, None, threshold_ratio=0.9, prune_ratio=0.5, n_experts=6,
                              min_per_layer=2, budget=budget)
        expected = caep_keep_mask(dictionary.T, codes.T, 0.9, 0.5, n_experts_per_layer=6,
                                  min_per_layer=2, budget=budget)
        assert (keep.ravel() == expected).all()
    assert caep_from_hsdl(fitted, None, threshold_ratio=0.9, prune_ratio=0.5, n_experts=6,
                          min_per_layer=2, budget="exact").sum() == 6


@pytest.mark.parametrize(("n_layers", "n_experts", "prune_ratio"),
                         [(3, 10, 0.25), (4, 16, 0.3), (2, 8, 0.75), (5, 6, 0.5)])
def test_global_and_per_layer_baselines_keep_the_same_count(n_layers, n_experts, prune_ratio):
    scores = np.random.default_rng(0).random((n_layers, n_experts))
    per_layer = keep_mask_from_scores(scores, prune_ratio, scope="per_layer", min_per_layer=1)
    global_keep = keep_mask_from_scores(scores, prune_ratio, scope="global", min_per_layer=1)
    assert global_keep.sum() == per_layer.sum() == n_kept_in_all(n_layers, n_experts,
                                                                  prune_ratio)
    # REAP as its authors run it: the same number in every layer.
    assert len(set(per_layer.sum(axis=1).tolist())) == 1


def test_the_pruning_dictionary_never_sees_evaluation_text():
    from moecollab.hsdl import HSDL
    from moecollab.synthetic import make_planted_hierarchy

    planted = make_planted_hierarchy(n_samples=300, random_state=0)
    template = HSDL(n_atoms=(4, 2), n_epochs=2, random_state=0)
    splits = np.array(["validation"] * 300, dtype=object)
    fitted = fit_calibration_dictionary(template, planted.X, splits,
                                        calibration_split="validation")
    assert fitted is not template and not hasattr(template, "dictionaries_")
    assert fitted.get_params() == template.get_params()
    assert fitted.dictionaries_[0].shape == (4, planted.X.shape[1])
    leaked = splits.copy()
    leaked[17] = "test"
    with pytest.raises(ValueError, match=r"\['test'\] is evaluation text"):
        fit_calibration_dictionary(template, planted.X, leaked, calibration_split="validation")
    other = splits.copy()
    other[3] = "train"
    with pytest.raises(ValueError, match="'validation' split only"):
        fit_calibration_dictionary(template, planted.X, other, calibration_split="validation")
    with pytest.raises(ValueError, match="must not be an evaluation split"):
        fit_calibration_dictionary(template, planted.X, np.array(["test"] * 300),
                                   calibration_split="test")
    with pytest.raises(ValueError, match="one entry per row"):
        fit_calibration_dictionary(template, planted.X, splits[:-1],
                                   calibration_split="validation")


# --------------------------------------------------------------------------------------------
# Masks from scores, random baseline
# --------------------------------------------------------------------------------------------


def test_n_kept_budget():
    assert (n_kept(64, 0.25), n_kept(6, 0.25), n_kept(10, 0.3), n_kept(8, 0.0)) == (48, 4, 7, 8)


def test_keep_mask_from_scores_global_and_per_layer():
    scores = np.array([[4.0, 3.0, 2.0, 1.0], [0.5, 0.4, 0.3, 0.2]])
    global_keep = keep_mask_from_scores(scores, 0.5, min_per_layer=1)
    assert global_keep.astype(int).tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    floored = keep_mask_from_scores(scores, 0.5, min_per_layer=2)  # 2 + 2 reserved, budget 4
    assert floored.astype(int).tolist() == [[1, 1, 0, 0], [1, 1, 0, 0]]
    per_layer = keep_mask_from_scores(scores, 0.25, scope="per_layer", min_per_layer=2)
    assert per_layer.astype(int).tolist() == [[1, 1, 1, 0], [1, 1, 1, 0]]


def test_keep_mask_from_scores_ties_are_deterministic():
    scores = np.ones((2, 4))
    keep = keep_mask_from_scores(scores, 0.5, min_per_layer=0)
    assert keep.astype(int).tolist() == [[1, 1, 1, 1], [0, 0, 0, 0]]  # lower layer, lower id
    keep = keep_mask_from_scores(scores, 0.5, min_per_layer=1)
    assert keep.astype(int).tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"prune_ratio": 1.0}, "prune_ratio must be in"),
        ({"scope": "layer"}, "scope must be"),
        ({"min_per_layer": 5}, "min_per_layer must be"),
        ({"prune_ratio": 0.9, "min_per_layer": 2}, "prune_ratio must leave"),
        ({"scores": np.array([[np.nan, 1.0]])}, "NaN"),
    ],
)
def test_keep_mask_from_scores_rejects_bad_arguments(kwargs, match):
    arguments = {"scores": np.arange(8.0).reshape(2, 4), "prune_ratio": 0.5, "min_per_layer": 1}
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=match):
        keep_mask_from_scores(**arguments)


def test_random_keep_mask_is_seeded_and_sized():
    first = random_keep_mask(4, 16, 0.5, random_state=3, min_per_layer=2)
    again = random_keep_mask(4, 16, 0.5, random_state=3, min_per_layer=2)
    other = random_keep_mask(4, 16, 0.5, random_state=4, min_per_layer=2)
    assert (first == again).all() and not (first == other).all()
    assert first.sum() == 32 and (first.sum(axis=1) >= 2).all()
    per_layer = random_keep_mask(4, 16, 0.25, random_state=0, scope="per_layer", min_per_layer=2)
    assert per_layer.sum(axis=1).tolist() == [12] * 4


# --------------------------------------------------------------------------------------------
# Expert outputs and scores
# --------------------------------------------------------------------------------------------


def _experts_calls(model, batch):
    """(experts module, hidden_states, top_k_index, top_k_weights, output) per MoE layer."""
    calls = []
    handles = [
        layer.experts.register_forward_hook(
            lambda module, args, output: calls.append((module, *args[:3], output))
        )
        for layer in find_moe_layers(model).moe_layers
    ]
    try:
        logits(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return calls


@pytest.mark.parametrize("family", FAMILIES)
def test_expert_forward_reproduces_routed_output(family, batch):
    # Σ_k weight_k · f_{index_k}(x) must equal the experts module output (the routed part of
    # the block output, shared experts excluded), computed by the model's grouped_mm kernel.
    model = tiny_model(family)
    for experts, hidden, index, weights, output in _experts_calls(model, batch):
        recomputed = torch.zeros_like(output)
        for expert_id in torch.unique(index).tolist():
            rows, rank = torch.where(index == expert_id)
            contribution = expert_forward(experts, expert_id, hidden[rows])
            recomputed.index_add_(0, rows, contribution * weights[rows, rank, None])
        torch.testing.assert_close(recomputed, output, atol=1e-5, rtol=1e-4)


def test_frequency_and_seer_match_the_trace(batch):
    model = tiny_model("olmoe")
    scores = expert_scores(model, [batch], ["frequency", "seer"])
    trace = capture_routing(model, [batch], progress=False)
    from_trace = scores_from_trace(trace, ["frequency", "seer"])
    n_tokens = int(batch["attention_mask"].sum())
    assert scores["frequency"].sum(axis=1).tolist() == [n_tokens * TOP_K] * N_LAYERS  # no pads
    np.testing.assert_allclose(scores["frequency"], from_trace["frequency"])
    np.testing.assert_allclose(scores["seer"], from_trace["seer"], rtol=1e-6)
    np.testing.assert_allclose(scores_from_trace(trace, "seer"), from_trace["seer"])


@pytest.mark.parametrize("family", ["olmoe", "gpt_oss"])
def test_reap_and_output_impact_match_a_plain_loop(family, batch):
    # Reference: each routed token run alone through the experts module's own kernel with a
    # weight of 1 (no expert_forward), then REAP = mean over routed tokens of g·‖f‖.
    model = tiny_model(family)
    scores = expert_scores(model, [batch], ["frequency", "reap", "output_impact"])
    valid = batch["attention_mask"].reshape(-1).bool()
    n_tokens = int(valid.sum())
    expected_reap = np.zeros((N_LAYERS, N_EXPERTS))
    expected_impact = np.zeros((N_LAYERS, N_EXPERTS))
    with torch.inference_mode():
        for layer, (experts, hidden, index, weights, _) in enumerate(_experts_calls(model, batch)):
            for token in torch.nonzero(valid).flatten().tolist():
                for rank in range(TOP_K):
                    expert_id = int(index[token, rank])
                    alone = experts(hidden[token : token + 1], index[token : token + 1, rank :
                                    rank + 1], torch.ones(1, 1, dtype=weights.dtype))
                    impact = float(weights[token, rank]) * float(alone.norm())
                    expected_reap[layer, expert_id] += impact
                    expected_impact[layer, expert_id] += impact
    counts = scores["frequency"]
    expected_reap = np.where(counts > 0, expected_reap / np.maximum(counts, 1), 0.0)
    np.testing.assert_allclose(scores["reap"], expected_reap, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(scores["output_impact"], expected_impact / n_tokens, rtol=1e-4,
                               atol=1e-7)
    assert (scores["reap"][counts == 0] == 0).all()


def test_expert_scores_rejects_unknown_method(batch):
    with pytest.raises(ValueError, match="method must be one of"):
        expert_scores(tiny_model("olmoe"), [batch], "gem")
    with pytest.raises(ValueError, match="method must be one of"):
        scores_from_trace(None, "reap")


# --------------------------------------------------------------------------------------------
# Applying masks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_mask_equals_removal_and_counts_parameters(family, batch):
    removed = tiny_model(family)
    masked = tiny_model(family)
    before = n_parameters(removed)
    counts = count_parameters_pruned(NON_UNIFORM, removed)
    reference = logits(removed, batch)
    apply_keep_mask(removed, NON_UNIFORM, mode="remove")
    apply_keep_mask(masked, NON_UNIFORM, mode="mask")
    torch.testing.assert_close(logits(removed, batch), logits(masked, batch), atol=1e-5,
                               rtol=1e-5)
    assert not torch.allclose(logits(removed, batch), reference)  # pruning did something
    assert counts["total_before"] == before
    assert n_parameters(removed) == counts["total_after"] == before - counts["removed"]
    assert n_parameters(masked) == before
    # models.count_parameters reads the same per-expert rule: on the removed model its routed
    # experts are exactly what pruning kept, less the router rows pruning counts beside them.
    kept = models.count_parameters(removed)
    assert kept["total"] == counts["total_after"]
    router_rows = sum(layer.parameters_per_expert()[1] * layer.n_experts
                      for layer in find_moe_layers(removed).moe_layers)
    assert kept["experts"] == counts["experts_after"] - router_rows
    architecture = find_moe_layers(removed)
    assert architecture.n_experts_per_layer == [6, 4, 6]
    for layer in architecture.moe_layers:
        assert layer.experts.num_experts == layer.router.num_experts == layer.n_experts
    kept = removed.config.kept_experts
    assert kept[str(architecture.moe_layer_ids[1])] == [1, 3, 5, 6]
    assert set(masked.config.masked_experts[str(architecture.moe_layer_ids[0])]) == {1, 5}


@pytest.mark.parametrize("mode", ["remove", "mask"])
@pytest.mark.parametrize("family", ["olmoe", "gpt_oss", "deepseek_v3"])
def test_keep_everything_is_a_no_op(family, mode, batch):
    model = tiny_model(family)
    reference = logits(model, batch)
    before = n_parameters(model)
    apply_keep_mask(model, np.ones((N_LAYERS, N_EXPERTS), dtype=bool), mode=mode)
    assert torch.equal(logits(model, batch), reference)
    assert n_parameters(model) == before
    assert getattr(model.config, "kept_experts", None) is None
    assert getattr(model.config, "masked_experts", None) is None


def test_uniform_removal_sets_the_config_count():
    model = apply_keep_mask(tiny_model("mixtral"), UNIFORM)
    assert model.config.num_local_experts == 6


def test_repruning_composes_original_ids(batch):
    twice = apply_keep_mask(tiny_model("qwen3_moe"), UNIFORM)  # keeps 0, 2, 3, 4, 5, 7
    # Renumbered 0..5 = originals 0, 2, 3, 4, 5, 7. Keep originals {0,2,3,4,7}, {3,5},
    # {0,2,4,5,7}, i.e. new ids {0,1,2,3,5}, {2,4}, {0,1,3,4,5}.
    second = np.zeros((N_LAYERS, 6), dtype=bool)
    second[0, [0, 1, 2, 3, 5]] = True
    second[1, [2, 4]] = True
    second[2, [0, 1, 3, 4, 5]] = True
    apply_keep_mask(twice, second)
    assert twice.config.kept_experts == {"0": [0, 2, 3, 4, 7], "1": [3, 5], "2": [0, 2, 4, 5, 7]}
    direct = np.zeros((N_LAYERS, N_EXPERTS), dtype=bool)
    for layer, ids in twice.config.kept_experts.items():
        direct[int(layer), ids] = True
    once = apply_keep_mask(tiny_model("qwen3_moe"), direct)  # the same experts in one step
    assert torch.equal(logits(twice, batch), logits(once, batch))


@pytest.mark.parametrize(
    ("family", "keep", "mode", "match"),
    [
        ("olmoe", np.eye(N_LAYERS, N_EXPERTS, dtype=bool), "remove", "at least top_k=2"),
        ("olmoe", np.eye(N_LAYERS, N_EXPERTS, dtype=bool), "mask", "at least top_k=2"),
        ("olmoe", np.ones((2, N_EXPERTS), dtype=bool), "remove", "keep_mask must have shape"),
        ("olmoe", np.ones((N_LAYERS, N_EXPERTS)), "remove", "keep_mask must be boolean"),
        ("olmoe", np.ones((N_LAYERS, N_EXPERTS), dtype=bool), "drop", "mode must be"),
        ("deepseek_v3", UNIFORM & ~np.eye(N_LAYERS, N_EXPERTS, dtype=bool), "remove",
         "multiple of n_group=2"),
    ],
)
def test_apply_keep_mask_refuses(family, keep, mode, match):
    with pytest.raises(ValueError, match=match):
        apply_keep_mask(tiny_model(family), keep, mode=mode)


def test_masked_model_survives_deepcopy(batch):
    model = apply_keep_mask(tiny_model("qwen2_moe"), NON_UNIFORM, mode="mask")
    copied = copy.deepcopy(model)
    for layer in find_moe_layers(copied).moe_layers:
        with torch.no_grad():
            layer.router.weight.mul_(-1.0)  # changing the copy must not change the original
    expected = logits(apply_keep_mask(tiny_model("qwen2_moe"), NON_UNIFORM), batch)
    torch.testing.assert_close(logits(model, batch), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits(copied, batch), expected)


def test_removal_after_masking_is_refused():
    model = apply_keep_mask(tiny_model("olmoe"), UNIFORM, mode="mask")
    with pytest.raises(ValueError, match="without masked experts"):
        apply_keep_mask(model, UNIFORM, mode="remove")


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["olmoe", "mixtral"])
def test_uniform_checkpoint_loads_with_stock_from_pretrained(family, batch, tmp_path):
    model = apply_keep_mask(tiny_model(family), UNIFORM)
    expected = logits(model, batch)
    path = save_pruned(model, tmp_path / "pruned", method="frequency", prune_ratio=0.25,
                       calibration={"dataset": "planted", "n_tokens": 19})
    stock = AutoModelForCausalLM.from_pretrained(path).eval()
    assert torch.equal(logits(stock, batch), expected)
    assert stock.config.kept_experts == model.config.kept_experts
    card = (path / "README.md").read_text()
    assert "`frequency`" in card and "0.25" in card and "planted" in card
    assert "| 0 | 6 | 0, 2, 3, 4, 5, 7 |" in card
    config = json.loads((path / "config.json").read_text())
    assert config["pruning"]["method"] == "frequency"


@pytest.mark.parametrize("family", ["olmoe", "gpt_oss"])
def test_non_uniform_checkpoint_reloads_with_load_pruned(family, batch, tmp_path):
    model = apply_keep_mask(tiny_model(family), NON_UNIFORM)
    expected = logits(model, batch)
    path = save_pruned(model, tmp_path / "pruned", method="caep", prune_ratio=0.33,
                       calibration={})
    reloaded = load_pruned(path)
    assert find_moe_layers(reloaded).n_experts_per_layer == [6, 4, 6]
    assert torch.equal(logits(reloaded, batch), expected)
    assert type(reloaded).__name__ == type(model).__name__


@pytest.mark.parametrize("family", ["olmoe", "deepseek_v3"])
def test_masked_checkpoint_reloads_with_masks(family, batch, tmp_path):
    model = apply_keep_mask(tiny_model(family), NON_UNIFORM, mode="mask")
    expected = logits(model, batch)
    path = save_pruned(model, tmp_path / "masked", method="reap", prune_ratio=0.33,
                       calibration={})
    assert torch.equal(logits(load_pruned(path), batch), expected)
    stock = AutoModelForCausalLM.from_pretrained(path).eval()
    if family == "olmoe":  # logit masks live in hooks: stock loading loses them until reapplied
        assert not torch.equal(logits(stock, batch), expected)
    assert torch.equal(logits(reapply_masks(stock), batch), expected)


def test_save_pruned_refuses_existing_folder(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "file").write_text("x")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_pruned(tiny_model("olmoe"), tmp_path / "out", method="x", prune_ratio=0.0,
                    calibration={})


def test_models_load_model_reads_a_pruned_checkpoint_with_its_tokenizer(batch, tmp_path):
    from moecollab.models import load_model, train_tokenizer

    tokenizer = train_tokenizer(["pruned experts reroute tokens"] * 20, vocab_size=300)
    model = apply_keep_mask(tiny_model("olmoe"), NON_UNIFORM)
    expected = logits(model, batch)
    path = save_pruned(model, tmp_path / "pruned", method="caep", prune_ratio=0.33,
                       calibration={}, tokenizer=tokenizer)
    reloaded, reloaded_tokenizer = load_model(path)
    assert torch.equal(logits(reloaded, batch), expected)
    assert reloaded_tokenizer.eos_token == "<|endoftext|>"
