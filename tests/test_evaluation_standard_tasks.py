"""moecollab.evaluation.standard_tasks: the paper's lm-eval tasks, named and checked offline."""

from __future__ import annotations

import pytest

from moecollab import evaluation


def test_standard_task_names():
    assert evaluation.standard_task_names(None) == []
    assert evaluation.standard_task_names(["paper"]) == list(evaluation.PAPER_TASKS)
    assert evaluation.standard_task_names(["rte", "paper_v2", "mmlu"]) == [
        "rte", "arc_challenge", "hellaswag", "winogrande", "openbookqa", "mmlu"]
    with pytest.raises(ValueError, match="profile_tasks"):
        evaluation.standard_task_names("paper")


def test_paper_tasks_resolve_offline(task_dir, tmp_path):
    names = [*evaluation.PAPER_TASKS, "moecollab_mcq_test", "no_such_task_xyz"]
    # The registry is built from YAML files shipped with lm-eval, so this needs no network.
    unknown = evaluation.check_tasks_resolve(names, include_path=task_dir, cache_dir=tmp_path)
    assert unknown == ["no_such_task_xyz"]


def test_standard_tasks_of_a_stage_tasks_list():
    assert evaluation.standard_tasks_of(["local"]) == []
    assert evaluation.standard_tasks_of(["local", "paper", "rte"]) == list(evaluation.PAPER_TASKS)
    for bad in (["paper"], "local"):
        with pytest.raises(ValueError) as error:
            evaluation.standard_tasks_of(bad)
        assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="tasks must include 'local'"):
        evaluation.standard_tasks_of(["paper"])


def test_check_backend_names_what_to_install(monkeypatch):
    import importlib.util

    assert evaluation.check_backend("hf") == "hf"
    with pytest.raises(ValueError, match="backend must be one of hf, vllm; got 'tgi'"):
        evaluation.check_backend("tgi")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "vllm" else real_find_spec(name))
    with pytest.raises(ValueError, match=r"needs the vllm package, which is not installed "
                                         r"here: pip install 'lm_eval\[vllm\]'") as error:
        evaluation.check_backend("vllm")
    assert "\n" not in str(error.value)


def test_dataset_downloads_read_both_switches_and_model_downloads_one(monkeypatch):
    from moecollab.preflight import dataset_downloads_offline, model_downloads_offline

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    assert not dataset_downloads_offline() and not model_downloads_offline()
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert dataset_downloads_offline() and not model_downloads_offline()
    monkeypatch.setenv("HF_HUB_OFFLINE", "yes")
    assert model_downloads_offline()


def test_paper_tasks_offline_fail_early_in_one_line(tmp_path):
    evaluation.check_standard_tasks([], cache_dir=tmp_path, offline=True)  # nothing to check
    with pytest.raises(ValueError, match="lm-eval knows no task, group or tag named "
                                         "no_such_task_xyz") as unknown:
        evaluation.check_standard_tasks(["rte", "no_such_task_xyz"], cache_dir=tmp_path,
                                        offline=True)
    with pytest.raises(ValueError, match=r"the standard tasks arc_challenge, rte need their "
                                         r"datasets from the hub; the hub is offline here") \
            as offline:
        evaluation.check_standard_tasks(["arc_challenge", "rte"], cache_dir=tmp_path,
                                        offline=True)
    for error in (unknown, offline):
        assert "\n" not in str(error.value)
