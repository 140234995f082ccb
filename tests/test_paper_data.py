"""The paper's data (MMLU-Pro, MMLU) read offline from tiny local copies with the real columns."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
from tiny_datasets import write_tiny_paper_data

from moecollab import evaluation, preflight, runner
from moecollab.artifacts import Manifest, write_table
from moecollab.data import CorpusError, load_corpus, paper, sources
from moecollab.params import ParameterError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def paper_dir(tmp_path_factory) -> Path:
    return write_tiny_paper_data(tmp_path_factory.mktemp("paper"))


def test_mmlu_pro_keeps_the_five_fields_with_their_options(paper_dir, tmp_path):
    mmlu_pro = paper.load_mmlu_pro(str(paper_dir), cache_dir=tmp_path)
    assert set(mmlu_pro["domain"]) == set(paper.FIELDS)  # biology dropped
    assert (mmlu_pro.groupby("domain").size() == 40).all()
    first = mmlu_pro.iloc[0]
    lines = first["text"].splitlines()
    assert lines[0] == first["question"] and len(lines) == 11
    assert lines[1 + first["answer"]].endswith(first["choices"][first["answer"]])
    assert lines[10].startswith("J. ")
    # A fixed hash of question_id decides the role: about 60% analysed in every field.
    assert set(mmlu_pro["split"]) == {"analysis", "held_out"}
    share = (mmlu_pro["split"] == "analysis").mean()
    assert 0.5 < share < 0.7
    assert mmlu_pro["split"].tolist() == [paper.role_of_question(i)
                                          for i in mmlu_pro["question_id"]]


def test_mmlu_reads_the_all_config_only_once(paper_dir, tmp_path):
    mmlu = paper.load_mmlu(str(paper_dir), cache_dir=tmp_path)
    assert len(mmlu) == 200  # five fields x 40; the per-subject decoy copy is not read
    assert set(mmlu["domain"]) == set(paper.FIELDS)
    assert mmlu["text"].str.count("\n").eq(4).all()  # four options
    assert set(mmlu["subject"]) <= set(paper.MMLU_FIELDS)


def test_prepared_tables_are_cached_under_the_profile(paper_dir, tmp_path):
    local = shutil.copytree(paper_dir, tmp_path / "copy")
    first = paper.load_mmlu_pro(str(local), cache_dir=tmp_path / "cache")
    cached = list((tmp_path / "cache" / "paper_data").glob("mmlu-pro-*.parquet"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    pd.testing.assert_frame_equal(paper.load_mmlu_pro(str(local), cache_dir=tmp_path / "cache"),
                                  first)
    assert cached[0].stat().st_mtime_ns == stamp
    # A changed local copy is prepared again, into another file.
    table = pd.read_parquet(next(local.glob(paper.LOCAL_FILES[paper.MMLU_PRO])))
    table.head(100).to_parquet(next(local.glob(paper.LOCAL_FILES[paper.MMLU_PRO])), index=False)
    assert len(paper.load_mmlu_pro(str(local), cache_dir=tmp_path / "cache")) < len(first)
    assert len(list((tmp_path / "cache" / "paper_data").glob("mmlu-pro-*.parquet"))) == 2


def test_calibration_never_contains_an_evaluated_question(paper_dir, tmp_path):
    mmlu_pro = paper.load_mmlu_pro(str(paper_dir), cache_dir=tmp_path)
    entries, domains = sources.calibration_entries("paper", paper_data_dir=str(paper_dir),
                                                   cache_dir=tmp_path)
    assert domains == list(paper.FIELDS)
    held_out = set(mmlu_pro.loc[mmlu_pro["split"] == "held_out", "question"])
    analysed = set(mmlu_pro.loc[mmlu_pro["split"] == "analysis", "question"])
    mmlu = paper.load_mmlu(str(paper_dir), cache_dir=tmp_path)
    shared = set(mmlu["question"]) & (held_out | analysed)
    assert shared & held_out and shared & analysed  # the tiny copy has both kinds of overlap
    assert not set(entries["question"]) & held_out
    assert shared & analysed <= set(entries["question"])  # analysed ones may stay
    assert len(entries) == len(mmlu) - len(shared & held_out)


def test_evaluation_items_are_held_out_questions_lm_eval_can_read(paper_dir, tmp_path):
    items, texts = sources.evaluation_data("paper", n_perplexity_entries=3,
                                           paper_data_dir=str(paper_dir), cache_dir=tmp_path)
    mmlu_pro = paper.load_mmlu_pro(str(paper_dir), cache_dir=tmp_path)
    held_out = mmlu_pro[mmlu_pro["split"] == "held_out"]
    assert set(items["item_id"]) == set(held_out["entry_id"])
    assert (items["split"] == "test").all() and items["choices"].map(len).eq(10).all()
    assert set(texts) == set(paper.FIELDS) and all(len(t) == 3 for t in texts.values())
    assert {text for field in texts.values() for text in field} <= set(held_out["text"])
    names = evaluation.write_mcq_tasks(items, tmp_path / "tasks", splits=("test",))
    assert "moecollab_mcq_psychology_test" in names and "moecollab_mcq_test" in names


def test_analysis_text_is_the_analysed_share_of_chosen_fields(paper_dir, tmp_path):
    entries = sources.analysis_entries("paper", domains=["law", "psychology"],
                                       paper_data_dir=str(paper_dir), cache_dir=tmp_path)
    assert set(entries["domain"]) == {"law", "psychology"}
    assert (entries["split"] == "analysis").all()
    assert {"entry_id", "domain", "split", "text"} <= set(entries.columns)
    with pytest.raises(paper.PaperDataError, match="biology"):
        sources.analysis_entries("paper", domains=["biology"], paper_data_dir=str(paper_dir),
                                 cache_dir=tmp_path)


def test_the_embedded_source_reads_the_corpus_as_before():
    corpus = load_corpus(domains=["law", "physics"])
    entries = sources.analysis_entries("embedded", domains=["law", "physics"], split="held_out")
    expected = corpus[corpus["split"].isin(["validation", "test"])]
    pd.testing.assert_frame_equal(entries, expected)
    calibration, domains = sources.calibration_entries("embedded", split="validation")
    assert domains == sorted(load_corpus()["domain"].unique())
    assert (calibration["split"] == "validation").all()
    with pytest.raises(ValueError, match="data_source must be one of embedded, paper"):
        sources.analysis_entries("mmlu", domains=["law"])


def test_stages_05_and_06_keep_to_the_study_fields(tmp_path):
    """A three-field study calibrates and evaluates on those three fields, not the corpus's."""
    folder = tmp_path / "00_model"
    folder.mkdir()
    def manifest(parameters):
        Manifest(stage="00_model", profile="test", key="k", parameters=parameters, inputs={},
                 outputs={}).save(folder)

    manifest({"domains": ["physics", "law", "biology"]})
    fields = sources.study_fields(folder)
    assert fields == ["physics", "law", "biology"]
    calibration, domains = sources.calibration_entries("embedded", fields=fields)
    assert domains == ["biology", "law", "physics"]  # sorted, as with every field
    assert set(calibration["domain"]) == set(domains)
    everything, _ = sources.calibration_entries("embedded")
    pd.testing.assert_frame_equal(calibration, everything[everything["domain"].isin(domains)])

    items = pd.DataFrame({"item_id": ["a", "b"], "domain": ["law", "history"],
                          "split": "test", "question": "q", "choices": [["x", "y"]] * 2,
                          "answer": 0, "entry_id": ["e1", "e2"]})
    sources.write_items(folder, "mcq", items)
    kept, texts = sources.evaluation_data("embedded", model_folder=folder,
                                          n_perplexity_entries=2, fields=fields)
    assert kept["item_id"].tolist() == ["a"] and sorted(texts) == domains
    _, all_texts = sources.evaluation_data("embedded", model_folder=folder,
                                           n_perplexity_entries=2)
    assert {field: all_texts[field] for field in domains} == texts  # the same texts per field
    # Field names are checked where the corpus checks them: the same error as load_corpus's.
    with pytest.raises(CorpusError, match="unknown domain 'astrology'; allowed: biology, "):
        sources.calibration_entries("embedded", fields=["law", "astrology"])
    manifest({})
    assert sources.study_fields(folder) is None  # older artifacts: every field


