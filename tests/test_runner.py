"""The runner on small fake stages: skipping, forcing, damage detection, failures, the CLI."""

import logging
import subprocess
import sys
import time

import pytest

from moecollab import artifacts, params, runner, stages
from moecollab.stages import Check, Stage

NOTEBOOK = '''---
jupytext:
  text_representation:
    extension: .md
    format_name: myst
kernelspec:
  display_name: Python 3
  language: python
  name: python3
---

# {name}

```{{code-cell}} ipython3
:tags: [parameters]

profile: str = "default"     # set by the runner
artifacts_root: str = "artifacts"  # set by the runner
output_dir: str = ""         # set by the runner
value: int = 1               # written to the output
fail: bool = False           # raise inside the notebook
seed: int = 0                # unused
```

```{{code-cell}} ipython3
from pathlib import Path
if fail:
    raise ValueError("the notebook was told to fail")
Path(output_dir, "value.txt").write_text(str(value))
```
'''


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project folder with two fake stages; the second needs the first."""
    fake = (Stage("10_first", "First", checks={"value": Check(low=0)}),
            Stage("11_second", "Second", needs=("10_first",)))
    (tmp_path / "notebooks" / "params").mkdir(parents=True)
    for stage in fake:
        (tmp_path / stage.notebook).write_text(NOTEBOOK.format(name=stage.name))
    (tmp_path / "notebooks" / "params" / "tiny.yml").write_text("value: 2\n")
    names = tuple(stage.name for stage in fake)
    for module in (runner, params, stages):
        monkeypatch.setattr(module, "STAGES", fake, raising=False)
        monkeypatch.setattr(module, "STAGE_NAMES", names, raising=False)
    return tmp_path


def plan(root, **kwargs):
    return runner.make_plan("tiny", root=root, **kwargs)


def test_runs_then_skips_then_forces(project):
    assert runner.run(plan(project)) == ["ran", "ran"]
    folder = project / "artifacts" / "tiny" / "10_first"
    assert (folder / "value.txt").read_text() == "2"
    manifest = artifacts.verify_stage(folder)
    assert manifest.parameters == {"value": 2, "fail": False, "seed": 0}
    assert "torch" in manifest.versions
    assert (project / "artifacts" / "tiny" / "executed" / "10_first.ipynb").is_file()
    assert runner.run(plan(project)) == ["skipped", "skipped"]
    assert runner.run(plan(project, force=True, only="11_second")) == ["ran"]


def test_a_changed_parameter_reruns_the_stage_and_everything_after_it(project):
    runner.run(plan(project))
    assert runner.run(plan(project, overrides=["value=3"])) == ["ran", "ran"]
    assert runner.run(plan(project, overrides=["11_second.value=4"])) == ["ran", "ran"]


def test_a_damaged_output_is_named_and_its_stage_reruns(project, caplog):
    runner.run(plan(project))
    (project / "artifacts" / "tiny" / "10_first" / "value.txt").write_text("999")
    assert runner.run(plan(project)) == ["ran", "skipped"]
    assert "value.txt does not match its manifest" in caplog.text
    assert (project / "artifacts" / "tiny" / "10_first" / "value.txt").read_text() == "2"


def test_a_failing_notebook_reports_its_cell_and_keeps_no_partial_stage(project):
    with pytest.raises(runner.StageFailed, match="ValueError: the notebook was told to fail"):
        runner.run(plan(project, overrides=["fail=true"]))
    stage_parent = project / "artifacts" / "tiny"
    assert not (stage_parent / "10_first").exists()
    assert not [p for p in stage_parent.iterdir() if "partial" in p.name]
    assert (stage_parent / "executed" / "10_first.ipynb").is_file()  # kept to read


def test_only_a_later_stage_without_its_input_names_the_missing_stage(project):
    with pytest.raises(artifacts.ArtifactError, match="needs stage 10_first"):
        runner.run(plan(project, only="11_second"))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"only": "nope"}, "--only 'nope' is not a stage"),
    ({"from_stage": "10_first", "only": "10_first"}, "not both"),
    ({"overrides": ["value=-1"]}, r"'value' of stage 10_first must be >= 0; got -1"),
])
def test_plans_are_checked_before_running(project, kwargs, message):
    with pytest.raises(params.ParameterError, match=message):
        plan(project, **kwargs)


def test_unknown_profile_lists_the_available_ones(project):
    with pytest.raises(params.ParameterError, match="unknown profile 'big'; available: tiny"):
        runner.make_plan("big", root=project)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "moecollab", *args], capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize(("args", "message"), [
    (["run", "-p", "n_layer=3"], "error: unknown parameter 'n_layer' for any stage "
                                 "(from -p); did you mean 'n_layers'?"),
    (["run", "-p", "n_experts=1"], "error: parameter 'n_experts' of stage 00_model must be in"),
    (["run", "--profile", "nonexistent"], "error: unknown profile 'nonexistent'"),
    (["run", "--profile", "missing.yml"], "error: profile file 'missing.yml' does not exist"),
])
def test_cli_user_errors_are_one_line_without_traceback(args, message):
    result = run_cli(*args)
    assert result.returncode == 2
    assert result.stderr.strip().startswith(message), result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_help_lists_stages_and_parameters():
    result = run_cli("--help")
    assert result.returncode == 0
    assert "00_model" in result.stdout
    assert "n_experts: int = 128" in result.stdout
    assert "[in [2, 512]]" in result.stdout


def test_leftovers_of_a_killed_run_are_removed_and_the_run_resumes(project):
    profile_folder = project / "artifacts" / "tiny"
    (profile_folder / ".10_first.partial-abc" / "sub").mkdir(parents=True)
    (profile_folder / "executed").mkdir()
    (profile_folder / "executed" / ".10_first.xyz.tmp.ipynb").write_text("{}")
    assert runner.run(plan(project)) == ["ran", "ran"]
    assert sorted(p.name for p in profile_folder.iterdir()) == [".run.lock", "10_first",
                                                               "11_second", "executed", "logs"]
    assert sorted(p.name for p in (profile_folder / "executed").iterdir()) == [
        "10_first.ipynb", "11_second.ipynb"]


def hold_lock(profile_folder, seconds):
    """Another process that holds a profile's run lock for ``seconds``."""
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from moecollab.run_lock import profile_lock\n"
        "with profile_lock(Path(sys.argv[1])):\n"
        "    print('locked', flush=True)\n"
        "    time.sleep(float(sys.argv[2]))\n"), str(profile_folder), str(seconds)],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_run_of_a_profile_stops_naming_the_first_and_touches_nothing(project):
    profile_folder = project / "artifacts" / "tiny"
    (profile_folder / "executed").mkdir(parents=True)
    live = profile_folder / "executed" / ".10_first.abc.tmp.ipynb"  # the holder's, say
    live.write_text("{}")
    holder = hold_lock(profile_folder, 60)
    try:
        with pytest.raises(runner.ProfileBusy, match=(
                rf"^profile 'tiny' is being written by another run \(pid {holder.pid}, "
                r"`python -c .*`, started .* UTC\); wait for it to end, or pass --wait")):
            runner.run(plan(project))
        assert live.exists()
        assert not (profile_folder / "10_first").exists()
    finally:
        holder.kill()
        holder.wait()
    assert runner.run(plan(project)) == ["ran", "ran"]  # its owner is gone: cleaned, then run
    assert not live.exists()


