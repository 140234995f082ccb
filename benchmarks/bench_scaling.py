"""How co-activation, HSDL and the trace grow with tokens and experts, extrapolated to the paper.

The paper analyses DeepSeek-MoE-16B: 27 MoE layers x 64 routed experts (1,728 columns), top-6,
over about 604k tokens. This script builds synthetic routing of exactly that shape (tokens of
200 latent "types", each preferring six experts per layer, so that pairs really co-occur), and
times, at a few token counts:

- co-activation (stage 02's core): the selection matrix, the shuffled null, the cross-layer lift
  summary and the top cross-layer pairs; and, separately, the top triplets;
- HSDL (stage 03): one fit with the default sizes (atoms 32 and 16) at two epoch counts, whose
  difference gives the cost of one epoch;
- the trace: bytes of ids and weights per token, sparse vs a dense float32 matrix.

A line ``seconds = fixed + per_token * tokens`` is fitted to each step (every one does a fixed
amount of work per token, plus costs that depend only on the experts) and extrapolated to 604k
tokens; the growth exponent between the two largest sizes is printed to check that the growth
is indeed linear. A second sweep varies the experts per layer (16, 32, 64) at a
fixed token count to show how the cost grows with experts. Capture itself is one forward pass
of the model with hooks: it is timed beside the same forward pass for the embedded architecture
with 16 and 64 experts at two token counts (its cost follows the forward pass, which for a 16B
model is not something a CPU benchmark can time, so it is not extrapolated).

Run: ``python benchmarks/bench_scaling.py`` (about 5 minutes on 2 cores) or ``--quick``.
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np
import torch
from _record import add_record_flag, record
from scipy import sparse

from moecollab import coactivation
from moecollab.capture import capture_routing
from moecollab.hsdl import HSDL
from moecollab.models import build_model, embedded_config

PAPER_TOKENS = 604_000
PAPER_LAYERS, PAPER_EXPERTS, PAPER_TOP_K = 27, 64, 6
HSDL_ROWS_DEFAULT = 40_000  # stage 03's max_samples: HSDL fits a seeded subsample this large
HSDL_EPOCHS_DEFAULT = 60


def synthetic_routing(n_tokens: int, n_layers: int, n_experts: int, top_k: int,
                      seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Top-k ids (tokens, layers, k) and softmax weights of tokens from 200 latent types."""
    rng = np.random.default_rng(seed)
    n_types = 200
    preferred = rng.random((n_types, n_layers, n_experts)).argsort(axis=2)[:, :, :top_k]
    boost = np.zeros((n_types, n_layers, n_experts), dtype=np.float32)
    np.put_along_axis(boost, preferred, 3.0, axis=2)
    types = rng.integers(0, n_types, n_tokens)
    ids = np.empty((n_tokens, n_layers, top_k), dtype=np.int16)
    weights = np.empty((n_tokens, n_layers, top_k), dtype=np.float32)
    for start in range(0, n_tokens, 4096):  # blocks keep the score tensor small
        block = types[start:start + 4096]
        scores = rng.gumbel(size=(len(block), n_layers, n_experts)).astype(np.float32)
        scores += boost[block]
        top = np.argpartition(-scores, top_k, axis=2)[:, :, :top_k]
        top_scores = np.take_along_axis(scores, top, axis=2)
        ids[start:start + len(block)] = top
        softmax = np.exp(top_scores - top_scores.max(axis=2, keepdims=True))
        weights[start:start + len(block)] = softmax / softmax.sum(axis=2, keepdims=True)
    return ids, weights


def weight_matrix(ids: np.ndarray, weights: np.ndarray, n_experts: int) -> sparse.csr_array:
    """X of the paper: one row per token, routing weight in column layer * n_experts + expert."""
    n_tokens, n_layers, top_k = ids.shape
    columns = (ids.astype(np.int64) + n_experts * np.arange(n_layers)[None, :, None]).ravel()
    rows = np.repeat(np.arange(n_tokens), n_layers * top_k)
    return sparse.csr_array((weights.ravel(), (rows, columns)),
                            shape=(n_tokens, n_layers * n_experts))


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def time_coactivation(ids: np.ndarray, n_experts: int) -> float:
    def work():
        selected = coactivation.selection_matrix(ids, n_experts)
        shuffled = coactivation.shuffled_selection(ids, n_experts, random_state=0)
        coactivation.lift_summary(selected, shuffled, n_experts)
        coactivation.top_pairs(selected, n=20, n_experts=n_experts, min_count=10)
    return timed(work)


def time_triplets(ids: np.ndarray, n_experts: int) -> float:
    return timed(lambda: coactivation.top_triplets(ids, n=20, n_experts=n_experts,
                                                   min_count=10))


