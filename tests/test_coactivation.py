"""Co-activation statistics: hand-sized answers, loop equivalence, planted pairs and the null."""

from collections import Counter
from itertools import combinations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from scipy import sparse  # noqa: E402

from moecollab import coactivation, plotting  # noqa: E402


def random_routing(n_tokens: int, n_layers: int, n_experts: int, top_k: int,
                   seed: int) -> np.ndarray:
    """Uniform top-k routing: ``top_k`` distinct experts per token and layer."""
    rng = np.random.default_rng(seed)
    keys = rng.random((n_tokens, n_layers, n_experts))
    return np.argsort(keys, axis=2)[:, :, :top_k].astype(np.int16)


def planted_routing(n_tokens: int, n_experts: int, top_k: int, seed: int) -> np.ndarray:
    """Two layers; expert 5 of layer 1 fires exactly on the tokens where expert 3 of layer 0 does.

    Both fire on about ``top_k / n_experts`` of the tokens, so their lift is ``n_experts / top_k``.
    """
    rng = np.random.default_rng([seed, 1])  # not the stream random_routing(seed) draws from
    expert_ids = random_routing(n_tokens, 1, n_experts, top_k, seed)
    planted = (expert_ids[:, 0, :] == 3).any(axis=1)
    keys = rng.random((n_tokens, n_experts))
    keys[:, 5] = np.where(planted, -1.0, 2.0)  # forced in on planted tokens, out elsewhere
    second = np.argsort(keys, axis=1)[:, :top_k].astype(np.int16)
    return np.stack([expert_ids[:, 0, :], second], axis=1)


def loop_statistics(expert_ids: np.ndarray, n_experts: int):
    """Counts, P(a), P(a and b), P(b | a) and lift with plain Python loops over tokens."""
    n_tokens, n_layers, _ = expert_ids.shape
    n_columns = n_layers * n_experts
    counts = np.zeros((n_columns, n_columns))
    for token in range(n_tokens):
        active = {layer * n_experts + int(expert) for layer in range(n_layers)
                  for expert in expert_ids[token, layer]}
        for a in active:
            for b in active:
                counts[a, b] += 1
    own = np.diag(counts).copy()
    frequency = own / n_tokens
    joint = counts / n_tokens
    conditional = np.full_like(counts, np.nan)
    lift = np.full_like(counts, np.nan)
    for a in range(n_columns):
        for b in range(n_columns):
            if own[a] > 0:
                conditional[a, b] = counts[a, b] / own[a]
            if own[a] > 0 and own[b] > 0:
                lift[a, b] = joint[a, b] / (frequency[a] * frequency[b])
    return counts, frequency, joint, conditional, lift


def brute_force_triplets(selected, layer_of=None) -> Counter:
    dense = np.asarray(sparse.csr_array(selected).toarray()) != 0
    counter: Counter = Counter()
    for row in dense:
        for triplet in combinations(np.flatnonzero(row).tolist(), 3):
            if layer_of is None or len({int(layer_of[c]) for c in triplet}) == 3:
                counter[triplet] += 1
    return counter


# --- hand-sized known answers -----------------------------------------------------------------


def test_hand_sized_probabilities_and_lift():
    # 4 tokens, 3 columns: a fires on 3, b on 2, c on 2; a&b on 1, a&c on 1, b&c on 1.
    selected = sparse.csr_array([[1, 1, 0], [1, 0, 0], [0, 1, 1], [1, 0, 1]], dtype=bool)
    np.testing.assert_allclose(coactivation.expert_frequency(selected), [0.75, 0.5, 0.5])
    assert coactivation.cooccurrence_counts(selected).tolist() == [[3, 1, 1], [1, 2, 1],
                                                                   [1, 1, 2]]
    joint = coactivation.coactivation_probability(selected)
    assert joint[0, 1] == pytest.approx(0.25)
    conditional = coactivation.conditional_probability(selected)
    assert conditional[0, 1] == pytest.approx(1 / 3)   # P(b | a) = 1/3
    assert conditional[1, 0] == pytest.approx(1 / 2)   # P(a | b) = 1/2
    lift = coactivation.coactivation_lift(selected)
    assert lift[0, 1] == pytest.approx(0.25 / (0.75 * 0.5))
    assert lift[1, 2] == pytest.approx(1.0)
    np.testing.assert_allclose(coactivation.expected_under_independence(selected) * lift,
                               joint)


