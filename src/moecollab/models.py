"""The embedded reference model: a real ``OlmoeForCausalLM`` and its tokenizer, built from scratch.

Also the loaders every stage uses: :func:`load_model` (safetensors only, ``trust_remote_code``
only when asked, a weights dtype, and accelerate's ``device_map`` for models larger than one
GPU), :func:`load_reference_model` (the model stage 00 settled on, loaded the way stage 00
recorded in ``model_ref.json``) and :func:`resolve_device`.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from . import stages

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>")
#: Weight dtypes a pretrained checkpoint can be loaded in; ``auto`` keeps the checkpoint's own.
#: The names are the plan checks' (:data:`moecollab.stages.DTYPES`, torch-free).
DTYPES: dict[str, Any] = {name: "auto" if name == "auto" else getattr(torch, name)
                          for name in stages.DTYPES}
#: accelerate's placement strategies for ``device_map`` (empty: one device, no accelerate);
#: :data:`moecollab.stages.DEVICE_MAPS` without the empty choice.
DEVICE_MAPS = tuple(name for name in stages.DEVICE_MAPS if name)

#: The file stage 00 writes when it loads a pretrained checkpoint instead of training one.
MODEL_REF = "model_ref.json"


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` → CUDA when present, else CPU; ``cpu``, ``cuda``, ``cuda:N``, ``mps`` or a
    ``torch.device`` as given; asking for CUDA without a GPU is an error.

    The one device rule of the package (models, training, HSDL, evaluation); the names are
    :data:`moecollab.stages.DEVICE`, which the plan checks profiles with.

    Examples
    --------
    >>> resolve_device("cpu")
    device(type='cpu')
    """
    if isinstance(device, torch.device):
        device = str(device)
    problem = stages.DEVICE.problem(device)
    if problem:
        raise ValueError(f"device {problem}; got {device!r}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for, but no CUDA device is available")
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


def build_model(config, seed: int, *, dtype: torch.dtype | None = None,
                trust_remote_code: bool = False):
    """A randomly initialised causal LM for ``config``; the same seed gives the same weights.

    For the embedded config this is an ``OlmoeForCausalLM``; for a pretrained model's config it
    is the untrained control of the same architecture. ``dtype`` None builds in torch's default
    (float32); ``trust_remote_code`` is needed for a config whose class is custom code.
    """
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if trust_remote_code:
        kwargs["trust_remote_code"] = True
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)  # initialisation draws from torch's global generator
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    finally:
        torch.random.set_rng_state(state)
    return model


# --------------------------------------------------------------------------------- loading


def torch_dtype(dtype: str | torch.dtype | None) -> Any:
    """``auto`` (or None) → ``"auto"``; ``float32``/``bfloat16``/``float16`` → the torch dtype.

    Examples
    --------
    >>> torch_dtype("bfloat16"), torch_dtype(None)
    (torch.bfloat16, 'auto')
    """
    if dtype is None:
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    return DTYPES[dtype]


def check_device_map(device_map: str | None) -> str | None:
    """The accelerate placement strategy, or None for one device; a clear error otherwise.

    Empty (or None) keeps the model on one device. ``auto`` (also ``balanced``,
    ``balanced_low_0``, ``sequential``) lets accelerate spread the layers over every visible
    GPU (and the CPU if they do not suffice); it needs the ``accelerate`` package.
    """
    if not device_map:
        return None
    if device_map not in DEVICE_MAPS:
        raise ValueError(f"device_map must be empty (one device) or one of "
                         f"{', '.join(DEVICE_MAPS)}; got {device_map!r}")
    if importlib.util.find_spec("accelerate") is None:
        raise ValueError(f"device_map {device_map!r} needs the accelerate package, which is not "
                         "installed: pip install accelerate (or leave device_map empty)")
    return device_map


