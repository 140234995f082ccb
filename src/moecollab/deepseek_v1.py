"""DeepSeek-MoE (v1) checkpoints, converted once to transformers' native ``Qwen2MoeForCausalLM``.

DeepSeek-MoE-16B (``deepseek-ai/deepseek-moe-16b-base``, ``model_type: deepseek``), the paper's
pruning model, ships its class as Python code written for transformers 4.36. That code imports
``transformers.modeling_attn_mask_utils``, which transformers 5 removed, and its experts are a
list of modules rather than the fused tensors every other family here uses. Rather than run or
re-implement that code, this module rewrites the checkpoint's weights, once, into the layout of a
class transformers ships: ``Qwen2MoeForCausalLM`` computes exactly the same function when

- the layers before ``first_k_dense_replace`` (and any off the ``moe_layer_freq`` grid) are
  Qwen2-MoE's ``mlp_only_layers`` (a dense MLP of ``intermediate_size``);
- the routed experts, the router (softmax over all routed experts, top-k, renormalised only if
  ``norm_topk_prob``: DeepSeek-MoE-16B does not) and the dense MLPs keep their weights and names;
- the ``n_shared_experts`` shared experts, one MLP of width ``n_shared_experts ×
  moe_intermediate_size`` added to every token unscaled, become Qwen2-MoE's ``shared_expert``,
  whose output Qwen2-MoE multiplies by ``sigmoid(shared_expert_gate(x))``: the gate's weight is
  set to zero, so the factor is exactly 1/2 for every token, and the shared expert's
  ``down_proj`` is doubled to compensate (both are powers of two, so no rounding is added);
- the attention, which has no biases (``attention_bias: false``), gets zero q/k/v biases
  (Qwen2-MoE's checkpoints always carry them; zeros keep every reader of that layout, vLLM
  included, on the same numbers).

The converted folder is a plain ``qwen2_moe`` checkpoint: it loads with stock
``AutoModelForCausalLM.from_pretrained``, lm-eval and vLLM, and moecollab captures, masks,
prunes and exports it like any other family. Its ``config.json`` records where it came from
(``converted_from``). The conversion streams one weight shard at a time (peak memory: one shard)
and writes into a cache, keyed by a fingerprint of the source (its ``config.json`` and the
headers of its safetensors shards), so it runs once per checkpoint.

Equivalence with the original code is tested on a tiny random checkpoint
(``tests/test_deepseek_v1.py``): logits agree to 1e-4 and the chosen experts and their weights
agree, in float32. In bfloat16 the original computes the router softmax in bfloat16 and
Qwen2-MoE in float32, so experts whose scores tie within bfloat16 rounding may be chosen
differently.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import struct
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: ``config.model_type`` of DeepSeek-MoE (v1) checkpoints.
MODEL_TYPE = "deepseek"
#: Bump when the converted layout changes: cached conversions of older versions are redone.
CONVERTER_VERSION = 1
#: The file written last into a finished conversion (its presence marks the folder complete).
CONVERSION_RECORD = "conversion.json"
#: Environment variable naming the folder converted checkpoints are cached in.
CACHE_ENV = "MOECOLLAB_CONVERTED_CACHE"
#: Files copied unchanged from the source checkpoint (the tokenizer and generation defaults).
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "tokenizer.model", "generation_config.json")
#: What a hub download fetches: no custom code and no pickled weights.
HUB_PATTERNS = ("config.json", "*.safetensors", "model.safetensors.index.json", *COPIED_FILES)

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


class ConversionError(ValueError):
    """The checkpoint cannot be converted (one-line message naming what is unsupported)."""


def is_deepseek_v1(config: Mapping[str, Any]) -> bool:
    """Whether a ``config.json`` (as a dict) is a DeepSeek-MoE (v1) checkpoint.

    Examples
    --------
    >>> is_deepseek_v1({"model_type": "deepseek"}), is_deepseek_v1({"model_type": "deepseek_v2"})
    (True, False)
    """
    return config.get("model_type") == MODEL_TYPE


def moe_layer_ids(config: Mapping[str, Any]) -> list[int]:
    """Decoder layers with a sparse MoE block, by the original code's rule.

    Examples
    --------
    >>> moe_layer_ids({"num_hidden_layers": 4, "n_routed_experts": 8,
    ...                "first_k_dense_replace": 1, "moe_layer_freq": 1})
    [1, 2, 3]
    """
    if not config.get("n_routed_experts"):
        return []
    first = int(config.get("first_k_dense_replace", 0))
    every = int(config.get("moe_layer_freq", 1))
    return [layer for layer in range(int(config["num_hidden_layers"]))
            if layer >= first and layer % every == 0]


def shape(config: Mapping[str, Any]) -> tuple[int, int]:
    """(routed experts per MoE layer, experts chosen per token) of a DeepSeek-MoE config."""
    return int(config["n_routed_experts"]), int(config["num_experts_per_tok"])


def check_convertible(config: Mapping[str, Any], source: str = "the checkpoint") -> None:
    """Refuse, in one line, the DeepSeek-MoE settings the converted class cannot reproduce."""
    problems = []
    if config.get("scoring_func", "softmax") != "softmax":
        problems.append(f"scoring_func {config['scoring_func']!r} (only 'softmax')")
    if config.get("rope_scaling"):
        problems.append(f"rope_scaling {config['rope_scaling']!r} (only none)")
    if config.get("attention_bias"):
        problems.append("attention_bias true (Qwen2-MoE has no output-projection bias)")
    if not moe_layer_ids(config):
        problems.append("no MoE layer (n_routed_experts is empty)")
    if problems:
        raise ConversionError(f"{source} (model_type deepseek) cannot be converted to "
                              f"Qwen2MoeForCausalLM: {'; '.join(problems)}")


def qwen2_moe_config(config: Mapping[str, Any]):
    """The ``Qwen2MoeConfig`` that computes what a DeepSeek-MoE (v1) config computes.

    Parameters
    ----------
    config : mapping
        The DeepSeek checkpoint's ``config.json``.

    Returns
    -------
    transformers.Qwen2MoeConfig
    """
    from transformers import Qwen2MoeConfig

    check_convertible(config)
    n_layers = int(config["num_hidden_layers"])
    sparse = set(moe_layer_ids(config))
    n_shared = int(config.get("n_shared_experts") or 0)
    moe_width = int(config["moe_intermediate_size"])
    return Qwen2MoeConfig(
        vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"], moe_intermediate_size=moe_width,
        # No shared expert: a zero MLP of width 1 (Qwen2-MoE always has one).
        shared_expert_intermediate_size=moe_width * n_shared if n_shared else 1,
        num_hidden_layers=n_layers, num_attention_heads=config["num_attention_heads"],
        num_key_value_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
        hidden_act=config.get("hidden_act", "silu"),
        max_position_embeddings=config.get("max_position_embeddings", 4096),
        initializer_range=config.get("initializer_range", 0.02),
        rms_norm_eps=config.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        rope_parameters={"rope_type": "default",
                         "rope_theta": float(config.get("rope_theta", 10000.0))},
        attention_dropout=float(config.get("attention_dropout", 0.0)),
        decoder_sparse_step=1,
        mlp_only_layers=[layer for layer in range(n_layers) if layer not in sparse],
        num_experts=int(config["n_routed_experts"]),
        num_experts_per_tok=int(config["num_experts_per_tok"]),
        norm_topk_prob=bool(config.get("norm_topk_prob", False)),
        qkv_bias=True, use_sliding_window=False,
        bos_token_id=config.get("bos_token_id"), eos_token_id=config.get("eos_token_id"),
        pad_token_id=config.get("pad_token_id"),
        architectures=["Qwen2MoeForCausalLM"],
        dtype=config.get("torch_dtype") or config.get("dtype") or "bfloat16",
    )


# --------------------------------------------------------------------------------- weights


def _converted_tensors(name: str, tensor, config: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    """The converted tensor(s) for one source tensor, and those added beside it."""
    import torch

    match = _LAYER.match(name)
    layer = int(match.group(1)) if match else None
    if ".mlp.shared_experts." in name:
        new_name = name.replace(".mlp.shared_experts.", ".mlp.shared_expert.")
        # Qwen2-MoE halves the shared expert (sigmoid(0) = 1/2): double its output projection.
        yield new_name, tensor * 2 if new_name.endswith("down_proj.weight") else tensor
        return
    yield name, tensor
    if name.endswith(".self_attn.q_proj.weight"):
        head_dim = int(config["hidden_size"]) // int(config["num_attention_heads"])
        n_kv = int(config.get("num_key_value_heads") or config["num_attention_heads"])
        prefix = name.removesuffix("q_proj.weight")
        yield prefix + "q_proj.bias", torch.zeros(tensor.shape[0], dtype=tensor.dtype)
        for projection in ("k_proj", "v_proj"):
            yield prefix + f"{projection}.bias", torch.zeros(n_kv * head_dim, dtype=tensor.dtype)
    elif name.endswith(".mlp.gate.weight") and layer is not None:
        hidden = tensor.shape[1]
        prefix = name.removesuffix("gate.weight")
        yield prefix + "shared_expert_gate.weight", torch.zeros(1, hidden, dtype=tensor.dtype)
        if not config.get("n_shared_experts"):
            for projection, size in (("gate_proj", (1, hidden)), ("up_proj", (1, hidden)),
                                     ("down_proj", (hidden, 1))):
                yield (prefix + f"shared_expert.{projection}.weight",
                       torch.zeros(*size, dtype=tensor.dtype))


def _weight_files(folder: Path) -> list[str]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    files = sorted(path.name for path in folder.glob("*.safetensors"))
    if not files:
        raise ConversionError(f"{folder} has no .safetensors weights (only safetensors "
                              "checkpoints are converted, never pickles)")
    return files


def convert_checkpoint(source: str | os.PathLike, target: str | os.PathLike, *,
                       progress: bool = True) -> Path:
    """Write the ``Qwen2MoeForCausalLM`` checkpoint equivalent to a DeepSeek-MoE (v1) folder.

    Parameters
    ----------
    source : folder with ``config.json`` (``model_type: deepseek``) and safetensors weights
    target : folder to create (must not exist); shards keep the source's names and split
    progress : show a progress bar over the shards

    Returns
    -------
    pathlib.Path
        ``target``, with ``config.json``, the weights, the tokenizer files and
        ``conversion.json`` (what was converted, by which version, how long it took).
    """
    from safetensors import safe_open
    from safetensors.torch import save_file
    from tqdm import tqdm

    source, target = Path(source), Path(target)
    config = json.loads((source / "config.json").read_text())
    if not is_deepseek_v1(config):
        raise ConversionError(f"{source} has model_type {config.get('model_type')!r}, not "
                              f"{MODEL_TYPE!r}: nothing to convert")
    check_convertible(config, str(source))
    started = time.perf_counter()
    target.mkdir(parents=True)
    files = _weight_files(source)
    weight_map: dict[str, str] = {}
    n_bytes = 0
    for filename in tqdm(files, desc="converting DeepSeek-MoE shards", disable=not progress):
        converted: dict[str, Any] = {}
        with safe_open(str(source / filename), framework="pt") as shard:
            for name in shard.keys():  # noqa: SIM118 (safe_open has no __iter__)
                for new_name, tensor in _converted_tensors(name, shard.get_tensor(name), config):
                    converted[new_name] = tensor.contiguous()
        save_file(converted, str(target / filename), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(converted, filename))
        n_bytes += sum(tensor.numel() * tensor.element_size() for tensor in converted.values())
        del converted
    if len(files) > 1:
        (target / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": n_bytes}, "weight_map": dict(sorted(weight_map.items()))},
            indent=2))
    qwen_config = qwen2_moe_config(config)
    qwen_config.converted_from = {"model_type": MODEL_TYPE,
                                  "architectures": config.get("architectures"),
                                  "converter": f"moecollab.deepseek_v1 {CONVERTER_VERSION}"}
    qwen_config.save_pretrained(target)
    for name in COPIED_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)
    seconds = time.perf_counter() - started
    (target / CONVERSION_RECORD).write_text(json.dumps({
        "source": str(source), "converter_version": CONVERTER_VERSION,
        "weight_bytes": n_bytes, "seconds": round(seconds, 2)}, indent=2))
    logger.info("converted %s to Qwen2MoeForCausalLM in %.1f s (%.2f GB of weights)", source,
                seconds, n_bytes / 1e9)
    return target


# --------------------------------------------------------------------------------- caching


def _safetensors_header(path: Path) -> bytes:
    """The JSON header of a safetensors file (names, dtypes, shapes, offsets): cheap to read."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        return handle.read(length)


