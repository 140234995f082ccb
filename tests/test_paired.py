"""Tests of moecollab.paired: paired bootstrap intervals over the same items."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from moecollab import paired


def _mcq_items(scores: dict[str, list[list[float]]]) -> pd.DataFrame:
    """Per-item rows: model -> one list of 0/1 scores per task (task names t0, t1, …)."""
    rows = []
    for model, tasks in scores.items():
        for index, values in enumerate(tasks):
            for doc_id, value in enumerate(values):
                rows.append({"mask": model, "task": f"t{index}", "domain": f"field{index}",
                             "split": "test", "doc_id": doc_id, "n_choices": 4.0,
                             "acc": float(value), "acc_norm": float(value)})
    return pd.DataFrame(rows)


def test_point_values_are_the_task_means_and_the_group_their_mean():
    items = _mcq_items({"a": [[1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], "b": [[0, 0, 0, 0], [1] * 6]})
    resampled = paired.resample_tasks(items, ["a", "b"], "acc", n_resamples=50)
    assert resampled.tasks == ("t0", "t1")
    np.testing.assert_allclose(resampled.point["a"], [0.5, 1.0])
    assert resampled.group("a")[0] == pytest.approx(0.75)  # unweighted over tasks
    assert resampled.group(["a", "b"])[0] == pytest.approx((0.75 + 0.5) / 2)
    assert resampled.n_items == {"t0": 4, "t1": 6}
    assert resampled.resamples["a"].shape == (50, 2)


def test_pairing_makes_a_constant_shift_certain():
    # b is a with every answer on task t0 flipped to right: each resample moves both together,
    # so the paired interval of the difference is tight while each score alone is wide.
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2, 200).astype(float)
    b = a.copy()
    b[:20] = 1.0
    items = _mcq_items({"a": [a.tolist()], "b": [b.tolist()]})
    resampled = paired.resample_tasks(items, ["a", "b"], "acc", n_resamples=500)
    difference = paired.paired_difference(resampled, "b", "a")
    alone = paired.interval(*resampled.group("a"))
    assert difference.estimate == pytest.approx(b.mean() - a.mean())
    assert difference.low > 0  # b is never worse on any item
    assert (difference.high - difference.low) < (alone.high - alone.low)


def test_identical_models_give_a_zero_interval_and_same_seed_same_interval():
    items = _mcq_items({"a": [[1, 0, 1, 0, 1]], "b": [[1, 0, 1, 0, 1]]})
    first = paired.paired_difference(paired.resample_tasks(items, ["a", "b"], "acc"), "a", "b")
    assert (first.estimate, first.low, first.high) == (0.0, 0.0, 0.0)
    assert not first.excludes_zero
    noisy = _mcq_items({"a": [[1, 0, 1, 0, 1, 1]], "b": [[0, 1, 1, 0, 0, 1]]})
    again = [paired.paired_difference(paired.resample_tasks(noisy, ["a", "b"], "acc",
                                                            random_state=3), "a", "b")
             for _ in range(2)]
    assert again[0] == again[1]


def test_an_interval_that_straddles_zero_excludes_nothing():
    assert not paired.Interval(0.01, -0.02, 0.04).excludes_zero
    assert paired.Interval(0.03, 0.01, 0.05).excludes_zero
    assert paired.Interval(-0.03, -0.05, -0.01).excludes_zero
    assert not paired.Interval(0.0, math.nan, math.nan).excludes_zero
    assert paired.Interval(0.0321, 0.01, 0.055).text() == "+0.032 [+0.010, +0.055]"
    assert paired.Interval(3.95, 3.5, 4.4).text(100, 1, "%") == "+395.0% [+350.0%, +440.0%]"
    assert paired.Interval(0.3124, 0.25, 0.375).text(signed=False) == "0.312 [0.250, 0.375]"


def test_perplexity_is_pooled_per_task_like_lm_eval():
    items = pd.DataFrame({
        "mask": ["a", "a"], "task": ["p", "p"], "doc_id": [0, 1],
        "loglikelihood": [-10.0, -30.0], "n_words": [5.0, 5.0], "n_bytes": [20.0, 30.0]})
    resampled = paired.resample_tasks(items, ["a"], "word_perplexity", n_resamples=10)
    assert resampled.point["a"][0] == pytest.approx(math.exp(40 / 10))
    bits = paired.resample_tasks(items, ["a"], "bits_per_byte", n_resamples=10)
    assert bits.point["a"][0] == pytest.approx(40 / (50 * math.log(2)))


def test_paper_accuracy_uses_acc_where_a_task_has_no_acc_norm():
    items = pd.DataFrame({
        "mask": ["a"] * 4, "task": ["arc", "arc", "wino", "wino"], "doc_id": [0, 1, 0, 1],
        "acc": [1.0, 1.0, 0.0, 1.0], "acc_norm": [0.0, 1.0, math.nan, math.nan]})
    resampled = paired.resample_tasks(items, ["a"], paired.PAPER_ACCURACY, n_resamples=10)
    np.testing.assert_allclose(resampled.point["a"], [0.5, 0.5])


def test_unpaired_items_are_refused():
    items = _mcq_items({"a": [[1, 0, 1]], "b": [[1, 0]]})
    with pytest.raises(ValueError, match="not paired"):
        paired.resample_tasks(items, ["a", "b"], "acc")
    with pytest.raises(ValueError, match="have no rows"):
        paired.resample_tasks(items, ["a", "zzz"], "acc")
    with pytest.raises(ValueError, match="metric must be one of"):
        paired.resample_tasks(items, ["a"], "accuracy")
    with pytest.raises(ValueError, match="n_resamples"):
        paired.resample_tasks(items, ["a"], "acc", n_resamples=0)
    with pytest.raises(ValueError, match="missing 'acc' values"):
        paired.resample_tasks(_mcq_items({"a": [[1, math.nan]]}), ["a"], "acc", tasks=["t0"])


def test_compare_with_baselines_averages_random_seeds():
    items = _mcq_items({"unpruned": [[1, 1, 1, 1]], "caep": [[1, 1, 1, 0]],
                        "r0": [[1, 0, 0, 0]], "r1": [[0, 0, 0, 0]], "reap": [[1, 1, 1, 0]]})
    found = paired.compare_with_baselines(items, "caep", {"random": ["r0", "r1"], "reap": "reap"},
                                          "acc", n_resamples=200)
    random, reap = found["comparisons"]
    assert found["value"] == 0.75 and random.baseline_value == pytest.approx(0.125)
    assert random.difference.estimate == pytest.approx(0.625)
    assert (reap.difference.low, reap.difference.high) == (0.0, 0.0)
    assert found["reference"].estimate == 1.0


def test_chance_accuracy_from_the_number_of_choices():
    items = pd.DataFrame({"task": ["a", "b", "b"], "n_choices": [4.0, 2.0, 2.0]})
    assert paired.chance_accuracy(items, ["a", "b"]) == pytest.approx(0.375)
    with pytest.raises(ValueError, match="not a multiple-choice"):
        paired.chance_accuracy(pd.DataFrame({"task": ["p"], "n_choices": [math.nan]}), ["p"])


def _domain_items(own_cost: float, other_cost: float, n_docs: int = 40) -> pd.DataFrame:
    """Three fields; per-field pruning costs its own field ``own_cost`` and others
    ``other_cost`` of relative accuracy (the unpruned model answers everything)."""
    fields = ["x", "y", "z"]
    rows = []
    for model in ["unpruned", *fields]:
        for field in fields:
            cost = 0.0 if model == "unpruned" else own_cost if field == model else other_cost
            wrong = round(cost * n_docs)
            for doc_id in range(n_docs):
                rows.append({"mask": model, "task": f"task_{field}", "doc_id": doc_id,
                             "acc": 0.0 if doc_id < wrong else 1.0})
    return pd.DataFrame(rows)


def test_domain_pruning_costs_on_and_off_the_diagonal():
    items = _domain_items(own_cost=0.05, other_cost=0.25)
    resampled = paired.resample_tasks(items, ["unpruned", "x", "y", "z"], "acc",
                                      n_resamples=300)
    costs = paired.domain_pruning_costs(resampled, {f: f for f in "xyz"},
                                        {f"task_{f}": f for f in "xyz"}, higher_is_better=True)
    assert costs["own"].estimate == pytest.approx(0.05)
    assert costs["others"].estimate == pytest.approx(0.25)
    assert costs["difference"].estimate == pytest.approx(0.20) and costs["difference"].low > 0
    # Perplexity: a rise is the cost.
    rise = paired.domain_pruning_costs(resampled, {f: f for f in "xyz"},
                                       {f"task_{f}": f for f in "xyz"}, higher_is_better=False)
    assert rise["own"].estimate == pytest.approx(-0.05)
    with pytest.raises(ValueError, match="at least two calibration fields"):
        paired.domain_pruning_costs(resampled, {"x": "x"}, {"task_x": "x"},
                                    higher_is_better=True)


def test_paired_purity_difference_against_a_field_blind_control():
    rng = np.random.default_rng(0)
    n_docs, per_doc = 60, 20
    fields = np.repeat(rng.choice(["a", "b", "c"], n_docs), per_doc)
    documents = np.repeat(np.arange(n_docs), per_doc)
    trained = np.where(rng.random(fields.size) < 0.8, pd.factorize(fields)[0],
                       rng.integers(0, 3, fields.size))
    control = rng.integers(0, 3, fields.size)
    control[:5] = -1  # unassigned tokens are left out
    result = paired.paired_purity_difference(trained, control, fields, documents,
                                             n_resamples=300)
    assert result["trained"] > 0.8 > 0.5 > result["control"]
    assert result["difference"].low > 0.2
    same = paired.paired_purity_difference(trained, trained, fields, documents, n_resamples=50)
    assert (same["difference"].low, same["difference"].high) == (0.0, 0.0)
    with pytest.raises(ValueError, match="one entry per token"):
        paired.paired_purity_difference(trained[:-1], control, fields, documents)


def test_separation_of_tied_methods_is_zero_and_of_distinct_ones_is_counted_in_errors():
    tied = pd.DataFrame({"mask": ["a"] * 4 + ["b"] * 4, "task": ["t"] * 8,
                         "doc_id": [0, 1, 2, 3] * 2, "acc": [1, 0, 1, 0] * 2})
    found = paired.separation(paired.resample_tasks(tied, ["a", "b"], "acc", n_resamples=50),
                              {"a": "a", "b": "b"})
    assert found["best"] != found["worst"] and found["z"] == 0.0
    rng = np.random.default_rng(0)
    good, bad = rng.random(400) < 0.8, rng.random(400) < 0.6
    items = pd.DataFrame({"mask": ["good"] * 400 + ["bad"] * 400 + ["bad2"] * 400,
                          "task": ["t"] * 1200, "doc_id": list(range(400)) * 3,
                          "acc": np.concatenate([good, bad, bad]).astype(float)})
    found = paired.separation(
        paired.resample_tasks(items, ["good", "bad", "bad2"], "acc", n_resamples=500),
        {"good": "good", "bad": ["bad", "bad2"]})
    assert (found["best"], found["worst"]) == ("good", "bad")
    difference = good.mean() - bad.mean()
    assert found["difference"].estimate == pytest.approx(difference)
    # The bootstrap error is close to the textbook paired standard error.
    textbook = np.std(good.astype(float) - bad, ddof=1) / np.sqrt(400)
    assert found["standard_error"] == pytest.approx(textbook, rel=0.15)
    assert found["z"] == pytest.approx(difference / found["standard_error"])
    with pytest.raises(ValueError, match="at least two methods"):
        paired.separation(paired.resample_tasks(items, ["good"], "acc"), {"good": "good"})


def _with_clusters(items: pd.DataFrame, copies: int) -> pd.DataFrame:
    """Every document repeated ``copies`` times, the copies one cluster (doc_ids renumbered)."""
    repeated = items.loc[items.index.repeat(copies)].copy()
    repeated["cluster"] = [f"{task}:{doc}" for task, doc in zip(repeated["task"],
                                                                 repeated["doc_id"], strict=True)]
    repeated["doc_id"] = repeated.groupby(["mask", "task"]).cumcount()
    return repeated.reset_index(drop=True)


def test_clusters_are_resampled_whole():
    rng = np.random.default_rng(1)
    scores = {"a": [rng.integers(0, 2, 40).tolist(), rng.integers(0, 2, 30).tolist()],
              "b": [rng.integers(0, 2, 40).tolist(), rng.integers(0, 2, 30).tolist()]}
    items = _mcq_items(scores)
    alone = paired.resample_tasks(items, ["a", "b"], "acc", n_resamples=300, random_state=4)
    # Three copies of each item in one cluster: the same evidence as one item, so exactly the
    # same resamples (a cluster draw is an item draw) ...
    clustered = _with_clusters(items, 3)
    tripled = paired.resample_tasks(clustered, ["a", "b"], "acc", n_resamples=300,
                                    random_state=4)
    for model in ("a", "b"):
        np.testing.assert_allclose(tripled.point[model], alone.point[model])
        np.testing.assert_allclose(tripled.resamples[model], alone.resamples[model])
    assert tripled.n_items == {"t0": 120, "t1": 90}
    # ... while the copies taken as independent items narrow the interval by about sqrt(3).
    naive = paired.resample_tasks(clustered.drop(columns="cluster"), ["a", "b"], "acc",
                                  n_resamples=300, random_state=4)
    ratio = (np.std(alone.resamples["a"][:, 0] - alone.resamples["b"][:, 0])
             / np.std(naive.resamples["a"][:, 0] - naive.resamples["b"][:, 0]))
    assert 1.4 < ratio < 2.1


def test_clusters_of_unequal_size_pool_their_items_and_perplexity_too():
    items = pd.DataFrame({
        "mask": "a", "task": "t", "doc_id": [0, 1, 2], "cluster": ["x", "x", "y"],
        "acc": [1.0, 1.0, 0.0], "loglikelihood": [-1.0, -2.0, -4.0], "n_words": [1.0, 1.0, 2.0]})
    resampled = paired.resample_tasks(items, ["a"], "acc", n_resamples=400)
    # A resample holds x twice (1.0), y twice (0.0) or one of each (2 of 3 items right).
    assert set(np.round(resampled.resamples["a"][:, 0], 6)) == {0.0, 1.0, round(2 / 3, 6)}
    ppl = paired.resample_tasks(items, ["a"], "word_perplexity", n_resamples=400)
    # x: -3 over 2 words, y: -4 over 2 words.
    assert set(np.round(ppl.resamples["a"][:, 0], 6)) == {
        round(math.exp(6 / 4), 6), round(math.exp(8 / 4), 6), round(math.exp(7 / 4), 6)}


def test_the_separation_table_has_a_row_per_family_and_ratio_from_the_same_resamples():
    rng = np.random.default_rng(1)
    rows = []
    for task in ("w1", "w2", "c1"):
        for mask, p in (("caep", 0.7), ("reap", 0.7), ("random-a", 0.4), ("random-b", 0.4)):
            rows += [{"mask": mask, "task": task, "doc_id": doc, "acc": float(rng.random() < p)}
                     for doc in range(300)]
    items = pd.DataFrame(rows)
    methods = {"caep": ["caep"], "reap": ["reap"], "random": ["random-a", "random-b"]}
    table = paired.separation_table(items, {0.5: methods}, {"word": ["w1", "w2"],
                                                            "cloze": ["c1"]},
                                    {"word": "acc", "cloze": "acc"}, n_resamples=300)
    assert table.columns.tolist() == ["family", "ratio", "best", "worst", "best minus worst",
                                      "standard error", "z", "widest CAEP interval (±)"]
    assert table[["family", "ratio"]].values.tolist() == [["word", 0.5], ["cloze", 0.5]]
    assert (table["worst"] == "random").all() and (table["z"] > 4).all()
    # Each row is what separation and paired_difference give on that family's resamples.
    resampled = paired.resample_tasks(items, ["caep", "reap", "random-a", "random-b"], "acc",
                                      tasks=["c1"], n_resamples=300)
    found = paired.separation(resampled, methods)
    row = table.iloc[1]
    assert row["z"] == pytest.approx(found["z"])
    widest = max((d.high - d.low) / 2 for d in (
        paired.paired_difference(resampled, ["caep"], ["reap"]),
        paired.paired_difference(resampled, ["caep"], ["random-a", "random-b"])))
    assert row["widest CAEP interval (±)"] == pytest.approx(widest)
