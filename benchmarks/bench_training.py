"""Training and evaluation throughput of the embedded model under different torch settings.

Stage 00 trains the embedded MoE and stage 06 evaluates some forty pruned copies of it; both
run on two CPU cores in the default study, so the settings below decide whether the study fits
its budget. Every variant is timed in the same run, interleaved (A B C A B C ...), and reported
as a ratio to the first, so a busy machine slows all of them alike:

1. ``training``: seconds per optimiser step of the default architecture (forward with router
   logits, next-token and balancing losses, backward, AdamW) for: torch's default thread count,
   one thread, the experts' ``eager`` loop instead of ``grouped_mm``, ``torch.compile``,
   bf16 autocast, and the first default architecture (16 experts of width 128, top-2).
2. ``evaluation``: seconds to evaluate one model on the field cloze task (lm-eval's ``HFLM``
   against ``moecollab.scoring.SharedContextLM``, which shares inputs and tokenization), on one
   item per held-out definition (its last field word) and on the default items (one at every
   field word, whose shorter contexts ``SharedContextLM`` reads inside the longest).

Run: ``python benchmarks/bench_training.py`` (about 10 minutes on 2 cores); ``--quick`` for a
short check.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _record import add_record_flag, record

from moecollab import data, models, training


def default_sizes() -> dict[str, int]:
    """The default profile's stage-00 architecture, read from the notebook."""
    from moecollab.params import stage_parameters
    from moecollab.stages import get_stage

    declared = stage_parameters(get_stage("00_model"), Path(__file__).resolve().parents[1])
    names = ("n_layers", "hidden_size", "n_heads", "n_experts", "top_k", "expert_size",
             "seq_len", "batch_size", "vocab_size")
    return {name: declared[name].default for name in names}


@contextlib.contextmanager
def threads(n: int | None):
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def training_variants(sizes: dict[str, int]) -> dict[str, dict]:
    return {
        "default threads, grouped_mm": {},
        "1 thread": {"threads": 1},
        "eager experts": {"experts": "eager"},
        "torch.compile": {"compile": True},
        "bf16 autocast": {"bf16": True},
        # The first default: 16 experts of width 128, top-2 (the same expert arithmetic per
        # token in 8x fewer, larger groups).
        "16 experts x 128, top-2": {"sizes": {"n_experts": 16, "expert_size": 128,
                                               "top_k": 2}},
    }


