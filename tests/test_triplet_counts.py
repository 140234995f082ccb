"""The triplet census equals the listed ranking (and brute force) without listing it."""

from collections import Counter
from itertools import combinations

import numpy as np
import pytest
from scipy import sparse

from moecollab import coactivation
from moecollab.hsdl_coverage import coverage_curve
from moecollab.triplet_counts import triplet_census

FRACTIONS = [0.01, 0.05, 0.1, 0.2, 0.5, 1.0]


def brute_force_counts(selected, layer_of=None) -> Counter:
    counter = Counter()
    for row in selected.toarray():
        for triplet in combinations(np.flatnonzero(row).tolist(), 3):
            if layer_of is None or len({int(layer_of[c]) for c in triplet}) == 3:
                counter[triplet] += 1
    return counter


def routed(n_tokens=300, n_layers=4, n_experts=6, top_k=2, seed=0):
    rng = np.random.default_rng(seed)
    ids = np.stack([np.stack([rng.choice(n_experts, top_k, replace=False)
                              for _ in range(n_layers)]) for _ in range(n_tokens)])
    return coactivation.selection_matrix(ids, n_experts)


@pytest.mark.parametrize("cross_layer_only", [False, True])
@pytest.mark.parametrize("min_count", [1, 3])
def test_census_equals_brute_force_and_the_listed_ranking(cross_layer_only, min_count):
    selected = routed()
    layer_of = np.arange(selected.shape[1]) // 6
    counts = brute_force_counts(selected, layer_of if cross_layer_only else None)
    ranking = sorted((t for t, c in counts.items() if c >= min_count),
                     key=lambda t: (-counts[t], t))
    census = triplet_census(selected, n_experts=6, cross_layer_only=cross_layer_only,
                            min_count=min_count, n_top=10, n_jobs=2)
    assert census.n_ranked == len(ranking)
    expected_histogram = np.bincount([counts[t] for t in ranking])
    assert census.histogram.tolist() == expected_histogram.tolist()
    assert [tuple(t) for t in census.top_triplets.tolist()] == ranking[:10]
    assert census.top_counts.tolist() == [counts[t] for t in ranking[:10]]
    listed, _ = coactivation.triplet_ranking(selected, n_experts=6, min_count=min_count,
                                             cross_layer_only=cross_layer_only)
    assert listed == ranking
    assert [census.count_at(p) for p in range(0, len(ranking), 37)] == [
        counts[t] for t in ranking[::37]]


def test_positions_and_coverage_equal_the_listed_ranking_on_ragged_rows():
    rng = np.random.default_rng(1)
    selected = sparse.csr_array(rng.random((250, 19)) < 0.3)  # rows of every length
    ranking, _ = coactivation.triplet_ranking(selected, cross_layer_only=False)
    index = {t: i for i, t in enumerate(ranking)}
    queries = [tuple(rng.choice(19, 3, replace=False).tolist()) for _ in range(300)]
    queries += [ranking[0], ranking[-1], (0, 0, 1)]
    census = triplet_census(selected)
    expected = [index.get(tuple(sorted(q)), np.inf) if len(set(q)) == 3 else np.inf
                for q in queries]
    assert census.positions(queries).tolist() == expected
    assert coverage_curve(queries, census, FRACTIONS).tolist() == coverage_curve(
        queries, ranking, FRACTIONS).tolist()
    counts = brute_force_counts(selected)
    assert census.counts_of(queries[:50]).tolist() == [counts[tuple(sorted(q))]
                                                     for q in queries[:50]]


def test_threads_and_expert_floor_give_the_same_census():
    selected = routed(n_tokens=400, seed=2)
    one = triplet_census(selected, n_top=5, n_jobs=1)
    two = triplet_census(selected, n_top=5, n_jobs=2)
    assert one.histogram.tolist() == two.histogram.tolist()
    assert one.top_triplets.tolist() == two.top_triplets.tolist()
    floor = triplet_census(selected, min_expert_frequency=0.3)
    listed, counts = coactivation.triplet_ranking(selected, cross_layer_only=False,
                                                    min_expert_frequency=0.3)
    assert floor.histogram.tolist() == np.bincount(counts, minlength=len(
        floor.histogram)).tolist()


def test_top_triplets_table_is_unchanged_by_the_census():
    selected = routed(n_tokens=400, seed=3)
    listed, counts = coactivation.triplet_ranking(selected, n_experts=6, cross_layer_only=True,
                                                  min_count=2)
    table = coactivation.top_triplets(selected, 8, n_experts=6, cross_layer_only=True,
                                      min_count=2)
    assert list(zip(table["expert_a"], table["expert_b"], table["expert_c"],
                    strict=True)) == listed[:8]
    assert table["count"].tolist() == counts[:8].tolist()


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"n_top": -1}, "n_top"),
    ({"n_jobs": 0}, "n_jobs"),
    ({"min_count": 0}, "min_count"),
    ({"cross_layer_only": True}, "n_experts"),
    ({"min_expert_frequency": 2}, "min_expert_frequency"),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        triplet_census(routed(n_tokens=10), **kwargs)


def test_position_and_triplet_errors_are_named():
    census = triplet_census(routed(n_tokens=20))
    with pytest.raises(ValueError, match="position"):
        census.count_at(census.n_ranked)
    with pytest.raises(ValueError, match="three column ids"):
        census.counts_of([(0, 1, 999)])
