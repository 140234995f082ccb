"""Cost and savings of expert pruning: physical removal vs masking, and one-pass scoring.

A randomly initialised OLMoE (4 layers, hidden 256, intermediate 256, 32 experts, top-2,
vocabulary 8192) is pruned at 50% (the same random per-layer keep-mask, 16 of 32 experts per
layer) in two ways, :func:`moecollab.pruning.apply_keep_mask` with ``mode="remove"`` and with
``mode="mask"``. Printed side by side, from one run:

- parameter counts and their ratio to the unpruned model;
- forward time over the same batches (median of alternated repeats, order rotated, one torch
  thread) and its ratio to the unpruned forward; both pruned models give the same logits
  (checked);
- the cost of :func:`moecollab.pruning.expert_scores` (all four scores in one pass, and
  ``frequency`` + ``seer`` alone, which skip re-running experts) relative to a plain forward.

Run: ``python benchmarks/bench_pruning.py`` (under 2 minutes on 2 cores) or ``--quick``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _record import add_record_flag, record
from transformers import OlmoeForCausalLM

from moecollab.models import build_model as build_embedded_model
from moecollab.models import embedded_config
from moecollab.pruning import SCORE_METHODS, apply_keep_mask, expert_scores, random_keep_mask


def build_model(n_experts: int, top_k: int, seed: int = 0) -> OlmoeForCausalLM:
    """The embedded model's architecture with ``n_experts`` per layer, randomly initialised."""
    config = embedded_config(vocab_size=8192, n_layers=4, hidden_size=256, n_heads=4,
                             n_experts=n_experts, top_k=top_k, expert_size=256, seq_len=1024)
    return build_embedded_model(config, seed=seed).eval()


def forward_all(model: torch.nn.Module, batches: list[torch.Tensor]) -> torch.Tensor:
    with torch.inference_mode():
        outputs = [model(input_ids=batch, use_cache=False).logits[:, -1] for batch in batches]
    return torch.cat(outputs)


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer tokens and repeats")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per mode")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--prune-ratio", type=float, default=0.5)
    add_record_flag(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n_experts, top_k = 32, 2
    n_batches, batch_size, seq_len = (2, 4, 128) if args.quick else (4, 8, 128)
    repeats = args.repeats or (3 if args.quick else 9)
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(3, 8192, (batch_size, seq_len), generator=generator)
               for _ in range(n_batches)]
    n_tokens = n_batches * batch_size * seq_len

    keep_mask = random_keep_mask(4, n_experts, args.prune_ratio, random_state=0,
                                 scope="per_layer", min_per_layer=top_k)
    models = {
        "unpruned": build_model(n_experts, top_k),
        "removed": apply_keep_mask(build_model(n_experts, top_k), keep_mask, mode="remove"),
        "masked": apply_keep_mask(build_model(n_experts, top_k), keep_mask, mode="mask"),
    }
    difference = (forward_all(models["removed"], batches)
                  - forward_all(models["masked"], batches)).abs().max().item()
    for model in models.values():  # warm-up
        forward_all(model, batches[:1])
    expert_scores(models["unpruned"], batches[:1], list(SCORE_METHODS))

    modes = {
        **{name: (lambda m=model: forward_all(m, batches)) for name, model in models.items()},
        "scores_all_four": lambda: expert_scores(models["unpruned"], batches,
                                                 list(SCORE_METHODS)),
        "scores_freq_seer": lambda: expert_scores(models["unpruned"], batches,
                                                  ["frequency", "seer"]),
    }
    times: dict[str, list[float]] = {name: [] for name in modes}
    names = list(modes)
    for repeat in range(repeats):
        order = names[repeat % len(names):] + names[: repeat % len(names)]
        for name in order:
            times[name].append(timed(modes[name]))
    median = {name: statistics.median(values) for name, values in times.items()}

    parameters = {name: sum(p.numel() for p in model.parameters())
                  for name, model in models.items()}
    print(f"OLMoE 4 layers x {n_experts} experts, top-{top_k}, hidden 256; "
          f"{args.prune_ratio:.0%} pruned (per layer); {n_tokens} tokens in {n_batches} batches; "
          f"{args.threads} thread(s); median of {repeats} alternated repeats")
    print(f"max |logits(removed) - logits(masked)| = {difference:.2e}")
    print(f"{'mode':<18}{'parameters':>12}{'ratio':>8}{'seconds':>10}{'tok/s':>10}{'ratio':>8}")
    base_time = median["unpruned"]
    for name in names:
        count = parameters.get(name)
        count_text = f"{count:>12,}{count / parameters['unpruned']:>8.3f}" if count else " " * 20
        print(f"{name:<18}{count_text}{median[name]:>10.3f}{n_tokens / median[name]:>10,.0f}"
              f"{median[name] / base_time:>8.2f}")
    if args.record:
        rows = [
            {"measure": "parameters after removal / before",
             "value": f"{parameters['removed'] / parameters['unpruned']:.3f}",
             "target": "< 1 (only expert weights go)"},
            {"measure": "parameters with masking / before",
             "value": f"{parameters['masked'] / parameters['unpruned']:.3f}", "target": "1"},
            {"measure": "forward time removed / unpruned",
             "value": f"{median['removed'] / base_time:.2f}", "target": "<= 1"},
            {"measure": "forward time masked / unpruned",
             "value": f"{median['masked'] / base_time:.2f}", "target": ""},
            {"measure": "max |logits(removed) - logits(masked)|",
             "value": f"{difference:.1e}", "target": "~0 (same model)"},
            {"measure": "all four scores in one pass / plain forward",
             "value": f"{median['scores_all_four'] / base_time:.2f}", "target": ""},
        ]
        record("pruning", f"Physical removal vs masking at {args.prune_ratio:.0%} pruned",
               rows, settings=f"OLMoE 4 layers x {n_experts} experts, top-{top_k}, hidden 256; "
                              f"{n_tokens} tokens; median of {repeats} alternated repeats")


if __name__ == "__main__":
    main()
