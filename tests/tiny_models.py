"""Tiny randomly initialised Mixture-of-Experts models, one per supported family.

Built from a config with no download: a few layers, hidden size 64, 8 routed experts, top-2,
vocabulary 512. Used by the capture tests and meant to be reused by the pruning tests::

    from tiny_models import FAMILIES, tiny_model
    model = tiny_model("deepseek_v3", first_k_dense_replace=1)

The configs respect the pitfalls measured in ``notes/transformers-moe.md`` (transformers 5.24):
DeepSeek's multi-head latent attention needs ``num_key_value_heads == num_attention_heads``;
GPT-OSS and Qwen3-Next need ``layer_types`` of length ``num_hidden_layers``; OLMoE/FlexOlmo
defaults name token ids outside a small vocabulary, so pad/bos/eos are set explicitly everywhere.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

#: The families every MoE-aware module must support (``config.model_type`` values).
FAMILIES: list[str] = [
    "olmoe",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "deepseek_v2",
    "deepseek_v3",
    "phimoe",
    "gpt_oss",
    "granitemoe",
]

#: Families supported as well, whose routers follow the same contract; cheap to build.
EXTRA_FAMILIES: list[str] = ["flex_olmo", "granitemoeshared", "qwen3_next"]

VOCAB_SIZE = 512
HIDDEN_SIZE = 64
N_EXPERTS = 8
TOP_K = 2
N_LAYERS = 3
PAD_TOKEN_ID = 0

_COMMON: dict[str, Any] = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": HIDDEN_SIZE,
    "intermediate_size": 64,
    "num_hidden_layers": N_LAYERS,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "num_experts_per_tok": TOP_K,
    "pad_token_id": PAD_TOKEN_ID,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
}

# Family-specific settings on top of _COMMON; the expert-count key is the family's own.
_FAMILY_SETTINGS: dict[str, dict[str, Any]] = {
    "olmoe": {"num_experts": N_EXPERTS, "norm_topk_prob": False},
    "flex_olmo": {"num_experts": N_EXPERTS, "norm_topk_prob": False},
    "mixtral": {"num_local_experts": N_EXPERTS},
    "phimoe": {"num_local_experts": N_EXPERTS},
    "granitemoe": {"num_local_experts": N_EXPERTS},
    "granitemoeshared": {"num_local_experts": N_EXPERTS, "shared_intermediate_size": 32},
    "qwen3_next": {
        "num_experts": N_EXPERTS,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 32,
        "norm_topk_prob": True,
        "head_dim": 16,
        "linear_num_value_heads": 4,
        "linear_num_key_heads": 2,
        "linear_key_head_dim": 16,
        "linear_value_head_dim": 16,
        "layer_types": None,  # filled to the right length in tiny_config
    },
    "qwen2_moe": {
        "num_experts": N_EXPERTS,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 64,
        "norm_topk_prob": True,
    },
    "qwen3_moe": {
        "num_experts": N_EXPERTS,
        "moe_intermediate_size": 32,
        "head_dim": 16,
        "norm_topk_prob": True,
    },
    "deepseek_v2": {
        "n_routed_experts": N_EXPERTS,
        "n_shared_experts": 1,
        "moe_intermediate_size": 32,
        "num_key_value_heads": 4,  # MLA: must equal num_attention_heads
        "first_k_dense_replace": 0,
        "kv_lora_rank": 16,
        "q_lora_rank": 32,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 8,
        "v_head_dim": 16,
        "topk_method": "greedy",
        "n_group": 1,
        "topk_group": 1,
    },
    "deepseek_v3": {
        "n_routed_experts": N_EXPERTS,
        "n_shared_experts": 1,
        "moe_intermediate_size": 32,
        "num_key_value_heads": 4,  # MLA: must equal num_attention_heads
        "first_k_dense_replace": 0,
        "kv_lora_rank": 16,
        "q_lora_rank": 32,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 8,
        "v_head_dim": 16,
        "n_group": 2,
        "topk_group": 1,
        "norm_topk_prob": True,
    },
    "gpt_oss": {
        "num_local_experts": N_EXPERTS,
        "head_dim": 16,
        "sliding_window": 16,
        "layer_types": None,  # filled to the right length in tiny_config
        # The default YaRN settings warn when max_position_embeddings is small.
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    },
}


# Families whose config needs ``layer_types`` of length num_hidden_layers.
_ALTERNATING_LAYER_TYPES: dict[str, tuple[str, str]] = {
    "gpt_oss": ("sliding_attention", "full_attention"),
    "qwen3_next": ("linear_attention", "full_attention"),
}


def tiny_config(family: str, **overrides: Any):
    """The config of a tiny model of ``family``; ``overrides`` replace any setting.

    Parameters
    ----------
    family : str
        A ``config.model_type``, one of :data:`FAMILIES` or :data:`EXTRA_FAMILIES`.
    **overrides
        Config keys to set (e.g. ``num_hidden_layers=2``, ``first_k_dense_replace=1``).

    Returns
    -------
    transformers.PretrainedConfig
    """
    if family not in _FAMILY_SETTINGS:
        known = ", ".join(FAMILIES + EXTRA_FAMILIES)
        raise ValueError(f"family must be one of {known}; got {family!r}")
    settings = {**_COMMON, **_FAMILY_SETTINGS[family], **overrides}
    if family in _ALTERNATING_LAYER_TYPES and settings.get("layer_types") is None:
        first, second = _ALTERNATING_LAYER_TYPES[family]
        n_layers = settings["num_hidden_layers"]
        settings["layer_types"] = [first if i % 2 == 0 else second for i in range(n_layers)]
    return AutoConfig.for_model(family, **settings)


def tiny_model(family: str, *, seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """A tiny randomly initialised causal LM of ``family``, in eval mode, fp32, on the CPU.

    Parameters
    ----------
    family : str
        A ``config.model_type``, one of :data:`FAMILIES` or :data:`EXTRA_FAMILIES`.
    seed : int
        Seed of the weight initialisation (a forked RNG: the global torch state is untouched).
    **overrides
        Config keys to set, see :func:`tiny_config`.

    Returns
    -------
    transformers.PreTrainedModel
        A ``*ForCausalLM`` with ``N_LAYERS`` layers unless overridden.
    """
    config = tiny_config(family, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        # Routers of some families start at zero bias terms; give DeepSeek-V3's selection-only
        # correction bias and GPT-OSS's router bias non-zero values so they matter in tests.
        for module in model.modules():
            correction = getattr(module, "e_score_correction_bias", None)
            if isinstance(correction, torch.Tensor):
                correction.data.normal_(0.0, 0.1)
        if family == "gpt_oss":
            for layer in model.model.layers:
                layer.mlp.router.bias.data.normal_(0.0, 0.1)
    return model.eval()


def tiny_dense_model(*, seed: int = 0) -> PreTrainedModel:
    """A tiny Llama (no experts at all): the standard unsupported model in tests."""
    config = AutoConfig.for_model(
        "llama",
        **{
            key: value
            for key, value in _COMMON.items()
            if key != "num_experts_per_tok"
        },
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def padded_batch(
    *, n_sequences: int = 2, seq_len: int = 12, n_pads: int = 5, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random token ids, right-padded: the last sequence ends with ``n_pads`` pad tokens.

    Returns
    -------
    dict
        ``input_ids`` and ``attention_mask``, each of shape (n_sequences, seq_len).
    """
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB_SIZE, (n_sequences, seq_len), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[-1, seq_len - n_pads :] = 0
    input_ids[attention_mask == 0] = PAD_TOKEN_ID
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@pytest.fixture(params=FAMILIES)
def tiny_moe_model(request) -> PreTrainedModel:
    """Parametrised fixture: one tiny model per family in :data:`FAMILIES`."""
    return tiny_model(request.param)