def load_model(path: str | os.PathLike, *, device: str = "cpu", dtype=None,
               trust_remote_code: bool = False, device_map: str | None = None):
    """Load a causal LM from a folder or hub id, from safetensors only.

    Parameters
    ----------
    path : folder with ``config.json`` and ``*.safetensors``, or a hub id
    device : ``auto``, ``cpu`` or ``cuda``; where the model goes when ``device_map`` is empty
    dtype : ``auto`` / None (the checkpoint's own), ``float32``, ``bfloat16``, ``float16`` or a
        torch dtype
    trust_remote_code : run code shipped with the checkpoint; off unless a profile asks
    device_map : empty or None puts the whole model on ``device``; ``auto`` (or another
        accelerate strategy, see :func:`check_device_map`) spreads it over the visible GPUs.
        Ignored, with a warning, for a pruned checkpoint with per-layer expert counts.

    Returns
    -------
    (model, tokenizer)
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch_dtype(dtype)
    device_map = check_device_map(device_map)
    path, trust_remote_code = _native_checkpoint(path, trust_remote_code)
    local = Path(path)
    if local.exists():
        if not (local / "config.json").is_file():
            raise FileNotFoundError(f"model path {path!s} has no config.json")
        if not any(local.glob("*.safetensors")):
            raise ValueError(f"model path {path!s} has no .safetensors weights "
                             "(only safetensors checkpoints are loaded)")
    else:
        from .preflight import check_hub_reachable

        check_hub_reachable(str(path))  # offline, a hub id must be in the Hugging Face cache
    if trust_remote_code:
        logger.warning("trust_remote_code=True: running code shipped with %s", path)
    target = resolve_device(device)
    config = json.loads((local / "config.json").read_text()) if local.exists() else {}
    if "kept_experts" in config or "masked_experts" in config:
        # A pruned checkpoint: per-layer expert counts and masks need moecollab's loader.
        from .pruning_apply import load_pruned

        if device_map:
            logger.warning("device_map %r ignored for the pruned checkpoint %s: it is loaded "
                           "on %s", device_map, path, target)
        model = load_pruned(local, dtype=dtype, device=target)
    else:
        kwargs: dict[str, Any] = {"use_safetensors": True, "dtype": dtype,
                                  "trust_remote_code": trust_remote_code}
        if device_map:
            kwargs["device_map"] = device_map
        try:
            model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
        except ImportError as error:
            if not trust_remote_code:
                raise
            import transformers

            first_line = (str(error).splitlines() or [type(error).__name__])[0]
            raise ImportError(
                f"the code shipped with {path} does not import with transformers "
                f"{transformers.__version__} ({first_line}); use a checkpoint with a native "
                "transformers class, or the transformers version its code was written for"
            ) from None
        if not device_map:
            model = model.to(target)
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    return model.eval(), tokenizer


def _native_checkpoint(path: str | os.PathLike, trust_remote_code: bool):
    """What to load for ``path``: itself, or, for a DeepSeek-MoE (v1) checkpoint, its
    conversion to the native ``Qwen2MoeForCausalLM`` (made once, then cached; see
    :mod:`moecollab.deepseek_v1`), whose loading runs no code from the checkpoint."""
    from . import deepseek_v1

    local = Path(path).expanduser()
    if local.exists():
        config_path = local / "config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    else:
        from .preflight import hub_config

        config = hub_config(str(path)) or {}
    if not deepseek_v1.is_deepseek_v1(config):
        return path, trust_remote_code
    if trust_remote_code:
        logger.warning("trust_remote_code ignored for %s: DeepSeek-MoE (v1) checkpoints are "
                       "converted to Qwen2MoeForCausalLM, and their code is never run", path)
    return deepseek_v1.converted_checkpoint(path), False


def is_dispatched(model) -> bool:
    """Whether accelerate spread ``model`` over several devices (so ``.to()`` must not move it)."""
    placement = getattr(model, "hf_device_map", None) or {}
    return len({str(device) for device in placement.values()}) > 1


def place(model, device: str | torch.device, device_map: str | None = None):
    """Move ``model`` to ``device``, unless accelerate placed it (``device_map`` set)."""
    if check_device_map(device_map) or is_dispatched(model):
        return model
    return model.to(device if isinstance(device, torch.device) else resolve_device(device))


def _dispatch(model, device_map: str):
    """Spread a model built in memory over the visible devices, as ``from_pretrained`` would."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    no_split = (model._get_no_split_modules(device_map)
                if hasattr(model, "_get_no_split_modules")
                else list(getattr(model, "_no_split_modules", None) or []))
    kwargs = {"no_split_module_classes": no_split, "dtype": model.dtype}
    max_memory = None
    if device_map != "sequential":
        max_memory = get_balanced_memory(model, low_zero=device_map == "balanced_low_0",
                                         **kwargs)
    placement = infer_auto_device_map(model, max_memory=max_memory, **kwargs)
    devices = set(placement.values())
    if len(devices) == 1:
        return model.to(next(iter(devices)))
    return dispatch_model(model, placement)


