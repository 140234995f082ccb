"""moecollab.evaluation.cache: what a cached result is keyed by and keeps, and a corrupt file."""

from __future__ import annotations

import numpy as np
import pytest
from tiny_evaluation import tiny_items

from moecollab import evaluation
from moecollab.evaluation import cache


def test_evaluate_caches_a_corrupt_file_again(model, tokenizer, task_dir, tmp_path):
    task = ["moecollab_mcq_law_test"]
    evaluation.evaluate(model, tokenizer, task, task_dir, model_key="tiny", cache_dir=tmp_path,
                        limit=2)
    (cached,) = (tmp_path / "lm_eval_results").glob("*.json")
    cached.write_text("{not json")
    raw = evaluation.evaluate(model, tokenizer, task, task_dir, model_key="tiny",
                              cache_dir=tmp_path, limit=2)
    assert raw["evaluated"] == task


def test_cache_key_follows_task_data_and_mask(tmp_path):
    items = tiny_items()
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
