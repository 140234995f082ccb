"""The appendix: benchmark results and the run record are formatted from what was recorded."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

from moecollab import appendix, artifacts

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = sorted(path.stem.removeprefix("bench_")
                    for path in (ROOT / "benchmarks").glob("bench_*.py"))


def fake_project(tmp_path: Path) -> tuple[Path, Path]:
    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    (results / "pruning.json").write_text(json.dumps({
        "name": "pruning", "title": "Removal vs masking", "settings": "4 layers",
        "command": "python benchmarks/bench_pruning.py --record", "date": "2026-11-25",
        "machine": {"cpu_cores": "2", "torch": "2.13.0"},
        "rows": [{"measure": "parameters after removal / before", "value": "0.556",
                  "target": "< 1"}]}))
    profile = tmp_path / "artifacts" / "toy"
    for stage, seconds, version in (("00_model", 12.5, "2.13.0"), ("03_hsdl", 3.0, "2.13.1")):
        manifest = artifacts.Manifest(stage=stage, profile="toy", key="ab" * 32,
                                      parameters={"seed": 7}, inputs={}, outputs={},
                                      versions={"torch": version}, seconds=seconds)
        (profile / stage).mkdir(parents=True)
        manifest.save(profile / stage)
    return tmp_path, profile


def test_parts_show_recorded_numbers_machine_and_manifests(tmp_path):
    root, profile = fake_project(tmp_path)
    paths = appendix.write_appendix_parts(root, profile)
    texts = {path.name: path.read_text() for path in paths}
    assert "| parameters after removal / before | 0.556 | < 1 |" in texts["benchmarks.md"]
    assert "cpu_cores 2" in texts["benchmarks.md"]
    assert "`python benchmarks/bench_pruning.py --record`" in texts["benchmarks.md"]
    assert texts["scaling.md"].startswith("No benchmark results are recorded yet")
    record = texts["run_record.md"]
    assert "| 00_model | 12 | 7 | `abababababab` |" in record
    assert "| 03_hsdl | 3 | 7 |" in record
    assert "| torch | 2.13.0, 2.13.1 |" in record
    assert "different versions" in record


def test_every_benchmark_records_and_make_bench_asks_it_to():
    assert {"capture", "hsdl", "pruning", "runner", "scaling"} <= set(BENCHMARKS)
    for name in BENCHMARKS:
        source = (ROOT / "benchmarks" / f"bench_{name}.py").read_text()
        assert re.search(rf'record\(\s*"{name}"', source), f"bench_{name}.py does not record"
    assert "--record" in (ROOT / "Makefile").read_text()


def test_the_book_shows_the_recorded_results_of_every_benchmark(tmp_path):
    recorded = {path.stem for path in (ROOT / "benchmarks" / "results").glob("*.json")}
    assert recorded == set(BENCHMARKS), "run `make bench` and commit benchmarks/results/"
    for name in recorded:
        payload = json.loads((ROOT / "benchmarks" / "results" / f"{name}.json").read_text())
        assert payload["rows"] and payload["machine"]["cpu_cores"]
    root, profile = fake_project(tmp_path)
    shutil.copytree(ROOT / "benchmarks" / "results", root / "benchmarks" / "results",
                    dirs_exist_ok=True)
    texts = "".join(path.read_text() for path in appendix.write_appendix_parts(root, profile))
    for name in recorded:
        title = json.loads((ROOT / "benchmarks" / "results" / f"{name}.json").read_text())["title"]
        assert title in texts, f"the appendix leaves out benchmark {name}"


def test_benchmark_help_runs_without_the_heavy_work():
    for name in BENCHMARKS:
        result = subprocess.run([sys.executable, f"benchmarks/bench_{name}.py", "--help"],
                                cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert "--record" in result.stdout


def test_scaling_plot_is_shown_when_the_benchmark_drew_it(tmp_path):
    root, profile = fake_project(tmp_path)
    (root / "benchmarks" / "results" / "scaling.png").write_bytes(b"\x89PNG fake")
    texts = {path.name: path.read_text()
             for path in appendix.write_appendix_parts(root, profile)}
    assert "```{figure} generated/scaling.png" in texts["scaling.md"]
    assert (root / "book" / "generated" / "scaling.png").read_bytes() == b"\x89PNG fake"