def make_step(sizes: dict[str, int], variant: dict, seed: int = 0):
    sizes = {**sizes, **variant.get("sizes", {})}
    config = models.embedded_config(
        vocab_size=sizes["vocab_size"], n_layers=sizes["n_layers"],
        hidden_size=sizes["hidden_size"], n_heads=sizes["n_heads"],
        n_experts=sizes["n_experts"], top_k=sizes["top_k"], expert_size=sizes["expert_size"],
        seq_len=sizes["seq_len"])
    model = models.build_model(config, seed=seed).train()
    if variant.get("experts"):
        model.set_experts_implementation(variant["experts"])
    forward = torch.compile(model) if variant.get("compile") else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    batch = torch.randint(0, sizes["vocab_size"], (sizes["batch_size"], sizes["seq_len"]),
                          generator=generator)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(variant.get("bf16"))):
            output = forward(input_ids=batch, output_router_logits=True)
            logits = output.logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
            loss = loss + 0.01 * training.per_layer_balance_loss(output.router_logits,
                                                                 sizes["top_k"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def time_training(sizes: dict[str, int], n_steps: int, rounds: int) -> dict[str, float]:
    variants = training_variants(sizes)
    steps = {}
    for name, variant in variants.items():
        with threads(variant.get("threads")):
            steps[name] = make_step(sizes, variant)
            for _ in range(2):  # warm-up (compilation, allocator)
                steps[name]()
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, variant in variants.items():
            with threads(variant.get("threads")):
                start = time.perf_counter()
                for _ in range(n_steps):
                    steps[name]()
                seconds[name].append((time.perf_counter() - start) / n_steps)
    return {name: statistics.median(values) for name, values in seconds.items()}


def time_evaluation(sizes: dict[str, int], max_items: int, rounds: int
                    ) -> tuple[dict[str, float], dict[str, int]]:
    """Seconds per model on the cloze task: HFLM against SharedContextLM (same tasks), and
    SharedContextLM on every blank of each definition; and the items of each variant."""
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager, get_task_dict

    from moecollab import evaluation
    from moecollab.data.cloze import make_cloze_items
    from moecollab.scoring import SharedContextLM

    corpus = data.load_corpus()
    tokenizer = models.train_tokenizer(corpus.loc[corpus["split"] == "train", "text"],
                                       vocab_size=sizes["vocab_size"])
    config = models.embedded_config(
        vocab_size=len(tokenizer), n_layers=sizes["n_layers"],
        hidden_size=sizes["hidden_size"], n_heads=sizes["n_heads"],
        n_experts=sizes["n_experts"], top_k=sizes["top_k"], expert_size=sizes["expert_size"],
        seq_len=sizes["seq_len"], tokenizer=tokenizer)
    model = models.build_model(config, seed=0).eval()
    item_sets = {blanks: make_cloze_items(corpus, tokenizer=tokenizer, blanks_per_entry=blanks)
                 .head(max_items).assign(split="held_out") for blanks in (1, 0)}
    encodings: dict = {}
    with tempfile.TemporaryDirectory() as folder:
        tasks = {}
        for blanks, items in item_sets.items():
            prefix = f"blanks{blanks}"
            names = evaluation.write_mcq_tasks(items, folder, prefix=prefix,
                                               splits=("held_out",), family="cloze")
            tasks[blanks] = get_task_dict(names[-1:], TaskManager(include_path=folder,
                                                                  include_defaults=False))
        shared = lambda: SharedContextLM(  # noqa: E731
            pretrained=model, tokenizer=tokenizer, batch_size=64, encodings=encodings)
        variants = {
            "HFLM": (lambda: HFLM(pretrained=model, tokenizer=tokenizer, batch_size=64), 1),
            "SharedContextLM": (shared, 1),
            "SharedContextLM, every field word": (shared, 0)}
        seconds: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(rounds):
            for name, (make, blanks) in variants.items():
                start = time.perf_counter()
                evaluate(lm=make(), task_dict=tasks[blanks], log_samples=True,
                         bootstrap_iters=0)
                seconds[name].append(time.perf_counter() - start)
    n_items = {name: len(item_sets[blanks]) for name, (_, blanks) in variants.items()}
    return {name: statistics.median(values) for name, values in seconds.items()}, n_items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few steps, for a quick check")
    add_record_flag(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    sizes = default_sizes()
    n_steps, rounds, max_items = (2, 1, 300) if args.quick else (5, 3, 100_000)
    train = time_training(sizes, n_steps, rounds)
    tokens = sizes["batch_size"] * sizes["seq_len"]
    first = next(iter(train))
    print(f"training step, {tokens} tokens, torch default threads = {torch.get_num_threads()}")
    for name, value in train.items():
        print(f"  {name:<30}{value:8.3f} s  {tokens / value:8,.0f} tok/s  "
              f"x{value / train[first]:.2f}")
    evaluation_seconds, n_items = time_evaluation(sizes, max_items, rounds)
    print("evaluation of one model on the cloze task (lm-eval)")
    for name, value in evaluation_seconds.items():
        print(f"  {name:<36}{value:8.1f} s  {n_items[name]:6,} items  "
              f"x{value / evaluation_seconds['HFLM']:.2f}")
    if args.record and not args.quick:
        rows = [{"measure": f"training step: {name} / default (s per step: "
                            f"{value:.2f})", "value": f"{value / train[first]:.2f}"}
                for name, value in train.items()]
        rows.append({"measure": "training throughput, default settings (tokens/s)",
                     "value": f"{tokens / train[first]:,.0f}"})
        rows += [{"measure": f"evaluation of one model, {name}, {n_items[name]:,} items (s)",
                  "value": f"{value:.1f}"} for name, value in evaluation_seconds.items()]
        ratio = evaluation_seconds["SharedContextLM"] / evaluation_seconds["HFLM"]
        rows.append({"measure": "evaluation: SharedContextLM / HFLM", "value": f"{ratio:.2f}",
                     "target": "< 1"})
        every = evaluation_seconds["SharedContextLM, every field word"]
        rows.append({"measure": "evaluation: every field word / one per definition, seconds "
                                "per model (SharedContextLM)",
                     "value": f"{every / evaluation_seconds['SharedContextLM']:.2f}"})
        record("training", "Training and evaluation throughput of the embedded model",
               rows, settings=f"default architecture {sizes}; {n_steps} steps x {rounds} "
                              "interleaved rounds; evaluation: every cloze item, median of "
                              f"{rounds}")


if __name__ == "__main__":
    main()
