"""Tests of moecollab.capture and the router registry in moecollab.moe_arch."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import sparse
from tiny_models import (
    EXTRA_FAMILIES,
    FAMILIES,
    N_EXPERTS,
    N_LAYERS,
    TOP_K,
    padded_batch,
    tiny_dense_model,
    tiny_model,
)

from moecollab.capture import RoutingTrace, capture_routing
from moecollab.moe_arch import (
    SUPPORTED_FAMILIES,
    UnsupportedModelError,
    find_moe_layers,
)


def _reference_routing(model, batch):
    """What each MoE block applied, read independently of the capture hooks.

    Two independent readings per layer: a pre-hook on the ``experts`` module (the ids and
    weights it was called with) and a direct call of the router on the block input.
    """
    architecture = find_moe_layers(model)
    applied: list[tuple[torch.Tensor, torch.Tensor]] = []
    router_inputs: list[torch.Tensor] = []
    handles = []
    for layer in architecture.moe_layers:

        def read_experts_call(module, args, kwargs):
            index = args[1] if len(args) > 1 else kwargs["top_k_index"]
            weights = args[2] if len(args) > 2 else kwargs["top_k_weights"]
            applied.append((index.clone(), weights.clone()))

        def read_router_input(module, args):
            router_inputs.append(args[0].clone())

        handles.append(
            layer.experts.register_forward_pre_hook(read_experts_call, with_kwargs=True)
        )
        handles.append(layer.router.register_forward_pre_hook(read_router_input))
    try:
        with torch.inference_mode():
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    with torch.inference_mode():
        direct = [
            layer.router(hidden)
            for layer, hidden in zip(architecture.moe_layers, router_inputs, strict=True)
        ]
    keep = batch["attention_mask"].reshape(-1).bool()
    applied_ids = torch.stack([index[keep] for index, _ in applied], dim=1)
    applied_weights = torch.stack([weights[keep] for _, weights in applied], dim=1)
    direct_ids = torch.stack([out[2][keep] for out in direct], dim=1)
    direct_weights = torch.stack([out[1][keep] for out in direct], dim=1)
    return applied_ids, applied_weights, direct_ids, direct_weights


# ---------------------------------------------------------------------------------------------
# Capture equals the model's own routing
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES + EXTRA_FAMILIES)
def test_captured_routing_equals_router_outputs(family):
    model = tiny_model(family)
    batch = padded_batch()
    trace = capture_routing(model, [batch], progress=False)

    applied_ids, applied_weights, direct_ids, direct_weights = _reference_routing(model, batch)
    n_tokens = int(batch["attention_mask"].sum())
    assert trace.expert_ids.shape == (n_tokens, N_LAYERS, TOP_K)
    assert trace.expert_ids.dtype == np.int16
    assert trace.weights.dtype == np.float32
    np.testing.assert_array_equal(trace.expert_ids, applied_ids.numpy())
    np.testing.assert_array_equal(trace.weights, applied_weights.float().numpy())
    np.testing.assert_array_equal(trace.expert_ids, direct_ids.numpy())
    np.testing.assert_array_equal(trace.weights, direct_weights.float().numpy())
    # Every token picks top_k distinct experts in every layer.
    assert (np.sort(trace.expert_ids, axis=2)[..., 1:] != np.sort(trace.expert_ids, axis=2)[
        ..., :-1
    ]).all()
    assert trace.model_type == family
    assert trace.n_experts == N_EXPERTS and trace.top_k == TOP_K
    assert trace.moe_layer_ids == list(range(N_LAYERS))
    assert trace.metadata["model_class"] == type(model).__name__


def test_pads_are_dropped_and_token_table_matches_input():
    batch = padded_batch(n_sequences=3, seq_len=10, n_pads=4)
    batch["attention_mask"][0, 7:] = 0  # a second padded sequence
    trace = capture_routing(tiny_model("olmoe"), [batch], progress=False)

    mask = batch["attention_mask"].bool()
    assert len(trace) == int(mask.sum()) == 30 - 4 - 3
    np.testing.assert_array_equal(trace.tokens["token_id"], batch["input_ids"][mask].numpy())
    expected_positions = np.concatenate([np.arange(n) for n in mask.sum(1).tolist()])
    np.testing.assert_array_equal(trace.tokens["position"], expected_positions)
    np.testing.assert_array_equal(
        trace.tokens["sequence_index"], np.repeat([0, 1, 2], mask.sum(1).numpy())
    )


def test_left_padding_positions_count_non_pad_tokens():
    batch = padded_batch(n_sequences=2, seq_len=6, n_pads=0)
    batch["attention_mask"][1, :2] = 0
    trace = capture_routing(tiny_model("mixtral"), [batch], progress=False)
    assert trace.tokens["position"].tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]


@pytest.mark.parametrize(
    ("family", "overrides", "moe_layer_ids", "dense_layer_ids", "shared"),
    [
        ("deepseek_v3", {"first_k_dense_replace": 1}, [1, 2], [0], True),
        ("deepseek_v2", {"first_k_dense_replace": 1}, [1, 2], [0], True),
        ("qwen2_moe", {"mlp_only_layers": [1]}, [0, 2], [1], True),
        ("qwen3_moe", {"decoder_sparse_step": 2}, [1], [0, 2], False),
    ],
)
def test_dense_layers_and_shared_experts_are_excluded(
    family, overrides, moe_layer_ids, dense_layer_ids, shared
):
    model = tiny_model(family, **overrides)
    batch = padded_batch()
    trace = capture_routing(model, [batch], progress=False)

    assert trace.moe_layer_ids == moe_layer_ids
    assert trace.dense_layer_ids == dense_layer_ids
    assert trace.shared_experts is shared
    assert trace.expert_ids.shape == (int(batch["attention_mask"].sum()), len(moe_layer_ids), 2)
    applied_ids, applied_weights, _, _ = _reference_routing(model, batch)
    np.testing.assert_array_equal(trace.expert_ids, applied_ids.numpy())
    np.testing.assert_array_equal(trace.weights, applied_weights.numpy())
    assert trace.to_matrix().shape[1] == len(moe_layer_ids) * N_EXPERTS


@pytest.mark.parametrize(
    ("family", "expected_sum"),
    [("mixtral", 1.0), ("gpt_oss", 1.0), ("granitemoe", 1.0), ("deepseek_v3", 2.5)],
)
def test_weights_are_what_the_family_applies(family, expected_sum):
    trace = capture_routing(tiny_model(family), [padded_batch()], progress=False)
    np.testing.assert_allclose(trace.weights.sum(axis=2), expected_sum, rtol=1e-5)
    if family == "deepseek_v3":
        assert trace.metadata["routing_config"]["routed_scaling_factor"] == expected_sum


def test_olmoe_weights_are_not_renormalised_by_default():
    trace = capture_routing(tiny_model("olmoe"), [padded_batch()], progress=False)
    assert (trace.weights.sum(axis=2) < 1.0).all()
    assert "norm_topk_prob" in trace.metadata["weight_semantics"]


def test_unsupported_model_fails_before_running():
    model = tiny_dense_model()
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))

    def batches():
        calls.append("batches were read")
        yield padded_batch()

    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM") as error:
        capture_routing(model, batches(), progress=False)
    assert calls == []
    message = str(error.value)
    assert "\n" not in message
    assert all(family in message for family in FAMILIES)
    assert isinstance(error.value, ValueError)


def test_registry_covers_every_required_family():
    assert set(FAMILIES) <= set(SUPPORTED_FAMILIES)
    for family in FAMILIES:
        architecture = find_moe_layers(tiny_model(family))
        assert architecture.n_experts_per_layer == [N_EXPERTS] * N_LAYERS
        assert architecture.top_k == TOP_K
        assert architecture.dense_layer_ids == ()


def test_hooks_removed_and_training_mode_restored_even_on_error():
    model = tiny_model("qwen3_moe").train()
    architecture = find_moe_layers(model)

    def failing_batches():
        yield padded_batch()
        raise RuntimeError("corpus reader failed")

    with pytest.raises(RuntimeError, match="corpus reader failed"):
        capture_routing(model, failing_batches(), progress=False)
    assert model.training
    assert all(not layer.router._forward_hooks for layer in architecture.moe_layers)
    capture_routing(model, [padded_batch()], progress=False)
    assert model.training


# ---------------------------------------------------------------------------------------------
# Inputs and metadata
# ---------------------------------------------------------------------------------------------


def test_bare_tensors_with_attention_masks_equal_dict_batches():
    model = tiny_model("granitemoe")
    first, second = padded_batch(seed=0), padded_batch(seed=1)
    from_dicts = capture_routing(model, [first, second], progress=False)
    from_tensors = capture_routing(
        model,
        [first["input_ids"], second["input_ids"]],
        attention_masks=[first["attention_mask"], second["attention_mask"]],
        progress=False,
    )
    np.testing.assert_array_equal(from_dicts.expert_ids, from_tensors.expert_ids)
    np.testing.assert_array_equal(from_dicts.weights, from_tensors.weights)
    pd.testing.assert_frame_equal(from_dicts.tokens, from_tensors.tokens)
    unmasked = capture_routing(model, [first["input_ids"]], progress=False)
    assert len(unmasked) == first["input_ids"].numel()
    bool_masks = capture_routing(
        model,
        [{"input_ids": first["input_ids"], "attention_mask": first["attention_mask"].bool()}],
        progress=False,
    )
    np.testing.assert_array_equal(bool_masks.expert_ids, from_dicts.expert_ids[: len(bool_masks)])


def test_token_metadata_per_sequence_per_token_and_table():
    model = tiny_model("mixtral")
    batch = padded_batch(n_sequences=2, seq_len=4, n_pads=1)
    pieces = [[f"t{row}{col}" for col in range(4)] for row in range(2)]
    trace = capture_routing(
        model,
        [{**batch, "domain": ["math", "law"], "text_piece": pieces}],
        progress=False,
    )
    assert trace.tokens["domain"].tolist() == ["math"] * 4 + ["law"] * 3
    assert trace.tokens["text_piece"].tolist() == ["t00", "t01", "t02", "t03", "t10", "t11", "t12"]

    table = pd.DataFrame({"document_id": np.arange(7) * 10})
    with_table = capture_routing(model, [batch], token_metadata=table, progress=False)
    assert with_table.tokens["document_id"].tolist() == list(range(0, 70, 10))

    per_batch = capture_routing(
        model, [batch], token_metadata=[{"split": ["train", "test"]}], progress=False
    )
    assert per_batch.tokens["split"].tolist() == ["train"] * 4 + ["test"] * 3

    with pytest.raises(ValueError, match="one row per non-pad token"):
        capture_routing(model, [batch], token_metadata=table.iloc[:5], progress=False)
    with pytest.raises(ValueError, match="'domain' must have shape"):
        capture_routing(model, [{**batch, "domain": ["math"] * 3}], progress=False)
    with pytest.raises(ValueError, match="clashes"):
        capture_routing(model, [{**batch, "position": [0, 1]}], progress=False)


def test_bad_arguments_are_named():
    model = tiny_model("olmoe")
    with pytest.raises(ValueError, match="wrap it in a list"):
        capture_routing(model, padded_batch()["input_ids"], progress=False)
    with pytest.raises(ValueError, match="dtype"):
        capture_routing(model, [padded_batch()], dtype=torch.int8, progress=False)
    with pytest.raises(ValueError, match="input_ids"):
        capture_routing(model, [{"ids": torch.zeros(1, 3)}], progress=False)
    with pytest.raises(ValueError, match="attention_mask of batch 0"):
        bad = {"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": torch.ones(2, 3)}
        capture_routing(model, [bad], progress=False)
    with pytest.raises(ValueError, match="must hold integers"):
        bad = {"input_ids": torch.ones(2, 4), "attention_mask": torch.ones(2, 4)}
        capture_routing(model, [bad], progress=False)


# ---------------------------------------------------------------------------------------------
# The activation matrix
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def captured_trace() -> RoutingTrace:
    batches = [padded_batch(seed=seed, n_sequences=3, seq_len=9, n_pads=seed) for seed in range(3)]
    for seed, batch in enumerate(batches):
        batch["domain"] = ["math", "law", "math"] if seed != 1 else ["law", "law", "cs"]
    return capture_routing(tiny_model("qwen3_moe"), batches, progress=False)


def test_token_matrix_columns_are_layer_times_n_experts_plus_expert(captured_trace):
    trace = captured_trace
    weights_before = trace.weights.copy()
    matrix = trace.to_matrix(level="token", value="weight")
    np.testing.assert_array_equal(trace.weights, weights_before)  # the trace is left untouched
    assert isinstance(matrix, sparse.csr_array)
    assert matrix.shape == (len(trace), N_LAYERS * N_EXPERTS)
    assert matrix.has_sorted_indices
    dense = matrix.toarray()
    expected = np.zeros_like(dense)
    for token in range(len(trace)):
        for layer in range(N_LAYERS):
            for rank in range(TOP_K):
                column = layer * N_EXPERTS + trace.expert_ids[token, layer, rank]
                expected[token, column] += trace.weights[token, layer, rank]
    np.testing.assert_array_equal(dense, expected)
    columns = trace.columns()
    assert columns.loc[2 * N_EXPERTS + 5].tolist() == [2, 2, 5]


def test_binary_matrix_has_top_k_ones_per_token_and_layer(captured_trace):
    binary = captured_trace.to_matrix(value="binary").toarray()
    assert set(np.unique(binary)) == {0.0, 1.0}
    per_layer = binary.reshape(len(captured_trace), N_LAYERS, N_EXPERTS).sum(axis=2)
    assert (per_layer == TOP_K).all()


@pytest.mark.parametrize("value", ["weight", "binary"])
def test_sample_matrix_is_sum_of_token_rows(captured_trace, value):
    trace = captured_trace
    token_rows = trace.to_matrix(level="token", value=value).toarray()
    samples, labels = trace.to_matrix(level="sample", value=value, return_labels=True)
    sequence_index = trace.tokens["sequence_index"].to_numpy()
    assert labels.tolist() == sorted(set(sequence_index.tolist())) == list(range(9))
    expected = np.stack([token_rows[sequence_index == label].sum(axis=0) for label in labels])
    np.testing.assert_allclose(samples.toarray(), expected, rtol=1e-6)

    by_domain, domains = trace.to_matrix(
        level="sample", value=value, sample_ids="domain", return_labels=True
    )
    assert domains.tolist() == ["cs", "law", "math"]
    domain = trace.tokens["domain"].to_numpy()
    expected = np.stack([token_rows[domain == label].sum(axis=0) for label in domains])
    np.testing.assert_allclose(by_domain.toarray(), expected, rtol=1e-6)

    by_array = trace.to_matrix(level="sample", value=value, sample_ids=domain)
    np.testing.assert_array_equal(by_array.toarray(), by_domain.toarray())


def test_matrix_with_per_layer_expert_counts():
    expert_ids = np.array([[[0, 1], [2, 0]], [[1, 0], [1, 2]]], dtype=np.int16)
    weights = np.array([[[0.6, 0.4], [0.7, 0.3]], [[0.5, 0.5], [0.9, 0.1]]], dtype=np.float32)
    trace = RoutingTrace(
        expert_ids=expert_ids,
        weights=weights,
        n_experts=3,
        top_k=2,
        moe_layer_ids=[0, 1],
        model_type="olmoe",
        n_experts_per_layer=[2, 3],
    )
    expected = np.array([[0.6, 0.4, 0.3, 0.0, 0.7], [0.5, 0.5, 0.0, 0.9, 0.1]], dtype=np.float32)
    np.testing.assert_array_equal(trace.to_matrix().toarray(), expected)
    summed = trace.to_matrix(level="sample", sample_ids=[7, 7]).toarray()
    np.testing.assert_allclose(summed, expected.sum(axis=0, keepdims=True))
    with pytest.raises(ValueError, match="MoE layer 0"):
        RoutingTrace(
            expert_ids=expert_ids + 1, weights=weights, n_experts=3, top_k=2,
            moe_layer_ids=[0, 1], model_type="olmoe", n_experts_per_layer=[2, 3],
        )  # fmt: skip


def test_to_matrix_bad_arguments(captured_trace):
    with pytest.raises(ValueError, match="level"):
        captured_trace.to_matrix(level="document")
    with pytest.raises(ValueError, match="value"):
        captured_trace.to_matrix(value="probability")
    with pytest.raises(ValueError, match="sample_ids must name"):
        captured_trace.to_matrix(level="sample", sample_ids="no_such_column")
    with pytest.raises(ValueError, match="one label per token"):
        captured_trace.to_matrix(level="sample", sample_ids=[0, 1])


def test_select_subsets_tokens(captured_trace):
    trace = captured_trace
    is_math = (trace.tokens["domain"] == "math").to_numpy()
    subset = trace.select(is_math)
    assert len(subset) == int(is_math.sum())
    np.testing.assert_array_equal(subset.expert_ids, trace.expert_ids[is_math])
    assert subset.tokens.index.tolist() == list(range(len(subset)))
    np.testing.assert_array_equal(
        subset.to_matrix().toarray(), trace.to_matrix().toarray()[is_math]
    )
    by_index = trace.select([3, 1])
    np.testing.assert_array_equal(by_index.weights, trace.weights[[3, 1]])


# ---------------------------------------------------------------------------------------------
# Files and streaming
# ---------------------------------------------------------------------------------------------


def _assert_same_trace(left: RoutingTrace, right: RoutingTrace) -> None:
    assert left.expert_ids.dtype == right.expert_ids.dtype == np.int16
    assert left.weights.dtype == right.weights.dtype
    np.testing.assert_array_equal(left.expert_ids, right.expert_ids)
    np.testing.assert_array_equal(left.weights, right.weights)
    pd.testing.assert_frame_equal(left.tokens, right.tokens)
    for name in (
        "n_experts", "top_k", "moe_layer_ids", "model_type", "n_experts_per_layer",
        "dense_layer_ids", "shared_experts", "metadata",
    ):  # fmt: skip
        assert getattr(left, name) == getattr(right, name), name


def test_save_load_round_trip_is_exact(captured_trace, tmp_path):
    path = captured_trace.save(tmp_path / "trace", max_shard_tokens=10)
    loaded = RoutingTrace.load(path)
    _assert_same_trace(captured_trace, loaded)
    assert not list(path.glob("*.pkl")) and not list(tmp_path.glob(".trace*"))
    shards = list(RoutingTrace.iter_shards(path))
    assert [len(shard) for shard in shards] == [10] * (len(captured_trace) // 10) + (
        [len(captured_trace) % 10] if len(captured_trace) % 10 else []
    )
    with pytest.raises(FileExistsError, match="overwrite=True"):
        captured_trace.save(path)
    captured_trace.select(np.arange(5)).save(path, overwrite=True)
    assert len(RoutingTrace.load(path)) == 5


def test_the_trace_module_reads_traces_without_torch():
    # The analysis chapters (co-activation, annotation) read traces; only capture needs torch.
    import subprocess
    import sys

    code = ("import sys, moecollab.trace, moecollab.coactivation, moecollab.annotation, "
            "moecollab.routing_health; print('torch' in sys.modules)")
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True)
    assert found.stdout.strip() == "False"


def test_stage_01s_traces_are_found_by_model(captured_trace, tmp_path):
    from moecollab.trace import load_stage_trace, stage_trace_folder

    captured_trace.save(stage_trace_folder(tmp_path, "trained"))
    assert stage_trace_folder(tmp_path, of="control") == tmp_path / "control_trace"
    _assert_same_trace(captured_trace, load_stage_trace(tmp_path))
    assert load_stage_trace(tmp_path, "control") is None  # capture_control was off
    captured_trace.select(np.arange(3)).save(stage_trace_folder(tmp_path, "control"))
    assert len(load_stage_trace(tmp_path, "control")) == 3
    with pytest.raises(FileNotFoundError):  # the trained model's trace is never optional
        load_stage_trace(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match=r"of must be one of \['control', 'trained'\]"):
        load_stage_trace(tmp_path, "twin")


def test_every_per_stage_reader_and_writer_names_its_model_of():
    # One name for "which model" (trained or control) across the stage contract.
    import inspect

    from moecollab import hsdl, models, trace

    for function in (trace.stage_trace_folder, trace.load_stage_trace, hsdl.save_stage_fit,
                     hsdl.load_stage_fit, models.save_stage_model):
        assert inspect.signature(function).parameters["of"].default == "trained", function


def test_streamed_capture_equals_in_memory(tmp_path):
    model = tiny_model("deepseek_v3", first_k_dense_replace=1)
    batches = [
        {**padded_batch(seed=seed, n_pads=seed + 1), "domain": ["a", "b"]} for seed in range(3)
    ]
    in_memory = capture_routing(model, batches, progress=False)
    out_dir = tmp_path / "capture"
    streamed = capture_routing(model, iter(batches), out_dir=out_dir, progress=False)
    _assert_same_trace(in_memory, streamed)
    header = RoutingTrace.read_header(out_dir)
    assert len(header["shards"]) == 3 and header["n_tokens"] == len(in_memory)
    assert header["dense_layer_ids"] == [0] and header["shared_experts"] is True
    shards = list(RoutingTrace.iter_shards(out_dir))
    assert [shard.tokens["sequence_index"].min() for shard in shards] == [0, 2, 4]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["capture"]

    with pytest.raises(FileExistsError, match="overwrite=True"):
        capture_routing(model, batches, out_dir=out_dir, progress=False)
    assert capture_routing(
        model, batches[:1], out_dir=out_dir, overwrite=True, progress=False, return_trace=False
    ) is None
    assert RoutingTrace.read_header(out_dir)["n_tokens"] == int(
        batches[0]["attention_mask"].sum()
    )


def test_failed_streamed_capture_leaves_nothing(tmp_path):
    def failing_batches():
        yield padded_batch()
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        capture_routing(
            tiny_model("phimoe"), failing_batches(), out_dir=tmp_path / "trace", progress=False
        )
    assert list(tmp_path.iterdir()) == []


def test_load_names_a_missing_trace(tmp_path):
    with pytest.raises(FileNotFoundError, match="metadata.json"):
        RoutingTrace.load(tmp_path)


def test_per_layer_expert_counts_of_a_pruned_model(tmp_path):
    model = tiny_model("olmoe")
    keep = torch.tensor([0, 2, 3, 5, 6, 7])  # remove experts 1 and 4 of decoder layer 1
    block = model.model.layers[1].mlp
    block.gate.weight = torch.nn.Parameter(block.gate.weight.data[keep])
    block.experts.gate_up_proj = torch.nn.Parameter(block.experts.gate_up_proj.data[keep])
    block.experts.down_proj = torch.nn.Parameter(block.experts.down_proj.data[keep])
    block.gate.num_experts = block.experts.num_experts = len(keep)

    batch = padded_batch()
    trace = capture_routing(model, [batch], progress=False)
    assert trace.n_experts_per_layer == [N_EXPERTS, len(keep), N_EXPERTS]
    assert trace.n_experts == N_EXPERTS
    assert trace.expert_ids[:, 1].max() < len(keep)
    applied_ids, applied_weights, _, _ = _reference_routing(model, batch)
    np.testing.assert_array_equal(trace.expert_ids, applied_ids.numpy())
    matrix = trace.to_matrix(value="binary")
    assert matrix.shape == (len(trace), 2 * N_EXPERTS + len(keep))
    per_layer = np.add.reduceat(matrix.toarray(), trace.column_offsets, axis=1)
    assert (per_layer == TOP_K).all()
    _assert_same_trace(trace, RoutingTrace.load(trace.save(tmp_path / "pruned")))


def test_float16_round_trip_and_repr(tmp_path):
    trace = capture_routing(
        tiny_model("gpt_oss"), [padded_batch()], dtype=torch.float16, progress=False
    )
    loaded = RoutingTrace.load(trace.save(tmp_path / "half"))
    _assert_same_trace(trace, loaded)
    assert loaded.weights.dtype == np.float16
    text = repr(loaded)
    assert "gpt_oss" in text and f"n_tokens={len(trace)}" in text and "\n" not in text