# --------------------------------------------------------------------------------------------
# Tiny checkpoints on disk, standing in for real ones (tests/test_real_profiles.py)
# --------------------------------------------------------------------------------------------

#: Special tokens of :func:`corpus_tokenizer` (those of ``moecollab.models.train_tokenizer``).
TOKENIZER_IDS = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1}

_TOKENIZER_CACHE: dict[int, Any] = {}

# Custom code written beside a checkpoint for the trust_remote_code path: classes that are not
# part of transformers (another name, another module), built on a native family so that
# moecollab can read their routers.
_CUSTOM_CONFIG = '''\
from transformers import {base}Config


class {name}Config({base}Config):
    """A custom-code config (test stand-in); model_type stays {model_type!r}."""
'''
_CUSTOM_MODEL = '''\
from transformers import {base}ForCausalLM

from .configuration_{module} import {name}Config


class {name}ForCausalLM({base}ForCausalLM):
    """A custom-code causal LM (test stand-in)."""

    config_class = {name}Config
'''


def corpus_tokenizer(vocab_size: int = VOCAB_SIZE):
    """A byte-level BPE tokenizer of exactly ``vocab_size`` tokens, trained on corpus text.

    The same recipe as the embedded model's (``<|endoftext|>`` = 0 for BOS/EOS, ``<|pad|>`` =
    1), so a tiny model with :data:`TOKENIZER_IDS` and this vocabulary reads the corpus.
    """
    if vocab_size not in _TOKENIZER_CACHE:
        from moecollab import data, models

        corpus = data.load_corpus()
        texts = corpus.groupby("domain").head(300)["text"].tolist()
        tokenizer = models.train_tokenizer(texts, vocab_size=vocab_size)
        assert len(tokenizer) == vocab_size, len(tokenizer)
        _TOKENIZER_CACHE[vocab_size] = tokenizer
    return _TOKENIZER_CACHE[vocab_size]


