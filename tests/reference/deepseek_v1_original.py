"""Run DeepSeek-MoE's own modeling code on a checkpoint and save its logits and routing.

This script runs in the SIDE environment (transformers 4.x, see ``side_env.py``), never in the
project's: the original ``modeling_deepseek.py`` was written for transformers 4.36 and does not
import under transformers 5. It is the reference the converter is tested against.

    python deepseek_v1_original.py --checkpoint DIR --code DIR --inputs inputs.safetensors \
        --output reference.safetensors [--dtype float32|bfloat16]

``--checkpoint`` holds ``config.json`` and the weights in the original layout; ``--code`` holds
the original ``configuration_deepseek.py`` and ``modeling_deepseek.py``; ``--inputs`` holds
``input_ids`` and ``attention_mask`` (int64, batch × sequence). The output holds ``logits``
(float32, batch × sequence × vocabulary) and, per MoE layer in decoder order, the experts the
router chose and the weights it gave them for every token (rows ``b * seq_len + s``, pads
included): ``expert_ids`` (int64) and ``weights`` (float32), each of shape
(n_moe_layers, n_tokens, top_k), exactly as ``MoEGate.forward`` returned them. Its metadata
records the transformers and torch versions and the code files' git blob hashes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

CODE_FILES = ("configuration_deepseek.py", "modeling_deepseek.py")


def git_blob_sha1(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def run(checkpoint: Path, code: Path, inputs: dict[str, torch.Tensor], dtype: torch.dtype):
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "checkpoint"
        shutil.copytree(checkpoint, folder)
        for name in CODE_FILES:  # the code sits beside config.json, as on the hub
            shutil.copy2(code / name, folder / name)
        model = AutoModelForCausalLM.from_pretrained(
            str(folder), trust_remote_code=True, torch_dtype=dtype, attn_implementation="eager")
    model.eval()
    gates = [module for name, module in model.named_modules()
             if type(module).__name__ == "MoEGate"]
    chosen = []
    hooks = [gate.register_forward_hook(
        lambda module, args, output: chosen.append((output[0].detach().clone(),
                                                    output[1].detach().float().clone())))
        for gate in gates]
    with torch.no_grad():
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                       use_cache=False).logits.float()
    for hook in hooks:
        hook.remove()
    return {"logits": logits.contiguous(),
            "expert_ids": torch.stack([ids for ids, _ in chosen]).to(torch.int64).contiguous(),
            "weights": torch.stack([weights for _, weights in chosen]).contiguous()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--code", type=Path, required=True)
    parser.add_argument("--inputs", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    inputs = load_file(str(args.inputs))
    outputs = run(args.checkpoint, args.code, inputs, getattr(torch, args.dtype))
    metadata = {"transformers": transformers.__version__, "torch": torch.__version__,
                "python": sys.version.split()[0], "dtype": args.dtype,
                "code": json.dumps({name: git_blob_sha1(args.code / name)
                                    for name in CODE_FILES})}
    save_file(outputs, str(args.output), metadata=metadata)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
