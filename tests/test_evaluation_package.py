"""The moecollab.evaluation package as a whole."""

from __future__ import annotations

from moecollab import evaluation


def test_every_module_of_the_package_is_in_the_evaluation_stage_source_hash(tmp_path):
    # The runner re-runs a stage when a module it imports changes; the notebook imports the
    # package, whose __init__ imports the modules that do the work.
    import shutil
    from pathlib import Path

    from moecollab import runner

    notebook = Path(__file__).parents[1] / "notebooks" / "06_evaluation.md"
    package = tmp_path / "src" / "moecollab"
    shutil.copytree(Path(evaluation.__file__).parents[1], package,
                    ignore=shutil.ignore_patterns("__pycache__"))
    before = runner.source_hash(tmp_path, notebook)
    modules = sorted((package / "evaluation").glob("*.py"))
    assert {module.stem for module in modules} == {
        "__init__", "cache", "harness", "hub_environment", "local_tasks", "standard_tasks",
        "tables"}
    for module in modules:
        text = module.read_text()
        module.write_text(text + "# changed\n")
        assert runner.source_hash(tmp_path, notebook) != before, module.name
        module.write_text(text)
    assert runner.source_hash(tmp_path, notebook) == before