def build_control_model(config, *, seed: int = 0, dtype=None, device: str = "cpu",
                        device_map: str | None = None, trust_remote_code: bool = False):
    """The untrained control of a pretrained checkpoint: its architecture, randomly initialised.

    Built on the CPU in ``dtype`` (None or ``auto``: float32), then moved to ``device``, or
    spread over the GPUs like the checkpoint when ``device_map`` is set.
    """
    dtype = torch_dtype(dtype)
    model = build_model(config, seed=seed, dtype=None if dtype == "auto" else dtype,
                        trust_remote_code=trust_remote_code)
    device_map = check_device_map(device_map)
    model = _dispatch(model, device_map) if device_map else model.to(resolve_device(device))
    return model.eval()


def release_memory() -> None:
    """Collect garbage and return cached CUDA memory, so the next large model fits."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def count_parameters(model) -> dict[str, int]:
    """Total parameters, parameters in routed experts, and parameters active per token.

    Routed-expert parameters are counted per MoE layer by
    :meth:`moecollab.moe_arch.MoELayer.parameters_per_expert` (the rule pruning counts by),
    so every supported family is counted the same way; a token uses ``top_k`` of each layer's
    experts and every other parameter (attention, embeddings, routers, shared experts).
    """
    from .moe_arch import find_moe_layers

    total = sum(p.numel() for p in model.parameters())
    layers = find_moe_layers(model).moe_layers
    per_expert = [layer.parameters_per_expert()[0] for layer in layers]
    expert = sum(size * layer.n_experts for size, layer in zip(per_expert, layers, strict=True))
    active = total - expert + sum(size * layer.top_k
                                  for size, layer in zip(per_expert, layers, strict=True))
    return {"total": total, "experts": expert, "active_per_token": active}


def write_model_ref(folder: str | os.PathLike, model: str, *, trust_remote_code: bool = False,
                    dtype: str = "auto", device_map: str = "") -> Path:
    """Record how stage 00 loaded a pretrained checkpoint, for the later stages to do the same."""
    from .artifacts import write_json

    torch_dtype(dtype)
    check_device_map(device_map)
    return write_json(Path(folder) / MODEL_REF, {
        "model": str(model), "trust_remote_code": bool(trust_remote_code),
        "dtype": dtype or "auto", "device_map": device_map or ""})


# Where stage 00 saves a model it trains and that model's untrained control (with the
# tokenizer): the contract with stages 01-06.
STAGE_MODEL_FOLDERS = {"trained": "model", "control": "control_model"}


def save_stage_model(model, tokenizer, stage_00_folder: str | os.PathLike,
                     of: str = "trained") -> Path:
    """Save a model stage 00 built, and its tokenizer, where the later stages load it."""
    if of not in STAGE_MODEL_FOLDERS:
        raise ValueError(f"of must be one of {sorted(STAGE_MODEL_FOLDERS)}; got {of!r}")
    folder = Path(stage_00_folder) / STAGE_MODEL_FOLDERS[of]
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def reference_checkpoint(stage_00_folder: str | os.PathLike) -> dict[str, Any]:
    """How to load stage 00's model from its files: the pretrained checkpoint it recorded
    (:func:`reference_settings`), or the folder of the model it trained."""
    return reference_settings(stage_00_folder) or {
        "model": str(Path(stage_00_folder) / STAGE_MODEL_FOLDERS["trained"]), "dtype": "auto",
        "trust_remote_code": False, "device_map": ""}


def reference_settings(stage_00_folder: str | os.PathLike) -> dict[str, Any] | None:
    """What :func:`write_model_ref` recorded, with defaults for older records; None when stage
    00 trained its own model."""
    reference = Path(stage_00_folder) / MODEL_REF
    if not reference.is_file():
        return None
    settings = json.loads(reference.read_text())
    return {"model": settings["model"],
            "trust_remote_code": bool(settings.get("trust_remote_code", False)),
            "dtype": settings.get("dtype", "auto"), "device_map": settings.get("device_map", "")}


def load_reference_model(stage_00_folder: str | os.PathLike, *, device: str = "cpu",
                         dtype=None, device_map: str | None = None):
    """The model stage 00 settled on: its trained checkpoint, or the pretrained one it named.

    A pretrained checkpoint is loaded the way stage 00 recorded in ``model_ref.json``
    (``trust_remote_code``, ``dtype``, ``device_map``); ``dtype`` or ``device_map`` given here
    replace the recorded ones (``device_map=""`` forces one device, e.g. a CPU copy to prune).

    Returns
    -------
    (model, tokenizer)
    """
    folder = Path(stage_00_folder)
    settings = reference_settings(folder)
    if settings is not None:
        return load_model(settings["model"], device=device,
                          trust_remote_code=settings["trust_remote_code"],
                          dtype=settings["dtype"] if dtype is None else dtype,
                          device_map=settings["device_map"] if device_map is None
                          else device_map)
    return load_model(folder / STAGE_MODEL_FOLDERS["trained"], device=device,
                      **({"dtype": dtype} if dtype is not None else {}))


def load_control_model(stage_00_folder: str | os.PathLike, reference, *, seed: int = 0,
                       device: str = "cpu", dtype=None, device_map: str | None = None):
    """The untrained control: stage 00's saved ``control_model``, or, for a pretrained
    checkpoint, the same architecture randomly initialised with ``seed``.

    ``reference`` is the reference model or its config (pass the config and free the model
    first when two copies would not fit). A built control takes ``dtype`` (default: the
    reference model's) and the recorded ``device_map`` unless one is given.
    """
    folder = Path(stage_00_folder) / STAGE_MODEL_FOLDERS["control"]
    if folder.is_dir():
        return load_model(folder, device=device)[0]
    config = getattr(reference, "config", reference)
    if dtype is None:
        dtype = getattr(reference, "dtype", None) if hasattr(reference, "config") else None
    settings = reference_settings(stage_00_folder) or {}
    if device_map is None:
        device_map = settings.get("device_map", "")
    return build_control_model(config, seed=seed, dtype=dtype, device=device,
                               device_map=device_map,
                               trust_remote_code=settings.get("trust_remote_code", False))


def check_load_settings(model: str, dtype: str = "auto", device_map: str = "") -> None:
    """Stage 00's checks of how to load the model, one line each, before any work.

    ``dtype`` and ``device_map`` apply to a pretrained checkpoint (``model``); the embedded
    model is trained from scratch in float32 on one device.
    """
    torch_dtype(dtype)
    check_device_map(device_map)
    if not model and dtype != "auto":
        raise ValueError(f"dtype {dtype!r} applies to a pretrained model (set model); the "
                         "embedded model trains in float32, so leave dtype at auto")
    if not model and device_map:
        raise ValueError(f"device_map {device_map!r} applies to a pretrained model (set model); "
                         "the embedded model trains on one device, so leave device_map empty")
