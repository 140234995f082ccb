"""Loading pretrained checkpoints the way real-model profiles ask: dtype, device_map, custom code.

Tiny checkpoints saved by ``tiny_models.save_tiny_checkpoint``; everything offline on the CPU.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from tiny_models import FAMILIES, save_tiny_checkpoint, tiny_model

from moecollab import artifacts, models


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint("qwen2_moe", tmp_path_factory.mktemp("qwen2_moe") / "model",
                                norm_topk_prob=False)


@pytest.mark.parametrize(("model", "dtype", "device_map", "message"), [
    ("x", "bf16", "", "dtype must be one of auto, float32, bfloat16, float16; got 'bf16'"),
    ("x", "auto", "gpu", "device_map must be empty (one device) or one of auto, balanced, "
                         "balanced_low_0, sequential; got 'gpu'"),
    ("", "bfloat16", "", "dtype 'bfloat16' applies to a pretrained model (set model)"),
    ("", "auto", "auto", "device_map 'auto' applies to a pretrained model (set model)"),
])
def test_load_settings_are_checked_in_one_line(model, dtype, device_map, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")) \
            as error:
        models.check_load_settings(model, dtype, device_map)
    assert "\n" not in str(error.value)


def test_device_map_without_accelerate_says_what_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "accelerate" else real_find_spec(name))
    with pytest.raises(ValueError, match="device_map 'auto' needs the accelerate package, which "
                                         "is not installed: pip install accelerate"):
        models.check_device_map("auto")
    assert models.check_device_map("") is None  # one device needs no accelerate


def test_load_model_in_bf16_with_accelerates_device_map(checkpoint):
    reference, _ = models.load_model(checkpoint, dtype="float32")
    model, tokenizer = models.load_model(checkpoint, dtype="bfloat16", device_map="auto")
    assert model.dtype == torch.bfloat16 and not model.training
    assert len(tokenizer) == model.config.vocab_size
    for (name, weight), (_, loaded) in zip(reference.state_dict().items(),
                                           model.state_dict().items(), strict=True):
        assert torch.equal(weight.to(torch.bfloat16), loaded), name
    assert models.place(model, "cpu", "auto") is model  # accelerate placed it: left alone


def test_later_stages_load_the_model_as_stage_00_recorded(checkpoint, tmp_path):
    models.write_model_ref(tmp_path, str(checkpoint), dtype="bfloat16", device_map="")
    assert artifacts.read_json(tmp_path / "model_ref.json") == {
        "model": str(checkpoint), "trust_remote_code": False, "dtype": "bfloat16",
        "device_map": ""}
    model, _ = models.load_reference_model(tmp_path)
    assert model.dtype == torch.bfloat16
    as_float, _ = models.load_reference_model(tmp_path, dtype="float32")  # an explicit override
    assert as_float.dtype == torch.float32

    # (The tiny checkpoint itself was initialised with seed 0.)
    control = models.load_control_model(tmp_path, model.config, seed=1, dtype=torch.bfloat16)
    again = models.load_control_model(tmp_path, model, seed=1)  # the model's own dtype
    assert type(control) is type(model) and control.dtype == torch.bfloat16
    for (name, weight), (_, other) in zip(control.state_dict().items(),
                                          again.state_dict().items(), strict=True):
        assert torch.equal(weight, other), name  # the same seed gives the same control
    router = "model.layers.0.mlp.gate.weight"
    assert not torch.equal(control.state_dict()[router], model.state_dict()[router])


def test_a_model_stage_00_trained_is_saved_and_loaded_from_its_folders(checkpoint, tmp_path):
    model, tokenizer = models.load_model(checkpoint)
    control = models.build_control_model(model.config, seed=1)
    assert models.save_stage_model(model, tokenizer, tmp_path) == tmp_path / "model"
    models.save_stage_model(control, tokenizer, tmp_path, "control")
    assert models.reference_checkpoint(tmp_path) == {
        "model": str(tmp_path / "model"), "dtype": "auto", "trust_remote_code": False,
        "device_map": ""}
    loaded, loaded_tokenizer = models.load_reference_model(tmp_path)
    loaded_control = models.load_control_model(tmp_path, loaded, seed=99)  # saved: seed unused
    for original, again in ((model, loaded), (control, loaded_control)):
        for (name, weight), (_, other) in zip(original.state_dict().items(),
                                              again.state_dict().items(), strict=True):
            assert torch.equal(weight, other), name
    assert len(loaded_tokenizer) == len(tokenizer)
    with pytest.raises(ValueError, match="of must be one of"):
        models.save_stage_model(model, tokenizer, tmp_path, "twin")
    # A recorded pretrained checkpoint is what the later stages load instead.
    models.write_model_ref(tmp_path, str(checkpoint))
    assert models.reference_checkpoint(tmp_path)["model"] == str(checkpoint)


def test_custom_code_loads_only_when_trusted_and_a_broken_one_fails_in_one_line(tmp_path,
                                                                               monkeypatch):
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    folder = save_tiny_checkpoint("deepseek_v2", tmp_path / "custom", custom_code="TinyDeepseek",
                                  first_k_dense_replace=1, n_shared_experts=2)
    model, _ = models.load_model(folder, trust_remote_code=True)
    assert type(model).__name__ == "TinyDeepseekForCausalLM"
    control = models.build_control_model(model.config, seed=0, trust_remote_code=True)
    assert type(control).__name__ == "TinyDeepseekForCausalLM"
    # Without trust the custom code never runs (here the native class takes over).
    assert type(models.load_model(folder)[0]).__name__ == "DeepseekV2ForCausalLM"

    # Like DeepSeek-MoE-16B's code under transformers 5: an import that no longer exists.
    folder = save_tiny_checkpoint("deepseek_v2", tmp_path / "broken", custom_code="Broken")
    modeling = folder / "modeling_broken.py"
    modeling.write_text("from transformers.modeling_attn_mask_utils import "
                        "_prepare_4d_causal_attention_mask\n" + modeling.read_text())
    with pytest.raises(ImportError, match=r"the code shipped with .* does not import with "
                                          r"transformers 5\.\d+\.\d+ \(") as error:
        models.load_model(folder, trust_remote_code=True)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("family", FAMILIES)
def test_count_parameters_of_every_family(family):
    model = tiny_model(family)
    counts = models.count_parameters(model)
    # The per-expert rule agrees with the parameter names where the family's names are plain.
    by_name = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
    assert counts["experts"] == by_name > 0
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    config = model.config
    n_experts = getattr(config, "num_experts", None) or config.num_local_experts
    assert counts["active_per_token"] == \
        counts["total"] - by_name + by_name * config.num_experts_per_tok // n_experts