def save_tiny_checkpoint(family: str, folder, *, seed: int = 0, custom_code: str | None = None,
                         dtype: torch.dtype = torch.float32, **overrides: Any):
    """Save a tiny random model of ``family`` with a corpus tokenizer, like a hub checkpoint.

    Parameters
    ----------
    family : str
        A ``config.model_type`` of :data:`FAMILIES` or :data:`EXTRA_FAMILIES`.
    folder : path
        Written with ``config.json``, ``model.safetensors`` and the tokenizer files.
    seed : int
    custom_code : str or None
        A class-name stem (e.g. ``"TinyDeepseek"``): the checkpoint then names custom classes
        ``<stem>Config`` / ``<stem>ForCausalLM`` in ``auto_map``, with their code beside the
        weights, so it loads only with ``trust_remote_code=True``.
    dtype : torch.dtype
        Dtype of the saved weights (``config.dtype``).
    **overrides
        Config keys, see :func:`tiny_config`.

    Returns
    -------
    pathlib.Path
        The folder.
    """
    import json
    from pathlib import Path

    settings = {**TOKENIZER_IDS, "max_position_embeddings": 512, **overrides}
    model = tiny_model(family, seed=seed, **settings).to(dtype)
    folder = Path(folder)
    model.save_pretrained(folder)
    corpus_tokenizer(model.config.vocab_size).save_pretrained(folder)
    if custom_code is not None:
        base = type(model).__name__.removesuffix("ForCausalLM")
        module = custom_code.lower()
        fields = {"base": base, "name": custom_code, "module": module, "model_type": family}
        (folder / f"configuration_{module}.py").write_text(_CUSTOM_CONFIG.format(**fields))
        (folder / f"modeling_{module}.py").write_text(_CUSTOM_MODEL.format(**fields))
        config = json.loads((folder / "config.json").read_text())
        config["architectures"] = [f"{custom_code}ForCausalLM"]
        config["auto_map"] = {
            "AutoConfig": f"configuration_{module}.{custom_code}Config",
            "AutoModelForCausalLM": f"modeling_{module}.{custom_code}ForCausalLM",
        }
        (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


# --------------------------------------------------------------------------------------------
# Tiny DeepSeek-MoE (v1) checkpoints in the original layout (tests/test_deepseek_v1.py)
# --------------------------------------------------------------------------------------------

#: A tiny DeepSeek-MoE (v1) config.json: the 16B model's structure (first layer dense, shared
#: experts, softmax top-k without renormalisation) at toy sizes, grouped-query attention on.
DEEPSEEK_V1_CONFIG: dict[str, Any] = {
    "architectures": ["DeepseekForCausalLM"],
    "auto_map": {
        "AutoConfig": "configuration_deepseek.DeepseekConfig",
        "AutoModel": "modeling_deepseek.DeepseekModel",
        "AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM",
    },
    "model_type": "deepseek",
    "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1,
    "first_k_dense_replace": 1, "hidden_act": "silu", "hidden_size": 64,
    "initializer_range": 0.02, "intermediate_size": 96, "max_position_embeddings": 512,
    "moe_intermediate_size": 32, "moe_layer_freq": 1, "n_routed_experts": 8,
    "n_shared_experts": 2, "norm_topk_prob": False, "num_attention_heads": 4,
    "num_experts_per_tok": 3, "num_hidden_layers": 3, "num_key_value_heads": 2,
    "pretraining_tp": 1, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 10000,
    "scoring_func": "softmax", "aux_loss_alpha": 0.001, "seq_aux": True,
    "tie_word_embeddings": False, "torch_dtype": "float32", "use_cache": True,
    "vocab_size": VOCAB_SIZE,
}


def deepseek_v1_state_dict(config: dict[str, Any], *, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights named and shaped as the original ``modeling_deepseek.py`` names them.

    Drawn from a seeded generator in a fixed order, so the same seed gives the same bytes. The
    router rows are drawn wider than the rest so that top-k choices are clear-cut (no near-ties
    that rounding could flip between two implementations).
    """
    generator = torch.Generator().manual_seed(seed)
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    head_dim = hidden // config["num_attention_heads"]
    n_kv = config["num_key_value_heads"]

    def normal(*shape, std=0.08):
        return torch.randn(*shape, generator=generator) * std

    def mlp(prefix, width):
        return {f"{prefix}.gate_proj.weight": normal(width, hidden),
                f"{prefix}.up_proj.weight": normal(width, hidden),
                f"{prefix}.down_proj.weight": normal(hidden, width)}

    weights = {"model.embed_tokens.weight": normal(vocab, hidden, std=0.5)}
    first, every = config["first_k_dense_replace"], config["moe_layer_freq"]
    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}"
        weights[f"{prefix}.input_layernorm.weight"] = 1 + normal(hidden, std=0.1)
        weights[f"{prefix}.post_attention_layernorm.weight"] = 1 + normal(hidden, std=0.1)
        attention = f"{prefix}.self_attn"
        weights[f"{attention}.q_proj.weight"] = normal(config["num_attention_heads"] * head_dim,
                                                       hidden, std=0.2)
        weights[f"{attention}.k_proj.weight"] = normal(n_kv * head_dim, hidden, std=0.2)
        weights[f"{attention}.v_proj.weight"] = normal(n_kv * head_dim, hidden, std=0.2)
        weights[f"{attention}.o_proj.weight"] = normal(hidden, hidden, std=0.2)
        if layer >= first and layer % every == 0:
            weights[f"{prefix}.mlp.gate.weight"] = normal(config["n_routed_experts"], hidden,
                                                          std=0.6)
            for expert in range(config["n_routed_experts"]):
                weights |= mlp(f"{prefix}.mlp.experts.{expert}",
                               config["moe_intermediate_size"])
            if config.get("n_shared_experts"):
                weights |= mlp(f"{prefix}.mlp.shared_experts",
                               config["moe_intermediate_size"] * config["n_shared_experts"])
        else:
            weights |= mlp(f"{prefix}.mlp", config["intermediate_size"])
    weights["model.norm.weight"] = 1 + normal(hidden, std=0.1)
    weights["lm_head.weight"] = normal(vocab, hidden, std=0.3)
    return weights


def save_tiny_deepseek_v1(folder, *, seed: int = 0, tokenizer: bool = True, **overrides: Any):
    """A tiny random DeepSeek-MoE (v1) checkpoint as the hub ships one, minus its code.

    ``config.json`` (``model_type: deepseek``, the ``auto_map`` of the real checkpoint) and
    ``model.safetensors`` in the original layout; the modeling code is deliberately absent, so
    anything that tried to run it would fail. ``overrides`` replace config keys.

    Returns
    -------
    pathlib.Path
        The folder.
    """
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    config = {**DEEPSEEK_V1_CONFIG, **overrides}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file(deepseek_v1_state_dict(config, seed=seed), str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    if tokenizer:
        corpus_tokenizer(config["vocab_size"]).save_pretrained(folder)
    return folder