# --------------------------------------------------------------------------------------------
# Plan-time checks: one line, before any model loads
# --------------------------------------------------------------------------------------------


def _plan(overrides, tmp_path):
    return runner.make_plan("smoke", overrides=overrides, artifacts_root=tmp_path / "artifacts",
                            root=ROOT)


PAPER_EVERYWHERE = ["01_capture.data_source=paper", "05_pruning.data_source=paper",
                    "06_evaluation.data_source=paper",
                    "01_capture.domains=[mathematics, computer_science, physics, law, "
                    "psychology]"]


def test_without_the_hub_the_plan_stops_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ParameterError) as stopped:
        _plan(PAPER_EVERYWHERE, tmp_path)
    message = str(stopped.value)
    assert "\n" not in message
    assert message.startswith("parameter 'data_source' of stage 01_capture: data_source 'paper' "
                              "reads TIGER-Lab/MMLU-Pro from the hub, which is offline here")
    assert "paper_data_dir" in message
    assert not (tmp_path / "artifacts").exists()  # nothing ran


def test_prepared_tables_in_the_profile_cache_need_no_hub(tmp_path, monkeypatch, paper_dir):
    cache = tmp_path / "artifacts" / "smoke" / "cache"
    for dataset in (paper.MMLU_PRO, paper.MMLU):  # as a first online run leaves them
        local = paper._cache_file(cache, dataset, str(paper_dir))
        target = paper._cache_file(cache, dataset, "")
        (paper.load_mmlu_pro if dataset == paper.MMLU_PRO else paper.load_mmlu)(
            str(paper_dir), cache_dir=cache)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local, target)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    plan = _plan(PAPER_EVERYWHERE, tmp_path)
    assert plan.parameters["05_pruning"]["data_source"] == "paper"


