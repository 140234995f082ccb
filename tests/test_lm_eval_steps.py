"""The harness runs lm-eval's steps itself, so that loaded tasks serve every model of a process.

``lm_eval.simple_evaluate`` loads every task (reading its dataset) and reports the machine it ran
on (subprocesses) for each model it is given: several seconds per model, as much as scoring the
study's model. :func:`moecollab.evaluation.harness._run_lm_eval` does simple_evaluate's steps
with the tasks loaded once per process. These tests hold it to simple_evaluate's numbers, for a
second model as much as the first, and check that a rewritten task file is loaded again.
"""

from __future__ import annotations

import copy

import lm_eval
import pandas as pd
import pytest
import torch
from lm_eval.api.task import ConfigurableTask
from lm_eval.tasks import TaskManager
from tiny_models import VOCAB_SIZE, tiny_model

from moecollab import evaluation
from moecollab.evaluation import cache, harness, hub_environment
from moecollab.models import train_tokenizer
from moecollab.scoring import SharedContextLM

WORDS = {"biology": ["cell", "gene", "enzyme", "tissue", "organism", "membrane"],
         "law": ["court", "judge", "contract", "statute", "tort", "appeal"]}


def _sentences() -> list[str]:
    return [f"The {word} is a kind of {other} studied in {domain}."
            for domain, words in WORDS.items() for word in words for other in words]


def _items(n_items: int) -> pd.DataFrame:
    return pd.DataFrame([
        {"item_id": f"mcq-{domain}-test-{index}", "domain": domain, "split": "test",
         "question": f"Which definition fits the term '{words[index]}'?",
         "choices": [f"a {words[(index + shift) % 6]} used in {domain}" for shift in range(4)],
         "answer": index % 4, "entry_id": f"{domain}-test-{index}"}
        for domain, words in WORDS.items() for index in range(n_items)])


def _write_tasks(folder, n_items: int = 4) -> list[str]:
    names = evaluation.write_mcq_tasks(_items(n_items), folder, splits=("test",))
    texts = {domain: _sentences()[index * 36:(index + 1) * 36:6]
             for index, domain in enumerate(WORDS)}
    return [names[-1], evaluation.write_perplexity_tasks(texts, folder)[-1]]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(_sentences(), VOCAB_SIZE)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _simple_evaluate(model, tokenizer, tasks, task_dir):
    language_model = SharedContextLM(pretrained=model, tokenizer=tokenizer, batch_size=8)
    return lm_eval.simple_evaluate(
        model=language_model, tasks=tasks, num_fewshot=0, log_samples=True,
        bootstrap_iters=100, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
        fewshot_random_seed=0,
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False))


def _run(model, tokenizer, tasks, task_dir):
    return harness._run_lm_eval(model, tokenizer, tasks, task_dir, limit=None, batch_size=8,
                                max_length=None, num_fewshot=0, bootstrap_iters=100,
                                random_seed=0)


def _same_numbers(ours, theirs, tasks):
    assert ours["results"] == theirs["results"]   # every metric and standard error, exactly
    assert ours["group_subtasks"] == theirs["group_subtasks"]
    assert ours["n-samples"] == theirs["n-samples"]
    for name in ours["samples"]:
        assert (cache.compact_samples(ours["samples"][name])
                == cache.compact_samples(theirs["samples"][name]))
    assert set(ours["samples"]) == set(theirs["samples"]) and ours["samples"]


def test_every_model_of_a_process_gets_simple_evaluates_numbers(tokenizer, tmp_path,
                                                                 monkeypatch):
    tasks = _write_tasks(tmp_path / "tasks")
    loads = []
    real_load = TaskManager.load

    def counting_load(self, *args, **kwargs):
        loads.append(args)
        return real_load(self, *args, **kwargs)

    monkeypatch.setattr(TaskManager, "load", counting_load)
    builds = []
    real_build = ConfigurableTask.build_all_requests

    def counting_build(self, **kwargs):
        builds.append(self.config.task)
        return real_build(self, **kwargs)

    monkeypatch.setattr(ConfigurableTask, "build_all_requests", counting_build)
    runs = []
    with hub_environment.hf_environment(tmp_path / "cache", offline=True):
        for seed in (0, 1):   # the second model reuses the tasks and requests of the first
            model = tiny_model("olmoe", seed=seed).eval()
            builds_before = len(builds)
            ours = _run(model, tokenizer, tasks, tmp_path / "tasks")
            n_built = len(builds) - builds_before
            loads_before = len(loads)
            theirs = _simple_evaluate(model, tokenizer, tasks, tmp_path / "tasks")
            assert len(loads) == loads_before + 1   # simple_evaluate loads them again
            _same_numbers(ours, theirs, tasks)
            runs.append((ours, copy.deepcopy(ours), n_built))
    assert len(loads) == 1 + 2   # ours once for both models, simple_evaluate once per model
    assert runs[0][2] > 0 and runs[1][2] == 0   # requests built for the first model only
    # The first model's logged answers survived the second model's run on the same requests.
    assert runs[0][0]["samples"] != runs[1][0]["samples"]
    assert runs[0][0]["samples"] == runs[0][1]["samples"]


def test_a_rewritten_task_file_is_loaded_again(tokenizer, tmp_path):
    model = tiny_model("olmoe").eval()
    with hub_environment.hf_environment(tmp_path / "cache", offline=True):
        tasks = _write_tasks(tmp_path / "tasks", n_items=4)
        first = _run(model, tokenizer, tasks, tmp_path / "tasks")
        tasks = _write_tasks(tmp_path / "tasks", n_items=3)   # same names, fewer items
        second = _run(model, tokenizer, tasks, tmp_path / "tasks")
    assert first["n-samples"]["moecollab_mcq_law_test"]["effective"] == 4
    assert second["n-samples"]["moecollab_mcq_law_test"]["effective"] == 3
