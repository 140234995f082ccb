"""The generated parts of the book's appendix: benchmark results and the record of a run.

``book/appendix.md`` holds the prose and includes three Markdown files that
:func:`write_appendix_parts` writes into ``book/generated/`` on every book build:

- ``benchmarks.md``: one table per recorded benchmark (``benchmarks/results/*.json``, written by
  ``make bench``), with the machine and date that produced it;
- ``scaling.md``: the scaling benchmark, extrapolated to the paper's setting;
- ``run_record.md``: for the profile being built, each stage's seconds, seed and key, and the
  package versions from the manifests.

Nothing here measures anything; it only formats what the benchmarks and stages recorded.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from .artifacts import MANIFEST_NAME
from .stages import STAGES

GENERATED_FOLDER = "book/generated"
BENCHMARK_ORDER = ("capture", "hsdl", "pruning", "runner", "training", "evaluation")


def write_appendix_parts(root: Path, profile_folder: Path) -> list[Path]:
    """Write ``benchmarks.md``, ``scaling.md`` and ``run_record.md`` under ``book/generated``."""
    folder = root / GENERATED_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    results = _load_results(root / "benchmarks" / "results")
    parts = {
        # The listed order first, then any other recorded benchmark: none is left out.
        "benchmarks.md": benchmark_tables(
            [results[name] for name in BENCHMARK_ORDER if name in results]
            + [results[name] for name in sorted(results)
               if name not in BENCHMARK_ORDER and name != "scaling"]),
        "scaling.md": benchmark_tables([results["scaling"]] if "scaling" in results else [])
        + scaling_figure(root / "benchmarks" / "results" / "scaling.png", folder),
        "run_record.md": run_record(profile_folder),
    }
    written = []
    for name, text in parts.items():
        path = folder / name
        path.write_text(text)
        written.append(path)
    return written


def scaling_figure(image: Path, folder: Path) -> str:
    """Markdown for the scaling plot (copied beside the generated page), or nothing.

    ``benchmarks/bench_scaling.py --record`` draws it from the points it measured: seconds of
    each step against tokens, the fitted lines to 604k tokens, and the paper's budget marked.
    """
    if not image.is_file():
        return ""
    shutil.copyfile(image, folder / image.name)
    return (f"\n```{{figure}} generated/{image.name}\n:name: fig-scaling\n\n"
            "Seconds of each step against tokens at the paper's 27 x 64 experts, top-6: "
            "measured points and the fitted lines extrapolated to the paper's 604k tokens "
            "(dashed); the dotted line is 10 minutes.\n```\n")


def _load_results(folder: Path) -> dict[str, dict[str, Any]]:
    results = {}
    for path in sorted(folder.glob("*.json")):
        payload = json.loads(path.read_text())
        results[payload.get("name", path.stem)] = payload
    return results


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def benchmark_tables(results: list[dict[str, Any]]) -> str:
    """Markdown: a heading-free block per benchmark (title, table, where it was measured).

    Examples
    --------
    >>> print(benchmark_tables([]))
    No benchmark results are recorded yet: run `make bench`.
    <BLANKLINE>
    """
    if not results:
        return "No benchmark results are recorded yet: run `make bench`.\n"
    blocks = []
    for result in results:
        machine = result.get("machine", {})
        where = ", ".join(f"{key} {value}" for key, value in machine.items())
        lines = [f"**{_cell(result['title'])}** ({_cell(result.get('settings', ''))})", "",
                 "| measure | value | target |", "|---|---|---|"]
        lines += [f"| {_cell(row['measure'])} | {_cell(row['value'])} | "
                  f"{_cell(row.get('target', ''))} |" for row in result["rows"]]
        lines += ["", f"Measured {result.get('date', '?')} by `{_cell(result['command'])}` "
                      f"on: {_cell(where)}.", ""]
        blocks.append("\n".join(lines))
    return "\n".join(blocks)


def run_record(profile_folder: Path) -> str:
    """Markdown: seconds, seed and key of every finished stage, then the package versions."""
    manifests = []
    for stage in STAGES:
        path = profile_folder / stage.name / MANIFEST_NAME
        if path.is_file():
            manifests.append(json.loads(path.read_text()))
    if not manifests:
        return f"No finished stages in `{profile_folder.name}`.\n"
    lines = [f"Profile `{manifests[0]['profile']}`, from the stages' manifests.", "",
             "| stage | seconds | seed | key (first 12 characters) |", "|---|---|---|---|"]
    for manifest in manifests:
        seed = manifest["parameters"].get("seed", "")
        lines.append(f"| {manifest['stage']} | {manifest['seconds']:.0f} | {seed} | "
                     f"`{manifest['key'][:12]}` |")
    versions: dict[str, set[str]] = {}
    for manifest in manifests:
        for package, version in manifest.get("versions", {}).items():
            versions.setdefault(package, set()).add(version)
    lines += ["", "| package | version |", "|---|---|"]
    lines += [f"| {package} | {', '.join(sorted(found))} |"
              for package, found in sorted(versions.items())]
    if any(len(found) > 1 for found in versions.values()):
        lines += ["", "Some stages ran with different versions (listed together above)."]
    return "\n".join(lines) + "\n"