def test_style_guide_example():
    selected = sparse.csr_array([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=bool)
    assert float(coactivation.coactivation_lift(selected)[0, 1]) == 1.5


def test_lift_is_nan_where_an_expert_never_fires():
    selected = sparse.csr_array([[1, 0, 1], [1, 0, 0], [0, 0, 1]], dtype=bool)
    lift = coactivation.coactivation_lift(selected)
    assert np.isnan(lift[1]).all() and np.isnan(lift[:, 1]).all()
    assert np.isfinite(np.delete(np.delete(lift, 1, 0), 1, 1)).all()
    assert np.isnan(coactivation.conditional_probability(selected)[1]).all()
    block = coactivation.adjacent_layer_lift(
        coactivation.selection_matrix(np.array([[[0], [0]], [[0], [0]]]), 2), 2, 0)
    assert np.isnan(block[1]).all() and np.isnan(block[:, 1]).all()


def test_selection_matrix_matches_routing_trace():
    from moecollab.capture import RoutingTrace

    expert_ids = random_routing(20, 3, 5, 2, seed=1)
    trace = RoutingTrace(expert_ids=expert_ids, weights=np.ones(expert_ids.shape, np.float32),
                         n_experts=5, top_k=2, moe_layer_ids=[0, 1, 2], model_type="test")
    ours = coactivation.selection_matrix(expert_ids, 5)
    theirs = trace.to_matrix(level="token", value="binary")
    assert (ours != (theirs != 0)).nnz == 0
    # Either way of building the selection matrix serves every function alike.
    assert (coactivation.shuffled_selection(theirs, 5, random_state=3)
            != coactivation.shuffled_selection(ours, 5, random_state=3)).nnz == 0
    from_trace, from_ids = (coactivation.triplet_ranking(x, cross_layer_only=False)
                            for x in (theirs, ours))
    assert from_trace[0] == from_ids[0]
    np.testing.assert_array_equal(from_trace[1], from_ids[1])


@pytest.mark.parametrize("function", [
    lambda x: coactivation.expert_frequency(x),
    lambda x: coactivation.shuffled_selection(x, 5),
    lambda x: coactivation.triplet_ranking(x, cross_layer_only=False),
    lambda x: coactivation.load_balance(x, 5),
])
def test_expert_ids_are_refused_with_how_to_build_the_selection_matrix(function):
    # One input convention: the selection matrix; expert ids (3-D) are not read as one.
    with pytest.raises(ValueError, match=r"got shape \(20, 3, 2\); build the selection "
                                         r"matrix with selection_matrix\(expert_ids"):
        function(random_routing(20, 3, 5, 2, seed=1))


# --- sparse implementation against a plain loop ---------------------------------------------


def test_sparse_statistics_equal_a_plain_loop():
    expert_ids = random_routing(60, 3, 5, 2, seed=2)
    expert_ids[:, 2, :] = random_routing(60, 1, 4, 2, seed=3)[:, 0, :]  # layer 2: expert 4 idle
    selected = coactivation.selection_matrix(expert_ids, 5)
    counts, frequency, joint, conditional, lift = loop_statistics(expert_ids, 5)
    np.testing.assert_array_equal(coactivation.cooccurrence_counts(selected), counts)
    np.testing.assert_allclose(coactivation.expert_frequency(selected), frequency)
    np.testing.assert_allclose(coactivation.coactivation_probability(selected), joint)
    np.testing.assert_allclose(coactivation.conditional_probability(selected), conditional)
    np.testing.assert_allclose(coactivation.coactivation_lift(selected), lift)
    np.testing.assert_allclose(coactivation.adjacent_layer_lift(selected, 5, 1),
                               lift[5:10, 10:15])
    # Dense input and weighted (non-binary) input give the same binary statistics.
    weighted = selected.astype(float) * 0.3
    np.testing.assert_allclose(coactivation.coactivation_lift(weighted.toarray()), lift)


def test_pair_ranking_and_top_pairs_agree_with_the_counts():
    expert_ids = random_routing(80, 3, 4, 2, seed=3)
    selected = coactivation.selection_matrix(expert_ids, 4)
    counts = coactivation.cooccurrence_counts(selected)
    pairs, pair_counts = coactivation.pair_ranking(selected, cross_layer_only=False)
    assert len(pairs) == int((np.triu(counts, 1) > 0).sum())
    assert all(a < b for a, b in pairs)
    assert [counts[a, b] for a, b in pairs] == pair_counts.tolist()
    assert (np.diff(pair_counts) <= 0).all()
    table = coactivation.top_pairs(selected, None, n_experts=4, cross_layer_only=True,
                                   min_count=2)
    assert (table["layer_a"] != table["layer_b"]).all()
    assert table["count"].min() >= 2
    assert list(table.columns) == ["expert_a", "expert_b", "layer_a", "expert_in_layer_a",
                                   "layer_b", "expert_in_layer_b", "count", "p_joint",
                                   "p_b_given_a", "lift"]
    lift = coactivation.coactivation_lift(selected)
    conditional = coactivation.conditional_probability(selected)
    for row in table.itertuples():
        assert row.expert_a == row.layer_a * 4 + row.expert_in_layer_a
        assert row.lift == pytest.approx(lift[row.expert_a, row.expert_b])
        assert row.p_b_given_a == pytest.approx(conditional[row.expert_a, row.expert_b])
    cross_pairs, _ = coactivation.pair_ranking(selected, n_experts=4, cross_layer_only=True,
                                               min_count=2)
    assert cross_pairs == list(zip(table["expert_a"], table["expert_b"], strict=True))


# --- planted collaboration and the shuffled null --------------------------------------------


def test_planted_pair_is_the_top_cross_layer_pair():
    n_experts, top_k = 8, 2
    selected = coactivation.selection_matrix(planted_routing(20_000, n_experts, top_k, 0),
                                             n_experts)
    table = coactivation.top_pairs(selected, 5, n_experts=n_experts, cross_layer_only=True)
    best = table.iloc[0]
    assert (best["layer_a"], best["expert_in_layer_a"]) == (0, 3)
    assert (best["layer_b"], best["expert_in_layer_b"]) == (1, 5)
    assert best["p_b_given_a"] == pytest.approx(1.0)
    # lift = 1 / P(a) with P(a) ~ Binomial(20000, 1/4) / 20000: 1.2% relative sd; 5% tolerance.
    assert best["lift"] == pytest.approx(n_experts / top_k, rel=0.05)
    assert table.iloc[1]["lift"] < 1.5
    block = coactivation.adjacent_layer_lift(selected, n_experts, 0)
    assert np.unravel_index(np.nanargmax(block), block.shape) == (3, 5)


def test_shuffled_null_keeps_marginals_and_breaks_cross_layer_links():
    n_experts, top_k = 8, 2
    expert_ids = planted_routing(20_000, n_experts, top_k, 1)
    selected = coactivation.selection_matrix(expert_ids, n_experts)
    null = coactivation.shuffled_selection(selected, n_experts, random_state=0)
    assert null.shape == selected.shape and null.nnz == selected.nnz
    # Every layer's usage of every expert is kept exactly ...
    np.testing.assert_array_equal(coactivation.expert_frequency(null),
                                  coactivation.expert_frequency(selected))
    # ... and so is the within-layer structure (whole rows of a layer move together).
    counts, null_counts = (coactivation.cooccurrence_counts(m) for m in (selected, null))
    np.testing.assert_array_equal(null_counts[:8, :8], counts[:8, :8])
    np.testing.assert_array_equal(null_counts[8:, 8:], counts[8:, 8:])
    # Cross-layer lift ~ 1. Each pair expects ~1,250 joint tokens (sd ~3%); max over 64 pairs
    # stays within 15%, and the mean |log2 lift| within 0.05.
    null_lift = coactivation.cross_layer_lift_values(null, n_experts)
    assert np.abs(null_lift - 1).max() < 0.15
    assert np.abs(np.log2(null_lift)).mean() < 0.05
    assert coactivation.adjacent_layer_lift(null, n_experts, 0)[3, 5] == pytest.approx(1,
                                                                                        abs=0.15)
    # Deterministic for a seed: each layer's rows moved by its own permutation, drawn in layer
    # order (the same null as permuting the layer's expert ids).
    rng = np.random.default_rng(0)
    moved = np.stack([expert_ids[rng.permutation(len(expert_ids)), layer]
                      for layer in range(expert_ids.shape[1])], axis=1)
    assert (coactivation.selection_matrix(moved, n_experts) != null).nnz == 0
    summary = coactivation.lift_summary(selected, null, n_experts)
    assert list(summary.columns) == ["observed", "shuffled null"]
    assert summary.loc["max_lift", "observed"] == pytest.approx(4, rel=0.05)
    assert summary.loc["max_lift", "shuffled null"] < 1.15
    assert summary.loc["share_lift_above_2", "shuffled null"] == 0


# --- triplets -------------------------------------------------------------------------------


@pytest.mark.parametrize("cross_layer_only", [False, True])
def test_triplet_counts_equal_brute_force(cross_layer_only):
    expert_ids = random_routing(50, 3, 5, 2, seed=4)
    selected = coactivation.selection_matrix(expert_ids, 5)
    layer_of = np.arange(15) // 5 if cross_layer_only else None
    expected = brute_force_triplets(selected, layer_of)
    triplets, counts = coactivation.triplet_ranking(selected, n_experts=5,
                                                    cross_layer_only=cross_layer_only)
    assert dict(zip(triplets, counts.tolist(), strict=True)) == dict(expected)
    assert triplets == sorted(expected, key=lambda t: (-expected[t], t))


def test_triplet_counting_paths_agree_on_ragged_rows():
    # Uneven active sets (not a trace): padding, per-code layer checks and the unique() path.
    rng = np.random.default_rng(5)
    selected = sparse.csr_array(rng.random((40, 12)) < 0.35)
    layer_of = np.arange(12) // 4
    matrix = coactivation._as_selection(selected)
    for cross in (False, True):
        expected = brute_force_triplets(selected, layer_of if cross else None)
        for dense_limit, chunk in ((2**24, 2**23), (0, 7)):
            triplets, counts = coactivation._count_triplets(
                matrix, layer_of, cross_layer_only=cross, max_dense_codes=dense_limit,
                chunk_codes=chunk)
            assert dict(zip(map(tuple, triplets.tolist()), counts.tolist(),
                            strict=True)) == dict(expected)


def test_triplet_floor_and_top_triplets():
    expert_ids = random_routing(200, 3, 4, 2, seed=6)
    selected = coactivation.selection_matrix(expert_ids, 4)
    frequency = coactivation.expert_frequency(selected)
    floor = float(np.median(frequency))
    triplets, counts = coactivation.triplet_ranking(selected, n_experts=4,
                                                    cross_layer_only=False,
                                                    min_expert_frequency=floor)
    frequent = set(np.flatnonzero(frequency >= floor).tolist())
    expected = {t: c for t, c in brute_force_triplets(selected).items() if set(t) <= frequent}
    assert dict(zip(triplets, counts.tolist(), strict=True)) == expected
    table = coactivation.top_triplets(selected, 3, n_experts=4, cross_layer_only=True,
                                      min_count=2)
    assert len(table) == 3
    assert (table["layer_a"] < table["layer_b"]).all() and (table["layer_b"] < table["layer_c"]
                                                            ).all()
    first = table.iloc[0]
    joint = first["count"] / 200
    p = frequency[[int(first[f"expert_{name}"]) for name in "abc"]]
    assert first["lift"] == pytest.approx(joint / p.prod())


# --- domains, balance, clustering -----------------------------------------------------------


def test_domain_similarity_load_balance_and_cluster_order():
    expert_ids = np.array([[[0, 1]], [[0, 1]], [[2, 3]], [[2, 3]], [[0, 2]], [[0, 1]]])
    selected = coactivation.selection_matrix(expert_ids, 4)
    similarity = coactivation.domain_similarity(selected, list("aabbcc"), 4, ["a", "b", "c"])
    assert similarity.shape == (3, 3)
    np.testing.assert_allclose(np.diag(similarity), 1.0)
    assert similarity[0, 1] == pytest.approx(0.0)
    order = coactivation.cluster_order(similarity)
    assert sorted(order.tolist()) == [0, 1, 2]
    assert abs(order.tolist().index(0) - order.tolist().index(2)) == 1  # a and c together
    balance = coactivation.load_balance(selected, 4)
    row = balance.iloc[0]
    # counts [4, 3, 3, 2] of 12: shares 1/3, 1/4, 1/4, 1/6
    fractions = np.array([4, 3, 3, 2]) / 12
    assert row["entropy_bits"] == pytest.approx(-(fractions * np.log2(fractions)).sum())
    assert row["normalised_entropy"] == pytest.approx(row["entropy_bits"] / 2)
    assert (row["max_share"], row["min_share"]) == pytest.approx((4 / 3, 2 / 3))
    assert row["coefficient_of_variation"] == pytest.approx(np.std([4, 3, 3, 2]) / 3)
    assert row["n_unused_experts"] == 0



def test_usage_from_the_selection_matrix_equals_stage_00s_from_expert_ids():
    # Stage 00's routing-health check counts expert ids; stage 02 counts the same selections
    # from the matrix: the same numbers, bit for bit.
    from moecollab import routing_health

    expert_ids = random_routing(300, 3, 6, 2, seed=8)
    domains = np.array(list("abc"))[np.random.default_rng(8).integers(0, 3, 300)]
    selected = coactivation.selection_matrix(expert_ids, 6)
    np.testing.assert_array_equal(coactivation._layer_counts(selected, 6),
                                  routing_health.expert_counts(expert_ids, 6))
    np.testing.assert_array_equal(
        coactivation.domain_similarity(selected, domains, 6, ["c", "a", "b"]),
        routing_health.cosine_matrix(routing_health.domain_usage(expert_ids, domains, 6,
                                                                 ["c", "a", "b"])))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda s: coactivation.adjacent_layer_lift(s, 4, 2), "layer"),
        (lambda s: coactivation.top_pairs(s, 0, n_experts=4, cross_layer_only=True), "n must"),
        (lambda s: coactivation.top_pairs(s, 5, n_experts=5, cross_layer_only=True),
         "n_experts"),
        (lambda s: coactivation.pair_ranking(s, cross_layer_only=True), "n_experts"),
        (lambda s: coactivation.pair_ranking(s, cross_layer_only=False, min_count=0),
         "min_count"),
        (lambda s: coactivation.triplet_ranking(s, cross_layer_only=False,
                                                min_expert_frequency=2), "min_expert"),
        (lambda s: coactivation.shuffled_selection(s, 5), "n_experts"),
    ],
)
def test_bad_arguments_are_named(call, match):
    selected = coactivation.selection_matrix(random_routing(10, 3, 4, 2, seed=7), 4)
    with pytest.raises(ValueError, match=match):
        call(selected)


