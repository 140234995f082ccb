"""Runner overhead and book build time, on the smoke profile.

1. ``run``: every stage of the smoke profile executes into a temporary artifacts folder
   (papermill, one notebook each); the seconds of each stage are printed.
2. ``skip``: each stage is planned and run again on its own (``--only``): the runner re-reads
   the notebooks' parameters, hashes the imported package modules and every input and output
   file, finds the stage current and skips it. Target: under 1 s a stage.
3. ``book``: the book is built strictly (``jupyter-book build --all -W``) from those notebooks
   into a temporary folder, as ``python -m moecollab book --profile smoke`` does (it rewrites
   the generated ``book/notebooks/`` of the checkout, as that command does).

Run: ``python benchmarks/bench_runner.py`` (about 3 minutes on 2 cores; most of it is step 1).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

from _record import add_record_flag, record

from moecollab import runner
from moecollab.stages import STAGE_NAMES


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="smoke", help="profile to run (default smoke)")
    parser.add_argument("--repeats", type=int, default=3, help="skip measurements per stage")
    add_record_flag(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory(prefix="bench_runner_") as tmp:
        artifacts_root = Path(tmp) / "artifacts"
        ran = {}
        for stage in STAGE_NAMES:
            plan = runner.make_plan(args.profile, only=stage, artifacts_root=artifacts_root)
            ran[stage] = timed(lambda plan=plan: runner.run(plan))
        skipped: dict[str, list[float]] = {stage: [] for stage in STAGE_NAMES}
        for _ in range(args.repeats):
            for stage in STAGE_NAMES:
                def plan_and_skip(stage=stage):
                    plan = runner.make_plan(args.profile, only=stage,
                                            artifacts_root=artifacts_root)
                    assert runner.run(plan) == ["skipped"], f"{stage} was not skipped"
                skipped[stage].append(timed(plan_and_skip))
        book_seconds = timed(lambda: runner.build_book(
            args.profile, artifacts_root=artifacts_root, strict=True,
            output_dir=Path(tmp) / "book"))

    median = {stage: statistics.median(times) for stage, times in skipped.items()}
    print(f"profile {args.profile}: seconds per stage (skip: median of {args.repeats})")
    print(f"{'stage':<18}{'run s':>8}{'skip s':>8}{'skip/run':>10}")
    for stage in STAGE_NAMES:
        print(f"{stage:<18}{ran[stage]:>8.1f}{median[stage]:>8.2f}"
              f"{median[stage] / ran[stage]:>10.3f}")
    slowest = max(median, key=median.get)
    print(f"slowest skip: {slowest} {median[slowest]:.2f} s (target < 1 s); "
          f"whole run {sum(ran.values()):.0f} s, whole skip {sum(median.values()):.1f} s")
    print(f"book build (strict, --all): {book_seconds:.1f} s")
    if args.record:
        rows = [{"measure": f"skipped stage {stage}: seconds (run: {ran[stage]:.0f} s)",
                 "value": f"{median[stage]:.2f}", "target": "< 1"} for stage in STAGE_NAMES]
        rows += [{"measure": "whole skipped run / whole run",
                  "value": f"{sum(median.values()) / sum(ran.values()):.3f}", "target": ""},
                 {"measure": "book build, strict, every page (seconds)",
                  "value": f"{book_seconds:.1f}", "target": ""}]
        record("runner", "Runner overhead of a skipped stage, and the book build",
               rows, settings=f"profile {args.profile}; each stage planned and run alone; "
                              f"skip times median of {args.repeats}")


if __name__ == "__main__":
    main()