def source_fingerprint(folder: str | os.PathLike) -> str:
    """A hash of what decides a conversion: ``config.json`` and each shard's name, size and
    header (reading headers, not weights, keeps it fast for a 33 GB checkpoint)."""
    folder = Path(folder)
    digest = hashlib.sha256(f"converter {CONVERTER_VERSION}\n".encode())
    digest.update((folder / "config.json").read_bytes())
    for filename in _weight_files(folder):
        path = folder / filename
        digest.update(f"{filename} {path.stat().st_size}\n".encode())
        digest.update(_safetensors_header(path))
    return digest.hexdigest()


def default_cache_dir() -> Path:
    """Where converted checkpoints are cached: ``$MOECOLLAB_CONVERTED_CACHE``, else
    ``<HF_HOME>/moecollab/converted`` (beside the Hugging Face download cache)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "moecollab" / "converted"


def local_source(source: str | os.PathLike) -> Path:
    """A DeepSeek-MoE checkpoint as a local folder: the folder itself, or a hub id downloaded
    (config, safetensors and tokenizer files only: no code, no pickles) into the HF cache."""
    folder = Path(source).expanduser()
    if folder.exists():
        return folder
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(source), allow_patterns=list(HUB_PATTERNS)))


def converted_checkpoint(source: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None,
                         progress: bool = True) -> Path:
    """The converted ``Qwen2MoeForCausalLM`` folder of a DeepSeek-MoE (v1) checkpoint, made
    on first use and reused afterwards.

    Parameters
    ----------
    source : a checkpoint folder or a hub id (downloaded without its code)
    cache_dir : where conversions live (default :func:`default_cache_dir`); one subfolder per
        source fingerprint, so a changed checkpoint is converted again, never confused
    progress : show a progress bar while converting

    Returns
    -------
    pathlib.Path
        A folder :func:`moecollab.models.load_model` (or stock transformers) loads.
    """
    folder = local_source(source)
    fingerprint = source_fingerprint(folder)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    label = folder.name if Path(source).expanduser().exists() else str(source)
    name = re.sub(r"[^A-Za-z0-9._-]+", "--", label)[-80:].strip("-.") or "model"
    target = cache / f"{name}-{fingerprint[:16]}"
    if (target / CONVERSION_RECORD).is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    logger.warning("converting DeepSeek-MoE checkpoint %s to Qwen2MoeForCausalLM once, into %s",
                   source, target)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=cache))
    try:
        convert_checkpoint(folder, work / "model", progress=progress)
        from .artifacts import replace_folder

        replace_folder(work / "model", target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target