@pytest.mark.parametrize(("overrides", "match"), [
    (["01_capture.data_source=paper"],
     "parameter 'domains' of stage 01_capture: biology, medicine, chemistry, engineering, "
     "history, philosophy are not among the paper's fields; with data_source 'embedded'"),
    (["01_capture.domains=[law, psychology]"],
     "psychology is not a field of the embedded corpus; with data_source 'paper' the fields"),
    (["05_pruning.data_source=mmlu"], "data_source"),
    (["06_evaluation.data_source=paper", "06_evaluation.paper_data_dir=/nonexistent"],
     "paper_data_dir '/nonexistent' is not a folder"),
])
def test_bad_data_settings_are_refused_at_plan_time(overrides, match, tmp_path):
    with pytest.raises(ParameterError, match=match):
        _plan(overrides, tmp_path)


def test_a_local_copy_with_a_missing_column_is_named(paper_dir, tmp_path):
    broken = shutil.copytree(paper_dir, tmp_path / "broken")
    path = next(broken.glob(paper.LOCAL_FILES[paper.MMLU]))
    pd.read_parquet(path).drop(columns=["subject"]).to_parquet(path, index=False)
    with pytest.raises(ParameterError, match=r"lacks column\(s\) subject of cais/mmlu"):
        preflight.check_data_sources({"05_pruning": {"data_source": "paper",
                                                     "paper_data_dir": str(broken)}})
    # 01 and 06 read MMLU-Pro only: the broken MMLU does not concern them.
    preflight.check_data_sources({"06_evaluation": {"data_source": "paper",
                                                    "paper_data_dir": str(broken)}})


def _cloze_items() -> pd.DataFrame:
    """Two field cloze items as stage 00 keeps them: one held-out group, the entry's split kept."""
    return pd.DataFrame({"item_id": ["c1", "c2"], "domain": ["law", "law"],
                         "split": "held_out", "term": "Tort", "question": ["A wrong", "A writ"],
                         "choices": [["civil", "star"], ["court", "leaf"]], "answer": [0, 0],
                         "entry_id": ["e1", "e2"], "entry_split": ["validation", "test"]})


