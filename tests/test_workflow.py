"""The publishing workflow builds the default profile's book, with its artifacts cached."""

import re
import subprocess
from pathlib import Path

import nbformat
import pytest
import yaml

from moecollab import runner
from moecollab.stages import STAGES

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / ".github" / "workflows" / "book.yml"


@pytest.fixture(scope="module")
def workflow():
    content = yaml.safe_load(WORKFLOW.read_text())
    # YAML 1.1 reads the key `on` as the boolean True.
    content["on"] = content.pop(True, content.get("on"))
    return content


def _steps(job):
    return job.get("steps", [])


def _make_targets():
    """Target name → its recipe lines, from the Makefile."""
    targets, current = {}, None
    for line in (ROOT / "Makefile").read_text().splitlines():
        match = re.match(r"^([A-Za-z_][\w-]*):", line)
        if match:
            current = match.group(1)
            targets[current] = []
        elif line.startswith("\t") and current:
            targets[current].append(line.strip())
        elif line.strip() and not line.startswith("#"):
            current = None
    return targets


def test_workflow_runs_on_push_to_main_and_by_hand(workflow):
    triggers = workflow["on"]
    assert triggers["push"]["branches"] == ["main"]
    assert "workflow_dispatch" in triggers


def test_build_job_runs_the_study_of_the_default_profile_offline(workflow):
    build = workflow["jobs"]["build"]
    commands = [step["run"] for step in _steps(build) if "run" in step]
    studies = [command for command in commands if re.search(r"\bmake study\b", command)]
    assert studies and not any("PROFILE" in command or "smoke" in command
                               for command in commands)
    assert any(step.get("uses", "").startswith("actions/setup-python")
               and str(step["with"]["python-version"]) == "3.11" for step in _steps(build))
    assert build["env"]["HF_HUB_OFFLINE"] == "1" and build["env"]["HF_DATASETS_OFFLINE"] == "1"
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^PROFILE \?= default$", makefile, re.MULTILINE)
    recipe = _make_targets()["study"]
    assert any("moecollab run --profile $(PROFILE)" in line for line in recipe)
    assert any("moecollab book --profile $(PROFILE)" in line for line in recipe)


def test_the_default_artifacts_are_cached_and_restored_before_the_study(workflow):
    steps = _steps(workflow["jobs"]["build"])
    (cache,) = [index for index, step in enumerate(steps)
                if step.get("uses", "").startswith("actions/cache@")]
    study = next(index for index, step in enumerate(steps) if "make study" in step.get("run", ""))
    assert cache < study
    settings = steps[cache]["with"]
    assert settings["path"] == "artifacts/default"
    # Exact hits for an unchanged study; otherwise the latest earlier cache, whose unchanged
    # stages the runner skips by their manifests.
    for decides in ("notebooks/**", "src/**", "data/**", "constraints.txt"):
        assert decides in settings["key"]
    assert settings["restore-keys"].split() == ["artifacts-default-"]
    assert settings["key"].startswith("artifacts-default-")


def test_uploaded_folder_is_where_the_book_is_built(workflow, tmp_path, monkeypatch):
    uploads = [step for step in _steps(workflow["jobs"]["build"])
               if step.get("uses", "").startswith("actions/upload-pages-artifact@")]
    assert len(uploads) == 1
    uploaded = Path(uploads[0]["with"]["path"])

    # Run build_book on a scratch tree with stand-in notebooks and without Sphinx, to learn
    # where it puts the HTML for the profile the workflow builds.
    executed = tmp_path / "artifacts" / "default" / "executed"
    executed.mkdir(parents=True)
    for stage in STAGES:
        nbformat.write(nbformat.v4.new_notebook(), executed / f"{stage.name}.ipynb")
    calls = []

    def fake_run(command, **kwargs):
        calls.append(command)
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(runner.subprocess, "run", fake_run)
    index = runner.build_book("default", root=tmp_path)
    assert calls and "jupyter-book" in Path(calls[0][0]).name
    assert index.relative_to(tmp_path).parent == uploaded
    assert uploaded == Path("_build/html")


def test_deploy_job_publishes_the_uploaded_artifact(workflow):
    deploy = workflow["jobs"]["deploy"]
    assert deploy["needs"] in ("build", ["build"])
    assert deploy["permissions"] == {"pages": "write", "id-token": "write"}
    assert deploy["environment"]["name"] == "github-pages"
    assert any(step.get("uses", "").startswith("actions/deploy-pages@v4")
               for step in _steps(deploy))
