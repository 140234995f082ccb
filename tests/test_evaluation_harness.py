"""moecollab.evaluation.harness: lm-eval on the tiny model, under masks, in workers, from disk.

The tiny OLMoE, its tokenizer and the local tasks are fixtures of tests/conftest.py, the items
tests/tiny_evaluation.py's. Everything offline, on the CPU.
"""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch
from tiny_evaluation import DOMAINS, SPLITS, tiny_items

from moecollab import evaluation
from moecollab.evaluation import harness, hub_environment


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
    items = tiny_items()
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

    def no_worker(*args, **kwargs):
        raise AssertionError("a worker was started although every result is cached")

    import subprocess

    with monkeypatch.context() as patch:   # everything cached: no worker starts
        patch.setattr(subprocess, "Popen", no_worker)
        assert evaluation.evaluate_masks_in_workers(
            tmp_path / "stage_00", masks, task, task_dir, cache_dir=tmp_path / "cache",
            n_workers=2, **settings) == 0

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


def test_workers_take_the_next_unclaimed_model_each(tmp_path, monkeypatch):
    # Two workers on one spec: whatever the interleaving, each model is evaluated exactly once,
    # and a worker that starts late takes what is left instead of a fixed share.
    from moecollab import models

    masks = {"a": np.ones((2, 4), dtype=bool), "b": np.zeros((2, 4), dtype=bool)}
    np.savez(tmp_path / "masks.npz", **masks)
    (tmp_path / "claims").mkdir()
    spec = {"stage_00_folder": "unused", "tasks": ["t"], "task_dir": "unused", "base_key": "k",
            "mode": "mask", "cache_dir": "unused", "limit": None, "kwargs": {},
            "masks": str(tmp_path / "masks.npz"), "order": ["a", "unpruned", "b"],
            "claims": str(tmp_path / "claims")}
    harness.write_json(tmp_path / "spec.json", spec)
    monkeypatch.setattr(models, "load_reference_model", lambda *args, **kwargs: ("m", "t"))
    evaluated: list[tuple[str, object]] = []
    started = []

    def record(model, tokenizer, keep_mask, *args, **kwargs):
        evaluated.append((started[-1], None if keep_mask is None else keep_mask.sum()))
        if len(evaluated) == 1:   # the second worker starts while the first is busy
            started.append("second")
            harness._mask_worker(str(tmp_path / "spec.json"))
            started.append("first")

    monkeypatch.setattr(harness, "_evaluate_mask", record)
    started.append("first")
    harness._mask_worker(str(tmp_path / "spec.json"))
    assert evaluated == [("first", 8), ("second", None), ("second", 0)]
    assert harness._claim(tmp_path / "claims" / "new") and \
        not harness._claim(tmp_path / "claims" / "new")
