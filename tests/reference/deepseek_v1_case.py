"""The DeepSeek-MoE equivalence case, shared by the tests and the script that stores the fixture.

One tiny random DeepSeek-MoE (v1) checkpoint (``tiny_models.save_tiny_deepseek_v1``, seed 0) and
one batch (two sequences of 12 tokens, the second ending in 4 pads). :func:`project_outputs` runs
it the project's way (converted to ``Qwen2MoeForCausalLM``, loaded by ``moecollab.models``,
routing captured by ``moecollab.capture``); :func:`reference_outputs` reads what the original
code produced in the side environment (``deepseek_v1_original.py``). Both return the logits of
the real (non-pad) tokens and, per token and MoE layer, the chosen experts sorted by id with their
weights in the same order (the original's top-k is unsorted).
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for tiny_models

from tiny_models import padded_batch, save_tiny_deepseek_v1  # noqa: E402

SEED = 0
FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "deepseek_v1_reference.safetensors"


def write_case(folder: Path) -> tuple[Path, Path]:
    """The tiny checkpoint (no tokenizer: only the weights matter) and the inputs file."""
    checkpoint = save_tiny_deepseek_v1(folder / "deepseek-v1", seed=SEED, tokenizer=False)
    batch = padded_batch(n_sequences=2, seq_len=12, n_pads=4, seed=SEED)
    inputs = folder / "inputs.safetensors"
    save_file({name: value.to(torch.int64).contiguous() for name, value in batch.items()},
              str(inputs))
    return checkpoint, inputs


def weights_digest(checkpoint: Path) -> str:
    """SHA-256 of the checkpoint's tensors (names, dtypes, shapes, bytes), in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(load_file(str(checkpoint / "model.safetensors")).items()):
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
        digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _sorted_routing(expert_ids: torch.Tensor, weights: torch.Tensor):
    order = expert_ids.sort(dim=-1)
    return order.values, weights.gather(-1, order.indices)


def project_outputs(checkpoint: Path, inputs: Path, cache_dir: Path, *,
                    dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Logits and routing through the project's path: convert, load, capture."""
    from moecollab import deepseek_v1, models
    from moecollab.capture import capture_routing

    batch = load_file(str(inputs))
    converted = deepseek_v1.converted_checkpoint(checkpoint, cache_dir=cache_dir,
                                                 progress=False)
    model, _ = models.load_model(converted, dtype=dtype)
    with torch.no_grad():
        logits = model(**batch).logits.float()
    trace = capture_routing(model, [batch], progress=False)  # pads dropped
    expert_ids, weights = _sorted_routing(torch.as_tensor(trace.expert_ids).long(),
                                          torch.as_tensor(trace.weights).float())
    real = batch["attention_mask"].bool()
    return {"logits": logits[real], "expert_ids": expert_ids, "weights": weights}


def reference_outputs(reference: dict[str, torch.Tensor], inputs: Path) -> dict[str, torch.Tensor]:
    """The original code's outputs, laid out as :func:`project_outputs` lays out its own."""
    real = load_file(str(inputs))["attention_mask"].bool()
    keep = real.reshape(-1)
    expert_ids = reference["expert_ids"][:, keep].permute(1, 0, 2)  # tokens, layers, top_k
    weights = reference["weights"][:, keep].permute(1, 0, 2)
    expert_ids, weights = _sorted_routing(expert_ids.long(), weights.float())
    return {"logits": reference["logits"][real], "expert_ids": expert_ids, "weights": weights}
