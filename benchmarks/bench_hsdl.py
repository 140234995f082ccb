"""Benchmark HSDL level 1 against scikit-learn's flat NMF and dictionary learning.

Run ``python benchmarks/bench_hsdl.py`` (about 3 minutes on 2 CPU cores) or with ``--quick``.
Prints two tables:

1. Quality and time on one planted matrix (4,000 samples x 96 experts, 12 coarse patterns) at
   equal atom count: mean L1 reconstruction error, mean nonzeros per code, planted patterns
   found (cosine > 0.9), fit time and the time ratio of HSDL to each method.
2. HSDL fit time (default parameters, two levels) as samples and experts grow.

Times on shared CPUs are noisy; each fit is timed once.
"""

from __future__ import annotations

import argparse
import time
import warnings

from _record import add_record_flag, record
from sklearn.exceptions import ConvergenceWarning

from moecollab.hsdl import HSDL, fit_flat_baseline, mean_l1_error
from moecollab.synthetic import make_planted_hierarchy, match_patterns


def _timed(function):
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def compare_methods(n_samples: int, random_state: int) -> list[dict]:
    planted = make_planted_hierarchy(
        n_samples=n_samples, n_experts=96, private_experts=2, random_state=random_state
    )
    X = planted.X
    n_atoms = planted.coarse_patterns.shape[0]
    rows = []
    model, seconds = _timed(lambda: HSDL(n_atoms=(n_atoms, 8), random_state=0).fit(X))
    codes = model.transform(X)[0]
    rows.append(("HSDL level 1", model.dictionaries_[0], codes, seconds))
    for name, method in [("NMF", "nmf"), ("MiniBatchDictionaryLearning", "dictionary_learning")]:
        (dictionary, codes), seconds = _timed(
            lambda method=method: fit_flat_baseline(X, n_atoms, method=method, random_state=0)
        )
        rows.append((name, dictionary, codes, seconds))
    hsdl_seconds = rows[0][3]
    return [
        {
            "method": name,
            "l1_error": mean_l1_error(X, codes, dictionary),
            "nonzeros": float((codes > 1e-6).sum(axis=1).mean()),
            "found": int((match_patterns(dictionary, planted.coarse_patterns) > 0.9).sum()),
            "n_patterns": n_atoms,
            "seconds": seconds,
            "hsdl_ratio": hsdl_seconds / seconds,
        }
        for name, dictionary, codes, seconds in rows
    ]


def scaling(sizes: list[tuple[int, int]]) -> list[dict]:
    rows = []
    for n_samples, n_experts in sizes:
        planted = make_planted_hierarchy(
            n_samples=n_samples,
            n_experts=n_experts,
            experts_per_fine=5,
            private_experts=2,
            random_state=0,
        )
        model, seconds = _timed(lambda X=planted.X: HSDL(n_atoms=(12, 8), random_state=0).fit(X))
        rows.append(
            {
                "n_samples": n_samples,
                "n_experts": n_experts,
                "seconds": seconds,
                "l1_error": model.reconstruction_error(planted.X),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (under a minute)")
    add_record_flag(parser)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=ConvergenceWarning)

    n_samples = 2000 if args.quick else 4000
    print(f"Planted matrix: {n_samples} samples x 96 experts, 12 coarse patterns, 12 atoms\n")
    header = f"{'method':<30}{'L1 error':>10}{'nonzeros':>10}{'found':>8}{'fit s':>8}{'HSDL/x':>8}"
    print(header)
    print("-" * len(header))
    compared = compare_methods(n_samples, random_state=1)
    for row in compared:
        found = f"{row['found']}/{row['n_patterns']}"
        print(
            f"{row['method']:<30}{row['l1_error']:>10.3f}{row['nonzeros']:>10.2f}{found:>8}"
            f"{row['seconds']:>8.2f}{row['hsdl_ratio']:>8.2f}"
        )

    if args.quick:
        sizes = [(2000, 96), (8000, 96), (4000, 64), (4000, 256)]
    else:
        sizes = [(2000, 96), (8000, 96), (32000, 96), (4000, 64), (4000, 256), (4000, 1024)]
    print("\nHSDL fit time (n_atoms=(12, 8), defaults)\n")
    header = f"{'n_samples':>10}{'n_experts':>10}{'fit s':>8}{'L1 error':>10}"
    print(header)
    print("-" * len(header))
    grown = scaling(sizes)
    for row in grown:
        print(
            f"{row['n_samples']:>10}{row['n_experts']:>10}{row['seconds']:>8.2f}"
            f"{row['l1_error']:>10.3f}"
        )
    if args.record:
        # No target for quality: HSDL trades reconstruction for sparser codes (fewer nonzeros).
        rows = [{"measure": f"{row['method']}: L1 error, nonzeros per code, planted patterns "
                            "found, fit seconds",
                 "value": f"{row['l1_error']:.2f}, {row['nonzeros']:.1f}, "
                          f"{row['found']}/{row['n_patterns']}, {row['seconds']:.1f} s",
                 "target": ""} for row in compared]
        rows += [{"measure": f"fit time HSDL / {row['method']}",
                  "value": f"{row['hsdl_ratio']:.2f}", "target": "<= 2"}
                 for row in compared[1:]]
        record("hsdl", "HSDL level 1 vs scikit-learn NMF and dictionary learning, planted data",
               rows, settings=f"{n_samples} samples x 96 experts, 12 planted coarse patterns, "
                              "12 atoms; each fit timed once")


if __name__ == "__main__":
    main()