def test_stage_00_items_are_written_as_before_and_read_back(tmp_path):
    items = _cloze_items()
    path = sources.write_items(tmp_path, "cloze", items)
    assert path == tmp_path / "cloze_items.parquet"
    # The bytes stage 00 wrote before the items had a reader of their own.
    write_table(tmp_path / "old.parquet", items)
    assert path.read_bytes() == (tmp_path / "old.parquet").read_bytes()
    pd.testing.assert_frame_equal(sources.read_items(tmp_path, "cloze"), pd.read_parquet(path))
    assert sources.read_items(tmp_path, "cloze", columns=["entry_split"]).columns.tolist() == [
        "entry_split"]
    assert sources.evaluated_entry_splits(tmp_path) == {"validation", "test"}
    assert sources.evaluated_entry_splits(tmp_path / "older") == set()  # no cloze items yet


def test_items_without_their_columns_or_family_are_refused(tmp_path):
    items = _cloze_items()
    with pytest.raises(ValueError, match=r"cloze items lacks column\(s\) entry_split of cloze "
                                         "items; expected item_id, domain, split, question, "
                                         "choices, answer, entry_id, entry_split"):
        sources.write_items(tmp_path, "cloze", items.drop(columns="entry_split"))
    sources.write_items(tmp_path, "mcq", items.drop(columns="entry_split"))  # mcq: not needed
    items.drop(columns=["answer", "entry_id"]).to_parquet(tmp_path / "cloze_items.parquet")
    with pytest.raises(ValueError, match=r"cloze_items.parquet lacks column\(s\) answer, "
                                         "entry_id of cloze items"):
        sources.read_items(tmp_path, "cloze")
    with pytest.raises(ValueError, match="family must be one of mcq, cloze .*; got 'word'"):
        sources.read_items(tmp_path, "word")
    with pytest.raises(FileNotFoundError, match="no mcq_items.parquet in .*; run stage 00_model"):
        sources.read_items(tmp_path / "elsewhere", "mcq")


def test_embedded_evaluation_items_come_by_family(tmp_path, paper_dir):
    mcq = pd.DataFrame({"item_id": ["m1"], "domain": ["law"], "split": ["test"],
                        "question": ["Tort"], "choices": [["a", "b"]], "answer": [0],
                        "entry_id": ["e1"]})
    cloze = mcq.assign(item_id="c1", split="held_out", entry_split="test")
    model_folder = tmp_path / "00_model"
    sources.write_items(model_folder, "mcq", mcq)
    sources.write_items(model_folder, "cloze", cloze)
    files = {"model_folder": model_folder, "n_perplexity_entries": 2}
    items, texts = sources.evaluation_data("embedded", families=["cloze"], **files)
    assert items[["item_id", "family"]].values.tolist() == [["c1", "cloze"]]
    assert all(len(field) == 2 for field in texts.values())
    both, _ = sources.evaluation_data("embedded", families=["mcq", "cloze"], **files)
    assert both["family"].tolist() == ["mcq", "cloze"]
    # Word cloze items are made from the field cloze file, options drawn within the field.
    law = pd.DataFrame({"item_id": [f"c{i}" for i in range(4)], "domain": "law",
                        "split": "held_out", "question": "Tort",
                        "choices": [[w, "x", "y", "z"] for w in ("writ", "jury", "bail", "tort")],
                        "answer": 0, "entry_id": [f"e{i}" for i in range(4)],
                        "entry_split": "test"})
    sources.write_items(tmp_path / "law", "cloze", law)
    word, _ = sources.evaluation_data("embedded", families=["word"],
                                      model_folder=tmp_path / "law", n_perplexity_entries=2)
    assert word["family"].unique().tolist() == ["word"]
    assert all(sorted(choices) == ["bail", "jury", "tort", "writ"] for choices in word["choices"])
    with pytest.raises(ValueError, match="unknown item families"):
        sources.evaluation_data("embedded", families=["gap"], **files)
    with pytest.raises(ValueError, match="data_source 'embedded' needs model_folder"):
        sources.evaluation_data("embedded", families=["cloze"], n_perplexity_entries=2)
    with pytest.raises(FileNotFoundError, match="no mcq_items.parquet in .*law; run stage "
                                                "00_model"):
        sources.evaluation_data("embedded", families=["mcq"], model_folder=tmp_path / "law",
                                n_perplexity_entries=2)
    with pytest.raises(ValueError, match="multiple-choice questions only"):
        sources.evaluation_data("paper", families=["cloze"],
                                n_perplexity_entries=2, paper_data_dir=str(paper_dir),
                                cache_dir=tmp_path)
