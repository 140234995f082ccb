"""moecollab.evaluation.local_tasks: this study's items and texts as local lm-eval task folders."""

from __future__ import annotations

import pytest
from tiny_evaluation import DOMAINS, N_ITEMS, SPLITS, tiny_items

from moecollab import evaluation


def test_write_mcq_tasks_names_files_and_determinism(tmp_path):
    items = tiny_items()
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
    items = tiny_items()
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
    items = tiny_items()
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
    items = tiny_items().replace({"domain": {"law": "computer_science"}})
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


def test_write_mcq_tasks_needs_the_item_columns_of_the_sources(tmp_path):
    # One home for the item columns: every column data.sources requires of an item, but
    # entry_id (which only groups documents into clusters), must be there.
    from moecollab.data import sources

    items = tiny_items()
    for column in sources.ITEM_COLUMNS:
        if column == "entry_id":
            evaluation.write_mcq_tasks(items.drop(columns=column), tmp_path)
            continue
        with pytest.raises(ValueError, match=rf"items lacks column\(s\) {column}; expected"):
            evaluation.write_mcq_tasks(items.drop(columns=column), tmp_path)
