"""How co-activation, HSDL and the trace grow with tokens and experts, extrapolated to the paper.

The paper analyses DeepSeek-MoE-16B: 27 MoE layers x 64 routed experts (1,728 columns), top-6,
over about 604k tokens. This script builds synthetic routing of exactly that shape (tokens of
200 latent "types", each preferring six experts per layer, so that pairs really co-occur), and
times, at a few token counts:

- co-activation (stage 02's core): the selection matrix, the shuffled null, the cross-layer lift
  summary and the top cross-layer pairs; and, separately, the top triplets;
- HSDL (stage 03): one fit with the default sizes (atoms 32 and 16) at two epoch counts, whose
  difference gives the cost of one epoch (the sparse step HSDL takes on sparse X, on one thread
  and on ``--cores``), beside an epoch of the dense step (dense mini-batches, the loop before);
  at the paper's 604k rows the epoch is measured directly, the best of ``--hsdl-repeats`` runs;
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
from moecollab.hsdl import HSDL, _forward, hsdl_loss
from moecollab.models import build_model, embedded_config
from moecollab.triplet_counts import triplet_census

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
        shuffled = coactivation.shuffled_selection(selected, n_experts, random_state=0)
        coactivation.lift_summary(selected, shuffled, n_experts)
        coactivation.top_pairs(selected, n=20, n_experts=n_experts, cross_layer_only=True,
                                min_count=10)
    return timed(work)


def time_triplets(ids: np.ndarray, n_experts: int) -> float:
    """The old way: list every cross-layer triplet with NumPy, then sort (what top_triplets did
    before the census; ``n=None`` still takes this path)."""
    return timed(lambda: coactivation.top_triplets(coactivation.selection_matrix(ids, n_experts),
                                                   n=None, n_experts=n_experts,
                                                   cross_layer_only=True, min_count=10))


def time_census(ids: np.ndarray, n_experts: int, threads: int) -> float:
    """The new way: the exact census of all triplets (what coverage needs) plus the top 20."""
    return timed(lambda: triplet_census(coactivation.selection_matrix(ids, n_experts),
                                        n_experts=n_experts, n_top=20, n_jobs=threads))


def time_old_hsdl_epoch(X: sparse.csr_array, threads: int, batch_size: int = 512) -> float:
    """One epoch of the dense step (SciPy row selection and ``toarray`` per batch, `hsdl_loss`
    on the dense batch: HSDL's loop before its sparse step), from random parameters of the
    default sizes, on ``threads`` torch threads: the same arithmetic as `HSDL`'s objective,
    kept here to measure the two side by side."""
    torch.set_num_threads(threads)
    X = sparse.csr_matrix(X, dtype=np.float32)
    generator = torch.Generator().manual_seed(0)
    shapes = [(32, X.shape[1]), (16, X.shape[1])]
    thetas = [torch.randn(*shape, generator=generator).requires_grad_() for shape in shapes]
    weights = [(0.01 * torch.randn(*shape, generator=generator)).requires_grad_()
               for shape in shapes]
    biases = [torch.zeros(shape[0]).requires_grad_() for shape in shapes]
    optimizer = torch.optim.Adam([*thetas, *weights, *biases], lr=2e-3)

    def epoch():
        order = torch.randperm(X.shape[0], generator=generator)
        for begin in range(0, X.shape[0], batch_size):
            ids = torch.sort(order[begin:begin + batch_size]).values
            batch = torch.as_tensor(X[ids.numpy()].toarray())
            dictionaries, codes = _forward(batch, thetas, weights, biases)
            terms = hsdl_loss(batch, dictionaries, codes, lambda_sparse=1e-3,
                              lambda_codes=0.02)
            optimizer.zero_grad(set_to_none=True)
            terms["total"].backward()
            optimizer.step()
            float(terms["total"].detach())
    return timed(epoch)


def time_new_hsdl_epoch(X: sparse.csr_array, threads: int) -> float:
    """One epoch of `HSDL` (random start, default sizes; sparse X takes its sparse step): a
    2-epoch fit minus a 1-epoch fit."""
    def fit(n_epochs):
        return timed(lambda: HSDL(n_atoms=(32, 16), n_epochs=n_epochs, batch_size=512,
                                  init="random", random_state=0, n_jobs=threads).fit(X))
    return max(fit(2) - fit(1), 0.0)


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


def speedup(old: float, new: float) -> str:
    """Old time over new, to one decimal below 10 (a slowdown must not round to 1)."""
    ratio = old / max(new, 1e-9)
    return f"{ratio:.1f}" if ratio < 10 else f"{ratio:.0f}"


def human(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} days"


def time_nmf_start(X: sparse.csr_array) -> float:
    """The NMF start of a default fit (atoms 32 and 16, three NMF runs per level) on ``X``'s
    first 8,192 rows: the most it ever sees, so its cost does not grow with the corpus."""
    model = HSDL(n_atoms=(32, 16), n_init=3, random_state=0)
    subsample = sparse.csr_matrix(X[:8192], dtype=np.float32)
    return timed(lambda: model._initial_values(subsample, np.random.RandomState(0),
                                               torch.Generator().manual_seed(0)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller token counts")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--hsdl-repeats", type=int, default=2,
                        help="runs of each HSDL epoch at the paper's size (the best is kept)")
    parser.add_argument("--cores", type=int, default=2,
                        help="threads of the new triplet census and the 2-core HSDL figure")
    add_record_flag(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("moecollab.hsdl").setLevel(logging.ERROR)  # collapse warnings, see above
    coactivation_counts = [2000, 8000] if args.quick else [4000, 16000, 64000]
    hsdl_counts = [1000, 2000] if args.quick else [2000, 8000]
    # The old listing enumerates C(27 * 6, 3) = 695k triplets per token with NumPy (about two
    # minutes for 500 tokens), so it is timed on a few hundred tokens only.
    triplet_counts = [25, 50] if args.quick else [100, 200]
    census_counts = [2000, 4000] if args.quick else [10000, 30000]

    print(f"synthetic routing: {PAPER_LAYERS} layers x {PAPER_EXPERTS} experts, "
          f"top-{PAPER_TOP_K} ({PAPER_LAYERS * PAPER_EXPERTS} columns); "
          f"torch {torch.__version__}, {args.threads} thread(s)\n")
    measured: dict[str, tuple[list[int], list[float]]] = {}

    def sweep(name: str, counts: list[int], measure) -> None:
        seconds = []
        for n_tokens in counts:
            ids, weights = synthetic_routing(n_tokens, PAPER_LAYERS, PAPER_EXPERTS, PAPER_TOP_K)
            seconds.append(measure(ids, weights))
            print(f"  {name:<46}{n_tokens:>8} tokens {seconds[-1]:>9.3f} s", flush=True)
        measured[name] = (counts, seconds)

    def matrix(ids, weights):
        return weight_matrix(ids, weights, PAPER_EXPERTS)

    sweep("co-activation (lift, null, top pairs)", coactivation_counts,
          lambda ids, weights: time_coactivation(ids, PAPER_EXPERTS))
    sweep("triplets, old: list and sort", triplet_counts,
          lambda ids, weights: time_triplets(ids, PAPER_EXPERTS))
    census_name = f"triplets, new: exact census, {args.cores} threads"
    time_census(synthetic_routing(64, PAPER_LAYERS, PAPER_EXPERTS, PAPER_TOP_K)[0],
                PAPER_EXPERTS, args.cores)  # numba compiles (or loads its cache) untimed
    sweep(census_name, census_counts,
          lambda ids, weights: time_census(ids, PAPER_EXPERTS, args.cores))
    # Old and new HSDL epochs alternate on the same matrix, so load on the machine hits both.
    hsdl_settings = {"HSDL epoch, dense step, 1 thread": (time_old_hsdl_epoch, 1),
                     f"HSDL epoch, dense step, {args.cores} threads": (time_old_hsdl_epoch,
                                                                     args.cores),
                     "HSDL epoch, sparse step, 1 thread": (time_new_hsdl_epoch, 1),
                     f"HSDL epoch, sparse step, {args.cores} threads": (time_new_hsdl_epoch,
                                                                      args.cores)}
    hsdl_seconds: dict[str, list[float]] = {name: [] for name in hsdl_settings}
    time_new_hsdl_epoch(matrix(*synthetic_routing(1024, PAPER_LAYERS, PAPER_EXPERTS,
                                                  PAPER_TOP_K)), 1)  # compile, warm up
    for n_tokens in hsdl_counts:
        X = matrix(*synthetic_routing(n_tokens, PAPER_LAYERS, PAPER_EXPERTS, PAPER_TOP_K))
        for name, (measure, threads) in hsdl_settings.items():
            hsdl_seconds[name].append(measure(X, threads))
            print(f"  {name:<46}{n_tokens:>8} tokens {hsdl_seconds[name][-1]:>9.3f} s",
                  flush=True)
        torch.set_num_threads(args.threads)
    # At the paper's size an epoch is measured, not extrapolated (a step costs more when the
    # rows it gathers are spread over 0.8 GB): the best of `hsdl_repeats` alternating runs,
    # since this machine's neighbours can slow one run by half.
    paper_rows = hsdl_counts[-1] * 4 if args.quick else PAPER_TOKENS
    X = matrix(*synthetic_routing(paper_rows, PAPER_LAYERS, PAPER_EXPERTS, PAPER_TOP_K))
    paper_epoch = {name: float("inf") for name in hsdl_settings}
    for _ in range(args.hsdl_repeats):
        for name, (measure, threads) in hsdl_settings.items():
            paper_epoch[name] = min(paper_epoch[name], measure(X, threads))
    torch.set_num_threads(args.threads)
    del X
    for name, seconds in paper_epoch.items():
        print(f"  {name:<46}{paper_rows:>8} tokens {seconds:>9.3f} s (measured, best of "
              f"{args.hsdl_repeats})", flush=True)
        # The line through all three sizes: the plot shows the measured epoch at 604k, and the
        # 40k-row figure is read between measurements rather than from the small sizes alone.
        measured[name] = ([*hsdl_counts, paper_rows], [*hsdl_seconds[name], seconds])
    nmf_seconds = time_nmf_start(matrix(*synthetic_routing(8192, PAPER_LAYERS, PAPER_EXPERTS,
                                                           PAPER_TOP_K)))
    print(f"  HSDL NMF start (8,192 rows, the most it reads): {nmf_seconds:.1f} s")

    print(f"\nexperts per layer at {coactivation_counts[0]} tokens ({PAPER_LAYERS} layers, "
          f"top-{PAPER_TOP_K}): co-activation and census seconds")
    expert_counts = [16, 32, 64]
    by_experts: dict[str, list[float]] = {"co-activation": [], "triplet census": []}
    for n_experts in expert_counts:
        ids, _ = synthetic_routing(coactivation_counts[0], PAPER_LAYERS, n_experts, PAPER_TOP_K)
        by_experts["co-activation"].append(time_coactivation(ids, n_experts))
        by_experts["triplet census"].append(time_census(ids, n_experts, args.cores))
        print(f"  {n_experts:>3} experts ({PAPER_LAYERS * n_experts:>5} columns): "
              + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in by_experts.items()), flush=True)
    expert_exponent = growth_exponent(expert_counts, by_experts["co-activation"])
    census_exponent = growth_exponent(expert_counts, by_experts["triplet census"])

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

    def hsdl_total(name: str, n_rows: int) -> float:
        return HSDL_EPOCHS_DEFAULT * at(name, n_rows) + nmf_seconds

    dense_1, dense_cores, sparse_1, sparse_cores = hsdl_settings
    fastest = min((sparse_1, sparse_cores), key=paper_epoch.__getitem__)
    fastest_threads = 1 if fastest == sparse_1 else args.cores
    rows_40k = min(HSDL_ROWS_DEFAULT, PAPER_TOKENS)
    results = [
        ("co-activation (lift, null, top pairs)",
         at("co-activation (lift, null, top pairs)", PAPER_TOKENS), None),
        ("all triplets (coverage, Eq. 8 and top 20)", at(census_name, PAPER_TOKENS),
         at("triplets, old: list and sort", PAPER_TOKENS)),
        (f"HSDL, {rows_40k:,}-row subsample x {HSDL_EPOCHS_DEFAULT} epochs, 1 thread",
         hsdl_total(sparse_1, rows_40k), hsdl_total(dense_1, rows_40k)),
        (f"HSDL on all {paper_rows:,} rows x {HSDL_EPOCHS_DEFAULT} epochs, 1 thread "
         "(measured epoch)", HSDL_EPOCHS_DEFAULT * paper_epoch[sparse_1] + nmf_seconds,
         HSDL_EPOCHS_DEFAULT * paper_epoch[dense_1] + nmf_seconds),
        (f"HSDL on all {paper_rows:,} rows x {HSDL_EPOCHS_DEFAULT} epochs, {args.cores} "
         "threads (measured epoch)",
         HSDL_EPOCHS_DEFAULT * paper_epoch[sparse_cores] + nmf_seconds,
         HSDL_EPOCHS_DEFAULT * paper_epoch[dense_cores] + nmf_seconds),
        (f"HSDL on all {paper_rows:,} rows x 2,000 epochs (the paper's), {fastest_threads} "
         "thread(s)", 2000 * paper_epoch[fastest] + nmf_seconds, None),
    ]
    exponents = {name: growth_exponent(*values) for name, values in measured.items()}
    bytes_per_token = PAPER_LAYERS * PAPER_TOP_K * (2 + 4)  # int16 ids + float32 weights
    dense_per_token = PAPER_LAYERS * PAPER_EXPERTS * 4
    print(f"\nextrapolated to the paper's {PAPER_TOKENS:,} tokens x "
          f"{PAPER_LAYERS * PAPER_EXPERTS:,} experts (seconds = fixed + per token x tokens)")
    for label, seconds, old in results:
        print(f"  {label:<72} {human(seconds):>10}"
              + (f"   (old: {human(old)}, x{old / max(seconds, 1e-9):.1f})" if old else ""))
    print("  growth exponents between the two largest sizes: " + ", ".join(
        f"{name} {value:.2f}" for name, value in exponents.items()))

    if args.record:
        record_rows = [{"measure": f"{label}: time at 604k tokens",
                        "value": human(seconds) if old is None else
                        f"{human(seconds)} (old {human(old)}, x{speedup(old, seconds)})",
                        "target": "<= 10 min on 2 cores" if "triplets" in label or (
                            "all" in label and "60 epochs" in label) else ""}
                       for label, seconds, old in results]
        record_rows += [
            {"measure": "HSDL, 2,000 epochs on one GPU",
             "value": "not measured (no GPU on the machine that ran this)",
             "target": "<= 5 min"},
            {"measure": f"time vs experts per layer (32 to 64, {coactivation_counts[0]} tokens)",
             "value": f"co-activation experts^{expert_exponent:.2f}, "
                      f"triplet census experts^{census_exponent:.2f}", "target": ""},
            {"measure": "capture / forward, worst of 16 or 64 experts and 2k or 8k tokens "
                        "(embedded architecture)",
             "value": f"{capture_ratio:.2f}", "target": "<= 1.05"},
            {"measure": "trace at 604k tokens: sparse ids+weights vs dense float32",
             "value": f"{PAPER_TOKENS * bytes_per_token / 1e9:.2f} GB vs "
                      f"{PAPER_TOKENS * dense_per_token / 1e9:.2f} GB", "target": ""},
        ]
        series = {name: {"tokens": counts, "seconds": seconds, "fit": list(fits[name])}
                  for name, (counts, seconds) in measured.items()}
        series["experts"] = {"experts_per_layer": expert_counts, **by_experts}
        series["nmf_start_seconds"] = nmf_seconds
        series["hsdl_epoch_at_paper_rows"] = {"rows": paper_rows, **paper_epoch}
        path = record("scaling", "Measured growth at the paper's 27 x 64 experts, top-6, "
                      "extrapolated to 604k tokens (old and new side by side)", record_rows,
                      settings=f"synthetic routing; co-activation at {coactivation_counts} "
                               f"tokens, old triplets at {triplet_counts}, census at "
                               f"{census_counts}, HSDL at {hsdl_counts} and measured at "
                               f"{paper_rows} (best of {args.hsdl_repeats}); {args.threads} torch "
                               f"thread(s) unless stated; linear fit per step; a shared "
                               f"2-core machine", extra={"series": series})
        scaling_plot(series, path.with_suffix(".png"))


def scaling_plot(series: dict, path) -> None:
    """Seconds against tokens per step, measured points and the fitted lines to 604k, with the
    paper's budget (the 604k tokens, and 10 minutes) marked; saved as a small PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = np.logspace(2, np.log10(PAPER_TOKENS * 1.5), 60)
    figure, axis = plt.subplots(figsize=(7.5, 4.2), dpi=110)
    for name, values in series.items():
        if not isinstance(values, dict) or "fit" not in values:
            continue
        fixed, per_token = values["fit"]
        line, = axis.plot(tokens, fixed + per_token * tokens, lw=1.2, label=name)
        axis.scatter(values["tokens"], values["seconds"], color=line.get_color(), s=14)
    axis.axvline(PAPER_TOKENS, color="black", ls="--", lw=0.8)
    axis.axhline(600, color="grey", ls=":", lw=0.8)
    axis.text(PAPER_TOKENS, axis.get_ylim()[0] if False else 1e-2, " paper: 604k tokens",
              fontsize=7, rotation=90, va="bottom")
    axis.text(150, 600, "10 min", fontsize=7, va="bottom")
    axis.set(xscale="log", yscale="log", xlabel="tokens", ylabel="seconds (one step)",
             title="Cost of each step at 27 x 64 experts, top-6 (an HSDL line is one epoch)",
             ylim=(1e-2, None))
    axis.legend(fontsize=6.5, loc="upper left")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    print(f"plot in {path}")


if __name__ == "__main__":
    main()
