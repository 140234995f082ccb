"""Store what DeepSeek-MoE's original code computes on the tiny case, for the offline test.

    .venv/bin/python tests/reference/make_deepseek_v1_fixture.py

Builds the case of ``deepseek_v1_case.py``, runs the original ``modeling_deepseek.py`` on it in
the side environment (``side_env.py``; built on first use), and writes
``tests/fixtures/deepseek_v1_reference.safetensors``: the original's float32 logits and routing,
with the checkpoint's weight digest and the versions that made it in the metadata. The fast test
``tests/test_deepseek_v1.py`` compares the project's path with this file; the slow one re-runs
the original code instead. It also prints how the two paths agree in bfloat16 (not stored, not
asserted: the two round differently, see ``moecollab.deepseek_v1``).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import deepseek_v1_case as case
import side_env
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file


def main() -> int:
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        checkpoint, inputs = case.write_case(folder)
        side_env.run_original(checkpoint, inputs, folder / "reference.safetensors")
        with safe_open(str(folder / "reference.safetensors"), "pt") as handle:
            metadata = dict(handle.metadata())
        reference = load_file(str(folder / "reference.safetensors"))
        metadata |= {"weights_sha256": case.weights_digest(checkpoint), "seed": str(case.SEED),
                     "inputs": json.dumps({name: value.tolist() for name, value in
                                           load_file(str(inputs)).items()})}
        case.FIXTURE.parent.mkdir(parents=True, exist_ok=True)
        save_file(reference, str(case.FIXTURE), metadata=metadata)
        print(f"wrote {case.FIXTURE} ({case.FIXTURE.stat().st_size:,} bytes) with "
              f"transformers {metadata['transformers']}, torch {metadata['torch']}")

        ours = case.project_outputs(checkpoint, inputs, folder / "converted")
        theirs = case.reference_outputs(reference, inputs)
        print(f"float32: max |logits difference| "
              f"{(ours['logits'] - theirs['logits']).abs().max():.2e}, same experts: "
              f"{torch.equal(ours['expert_ids'], theirs['expert_ids'])}")
        side_env.run_original(checkpoint, inputs, folder / "bf16.safetensors", dtype="bfloat16")
        theirs = case.reference_outputs(load_file(str(folder / "bf16.safetensors")), inputs)
        ours = case.project_outputs(checkpoint, inputs, folder / "converted",
                                    dtype=torch.bfloat16)
        same = (ours["expert_ids"] == theirs["expert_ids"]).all(-1)
        print(f"bfloat16: max |logits difference| "
              f"{(ours['logits'] - theirs['logits']).abs().max():.2e}; "
              f"{same.float().mean():.1%} of (token, layer) pairs choose the same experts")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
