"""DeepSeek-MoE (v1) through its conversion to Qwen2MoeForCausalLM, checked against its own code.

The reference is the checkpoint's original ``modeling_deepseek.py``, run under transformers 4.46
in a side environment (``tests/reference/``). The fast test compares the project's path with what
that code computed on a tiny random checkpoint (stored in ``tests/fixtures/``, made by
``tests/reference/make_deepseek_v1_fixture.py``); the slow one runs the original code now.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_models import DEEPSEEK_V1_CONFIG, padded_batch, save_tiny_deepseek_v1
from transformers import AutoModelForCausalLM

from moecollab import deepseek_v1, models, preflight
from moecollab.capture import capture_routing
from moecollab.moe_arch import find_moe_layers
from moecollab.params import ParameterError
from moecollab.pruning import apply_keep_mask, save_pruned

sys.path.insert(0, str(Path(__file__).with_name("reference")))
import deepseek_v1_case as case  # noqa: E402
import side_env  # noqa: E402

ATOL = 1e-4


def assert_same_as_original(ours: dict, theirs: dict) -> None:
    torch.testing.assert_close(ours["logits"], theirs["logits"], atol=ATOL, rtol=0)
    assert torch.equal(ours["expert_ids"], theirs["expert_ids"])
    torch.testing.assert_close(ours["weights"], theirs["weights"], atol=1e-5, rtol=0)


def test_the_fixture_was_made_from_this_case(tmp_path):
    checkpoint, inputs = case.write_case(tmp_path)
    with safe_open(str(case.FIXTURE), "pt") as handle:
        metadata = handle.metadata()
    # The generator still draws the same weights, and the original code was the hub's.
    assert metadata["weights_sha256"] == case.weights_digest(checkpoint)
    assert json.loads(metadata["code"]) == side_env.ORIGINAL_FILES
    assert metadata["transformers"].startswith("4.") and metadata["dtype"] == "float32"
    stored_inputs = json.loads(metadata["inputs"])
    assert stored_inputs == {name: value.tolist() for name, value in
                             load_file(str(inputs)).items()}


def test_converted_model_equals_the_original_code_stored(tmp_path):
    checkpoint, inputs = case.write_case(tmp_path)
    ours = case.project_outputs(checkpoint, inputs, tmp_path / "converted")
    theirs = case.reference_outputs(load_file(str(case.FIXTURE)), inputs)
    assert ours["expert_ids"].shape == (20, 2, 3)  # 20 real tokens, 2 MoE layers, top-3
    assert_same_as_original(ours, theirs)


def test_the_comparison_catches_an_uncompensated_shared_expert(tmp_path, monkeypatch):
    """Without doubling the shared expert's down_proj, the gate's 1/2 shows in the logits."""
    original = deepseek_v1._converted_tensors

    def halved(name, tensor, config):
        for new_name, new_tensor in original(name, tensor, config):
            if ".shared_expert.down_proj" in new_name:
                new_tensor = new_tensor / 2
            yield new_name, new_tensor

    monkeypatch.setattr(deepseek_v1, "_converted_tensors", halved)
    checkpoint, inputs = case.write_case(tmp_path)
    ours = case.project_outputs(checkpoint, inputs, tmp_path / "converted")
    theirs = case.reference_outputs(load_file(str(case.FIXTURE)), inputs)
    assert (ours["logits"] - theirs["logits"]).abs().max() > 100 * ATOL


@pytest.mark.slow
def test_converted_model_equals_the_original_code_run_now(tmp_path):
    side_python, code, note = side_env.ensure()
    if side_python is None:
        pytest.skip(note)
    checkpoint, inputs = case.write_case(tmp_path)
    side_env.run_original(checkpoint, inputs, tmp_path / "reference.safetensors")
    theirs = case.reference_outputs(load_file(str(tmp_path / "reference.safetensors")), inputs)
    ours = case.project_outputs(checkpoint, inputs, tmp_path / "converted")
    assert_same_as_original(ours, theirs)
    # The stored fixture is what the original code computes today.
    stored = case.reference_outputs(load_file(str(case.FIXTURE)), inputs)
    assert_same_as_original(stored, theirs)


# --------------------------------------------------------------------------------------------
# The conversion itself
# --------------------------------------------------------------------------------------------


def test_conversion_runs_once_per_source(tmp_path):
    source = save_tiny_deepseek_v1(tmp_path / "a", tokenizer=False)
    first = deepseek_v1.converted_checkpoint(source, cache_dir=tmp_path / "cache", progress=False)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    again = deepseek_v1.converted_checkpoint(source, cache_dir=tmp_path / "cache", progress=False)
    assert again == first and (first / "model.safetensors").stat().st_mtime_ns == stamp
    other = save_tiny_deepseek_v1(tmp_path / "b", seed=1, tokenizer=False)
    assert deepseek_v1.converted_checkpoint(other, cache_dir=tmp_path / "cache",
                                            progress=False) != first
    record = json.loads((first / deepseek_v1.CONVERSION_RECORD).read_text())
    assert record["converter_version"] == deepseek_v1.CONVERTER_VERSION
    assert not list((tmp_path / "cache").glob(".*partial*"))


def test_converted_checkpoint_is_a_stock_qwen2_moe(tmp_path):
    source = save_tiny_deepseek_v1(tmp_path / "src", tokenizer=False)
    converted = deepseek_v1.converted_checkpoint(source, cache_dir=tmp_path / "cache",
                                                 progress=False)
    config = json.loads((converted / "config.json").read_text())
    assert config["model_type"] == "qwen2_moe" and config["mlp_only_layers"] == [0]
    assert config["converted_from"]["model_type"] == "deepseek"
    assert config["shared_expert_intermediate_size"] == 2 * 32 and not config["norm_topk_prob"]
    model = AutoModelForCausalLM.from_pretrained(converted).eval()  # no custom code
    layer = model.model.layers[1].mlp
    assert torch.count_nonzero(layer.shared_expert_gate.weight) == 0
    original = load_file(str(source / "model.safetensors"))
    torch.testing.assert_close(layer.shared_expert.down_proj.weight,
                               2 * original["model.layers.1.mlp.shared_experts.down_proj.weight"])
    assert torch.count_nonzero(model.model.layers[0].self_attn.q_proj.bias) == 0


def test_missing_shared_experts_convert_to_a_zero_shared_expert(tmp_path):
    source = save_tiny_deepseek_v1(tmp_path / "src", tokenizer=False, n_shared_experts=None)
    model, _ = models.load_model(deepseek_v1.converted_checkpoint(
        source, cache_dir=tmp_path / "cache", progress=False))
    hidden = torch.randn(5, DEEPSEEK_V1_CONFIG["hidden_size"])
    assert torch.count_nonzero(model.model.layers[1].mlp.shared_expert(hidden)) == 0


@pytest.mark.parametrize(("overrides", "match"), [
    ({"scoring_func": "sigmoid"}, "scoring_func 'sigmoid'"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
    ({"attention_bias": True}, "attention_bias"),
    ({"n_routed_experts": None}, "no MoE layer"),
])
def test_unconvertible_settings_are_refused_in_one_line(overrides, match, tmp_path):
    with pytest.raises(deepseek_v1.ConversionError, match=match) as refused:
        deepseek_v1.check_convertible({**DEEPSEEK_V1_CONFIG, **overrides})
    assert "\n" not in str(refused.value)
    source = tmp_path / "src"
    source.mkdir()
    (source / "config.json").write_text(json.dumps({**DEEPSEEK_V1_CONFIG, **overrides}))
    save_file({"x": torch.zeros(1)}, str(source / "model.safetensors"))
    with pytest.raises(ParameterError, match=match):  # the plan refuses it before any work
        preflight.read_model_config(source)


def test_the_plan_reads_the_shape_of_a_deepseek_checkpoint(tmp_path):
    source = save_tiny_deepseek_v1(tmp_path / "src", tokenizer=False)
    assert preflight.model_shape({"model": str(source)}) == (8, 3)
    with pytest.raises(ParameterError, match="leaves 2 of 8 experts per layer"):
        preflight.check_plan({"00_model": {"model": str(source)},
                              "05_pruning": {"prune_ratios": [0.75]}})


# --------------------------------------------------------------------------------------------
# The rest of the study on a converted model: capture, mask = remove, export, reload
# --------------------------------------------------------------------------------------------


@pytest.fixture
def converted_model(tmp_path, monkeypatch):
    monkeypatch.setenv(deepseek_v1.CACHE_ENV, str(tmp_path / "cache"))
    source = save_tiny_deepseek_v1(tmp_path / "src")
    model, tokenizer = models.load_model(source, trust_remote_code=True)  # no code is run
    return model, tokenizer, source


def test_load_model_converts_a_deepseek_folder_transparently(converted_model, tmp_path):
    model, tokenizer, source = converted_model
    assert type(model).__name__ == "Qwen2MoeForCausalLM"
    assert tokenizer.eos_token == "<|endoftext|>"
    assert len(list((tmp_path / "cache").iterdir())) == 1
    architecture = find_moe_layers(model)
    assert architecture.moe_layer_ids == [1, 2] and architecture.dense_layer_ids == (0,)
    assert architecture.shared_experts and architecture.top_k == 3


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def test_pruning_and_export_work_on_a_converted_model(converted_model, tmp_path):
    model, tokenizer, source = converted_model
    batch = padded_batch(n_sequences=2, seq_len=10, n_pads=3)
    keep = np.ones((2, 8), dtype=bool)
    keep[0, [1, 5]] = False
    keep[1, [0, 2, 4, 6]] = False
    trace = capture_routing(model, [batch], progress=False)
    assert trace.n_moe_layers == 2 and trace.top_k == 3

    masked = apply_keep_mask(models.load_model(source)[0], keep, mode="mask")
    removed = apply_keep_mask(models.load_model(source)[0], keep, mode="remove")
    torch.testing.assert_close(_logits(masked, batch), _logits(removed, batch), atol=1e-5,
                               rtol=1e-5)
    assert not torch.allclose(_logits(removed, batch), _logits(model, batch))
    pruned_trace = capture_routing(removed, [batch], progress=False)
    for layer, kept in enumerate(removed.config.kept_experts.values()):  # renumbered ids
        assert set(np.unique(pruned_trace.expert_ids[:, layer])) <= set(range(len(kept)))

    path = save_pruned(removed, tmp_path / "pruned", method="caep", prune_ratio=0.375,
                       calibration={}, tokenizer=tokenizer)
    reloaded, _ = models.load_model(path)
    assert torch.equal(_logits(reloaded, batch), _logits(removed, batch))

    uniform = np.ones((2, 8), dtype=bool)
    uniform[:, [3, 7]] = False
    exported = save_pruned(apply_keep_mask(models.load_model(source)[0], uniform),
                           tmp_path / "uniform", method="caep", prune_ratio=0.25, calibration={})
    stock = AutoModelForCausalLM.from_pretrained(exported).eval()
    expected = apply_keep_mask(models.load_model(source)[0], uniform)
    assert torch.equal(_logits(stock, batch), _logits(expected, batch))