def time_hsdl(X: sparse.csr_array) -> tuple[float, float]:
    """(seconds per epoch, seconds of the NMF start) of a default-size fit (atoms 32 and 16).

    An epoch costs the same whatever the values (dense mini-batch products), so it is timed
    from random starts, 11 epochs minus 1, where nothing else varies; the NMF start is a
    one-epoch fit from NMF minus one from a random start. (From a random start the codes
    collapse, which is why stage 03 starts from NMF; it does not change the cost.)
    """
    def fit(init: str, n_epochs: int) -> float:
        return timed(lambda: HSDL(n_atoms=(32, 16), n_epochs=n_epochs, batch_size=512,
                                  init=init, random_state=0).fit(X))
    random_1, random_11, nmf_1 = fit("random", 1), fit("random", 11), fit("nmf", 1)
    return max((random_11 - random_1) / 10, 0.0), max(nmf_1 - random_1, 0.0)


def time_capture(n_experts: int, top_k: int, n_tokens: int) -> tuple[float, float]:
    """(capture seconds, plain forward seconds) of the embedded architecture (4 layers, hidden
    256) with ``n_experts`` experts per layer over ``n_tokens`` random tokens, best of two."""
    model = build_model(embedded_config(vocab_size=4096, n_experts=n_experts, top_k=top_k,
                                        expert_size=128, seq_len=256), seed=0).eval()
    generator = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(3, 4096, (8, 256), generator=generator),
                "attention_mask": torch.ones(8, 256, dtype=torch.long)}
               for _ in range(max(n_tokens // 2048, 1))]

    def forward():
        with torch.inference_mode():
            for batch in batches:
                model(**batch, use_cache=False, logits_to_keep=1)

    capture = min(timed(lambda: capture_routing(model, batches, progress=False))
                  for _ in range(2))
    return capture, min(timed(forward) for _ in range(2))


def linear_fit(sizes: list[int], seconds: list[float]) -> tuple[float, float]:
    """(fixed seconds, seconds per unit) of ``seconds = fixed + per_unit * size``, both >= 0."""
    per_unit, fixed = np.polyfit(np.asarray(sizes, float), np.asarray(seconds, float), 1)
    return max(float(fixed), 0.0), max(float(per_unit), 0.0)


def growth_exponent(sizes: list[int], seconds: list[float]) -> float:
    """Slope of log(seconds) on log(size) between the two largest sizes (1 = linear)."""
    if min(seconds[-2:]) <= 0:
        return float("nan")
    return float(np.log(seconds[-1] / seconds[-2]) / np.log(sizes[-1] / sizes[-2]))


def human(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} days"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller token counts")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    add_record_flag(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("moecollab.hsdl").setLevel(logging.ERROR)  # collapse warnings, see above
    coactivation_counts = [2000, 8000] if args.quick else [4000, 16000, 64000]
    hsdl_counts = [500, 1000] if args.quick else [2000, 4000, 8000]
    # Triplets are counted per token over C(27 * 6, 3) = 695k combinations (measured: about
    # two minutes for 500 tokens), so they are timed on a few hundred tokens only.
    triplet_counts = [25, 50] if args.quick else [100, 200]

    print(f"synthetic routing: {PAPER_LAYERS} layers x {PAPER_EXPERTS} experts, "
          f"top-{PAPER_TOP_K} ({PAPER_LAYERS * PAPER_EXPERTS} columns); "
          f"torch {torch.__version__}, {args.threads} thread(s)\n")
    measured: dict[str, tuple[list[int], list[float]]] = {}

    def sweep(name: str, counts: list[int], measure) -> None:
        seconds = []
        for n_tokens in counts:
            ids, weights = synthetic_routing(n_tokens, PAPER_LAYERS, PAPER_EXPERTS, PAPER_TOP_K)
            seconds.append(measure(ids, weights))
            print(f"  {name:<40}{n_tokens:>8} tokens {seconds[-1]:>9.3f} s")
        measured[name] = (counts, seconds)

    sweep("co-activation (lift, null, top pairs)", coactivation_counts,
          lambda ids, weights: time_coactivation(ids, PAPER_EXPERTS))
    sweep("top triplets", triplet_counts, lambda ids, weights: time_triplets(ids, PAPER_EXPERTS))
    hsdl_parts: list[tuple[float, float]] = []
    sweep("HSDL epoch (atoms 32, 16)", hsdl_counts,
          lambda ids, weights: hsdl_parts.append(time_hsdl(
              weight_matrix(ids, weights, PAPER_EXPERTS))) or hsdl_parts[-1][0])
    measured["HSDL NMF start"] = (hsdl_counts, [start for _, start in hsdl_parts])
    print("  HSDL NMF start: " + ", ".join(
        f"{n} tokens {s:.2f} s" for n, s in zip(*measured["HSDL NMF start"], strict=True)))

    print(f"\nexperts per layer at {coactivation_counts[0]} tokens ({PAPER_LAYERS} layers, "
          f"top-{PAPER_TOP_K}): co-activation seconds")
    expert_counts = [16, 32, 64]
    by_experts = []
    for n_experts in expert_counts:
        ids, _ = synthetic_routing(coactivation_counts[0], PAPER_LAYERS, n_experts, PAPER_TOP_K)
        by_experts.append(time_coactivation(ids, n_experts))
        print(f"  {n_experts:>3} experts ({PAPER_LAYERS * n_experts:>5} columns): "
              f"{by_experts[-1]:.2f} s")
    expert_exponent = growth_exponent(expert_counts, by_experts)
    print(f"  from 32 to 64 experts the time grows as experts^{expert_exponent:.2f}")

    print("\ncapture of the embedded architecture (4 layers, hidden 256), random tokens:")
    capture_rows = []
    for n_experts, top_k in ((16, 2), (64, 8)):
        for n_tokens in ((2048, 8192) if not args.quick else (2048, 4096)):
            capture_seconds, forward_seconds = time_capture(n_experts, top_k, n_tokens)
            capture_rows.append((n_experts, top_k, n_tokens, capture_seconds, forward_seconds))
            print(f"  {n_experts:>3} experts top-{top_k}, {n_tokens:>5} tokens: capture "
                  f"{capture_seconds:.2f} s, forward {forward_seconds:.2f} s "
                  f"(x{capture_seconds / forward_seconds:.2f})")
    capture_ratio = max(row[3] / row[4] for row in capture_rows)

    fits = {name: linear_fit(*values) for name, values in measured.items()}

    def at(name: str, n_tokens: int) -> float:
        fixed, per_token = fits[name]
        return fixed + per_token * n_tokens

    hsdl_rows = min(HSDL_ROWS_DEFAULT, PAPER_TOKENS)
    results = [
        ("co-activation (lift, null, top pairs)", at("co-activation (lift, null, top pairs)",
                                                     PAPER_TOKENS)),
        ("top triplets, all cross-layer triplets", at("top triplets", PAPER_TOKENS)),
        (f"HSDL, stage 03's subsample of {hsdl_rows:,} rows x {HSDL_EPOCHS_DEFAULT} epochs",
         HSDL_EPOCHS_DEFAULT * at("HSDL epoch (atoms 32, 16)", hsdl_rows)
         + at("HSDL NMF start", hsdl_rows)),
        (f"HSDL on all {PAPER_TOKENS:,} rows x {HSDL_EPOCHS_DEFAULT} epochs",
         HSDL_EPOCHS_DEFAULT * at("HSDL epoch (atoms 32, 16)", PAPER_TOKENS)
         + at("HSDL NMF start", PAPER_TOKENS)),
    ]
    exponents = {name: growth_exponent(*values) for name, values in measured.items()}
    bytes_per_token = PAPER_LAYERS * PAPER_TOP_K * (2 + 4)  # int16 ids + float32 weights
    dense_per_token = PAPER_LAYERS * PAPER_EXPERTS * 4
    print(f"\nextrapolated to the paper's {PAPER_TOKENS:,} tokens x "
          f"{PAPER_LAYERS * PAPER_EXPERTS:,} experts (seconds = fixed + per token x tokens; "
          "b = measured growth exponent between the two largest sizes)")
    for (label, seconds), name in zip(results, ["co-activation (lift, null, top pairs)",
                                                "top triplets", "HSDL epoch (atoms 32, 16)",
                                                "HSDL epoch (atoms 32, 16)"], strict=True):
        print(f"  {label:<62} b={exponents[name]:.2f}  {human(seconds)}")
    print(f"  trace: {bytes_per_token} bytes a token sparse vs {dense_per_token:,} dense "
          f"(x{dense_per_token / bytes_per_token:.1f}); {PAPER_TOKENS * bytes_per_token / 1e9:.2f}"
          f" GB vs {PAPER_TOKENS * dense_per_token / 1e9:.2f} GB")

    if args.record:
        record_rows = [{"measure": f"{label}: time at 604k tokens", "value": human(seconds),
                        "target": ""} for label, seconds in results]
        record_rows += [
            {"measure": f"co-activation time vs experts per layer (32 to 64, "
                        f"{coactivation_counts[0]} tokens)",
             "value": f"experts^{expert_exponent:.2f}", "target": ""},
            {"measure": "capture / forward, worst of 16 or 64 experts and 2k or 8k tokens "
                        "(embedded architecture)",
             "value": f"{capture_ratio:.2f}", "target": "<= 1.05"},
            {"measure": "trace at 604k tokens: sparse ids+weights vs dense float32",
             "value": f"{PAPER_TOKENS * bytes_per_token / 1e9:.2f} GB vs "
                      f"{PAPER_TOKENS * dense_per_token / 1e9:.2f} GB", "target": ""},
        ]
        record("scaling", "Measured growth at the paper's 27 x 64 experts, top-6, "
               "extrapolated to 604k tokens", record_rows,
               settings=f"synthetic routing; co-activation at {coactivation_counts} tokens, "
                        f"triplets at {triplet_counts}, HSDL at {hsdl_counts}; "
                        f"{args.threads} torch thread(s); linear fit per step")


if __name__ == "__main__":
    main()
