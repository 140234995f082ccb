"""Cost of routing capture: plain forward passes vs the same passes with capture.

A randomly initialised OLMoE of realistic small size (4 layers, hidden 512, 16 experts, top-2,
vocabulary 8192, about 50M parameters) runs over the same batches in four modes, alternated over
several repeats (order rotated); the median wall time of each is printed with its ratio to the
plain forward:

- ``forward``: ``model(input_ids, attention_mask)`` under ``torch.inference_mode`` (full logits);
- ``forward_last_logit``: the same with ``logits_to_keep=1``, which is what capture runs (routing
  does not depend on the LM head), so ``capture / forward_last_logit`` is the hooks' own cost;
- ``capture``: :func:`moecollab.capture.capture_routing` in memory;
- ``capture_streamed``: the same, streamed to a temporary folder (shards + parquet).

It also prints the trace size (sparse ids + weights) against a dense float32 tokens × experts
matrix, the size on disk, and (full run) the peak of Python-tracked memory (numpy, pandas) for an
in-memory and a streamed capture, to show that streaming keeps memory at one batch.

Run: ``python benchmarks/bench_capture.py`` (about a minute on 2 idle cores) or ``--quick``.
Timings use one torch thread by default: on a shared 2-core machine, two OpenMP threads competing
with other processes made single passes swing between 0.85 s and 8 s (measured), hiding any
capture cost; with one thread the spread was under 10 %. ``--threads 2`` measures the other case.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import tracemalloc
from pathlib import Path

import torch
from _record import add_record_flag, record
from transformers import OlmoeForCausalLM

from moecollab.capture import capture_routing
from moecollab.models import build_model as build_embedded_model
from moecollab.models import embedded_config


def build_model(hidden_size: int, vocab_size: int, seed: int) -> OlmoeForCausalLM:
    """The embedded model's architecture (4 layers, 16 experts, top-2), randomly initialised."""
    config = embedded_config(vocab_size=vocab_size, n_layers=4, hidden_size=hidden_size,
                             n_heads=8, n_experts=16, top_k=2,
                             expert_size=hidden_size * 3 // 4, seq_len=1024)
    return build_embedded_model(config, seed=seed).eval()


def build_batches(
    n_sequences: int, seq_len: int, batch_size: int, vocab_size: int, seed: int
) -> list[dict[str, torch.Tensor]]:
    """Random token ids; every other sequence ends with up to seq_len/4 pad tokens."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for start in range(0, n_sequences, batch_size):
        n_rows = min(batch_size, n_sequences - start)
        input_ids = torch.randint(3, vocab_size, (n_rows, seq_len), generator=generator)
        attention_mask = torch.ones_like(input_ids)
        n_pads = torch.randint(0, seq_len // 4, (n_rows,), generator=generator)
        for row in range(0, n_rows, 2):
            attention_mask[row, seq_len - int(n_pads[row]) :] = 0
        input_ids[attention_mask == 0] = 0
        batches.append({"input_ids": input_ids, "attention_mask": attention_mask})
    return batches


def folder_bytes(path: Path) -> int:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small model and data, 2 repeats")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per mode")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: steadier timings on a shared machine)",
    )
    add_record_flag(parser)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    if args.quick:
        hidden_size, n_sequences, seq_len, batch_size, repeats = 256, 16, 128, 8, 2
    else:
        hidden_size, n_sequences, seq_len, batch_size, repeats = 512, 16, 256, 8, 7
    repeats = args.repeats or repeats
    vocab_size = 8192

    model = build_model(hidden_size, vocab_size, seed=0)
    batches = build_batches(n_sequences, seq_len, batch_size, vocab_size, seed=0)
    n_params = sum(parameter.numel() for parameter in model.parameters())
    n_tokens = sum(int(batch["attention_mask"].sum()) for batch in batches)
    print(
        f"OLMoE 4 layers, hidden {hidden_size}, 16 experts, top-2, vocab {vocab_size}: "
        f"{n_params / 1e6:.1f}M parameters; {len(batches)} batches of {batch_size}x{seq_len}, "
        f"{n_tokens} non-pad tokens; torch {torch.__version__}, {args.threads} threads"
    )

    with tempfile.TemporaryDirectory(prefix="bench_capture_") as tmp:
        rows = run_benchmark(model, batches, n_tokens, repeats, Path(tmp), quick=args.quick)
    if args.record:
        record("capture", "Routing capture vs the same forward pass; sparse trace vs dense",
               rows, settings=f"OLMoE 4 layers x 16 experts, top-2, hidden {hidden_size}; "
                              f"{n_tokens} tokens; median of {repeats} alternated repeats")


def run_benchmark(
    model: OlmoeForCausalLM,
    batches: list[dict[str, torch.Tensor]],
    n_tokens: int,
    repeats: int,
    workdir: Path,
    *,
    quick: bool,
) -> list[dict[str, str]]:
    def forward(**kwargs) -> None:
        with torch.inference_mode():
            for batch in batches:
                model(**batch, use_cache=False, **kwargs)

    run_index = 0

    def capture_streamed() -> None:
        nonlocal run_index
        run_index += 1
        capture_routing(
            model, batches, out_dir=workdir / f"run{run_index}", progress=False,
            return_trace=False,
        )  # fmt: skip

    modes = {
        "forward": lambda: forward(),
        "forward_last_logit": lambda: forward(logits_to_keep=1),
        "capture": lambda: capture_routing(model, batches, progress=False),
        "capture_streamed": capture_streamed,
    }
    for run in modes.values():  # warm-up: first calls pay one-off kernel and import costs
        run()
    times: dict[str, list[float]] = {name: [] for name in modes}
    names = list(modes)
    for repeat in range(repeats):
        # Rotate the order so that no mode always runs first (or after the same one).
        for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
            run = modes[name]
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)

    median = {name: statistics.median(values) for name, values in times.items()}
    best = {name: min(values) for name, values in times.items()}
    print(f"\nmedian of {repeats} alternated repeats (seconds, tokens/s, ratio):")
    for name in modes:
        print(
            f"  {name:<20} {median[name]:7.3f} s  {n_tokens / median[name]:8.0f} tok/s  "
            f"x{median[name] / median['forward']:.3f} vs forward  "
            f"x{median[name] / median['forward_last_logit']:.3f} vs forward_last_logit  "
            f"(all: {', '.join(f'{value:.2f}' for value in times[name])})"
        )
    for name in ("capture", "capture_streamed"):
        print(
            f"{name} vs the same forward (logits_to_keep=1): "
            f"median x{median[name] / median['forward_last_logit']:.3f}, "
            f"best-of x{best[name] / best['forward_last_logit']:.3f}; "
            f"vs full forward: median x{median[name] / median['forward']:.3f} (target <= 1.05)"
        )

    trace = capture_routing(model, batches, progress=False)
    sparse_bytes = trace.expert_ids.nbytes + trace.weights.nbytes
    table_bytes = int(trace.tokens.memory_usage(deep=True).sum())
    dense_bytes = len(trace) * trace.n_columns * 4
    disk_bytes = folder_bytes(workdir / "run1")
    print(
        f"\ntrace of {len(trace)} tokens x {trace.n_moe_layers} layers x top-{trace.top_k}: "
        f"ids+weights {sparse_bytes / 1e6:.2f} MB (+ token table {table_bytes / 1e6:.2f} MB); "
        f"dense float32 tokens x {trace.n_columns} experts: {dense_bytes / 1e6:.2f} MB "
        f"(x{dense_bytes / sparse_bytes:.1f}); on disk (streamed): {disk_bytes / 1e6:.2f} MB"
    )

    rows = [
        {"measure": "capture time / forward time (same forward, logits_to_keep=1)",
         "value": f"{median['capture'] / median['forward_last_logit']:.3f}",
         "target": "<= 1.05"},
        {"measure": "streamed capture time / forward time",
         "value": f"{median['capture_streamed'] / median['forward_last_logit']:.3f}",
         "target": "<= 1.05"},
        {"measure": "capture time / full forward time (with logits)",
         "value": f"{median['capture'] / median['forward']:.3f}", "target": ""},
        {"measure": "dense float32 matrix size / sparse trace size",
         "value": f"{dense_bytes / sparse_bytes:.1f}", "target": "> 1"},
    ]
    if not quick:
        peaks = {}
        for name, run in (("capture", modes["capture"]), ("capture_streamed", capture_streamed)):
            tracemalloc.start()
            run()
            peaks[name] = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        print(
            "peak Python-tracked memory (numpy/pandas, not torch): "
            + ", ".join(f"{name} {peak / 1e6:.2f} MB" for name, peak in peaks.items())
            + f"; one batch of ids+weights is {sparse_bytes / len(batches) / 1e6:.2f} MB"
        )
    return rows


if __name__ == "__main__":
    main()
