"""Tests of moecollab.evaluation: local lm-eval tasks, cached runs, keep-masks, tables.

One tiny OLMoE (3 layers, 8 experts, vocabulary 512) and a byte-level BPE tokenizer trained on a
few sentences; 3 domains × 2 splits × 4 four-choice items. Everything offline, on the CPU.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pandas as pd
import pytest
import torch
from tiny_models import VOCAB_SIZE, tiny_model

from moecollab import evaluation
from moecollab.evaluation import cache, harness, hub_environment
from moecollab.models import train_tokenizer

DOMAINS = ("biology", "chemistry", "law")  # in the corpus's domain order
SPLITS = ("train", "test")
N_ITEMS = 4

_WORDS = {
    "biology": ["cell", "gene", "enzyme", "tissue", "organism", "membrane"],
    "chemistry": ["acid", "atom", "molecule", "solvent", "crystal", "reaction"],
    "law": ["court", "judge", "contract", "statute", "tort", "appeal"],
}


def _sentences() -> list[str]:
    return [
        f"The {word} is a kind of {other} studied in {domain}."
        for domain, words in _WORDS.items()
        for word in words
        for other in words
    ]


def _items() -> pd.DataFrame:
    rows = []
    for domain in DOMAINS:
        words = _WORDS[domain]
        for split in SPLITS:
            for index in range(N_ITEMS):
                term = words[index + (2 if split == "test" else 0)]
                choices = [f"a {words[(index + shift) % 6]} used in {domain}"
                           for shift in range(4)]
                rows.append({
                    "item_id": f"mcq-{domain}-{split}-{index}",
                    "domain": domain,
                    "split": split,
                    "term": term,
                    "question": f"Which definition fits the term '{term}'?",
                    "choices": choices,
                    "answer": index % 4,
                    "entry_id": f"{domain}-{split}-{index}",
                })
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def tokenizer():
    tokenizer = train_tokenizer(_sentences(), VOCAB_SIZE)
    assert len(tokenizer) <= VOCAB_SIZE  # every id is a row of the model's embedding
    return tokenizer


@pytest.fixture(scope="module")
def model():
    # One thread: on the shared 2-core machine two busy-waiting threads are ~200x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tiny_model("olmoe")
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tasks")
    evaluation.write_mcq_tasks(_items(), folder)
    evaluation.write_perplexity_tasks(
        {domain: _sentences()[i * 12:(i + 1) * 12:4] for i, domain in enumerate(DOMAINS)},
        folder)
    return folder


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


# --------------------------------------------------------------------------------------------
# Writing tasks
# --------------------------------------------------------------------------------------------


def test_write_mcq_tasks_names_files_and_determinism(tmp_path):
    items = _items()
    names = evaluation.write_mcq_tasks(items, tmp_path / "a")
    assert names == [f"moecollab_mcq_{d}_{s}" for s in SPLITS for d in DOMAINS] + [
        "moecollab_mcq_train", "moecollab_mcq_test"]
    first = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}
    # Rows in another order give the same bytes; so does a second write.
    evaluation.write_mcq_tasks(items.iloc[::-1], tmp_path / "a")
    second = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}
    assert first == second
    yaml_text = first["moecollab_mcq_law_test.yaml"].decode()
    assert str((tmp_path / "a" / "moecollab_mcq_law_test.jsonl").resolve()) in yaml_text
    group_text = first["moecollab_mcq_test.yaml"].decode()
    assert "weight_by_size: false" in group_text and "aggregate_metric_list" in group_text
    assert len(first["moecollab_mcq_law_test.jsonl"].decode().splitlines()) == N_ITEMS


def test_cloze_family_has_its_own_names_and_reads_the_question_as_is(tmp_path):
    items = _items()
    mcq = evaluation.write_mcq_tasks(items, tmp_path, splits=("test",))
    cloze = evaluation.write_mcq_tasks(items, tmp_path, splits=("test",), family="cloze")
    assert cloze == [name.replace("_mcq_", "_cloze_") for name in mcq]
    template = (tmp_path / "_moecollab_cloze_template_yaml").read_text()
    assert "doc_to_text: question\n" in template  # a feature name, no "Answer:" suffix
    # The two families live side by side: writing one leaves the other's files.
    assert (tmp_path / "moecollab_mcq_law_test.yaml").exists()
    assert (tmp_path / "moecollab_cloze_law_test.yaml").exists()
    with pytest.raises(ValueError, match="family must be one of mcq, cloze"):
        evaluation.write_mcq_tasks(items, tmp_path, family="gap")


def test_write_mcq_tasks_removes_stale_and_checks_input(tmp_path):
    items = _items()
    evaluation.write_mcq_tasks(items, tmp_path)
    evaluation.write_mcq_tasks(items[items["domain"] != "law"], tmp_path)
    assert not (tmp_path / "moecollab_mcq_law_test.yaml").exists()
    assert (tmp_path / "moecollab_mcq_biology_test.yaml").exists()
    with pytest.raises(ValueError, match="answer"):
        evaluation.write_mcq_tasks(items.drop(columns="answer"), tmp_path)
    bad = items.copy()
    bad.loc[0, "answer"] = 7
    with pytest.raises(ValueError, match="answer must index"):
        evaluation.write_mcq_tasks(bad, tmp_path)
    with pytest.raises(ValueError, match="domain"):
        evaluation.write_mcq_tasks(items.assign(domain="computer science"), tmp_path)
    with pytest.raises(ValueError, match="splits"):
        evaluation.write_mcq_tasks(items, tmp_path, splits="test")


def test_task_families_read_the_manifests_not_the_names(tmp_path):
    # A prefix and a domain with "_" in them: splitting names on "_" would give "study" and
    # "science" as families here.
    items = _items().replace({"domain": {"law": "computer_science"}})
    items["item_id"] = items["item_id"].str.replace("law", "computer_science")
    mcq = evaluation.write_mcq_tasks(items, tmp_path, prefix="my_study", splits=("test",))
    word = evaluation.write_mcq_tasks(items, tmp_path, prefix="my_study", splits=("test",),
                                      family="word")
    ppl = evaluation.write_perplexity_tasks({"computer_science": ["Some text."]}, tmp_path,
                                            prefix="my_study")
    assert "my_study_word_computer_science_test" in word
    families = evaluation.task_families([*mcq, *word, *ppl], tmp_path)
    assert families == {**dict.fromkeys(mcq, "mcq"), **dict.fromkeys(word, "word"),
                        **dict.fromkeys(ppl, None)}
    assert families["my_study_word_test"] == "word"  # a group
    assert evaluation.task_families("my_study_mcq_computer_science_test", tmp_path) == {
        "my_study_mcq_computer_science_test": "mcq"}  # one name as a str
    with pytest.raises(ValueError, match=r"unknown local task\(s\) 'my_study_cloze_test'.*"
                                         r"known: my_study_mcq"):
        evaluation.task_families(["my_study_mcq_test", "my_study_cloze_test"], tmp_path)
    with pytest.raises(ValueError, match="known: none"):
        evaluation.task_families(["arc_challenge"], tmp_path / "empty")


# --------------------------------------------------------------------------------------------
# Evaluation and caching
# --------------------------------------------------------------------------------------------


def test_evaluate_mcq_tasks_groups_limit_and_cache(model, tokenizer, task_dir, cache_dir,
                                                   monkeypatch):
    calls = []
    real_run = harness._run_lm_eval

    def counting_run(model, tokenizer, tasks, *args, **kwargs):   # one lm-eval run
        calls.append(tasks)
        return real_run(model, tokenizer, tasks, *args, **kwargs)

    monkeypatch.setattr(harness, "_run_lm_eval", counting_run)
    tasks = ["moecollab_mcq_test", "moecollab_mcq_train"]
    raw = evaluation.evaluate(model, tokenizer, tasks, task_dir, model_key="tiny",
                              cache_dir=cache_dir, limit=3, batch_size=8)
    assert len(calls) == 1 and raw["evaluated"] == tasks
    table = evaluation.results_table(raw)
    expected = {f"moecollab_mcq_{d}_{s}" for d in DOMAINS for s in SPLITS} | set(tasks)
    assert set(table["task"]) == expected
    assert set(table["metric"]) == {"acc", "acc_norm"}
    assert table["value"].between(0, 1).all()
    subtasks = table[table["kind"] == "task"]
    assert (subtasks["n_samples"] == 3).all()  # limit applies per subtask
    law = subtasks[subtasks["task"] == "moecollab_mcq_law_test"].iloc[0]
    assert (law["domain"], law["split"]) == ("law", "test")
    # The group is the unweighted mean of its domains.
    for split in SPLITS:
        for metric in ("acc", "acc_norm"):
            members = subtasks[(subtasks["split"] == split) & (subtasks["metric"] == metric)]
            group = table[(table["task"] == f"moecollab_mcq_{split}")
                          & (table["metric"] == metric)]
            assert group["value"].item() == pytest.approx(members["value"].mean())

    # Second call: every result from the cache, lm-eval not called.
    def failing_run(*args, **kwargs):
        raise AssertionError("lm-eval run although results are cached")

    monkeypatch.setattr(harness, "_run_lm_eval", failing_run)
    again = evaluation.evaluate(model, tokenizer, tasks, task_dir, model_key="tiny",
                                cache_dir=cache_dir, limit=3, batch_size=8)
    assert again["cached"] == tasks and again["evaluated"] == []
    pd.testing.assert_frame_equal(evaluation.results_table(again), table)

    # Only the new task runs when one is added.
    monkeypatch.setattr(harness, "_run_lm_eval", counting_run)
    calls.clear()
    more = evaluation.evaluate(model, tokenizer, [*tasks, "moecollab_mcq_law_test"], task_dir,
                               model_key="tiny", cache_dir=cache_dir, limit=2, batch_size=8)
    # limit changed: all keys are new; a group's member runs inside the group (lm-eval refuses
    # a group together with one of its members).
    assert calls == [tasks]
    assert more["evaluated"] == [*tasks, "moecollab_mcq_law_test"]
    assert more["n_samples"]["moecollab_mcq_law_test"]["effective"] == 2


def test_evaluate_caches_a_corrupt_file_again(model, tokenizer, task_dir, tmp_path):
    task = ["moecollab_mcq_law_test"]
    evaluation.evaluate(model, tokenizer, task, task_dir, model_key="tiny", cache_dir=tmp_path,
                        limit=2)
    (cached,) = (tmp_path / "lm_eval_results").glob("*.json")
    cached.write_text("{not json")
    raw = evaluation.evaluate(model, tokenizer, task, task_dir, model_key="tiny",
                              cache_dir=tmp_path, limit=2)
    assert raw["evaluated"] == task


def _choice_logliks(model, tokenizer, context: str, choices: list[str]) -> np.ndarray:
    """Sum of log-probabilities of ``" " + choice`` after ``context``, as lm-eval splits it."""
    scores = []
    for choice in choices:
        whole = tokenizer.encode(context + " " + choice)
        context_ids = tokenizer.encode(context)
        continuation = whole[len(context_ids):]
        ids = torch.tensor([whole[:-1]])
        with torch.no_grad():
            log_probs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
        positions = range(len(context_ids) - 1, len(whole) - 1)
        scores.append(sum(float(log_probs[p, t]) for p, t in zip(positions, continuation,
                                                                  strict=True)))
    return np.array(scores)


def test_accuracy_matches_loglikelihoods_computed_by_hand(model, tokenizer, task_dir):
    raw = evaluation.evaluate(model, tokenizer, ["moecollab_mcq_chemistry_train"], task_dir,
                              model_key="tiny", limit=3, batch_size=4)
    items = _items()
    items = items[(items["domain"] == "chemistry") & (items["split"] == "train")]
    items = items.sort_values("item_id").head(3)
    correct, correct_norm = [], []
    for item in items.to_dict("records"):
        context = evaluation.MCQ_PROMPT.replace("{{question}}", item["question"])
        logliks = _choice_logliks(model, tokenizer, context, item["choices"])
        lengths = np.array([len(choice) for choice in item["choices"]], dtype=float)
        correct.append(int(np.argmax(logliks)) == item["answer"])
        correct_norm.append(int(np.argmax(logliks / lengths)) == item["answer"])
    result = raw["results"]["moecollab_mcq_chemistry_train"]
    assert result["acc,none"] == pytest.approx(np.mean(correct))
    assert result["acc_norm,none"] == pytest.approx(np.mean(correct_norm))


def test_perplexity_tasks_run_and_leave_no_global_state(model, tokenizer, task_dir):
    import os

    import datasets

    environment = dict(os.environ)
    datasets_cache = datasets.config.HF_DATASETS_CACHE
    torch_state, numpy_state = torch.random.get_rng_state(), np.random.get_state()
    raw = evaluation.evaluate(model, tokenizer, ["moecollab_ppl"], task_dir, model_key="tiny",
                              limit=2)
    assert dict(os.environ) == environment
    assert datasets.config.HF_DATASETS_CACHE == datasets_cache
    assert torch.equal(torch.random.get_rng_state(), torch_state)
    assert np.random.get_state()[1].tolist() == numpy_state[1].tolist()
    table = evaluation.results_table(raw)
    assert set(table["metric"]) == set(evaluation.PERPLEXITY_METRICS)
    assert set(table["task"]) == {"moecollab_ppl", *(f"moecollab_ppl_{d}" for d in DOMAINS)}
    byte_perplexity = table.loc[table["metric"] == "byte_perplexity", "value"]
    assert (byte_perplexity > 1).all() and np.isfinite(byte_perplexity).all()
    bits = table[(table["metric"] == "bits_per_byte") & (table["kind"] == "task")]
    ppl = table[(table["metric"] == "byte_perplexity") & (table["kind"] == "task")]
    np.testing.assert_allclose(2 ** bits["value"].to_numpy(), ppl["value"].to_numpy(),
                               rtol=1e-6)


def test_cache_key_follows_task_data_and_mask(tmp_path):
    items = _items()
    evaluation.write_mcq_tasks(items, tmp_path)
    names = ["moecollab_mcq_law_test", "moecollab_mcq_biology_test", "moecollab_mcq_test",
             "arc_challenge"]
    before = evaluation.task_cache_keys(names, tmp_path, model_key="m")
    changed = items.copy()
    law_test = (changed["domain"] == "law") & (changed["split"] == "test")
    changed.loc[law_test, "question"] = changed.loc[law_test, "question"] + " "
    evaluation.write_mcq_tasks(changed, tmp_path)
    after = evaluation.task_cache_keys(names, tmp_path, model_key="m")
    assert after["moecollab_mcq_law_test"] != before["moecollab_mcq_law_test"]
    assert after["moecollab_mcq_test"] != before["moecollab_mcq_test"]  # the group too
    assert after["moecollab_mcq_biology_test"] == before["moecollab_mcq_biology_test"]
    assert after["arc_challenge"] == before["arc_challenge"]
    for setting in ({"model_key": "other"}, {"model_key": "m", "limit": 5},
                    {"model_key": "m", "num_fewshot": 1}):
        assert evaluation.task_cache_keys(names, tmp_path, **setting) != after

    keep = np.ones((3, 8), dtype=bool)
    assert evaluation.mask_key("base", None) == "base"
    assert evaluation.mask_key("base", keep) == "base"  # keeps every expert: the same model
    keep[0, :4] = False
    other = keep.copy()
    other[1, 0] = False
    assert evaluation.mask_key("base", keep) != "base"
    assert evaluation.mask_key("base", keep) != evaluation.mask_key("base", other)
    assert evaluation.mask_key("base", keep, "mask") != evaluation.mask_key("base", keep,
                                                                            "remove")
    with pytest.raises(ValueError, match="boolean"):
        evaluation.mask_key("base", keep.astype(int))
    with pytest.raises(ValueError, match="mode"):
        evaluation.mask_key("base", keep, "drop")


def test_evaluate_masks(model, tokenizer, task_dir, tmp_path):
    rng = np.random.default_rng(0)
    keep = np.ones((3, 8), dtype=bool)
    for layer in range(3):
        keep[layer, rng.choice(8, size=4, replace=False)] = False
    masks = {"unpruned": None, "all_kept": np.ones((3, 8), dtype=bool), "half": keep}
    ids = torch.tensor([tokenizer.encode("The court is a kind of judge studied in law.")])
    with torch.no_grad():
        logits_before = model(ids).logits
    task = ["moecollab_mcq_test"]
    table = evaluation.evaluate_masks(model, tokenizer, masks, task, task_dir, base_key="tiny",
                                      cache_dir=tmp_path, limit=4, progress=False,
                                      batch_size=8)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, logits_before, rtol=0, atol=0)
    assert list(table.columns[:2]) == ["mask", "model_key"]
    assert set(table["mask"]) == set(masks)
    by_mask = {name: rows.drop(columns=["mask"]).reset_index(drop=True)
               for name, rows in table.groupby("mask")}
    pd.testing.assert_frame_equal(by_mask["all_kept"], by_mask["unpruned"])
    assert by_mask["half"]["model_key"].iloc[0] == evaluation.mask_key("tiny", keep, "mask")
    assert by_mask["half"]["model_key"].iloc[0] != "tiny"

    # Removing the experts gives the same accuracies as masking them (same logits).
    removed = evaluation.evaluate_masks(model, tokenizer, {"half": keep}, task, task_dir,
                                        base_key="tiny", mode="remove", limit=4,
                                        progress=False, batch_size=8)
    np.testing.assert_allclose(removed["value"].to_numpy(),
                               by_mask["half"]["value"].to_numpy(), atol=1e-12)
    with pytest.raises(ValueError, match="unknown keyword"):
        evaluation.evaluate_masks(model, tokenizer, masks, task, task_dir, base_key="tiny",
                                  limt=3)


def test_masked_copy_shares_expert_weights(model):
    keep = np.ones((3, 8), dtype=bool)
    keep[:, :2] = False
    copy = harness._pruned_copy(model, keep, "mask")
    base_experts = model.model.layers[0].mlp.experts.gate_up_proj
    assert copy.model.layers[0].mlp.experts.gate_up_proj is base_experts
    assert copy.model.layers[0].mlp.gate is not model.model.layers[0].mlp.gate
    assert "masked_experts" in copy.config.to_dict()
    assert "masked_experts" not in model.config.to_dict()


def test_evaluate_checks_arguments(model, tokenizer, task_dir):
    with pytest.raises(ValueError, match="model_key"):
        evaluation.evaluate(model, tokenizer, ["x"], task_dir, model_key="")
    with pytest.raises(ValueError, match="limit"):
        evaluation.evaluate(model, tokenizer, ["x"], task_dir, model_key="m", limit=0)
    with pytest.raises(ValueError, match="tasks"):
        evaluation.evaluate(model, tokenizer, [], task_dir, model_key="m")
    with pytest.raises(ValueError, match="task_dir"):
        evaluation.evaluate(model, tokenizer, ["x"], task_dir / "missing", model_key="m")


# --------------------------------------------------------------------------------------------
# Standard tasks
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Tables and figures
# --------------------------------------------------------------------------------------------


def test_relative_drop_by_hand():
    table = pd.DataFrame({
        "mask": ["unpruned", "unpruned", "caep", "caep", "random"],
        "task": ["a", "b", "a", "b", "c"],
        "metric": ["acc"] * 5,
        "domain": [None, "law", None, "law", None],
        "value": [0.5, 0.8, 0.4, 0.8, 0.3],
    })
    out = evaluation.relative_drop(table)
    assert out["relative_drop"].iloc[:4].tolist() == pytest.approx([0.0, 0.0, -0.2, 0.0])
    assert math.isnan(out["relative_drop"].iloc[4])  # no baseline for task c
    assert out["baseline"].iloc[2] == 0.5
    with pytest.raises(ValueError, match="baseline_mask"):
        evaluation.relative_drop(table, baseline_mask="dense")
    with pytest.raises(ValueError, match="mask"):
        evaluation.relative_drop(table.drop(columns="mask"))


def test_results_table_reads_plain_lm_eval_output():
    raw = {"results": {"arc_challenge": {"alias": "arc_challenge", "acc,none": 0.25,
                                         "acc_stderr,none": 0.01, "acc_norm,none": 0.3,
                                         "acc_norm_stderr,none": "N/A"}},
           "n-samples": {"arc_challenge": {"original": 10, "effective": 10}}}
    table = evaluation.results_table(raw)
    assert table["metric"].tolist() == ["acc", "acc_norm"]
    assert table["stderr"].iloc[0] == 0.01 and math.isnan(table["stderr"].iloc[1])
    assert table["domain"].isna().all() and (table["n_samples"] == 10).all()


def test_figures():
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    from moecollab import plotting

    rows = [{"method": "unpruned", "prune_ratio": 0.0, "value": 0.6}]
    for ratio in (0.25, 0.5, 0.75):
        rows += [{"method": "caep", "prune_ratio": ratio, "value": 0.6 - ratio / 2},
                 {"method": "seer", "prune_ratio": ratio, "value": 0.55 - ratio / 2}]
        rows += [{"method": "random", "prune_ratio": ratio, "value": 0.5 - ratio / 2 + s / 50}
                 for s in range(3)]
    curve = plotting.accuracy_vs_ratio(pd.DataFrame(rows), chance=0.25)
    assert isinstance(curve, Figure)
    matrix = pd.DataFrame([[-0.05, -0.2], [-0.3, -0.02]], index=["law", "math"],
                          columns=["law", "math"])
    heatmap = plotting.domain_drop_heatmap(matrix)
    assert isinstance(heatmap, Figure)
    labels = [text.get_text() for text in heatmap.axes[0].texts]
    assert "-5.0%" in labels
    bars = plotting.results_bars(pd.DataFrame({
        "method": ["caep", "caep", "seer", "seer"], "task": ["arc", "rte"] * 2,
        "value": [0.4, 0.5, 0.35, 0.45], "stderr": [0.01, 0.02, 0.01, 0.02]}))
    assert isinstance(bars, Figure)
    for figure in (curve, heatmap, bars):
        plt.close(figure)


def test_an_exported_uniform_checkpoint_runs_through_lm_eval_from_its_folder(
        model, tokenizer, task_dir, tmp_path):
    # What a user of the exported checkpoint does: stock from_pretrained via lm-eval's "hf"
    # model with pretrained=<folder>, no moecollab code in the loop.
    import lm_eval
    from lm_eval.tasks import TaskManager

    from moecollab.pruning import apply_keep_mask, save_pruned

    keep = np.ones((3, 8), dtype=bool)
    keep[:, [1, 6]] = False  # six experts in every layer
    pruned = apply_keep_mask(copy.deepcopy(model), keep, mode="remove")
    folder = save_pruned(pruned, tmp_path / "pruned", method="test", prune_ratio=0.25,
                         calibration={}, tokenizer=tokenizer)
    with hub_environment.hf_environment(tmp_path / "cache", offline=True):
        raw = lm_eval.simple_evaluate(
            model="hf", model_args=f"pretrained={folder},dtype=float32", device="cpu",
            tasks=["moecollab_mcq_law_test"], limit=3, bootstrap_iters=0,
            task_manager=TaskManager(include_path=str(task_dir), include_defaults=False))
    from_folder = raw["results"]["moecollab_mcq_law_test"]["acc,none"]
    in_memory = evaluation.evaluate(pruned, tokenizer, ["moecollab_mcq_law_test"], task_dir,
                                    model_key="pruned-in-memory", limit=3, bootstrap_iters=0)
    assert from_folder == in_memory["results"]["moecollab_mcq_law_test"]["acc,none"]


# --------------------------------------------------------------------------------------------
# Standard tasks in the evaluation stage, and checkpoints on disk (vLLM / hf model types)
# --------------------------------------------------------------------------------------------


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


def test_standard_table_uses_normalised_accuracy_where_the_task_has_it():
    from moecollab.mask_set import MaskSet

    mask_set = MaskSet()
    mask_set.add(np.ones((1, 4), dtype=bool), method="caep", prune_ratio=0.25)
    for seed in (0, 1):
        mask_set.add(np.ones((1, 4), dtype=bool), method="random", prune_ratio=0.25, seed=seed)
    rows = []
    for mask, values in {"unpruned": (0.5, 0.6, 0.7), "caep@0.25": (0.4, 0.5, 0.6),
                         "random-s0@0.25": (0.2, 0.3, 0.4),
                         "random-s1@0.25": (0.4, 0.5, 0.6)}.items():
        acc, acc_norm, winogrande = values
        rows += [{"mask": mask, "task": "arc_challenge", "kind": "task", "metric": "acc",
                  "value": acc},
                 {"mask": mask, "task": "arc_challenge", "kind": "task", "metric": "acc_norm",
                  "value": acc_norm},
                 {"mask": mask, "task": "winogrande", "kind": "task", "metric": "acc",
                  "value": winogrande}]
    table = evaluation.standard_table(evaluation.add_method_columns(pd.DataFrame(rows),
                                                                    mask_set))
    assert list(table.columns) == ["arc_challenge", "winogrande", "average"]
    assert table.loc[("unpruned", 0.0), "arc_challenge"] == pytest.approx(0.6)
    assert table.loc[("random", 0.25), "winogrande"] == pytest.approx(0.5)  # mean of seeds
    assert table.loc[("caep", 0.25), "average"] == pytest.approx(0.55)
    with pytest.raises(ValueError, match="does not hold: seer@0.25"):
        evaluation.add_method_columns(pd.DataFrame({"mask": ["unpruned", "seer@0.25"]}),
                                      mask_set)


def test_exported_checkpoints_run_in_a_child_process_like_in_memory(model, tokenizer, task_dir,
                                                                   tmp_path, monkeypatch):
    # The vLLM backend's path (lm-eval's model type on each exported folder, one child process
    # each), run here with the "hf" model type: the numbers must equal the in-memory ones.
    from moecollab.pruning import apply_keep_mask, save_pruned

    uniform = np.ones((3, 8), dtype=bool)
    uniform[:, [1, 6]] = False
    uneven = uniform.copy()
    uneven[0, 2] = False
    for name, keep in (("caep", uniform), ("reap", uneven)):
        pruned = apply_keep_mask(copy.deepcopy(model), keep, mode="remove")
        save_pruned(pruned, tmp_path / "05" / f"checkpoint-{name}-0.25", method=name,
                    prune_ratio=0.25, calibration={}, tokenizer=tokenizer)
    exported = evaluation.exported_checkpoints(tmp_path / "05")
    assert exported["mask"].tolist() == ["caep@0.25", "reap@0.25"]
    assert exported["uniform"].tolist() == [True, False]
    row = exported.iloc[0]
    tasks = ["moecollab_mcq_law_test"]
    results = evaluation.evaluate_checkpoints(
        {row["mask"]: (row["path"], row["key"])}, tasks, task_dir, backend="hf",
        dtype="float32", device="cpu", batch_size=8, cache_dir=tmp_path / "cache", limit=3,
        bootstrap_iters=0, progress=False)
    assert results["mask"].unique().tolist() == ["caep@0.25"]
    assert results["model_key"].iloc[0] == f"{row['key']}|hf"
    pruned = apply_keep_mask(copy.deepcopy(model), uniform, mode="remove")
    in_memory = evaluation.evaluate(pruned, tokenizer, tasks, task_dir, model_key="in-memory",
                                    limit=3, bootstrap_iters=0)
    acc = results.set_index("metric").loc["acc", "value"]
    assert acc == in_memory["results"]["moecollab_mcq_law_test"]["acc,none"]
    # The child process returns the per-document rows too, equal to the in-memory ones.
    _, child_items = evaluation.evaluate_checkpoints(
        {row["mask"]: (row["path"], row["key"])}, tasks, task_dir, backend="hf",
        dtype="float32", device="cpu", batch_size=8, cache_dir=tmp_path / "cache", limit=3,
        bootstrap_iters=0, progress=False, return_items=True)
    pd.testing.assert_frame_equal(child_items.drop(columns="mask"),
                                  evaluation.item_table(in_memory))
    # Cached: a second call starts no child process.
    monkeypatch.setattr(harness, "_run_in_child",
                        lambda spec: pytest.fail("evaluated again despite the cache"))
    again = evaluation.evaluate_checkpoints(
        {row["mask"]: (row["path"], row["key"])}, tasks, task_dir, backend="hf",
        dtype="float32", device="cpu", batch_size=8, cache_dir=tmp_path / "cache", limit=3,
        bootstrap_iters=0, progress=False)
    pd.testing.assert_frame_equal(results, again)


# --------------------------------------------------------------------------------------------
# Per-document results (paired comparisons)
# --------------------------------------------------------------------------------------------


def test_item_table_reproduces_every_task_metric(model, tokenizer, task_dir, tmp_path):
    from moecollab import paired

    tasks = ["moecollab_mcq_test", "moecollab_ppl"]
    raw = evaluation.evaluate(model, tokenizer, tasks, task_dir, model_key="tiny",
                              cache_dir=tmp_path, limit=3, batch_size=8)
    items = evaluation.item_table(raw)
    assert list(items.columns) == list(paired.ITEM_COLUMNS[1:])
    mcq = items[items["task"].str.startswith("moecollab_mcq")]
    ppl = items[items["task"].str.startswith("moecollab_ppl")]
    assert set(mcq["task"]) == {f"moecollab_mcq_{d}_test" for d in DOMAINS}
    assert set(ppl["task"]) == {f"moecollab_ppl_{d}" for d in DOMAINS}
    assert (mcq.groupby("task").size() == 3).all() and (mcq["n_choices"] == 4).all()
    assert mcq["acc"].isin([0.0, 1.0]).all() and ppl["acc"].isna().all()
    assert (ppl["loglikelihood"] < 0).all() and (ppl["n_bytes"] > ppl["n_words"]).all()
    assert set(mcq["split"]) == {"test"} and set(mcq["domain"]) == set(DOMAINS)

    # Every task's lm-eval metric is recomputed exactly from the per-document rows.
    table = evaluation.results_table(raw).set_index(["task", "metric"])["value"]
    for metric, rows in (("acc", mcq), ("acc_norm", mcq), ("word_perplexity", ppl),
                         ("byte_perplexity", ppl), ("bits_per_byte", ppl)):
        recomputed = paired.resample_tasks(rows.assign(mask="tiny"), ["tiny"], metric,
                                           n_resamples=1)
        for task, value in zip(recomputed.tasks, recomputed.point["tiny"], strict=True):
            assert value == pytest.approx(table[(task, metric)], rel=1e-9), (task, metric)
    # The groups are the unweighted means of these.
    assert table[("moecollab_ppl", "word_perplexity")] == pytest.approx(
        paired.resample_tasks(ppl.assign(mask="t"), ["t"], "word_perplexity",
                              n_resamples=1).group("t")[0])

    # The cache keeps the per-document rows: a second call reads the same table.
    again = evaluation.evaluate(model, tokenizer, tasks, task_dir, model_key="tiny",
                                cache_dir=tmp_path, limit=3, batch_size=8)
    assert again["evaluated"] == []
    pd.testing.assert_frame_equal(evaluation.item_table(again), items)


def test_evaluate_masks_returns_paired_items(model, tokenizer, task_dir, tmp_path):
    keep = np.ones((3, 8), dtype=bool)
    keep[:, :4] = False
    masks = {"unpruned": None, "all_kept": np.ones((3, 8), dtype=bool), "half": keep}
    results, items = evaluation.evaluate_masks(
        model, tokenizer, masks, ["moecollab_mcq_test"], task_dir, base_key="tiny",
        cache_dir=tmp_path, limit=2, progress=False, batch_size=8, return_items=True)
    assert set(results["mask"]) == set(items["mask"]) == set(masks)
    assert items.columns[0] == "mask"
    by_mask = {name: rows.drop(columns="mask").reset_index(drop=True)
               for name, rows in items.groupby("mask")}
    pd.testing.assert_frame_equal(by_mask["all_kept"], by_mask["unpruned"])
    for name in masks:  # the same documents for every model: comparisons can be paired
        assert by_mask[name][["task", "doc_id"]].equals(by_mask["unpruned"][["task", "doc_id"]])


def test_compact_samples_keep_what_the_item_table_needs():
    samples = [
        {"doc_id": 1, "arguments": [("q", " a"), ("q", " b")], "metrics": ["acc", "acc_norm"],
         "acc": 1.0, "acc_norm": 0.0, "filter": "none", "doc": {"text": "long"}},
        {"doc_id": 0, "arguments": [("q", " a"), ("q", " b")], "metrics": ["acc", "acc_norm"],
         "acc": 0.0, "acc_norm": 1.0, "filter": "none"},
        {"doc_id": 1, "metrics": ["acc"], "acc": 0.0, "filter": "other"},  # a second filter
        {"doc_id": 2, "arguments": [("", "text")], "metrics": ["word_perplexity"],
         "word_perplexity": (-4.5, 3)},
    ]
    compact = cache.compact_samples(samples)
    assert cache.compact_samples(compact) == compact  # idempotent (child processes)
    assert compact == [
        {"doc_id": 0, "n_choices": 2, "acc": 0.0, "acc_norm": 1.0},
        {"doc_id": 1, "n_choices": 2, "acc": 1.0, "acc_norm": 0.0},
        {"doc_id": 2, "word_perplexity": [-4.5, 3.0]},
    ]


def test_workers_fill_the_cache_with_what_one_process_computes(model, tokenizer, task_dir,
                                                               tmp_path, monkeypatch):
    (tmp_path / "stage_00" / "model").mkdir(parents=True)
    model.save_pretrained(tmp_path / "stage_00" / "model")
    tokenizer.save_pretrained(tmp_path / "stage_00" / "model")
    keep = np.ones((3, 8), dtype=bool)
    keep[:, :4] = False
    masks = {"unpruned": None, "all_kept": np.ones((3, 8), dtype=bool), "half": keep}
    task = ["moecollab_mcq_test"]
    settings = {"base_key": "tiny", "limit": 4, "batch_size": 8}
    n_distinct = evaluation.evaluate_masks_in_workers(
        tmp_path / "stage_00", masks, task, task_dir, cache_dir=tmp_path / "cache",
        n_workers=2, **settings)
    assert n_distinct == 2  # all_kept is the unpruned model: one key, evaluated once

    def fail(*args, **kwargs):
        raise AssertionError("every result should come from the workers' cache")

    direct = evaluation.evaluate_masks(model, tokenizer, masks, task, task_dir,
                                       progress=False, **settings)
    monkeypatch.setattr(harness, "_run_lm_eval", fail)
    cached = evaluation.evaluate_masks(model, tokenizer, masks, task, task_dir,
                                       cache_dir=tmp_path / "cache", progress=False, **settings)
    pd.testing.assert_frame_equal(cached.drop(columns="stderr"), direct.drop(columns="stderr"),
                                  atol=1e-6)
    with pytest.raises(ValueError, match="n_workers must be a positive int"):
        evaluation.evaluate_masks_in_workers(tmp_path / "stage_00", masks, task, task_dir,
                                             cache_dir=tmp_path / "cache", n_workers=0,
                                             **settings)


# --------------------------------------------------------------------------------------------
# The package
# --------------------------------------------------------------------------------------------


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
