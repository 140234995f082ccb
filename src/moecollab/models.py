"""The embedded reference model: a real ``OlmoeForCausalLM`` and its tokenizer, built from scratch.

Also the loaders every stage uses: :func:`load_model` (safetensors only, ``trust_remote_code``
only when asked) and :func:`resolve_device`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>")


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` → CUDA when present, else CPU; ``cuda`` without a GPU is an error."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda'; got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for, but no CUDA device is available")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on ``texts``, wrapped for transformers.

    Returns
    -------
    transformers.PreTrainedTokenizerFast
        With ``<|endoftext|>`` as BOS/EOS and ``<|pad|>`` as padding.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=SPECIAL_TOKENS[0], eos_token=SPECIAL_TOKENS[0],
        pad_token=SPECIAL_TOKENS[1], model_max_length=4096)


def embedded_config(*, vocab_size: int, n_layers: int = 4, hidden_size: int = 256,
                    n_heads: int = 4, n_experts: int = 16, top_k: int = 2,
                    expert_size: int = 128, seq_len: int = 256, tokenizer=None):
    """An ``OlmoeConfig`` for a small model trained from scratch.

    ``norm_topk_prob=True`` (the Mixtral/Qwen convention): the weights of a token's top-k experts
    sum to one, so removing an expert that is never chosen leaves outputs unchanged and pruned
    tokens re-route among survivors with the model's own normalisation.
    """
    from transformers import OlmoeConfig

    # OLMoE's default token ids lie outside a small vocabulary: always set them.
    special = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1}
    if tokenizer is not None:
        special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                   "pad_token_id": tokenizer.pad_token_id}
    return OlmoeConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=expert_size,
        num_hidden_layers=n_layers, num_attention_heads=n_heads, num_key_value_heads=n_heads,
        num_experts=n_experts, num_experts_per_tok=top_k, norm_topk_prob=True,
        max_position_embeddings=max(seq_len, 512), tie_word_embeddings=True,
        output_router_logits=False, router_aux_loss_coef=0.0, **special)


def build_model(config, seed: int):
    """A randomly initialised causal LM for ``config``; the same seed gives the same weights.

    For the embedded config this is an ``OlmoeForCausalLM``; for a pretrained model's config it
    is the untrained control of the same architecture.
    """
    from transformers import AutoModelForCausalLM

    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)  # initialisation draws from torch's global generator
        model = AutoModelForCausalLM.from_config(config)
    finally:
        torch.random.set_rng_state(state)
    return model


def load_model(path: str | os.PathLike, *, device: str = "cpu", dtype=None,
               trust_remote_code: bool = False):
    """Load a causal LM from a folder or hub id, from safetensors only.

    Parameters
    ----------
    path : folder with ``config.json`` and ``*.safetensors``, or a hub id
    device : ``auto``, ``cpu`` or ``cuda``
    dtype : torch dtype or None (the checkpoint's own)
    trust_remote_code : run code shipped with the checkpoint; off unless a profile asks

    Returns
    -------
    (model, tokenizer)
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = Path(path)
    if local.exists():
        if not (local / "config.json").is_file():
            raise FileNotFoundError(f"model path {path!s} has no config.json")
        if not any(local.glob("*.safetensors")):
            raise ValueError(f"model path {path!s} has no .safetensors weights "
                             "(only safetensors checkpoints are loaded)")
    if trust_remote_code:
        logger.warning("trust_remote_code=True: running code shipped with %s", path)
    target = resolve_device(device)
    config = json.loads((local / "config.json").read_text()) if local.exists() else {}
    if "kept_experts" in config or "masked_experts" in config:
        # A pruned checkpoint: per-layer expert counts and masks need moecollab's loader.
        from .pruning_apply import load_pruned

        model = load_pruned(local, dtype=dtype, device=target)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), use_safetensors=True, trust_remote_code=trust_remote_code,
            dtype=dtype if dtype is not None else "auto")
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    return model.to(target).eval(), tokenizer


def count_parameters(model) -> dict[str, int]:
    """Total parameters, parameters in routed experts, and parameters active per token."""
    config = model.config
    total = sum(p.numel() for p in model.parameters())
    expert = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
    n_experts = getattr(config, "num_experts", None) or config.num_local_experts
    active = total - expert + expert * config.num_experts_per_tok // n_experts
    return {"total": total, "experts": expert, "active_per_token": active}


def load_reference_model(stage_00_folder: str | os.PathLike, *, device: str = "cpu"):
    """The model stage 00 settled on: its trained checkpoint, or the pretrained one it named.

    Returns
    -------
    (model, tokenizer)
    """
    folder = Path(stage_00_folder)
    reference = folder / "model_ref.json"
    if reference.is_file():
        settings = json.loads(reference.read_text())
        return load_model(settings["model"], device=device,
                          trust_remote_code=settings.get("trust_remote_code", False))
    return load_model(folder / "model", device=device)


def load_control_model(stage_00_folder: str | os.PathLike, reference_model, *, seed: int = 0,
                       device: str = "cpu"):
    """The untrained control: stage 00's saved ``control_model``, or, for a pretrained
    checkpoint, the same architecture randomly initialised with ``seed``."""
    folder = Path(stage_00_folder) / "control_model"
    if folder.is_dir():
        return load_model(folder, device=device)[0]
    return build_model(reference_model.config, seed=seed).to(resolve_device(device)).eval()
