"""moecollab.evaluation.tables: results, per-document and standard tables, drops, figures."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from tiny_evaluation import DOMAINS

from moecollab import evaluation


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