def test_a_run_asked_to_wait_runs_once_the_first_has_ended(project, caplog):
    caplog.set_level(logging.INFO, logger="moecollab")
    holder = hold_lock(project / "artifacts" / "tiny", 2)
    started = time.monotonic()
    assert runner.run(plan(project), wait=True) == ["ran", "ran"]
    assert time.monotonic() - started > 1.5
    assert f"waiting for the run that holds profile 'tiny' (pid {holder.pid}" in caplog.text
    holder.wait()


def test_the_source_hash_follows_only_the_modules_a_notebook_imports(tmp_path):
    package = tmp_path / "src" / "moecollab"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "used.py").write_text("from .helper import thing\n")
    (package / "helper.py").write_text("thing = 1\n")
    (package / "unused.py").write_text("other = 1\n")
    notebook = tmp_path / "stage.md"
    notebook.write_text(NOTEBOOK.format(name="x").replace(
        "from pathlib import Path", "from pathlib import Path\nfrom moecollab import used"))
    before = runner.source_hash(tmp_path, notebook)
    (package / "unused.py").write_text("other = 2\n")
    assert runner.source_hash(tmp_path, notebook) == before
    (package / "helper.py").write_text("thing = 2\n")  # imported by an imported module
    assert runner.source_hash(tmp_path, notebook) != before


def test_sample_level_codes_are_refused_at_plan_time_only_when_annotation_runs():
    # The real stages: stage 04 reads token-level codes, so a sample-level stage 03 is refused
    # before anything runs, unless stage 04 is not part of the run.
    with pytest.raises(params.ParameterError, match="'level' of stage 03_hsdl: 'sample'"):
        runner.make_plan("smoke", overrides=["03_hsdl.level=sample"])
    assert runner.make_plan("smoke", overrides=["03_hsdl.level=sample"], only="03_hsdl")
    with pytest.raises(params.ParameterError, match="needs token-level codes"):
        runner.make_plan("smoke", overrides=["03_hsdl.level=sample"], from_stage="02_coactivation")