def test_selection_matrix_rejects_out_of_range_ids():
    with pytest.raises(ValueError, match="expert_ids"):
        coactivation.selection_matrix(np.array([[[0, 4]]]), 4)


# --- figures --------------------------------------------------------------------------------


def test_figures_are_returned_and_closed():
    n_experts = 8
    expert_ids = planted_routing(2_000, n_experts, 2, 2)
    selected = coactivation.selection_matrix(expert_ids, n_experts)
    null = coactivation.shuffled_selection(selected, n_experts, random_state=0)
    balance = coactivation.load_balance(selected, n_experts)
    similarity = np.array([[1.0, 0.2, 0.8], [0.2, 1.0, 0.3], [0.8, 0.3, 1.0]])
    block = coactivation.adjacent_layer_lift(selected, n_experts, 0)
    block[0] = np.nan  # an expert that never fires stays blank
    figures = [
        plotting.coactivation_heatmap(block, 0),
        plotting.lift_distribution(coactivation.cross_layer_lift_values(selected, n_experts),
                                   coactivation.cross_layer_lift_values(null, n_experts)),
        plotting.top_pairs_bars(coactivation.top_pairs(selected, 10, n_experts=n_experts,
                                                       cross_layer_only=True)),
        plotting.top_pairs_bars(pd.DataFrame(coactivation.top_triplets(
            coactivation.selection_matrix(np.concatenate([expert_ids, expert_ids[:, :1]], axis=1),
                                          n_experts),
            5, n_experts=n_experts, cross_layer_only=True))),
        plotting.clustered_similarity(similarity, ["math", "law", "physics"],
                                      coactivation.cluster_order(similarity)),
        plotting.load_balance_plot(balance, balance.assign(normalised_entropy=0.5)),
    ]
    try:
        for figure in figures:
            assert isinstance(figure, Figure)
            figure.canvas.draw()
    finally:
        for figure in figures:
            plt.close(figure)
