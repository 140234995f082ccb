"""The real-checkpoint profiles, run end to end on tiny random models of the same classes.

Every profile in :data:`REAL_PROFILES` names a hub checkpoint (most need a GPU, all need hub
access). Here each is checked two ways without either:

- fast: the profile resolves against the notebooks with its intended sizes (for GPU profiles the
  paper's 128 sequences of 2,048 tokens for calibration, bf16, ``device_map: auto``, the paper's
  tasks; for the laptop profile a CPU in float32) and its data source;
- end to end: the profile runs through the real runner, stage 00 to 06, with its checkpoint
  swapped for a tiny randomly initialised model of the checkpoint's transformers class (saved
  as safetensors with a tokenizer, like a hub download), the paper's datasets swapped for tiny
  local Parquet copies with their real columns, and overrides that shrink every size.

DeepSeek-MoE-16B's stand-in is a tiny checkpoint in DeepSeek's own layout (``model_type:
deepseek``, no code beside it): stage 00 converts it to ``Qwen2MoeForCausalLM``, as it would
convert the real one (``moecollab.deepseek_v1``, tested against the original code in
``tests/test_deepseek_v1.py``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from tiny_datasets import write_tiny_paper_data
from tiny_models import save_tiny_checkpoint, save_tiny_deepseek_v1

from moecollab import artifacts, deepseek_v1, runner
from moecollab.data import paper
from moecollab.stages import STAGE_NAMES
from moecollab.trace import RoutingTrace

ROOT = Path(__file__).resolve().parents[1]
PAPER_TOKENS = 128 * 2048


@dataclass(frozen=True)
class RealProfile:
    hub_id: str
    family: str                    # config.model_type of the checkpoint
    model_class: str               # the transformers class that loads it (after conversion)
    gpu: bool = True               # sized for CUDA GPUs (else: a laptop CPU)
    paper_data: bool = False       # captures, calibrates and evaluates on MMLU-Pro / MMLU
    tiny: dict[str, Any] = field(default_factory=dict)   # config keys of the stand-in


REAL_PROFILES = {
    "olmoe-1b-7b": RealProfile("allenai/OLMoE-1B-7B-0924", "olmoe", "OlmoeForCausalLM",
                               tiny={"norm_topk_prob": False}),
    # Converted once from DeepSeek's own layout (model_type deepseek) to a native class.
    "deepseek-moe-16b": RealProfile("deepseek-ai/deepseek-moe-16b-base", "deepseek",
                                    "Qwen2MoeForCausalLM", paper_data=True),
    # config.json says PhiMoEForCausalLM (its old custom code); transformers' native class loads it.
    "phi-3.5-moe": RealProfile("microsoft/Phi-3.5-MoE-instruct", "phimoe", "PhimoeForCausalLM",
                               paper_data=True),
    # SlimMoE: Phi-3.5-MoE's experts and attention slimmed (head_dim no longer hidden/heads).
    "phi-mini-moe": RealProfile("microsoft/Phi-mini-MoE-instruct", "phimoe",
                                "PhimoeForCausalLM",
                                tiny={"head_dim": 8, "attention_bias": True,
                                      "lm_head_bias": True}),
    "qwen1.5-moe": RealProfile("Qwen/Qwen1.5-MoE-A2.7B", "qwen2_moe", "Qwen2MoeForCausalLM",
                               tiny={"norm_topk_prob": False}),
    "mixtral-8x7b": RealProfile("mistralai/Mixtral-8x7B-v0.1", "mixtral", "MixtralForCausalLM"),
    "qwen3-moe": RealProfile("Qwen/Qwen3-30B-A3B", "qwen3_moe", "Qwen3MoeForCausalLM",
                             tiny={"norm_topk_prob": True}),
    "granite-1b-a400m": RealProfile(
        "ibm-granite/granite-3.0-1b-a400m-base", "granitemoe", "GraniteMoeForCausalLM",
        gpu=False, tiny={"embedding_multiplier": 12.0, "logits_scaling": 6.0,
                         "residual_multiplier": 0.22, "attention_multiplier": 0.015625,
                         "tie_word_embeddings": True}),
}

# The smoke profile's sizes, for a pretrained model (no training settings needed).
SHRINK = {
    "device": "cpu",
    "00_model.max_entries_per_domain": 150, "00_model.general_text_ratio": 0.2,
    "00_model.seq_len": 64, "00_model.batch_size": 8, "00_model.n_eval_tokens": 1024,
    "00_model.cloze_option_tokens": 4,  # tiny tokenizers have few one-token words
    "01_capture.max_tokens": 5120, "01_capture.seq_len": 64, "01_capture.batch_size": 8,
    "02_coactivation.min_count": 2,
    "03_hsdl.n_atoms": "[6, 3]", "03_hsdl.n_epochs": 3, "03_hsdl.max_samples": 2000,
    "03_hsdl.sweep_atoms": "[3, 6]", "03_hsdl.sweep_lambda_codes": "[0.02]",
    "03_hsdl.sweep_epochs": 2,
    "04_annotation.min_count": 2, "04_annotation.n_random_repeats": 20,
    "05_pruning.prune_ratios": "[0.5]",  # one ratio: each mask costs an lm-eval run in 06
    "05_pruning.n_random_seeds": 2, "05_pruning.calibration_tokens": 2560,
    "05_pruning.seq_len": 64, "05_pruning.batch_size": 8,
    "05_pruning.ablation_threshold_ratios": "[0.9, 1.0]",
    "06_evaluation.limit": 4, "06_evaluation.n_perplexity_entries": 4,
    "06_evaluation.n_random_evaluated": 1, "06_evaluation.batch_size": 8,
    "06_evaluation.tasks": "[local]",
}
# One profile keeps its bf16 weights and accelerate's device_map (all on the CPU here); the
# others run in float32 on one device, which is faster on a CPU.
KEEPS_BF16 = "olmoe-1b-7b"
# A run takes 1 to 3 minutes on 2 CPU cores, so `make e2e` (which CI runs) runs three: the bf16
# and device_map path, the converted DeepSeek-MoE on the paper's data (shared experts, a dense
# first layer), and the laptop profile; the others are marked slow (pytest -m slow). `make test`
# runs none of them: it keeps one end-to-end run, the smoke profile's.
E2E_SUITE = ("olmoe-1b-7b", "deepseek-moe-16b", "granite-1b-a400m")


def test_the_table_lists_every_real_profile():
    profiles = {path.stem for path in (ROOT / "notebooks" / "params").glob("*.yml")}
    assert profiles - {"default", "smoke"} == set(REAL_PROFILES)


@pytest.mark.parametrize("name", sorted(REAL_PROFILES))
def test_real_profile_resolves_with_its_settings(name, monkeypatch):
    # A hub id is checked against the hub only when it is online; nothing is downloaded here.
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    spec = REAL_PROFILES[name]
    plan = runner.make_plan(name, root=ROOT)
    values = plan.parameters
    assert values["00_model"]["model"] == spec.hub_id
    assert values["00_model"]["trust_remote_code"] is False  # no profile runs checkpoint code
    assert values["06_evaluation"]["backend"] == "hf"
    text = (ROOT / "notebooks" / "params" / f"{name}.yml").read_text()
    description = next(line for line in text.splitlines() if line.startswith("description:"))
    assert spec.hub_id in description and "GB" in description and "hub" in description
    if spec.gpu:
        assert values["00_model"]["dtype"] == "bfloat16"
        assert values["00_model"]["device_map"] == "auto"
        for stage in ("00_model", "01_capture", "03_hsdl", "05_pruning", "06_evaluation"):
            assert values[stage]["device"] == "cuda", stage
        assert values["05_pruning"]["calibration_tokens"] == PAPER_TOKENS
        assert values["01_capture"]["seq_len"] == values["05_pruning"]["seq_len"] == 2048
        assert values["06_evaluation"]["tasks"] == ["local", "paper"]
        assert "GPU" in description
    else:  # the laptop profile: a CPU, float32, one device
        assert values["00_model"]["device_map"] == "" and values["00_model"]["dtype"] == "float32"
        for stage in ("00_model", "01_capture", "03_hsdl", "05_pruning", "06_evaluation"):
            assert values[stage]["device"] == "cpu", stage
        assert "CPU" in description
    source = "paper" if spec.paper_data else "embedded"
    for stage in ("01_capture", "05_pruning", "06_evaluation"):
        assert values[stage]["data_source"] == source, stage
    if spec.paper_data:
        assert values["01_capture"]["domains"] == list(paper.FIELDS)
        assert values["01_capture"]["max_tokens"] >= 604109  # the paper's analysed tokens
        assert "MMLU-Pro" in description
    elif spec.gpu:
        assert values["01_capture"]["max_tokens"] == PAPER_TOKENS


def _overrides(name: str, checkpoint: Path, paper_dir: Path | None = None) -> list[str]:
    settings = {**SHRINK, "00_model.model": str(checkpoint)}
    if name != KEEPS_BF16:
        settings |= {"00_model.dtype": "float32", "00_model.device_map": ""}
    if paper_dir is not None:
        settings |= {f"{stage}.paper_data_dir": str(paper_dir)
                     for stage in ("01_capture", "05_pruning", "06_evaluation")}
    return [f"{key}={value}" for key, value in settings.items()]


def _stand_in(name: str, folder: Path) -> Path:
    spec = REAL_PROFILES[name]
    if spec.family == deepseek_v1.MODEL_TYPE:
        return save_tiny_deepseek_v1(folder)
    return save_tiny_checkpoint(spec.family, folder, **spec.tiny)


def _run_profile_on_a_tiny_model(name: str, tmp_path: Path, monkeypatch) -> list[str]:
    spec = REAL_PROFILES[name]
    monkeypatch.setenv(deepseek_v1.CACHE_ENV, str(tmp_path / "converted"))
    checkpoint = _stand_in(name, tmp_path / "checkpoint")
    paper_dir = write_tiny_paper_data(tmp_path / "paper") if spec.paper_data else None
    overrides = _overrides(name, checkpoint, paper_dir)
    plan = runner.make_plan(name, overrides=overrides, artifacts_root=tmp_path / "artifacts",
                            root=ROOT)
    assert runner.run(plan) == ["ran"] * len(STAGE_NAMES)
    folder = tmp_path / "artifacts" / name
    for stage in STAGE_NAMES:
        artifacts.verify_stage(folder / stage)

    reference = artifacts.read_json(folder / "00_model" / "model_ref.json")
    assert reference == {
        "model": str(checkpoint), "trust_remote_code": False,
        "dtype": "bfloat16" if name == KEEPS_BF16 else "float32",
        "device_map": "auto" if name == KEEPS_BF16 else ""}
    # Stage 01 loaded the model the way stage 00 recorded it: the class proves it.
    trace = json.loads((folder / "01_capture" / "trace" / "metadata.json").read_text())
    assert trace["metadata"]["model_class"] == spec.model_class
    assert (folder / "01_capture" / "control_trace" / "metadata.json").is_file()
    tokens = RoutingTrace.load(folder / "01_capture" / "trace").tokens
    if spec.paper_data:  # the analysed MMLU-Pro questions of the five fields, nothing else
        assert set(tokens["domain"]) == set(paper.FIELDS)
        assert tokens["entry_id"].str.startswith("mmlu_pro-").all()
        assert set(tokens["split"]) == {"analysis"}
    else:
        assert not tokens["entry_id"].astype(str).str.startswith("mmlu").any()
    if spec.family == deepseek_v1.MODEL_TYPE:  # converted once, reused by every stage
        assert len(list((tmp_path / "converted").iterdir())) == 1
    assert (folder / "05_pruning" / "masks.safetensors").is_file()
    results = pd.read_csv(folder / "06_evaluation" / "results.csv")
    unpruned = results[results["mask"] == "unpruned"]
    assert not unpruned.empty and unpruned["value"].notna().all()
    assert {"caep", "random"} <= set(results["method"])
    if spec.paper_data:  # evaluated on MMLU-Pro's held-out questions, field by field
        fields = set(results.loc[results["kind"] == "task", "domain"])
        assert fields == set(paper.FIELDS)
    assert (folder / "06_evaluation" / "table_1.csv").is_file()
    return overrides


def _check_standard_tasks_fail_early(name: str, overrides: list[str], artifacts_root: Path):
    """Stage 06 asked for the paper's tasks stops in its first cells, in one line: no vLLM
    here, and no hub for the datasets."""
    import importlib.util

    cases = [(["06_evaluation.backend=hf"],
              r"ValueError: the standard tasks arc_challenge, hellaswag, winogrande, rte, "
              r"openbookqa, piqa need their datasets from the hub; the hub is offline here")]
    if importlib.util.find_spec("vllm") is None:
        # (without export the plan itself refuses vllm: tests/test_bad_input.py)
        cases.append((["06_evaluation.backend=vllm", "05_pruning.export=true"],
                      r"ValueError: backend 'vllm' needs the vllm package, which is not "
                      r"installed here: pip install 'lm_eval\[vllm\]'"))
    for extra, message in cases:
        plan = runner.make_plan(name, overrides=[*overrides, "06_evaluation.tasks=[local, paper]",
                                                 *extra],
                                only="06_evaluation", artifacts_root=artifacts_root, root=ROOT)
        with pytest.raises(runner.StageFailed) as failed:
            runner.run(plan)
        assert re.search(message, str(failed.value).splitlines()[0]), str(failed.value)
        # The earlier run's results stay in place.
        artifacts.verify_stage(artifacts_root / name / "06_evaluation")


@pytest.mark.parametrize("name", [
    pytest.param(name, marks=pytest.mark.e2e if name in E2E_SUITE else pytest.mark.slow)
    for name in sorted(REAL_PROFILES)])
def test_real_profile_runs_end_to_end_on_a_tiny_model_of_its_class(name, tmp_path,
                                                                  monkeypatch):
    overrides = _run_profile_on_a_tiny_model(name, tmp_path, monkeypatch)
    if name == KEEPS_BF16:
        _check_standard_tasks_fail_early(name, overrides, tmp_path / "artifacts")


def test_the_native_class_of_each_stand_in_is_the_checkpoints():
    from transformers import AutoConfig, AutoModelForCausalLM

    for spec in REAL_PROFILES.values():
        family = "qwen2_moe" if spec.family == deepseek_v1.MODEL_TYPE else spec.family
        config_class = type(AutoConfig.for_model(family))
        assert AutoModelForCausalLM._model_mapping[config_class].__name__ == spec.model_class
