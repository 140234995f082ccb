"""Tests of moecollab.layout: the one (MoE layer, expert) <-> column layout of the study."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from moecollab import layout


@pytest.mark.parametrize("n_experts, n_columns", [(4, 12), ([2, 5, 3], 10), ([1], 1)])
def test_layout_and_column_of_are_inverse(n_experts, n_columns):
    layers, experts = layout.column_layout(n_experts, n_columns)
    assert [layout.column_of(int(layer), int(expert), n_experts)
            for layer, expert in zip(layers, experts, strict=True)] == list(range(n_columns))
    offsets = layout.column_offsets(n_experts, n_columns=n_columns)
    assert offsets[-1] == n_columns
    np.testing.assert_array_equal(np.diff(offsets), np.bincount(layers))


def test_one_count_is_every_layer_and_the_offsets_of_a_trace_follow_it():
    np.testing.assert_array_equal(layout.column_offsets(3, n_layers=4), [0, 3, 6, 9, 12])
    np.testing.assert_array_equal(layout.column_offsets([3, 3, 3, 3]), [0, 3, 6, 9, 12])
    # the matrix of a routing trace puts (layer, expert) at column_of(layer, expert)
    from moecollab.capture import RoutingTrace

    # 2 tokens, 2 MoE layers (2 and 3 experts), top-2
    ids = np.array([[[0, 1], [2, 0]], [[1, 0], [1, 2]]], dtype=np.int16)
    trace = RoutingTrace(expert_ids=ids, weights=np.full(ids.shape, 0.5, np.float32),
                         n_experts=3, top_k=2, moe_layer_ids=[0, 1], model_type="olmoe",
                         tokens=pd.DataFrame({"sequence_index": [0, 1]}),
                         n_experts_per_layer=[2, 3])
    np.testing.assert_array_equal(trace.column_offsets, layout.column_offsets([2, 3])[:-1])
    matrix = sparse.csr_array(trace.to_matrix()).toarray()
    for token in range(2):
        for layer in range(2):
            for expert in ids[token, layer]:
                assert matrix[token, layout.column_of(layer, int(expert), [2, 3])] > 0
    assert (matrix > 0).sum() == ids.size


@pytest.mark.parametrize("call, message", [
    (lambda: layout.per_layer_counts(5, n_columns=12), "positive divisor"),
    (lambda: layout.per_layer_counts(0, n_layers=2), "positive int"),
    (lambda: layout.per_layer_counts(3), "needs n_layers or n_columns"),
    (lambda: layout.per_layer_counts([2, 0]), "one positive count per layer"),
    (lambda: layout.per_layer_counts([2, 2], n_layers=3), r"per layer \(3\)"),
    (lambda: layout.per_layer_counts([2, 2], n_columns=5), r"sum to the number of columns"),
    (lambda: layout.column_of(0, 2, [2, 3]), "no expert 2 in MoE layer 0"),
    (lambda: layout.column_of(2, 0, [2, 3]), "no expert 0 in MoE layer 2"),
])
def test_bad_layouts_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()
