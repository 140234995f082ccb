"""One source per fact: the stage list, notebooks, table of contents, profiles and pins agree."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from moecollab import runner
from moecollab.params import read_parameters_cell
from moecollab.stages import RUNNER_PARAMETERS, STAGE_NAMES, STAGES

ROOT = Path(__file__).resolve().parents[1]


def test_notebooks_match_the_stage_list():
    assert sorted(p.stem for p in (ROOT / "notebooks").glob("*.md")) == sorted(STAGE_NAMES)


def test_table_of_contents_lists_the_stages_in_order():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [chapter["file"] for part in toc["parts"] for chapter in part["chapters"]]
    chapters = [name.removeprefix("book/notebooks/") for name in files
                if name.startswith("book/notebooks/")]
    assert chapters == list(STAGE_NAMES)
    for name in files:
        if not name.startswith("book/notebooks/") and name not in runner.GENERATED_PAGES:
            assert (ROOT / f"{name}.md").is_file(), name


@pytest.mark.parametrize("stage", STAGES, ids=STAGE_NAMES)
def test_every_notebook_takes_the_runner_parameters_and_the_shared_ones(stage):
    cell = read_parameters_cell(ROOT / stage.notebook)
    for name in (*RUNNER_PARAMETERS, "seed"):
        assert re.search(rf"^{name}: ", cell, re.MULTILINE), f"{stage.name} lacks {name}"


@pytest.mark.parametrize("profile", sorted(p.stem for p in (ROOT / "notebooks/params")
                                           .glob("*.yml")))
def test_every_profile_resolves(profile, monkeypatch):
    # A real-checkpoint profile names a hub id, and the paper's data a hub dataset, which the
    # plan accepts only when the hub is reachable (offline it stops with one line:
    # tests/test_bad_input.py, tests/test_paper_data.py).
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    plan = runner.make_plan(profile, root=ROOT)
    assert [stage.name for stage in plan.stages] == list(STAGE_NAMES)


def _pins(lines):
    pins = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def test_pins_agree_between_pyproject_requirements_constraints_and_environment():
    requirements = _pins((ROOT / "requirements.txt").read_text().splitlines())
    constraints = _pins((ROOT / "constraints.txt").read_text().splitlines())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = _pins(project["dependencies"])
    for name, version in declared.items():
        assert requirements.get(name) == version, f"pyproject pins {name}=={version}"
    for name, version in requirements.items():
        assert constraints.get(name) == version, f"constraints.txt disagrees on {name}"
    assert requirements["torch"] == "2.13.0"
    environment = yaml.safe_load((ROOT / "environment.yml").read_text())
    python = [d for d in environment["dependencies"] if isinstance(d, str)
              and d.startswith("python=")]
    assert python == ["python=3.11"]
    assert project["requires-python"] == ">=3.11"
    pip_block = next(d["pip"] for d in environment["dependencies"] if isinstance(d, dict))
    assert "-r requirements.txt" in pip_block and "-c constraints.txt" in pip_block


def test_ci_and_readme_use_the_same_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert ci.index("make test") < ci.index("make e2e")  # the fast suite first, then the long runs
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make study" in readme


@pytest.mark.parametrize("stage", STAGES, ids=STAGE_NAMES)
def test_papermill_reads_every_parameter_line(stage):
    # papermill parses the cell itself (for --help-notebook and injection warnings); a line it
    # cannot read makes it warn "Passed unknown parameter" on every run.
    from papermill.translators import PythonTranslator

    cell = read_parameters_cell(ROOT / stage.notebook)
    names = {parameter.name for parameter in PythonTranslator.inspect({"source": cell})}
    expected = set(re.findall(r"^(\w+):", cell, re.MULTILINE))
    assert names == expected


def test_notebook_code_cells_name_nothing_undefined_or_unused(tmp_path):
    # A chapter's code is run only by a whole stage; pyflakes' rules (ruff F) catch a name left
    # behind by an edit, or an import nothing uses, in seconds instead of a smoke run.
    import jupytext

    for stage in STAGES:
        notebook = jupytext.read(ROOT / stage.notebook)
        jupytext.write(notebook, tmp_path / f"{stage.name}.py", fmt="py:percent")
    found = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--isolated",
                            "--select", "F", "--output-format", "concise", str(tmp_path)],
                           capture_output=True, text=True)
    assert found.returncode == 0, found.stdout
