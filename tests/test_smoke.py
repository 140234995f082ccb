"""The smoke profile end to end through the real runner, then a strict book build."""

import shutil
import subprocess

import nbformat
import pandas as pd
import pytest

from moecollab import artifacts, runner
from moecollab.stages import STAGE_NAMES, STAGES


def test_every_stage_finishes_with_a_verified_manifest(smoke_artifacts):
    for stage in STAGE_NAMES:
        manifest = artifacts.verify_stage(smoke_artifacts / "smoke" / stage)
        assert manifest.outputs and manifest.seconds > 0
        path = smoke_artifacts / "smoke" / "executed" / f"{stage}.ipynb"
        executed = nbformat.read(path, 4)
        assert not executed.metadata.papermill.get("exception")
        assert path.stat().st_size < 2_000_000, f"{stage}: executed notebook over 2 MB"


def test_stage_00_writes_a_loadable_model_and_its_checks(smoke_artifacts):
    from moecollab.models import load_model

    folder = smoke_artifacts / "smoke" / "00_model"
    model, tokenizer = load_model(folder / "model")
    assert model.config.model_type == "olmoe" and model.config.num_experts == 8
    assert tokenizer.eos_token == "<|endoftext|>"
    health = artifacts.read_json(folder / "routing_health.json")
    assert set(health) == {"trained", "control"}
    assert len(health["trained"]["mutual_information_bits"]) == 2
    assert (folder / "mcq_items.parquet").is_file()
    verdict = artifacts.read_json(folder / "verdict.json")
    assert isinstance(verdict["healthy"], bool)
    assert verdict["mutual_information_above_control_in_every_layer"] == (
        len(verdict["layers_with_mutual_information_above_control"]) == 2)
    accuracy = pd.read_csv(folder / "field_accuracy.csv").set_index("domain")
    assert {"trained", "control", "items"} <= set(accuracy.columns)
    assert accuracy["trained"].between(0, 1).all()


def test_cloze_items_are_held_out_and_calibration_never_reads_them(smoke_artifacts):
    from moecollab import data

    corpus = data.load_corpus().set_index("entry_id")
    items = pd.read_parquet(smoke_artifacts / "smoke" / "00_model" / "cloze_items.parquet")
    assert len(items) > 0 and set(items["split"]) == {"held_out"}
    assert set(corpus.loc[items["entry_id"], "split"]) <= {"validation", "test"}
    assert (corpus.loc[items["entry_id"], "split"].to_numpy() == items["entry_split"]).all()
    seen = pd.read_csv(smoke_artifacts / "smoke" / "05_pruning" /
                       "pruning_dictionary_entries.csv")
    assert not set(seen["entry_id"]) & set(items["entry_id"])
    results = pd.read_csv(smoke_artifacts / "smoke" / "06_evaluation" / "results.csv")
    assert "moecollab_cloze_held_out" in set(results["task"])


def test_no_evaluation_text_reaches_the_pruning_dictionary(smoke_artifacts):
    import pandas as pd

    from moecollab import data
    from moecollab.hsdl import load_hsdl

    folder = smoke_artifacts / "smoke" / "05_pruning"
    seen = pd.read_csv(folder / "pruning_dictionary_entries.csv")
    assert set(seen["split"]) == {"train"} and len(seen) > 0
    corpus = data.load_corpus()
    test_entries = set(corpus.loc[corpus["split"] == "test", "entry_id"])
    assert test_entries and not set(seen["entry_id"]) & test_entries
    # What stage 06 evaluates comes from test entries: held-out headwords and test text.
    items = pd.read_parquet(smoke_artifacts / "smoke" / "00_model" / "mcq_items.parquet")
    assert set(items.loc[items["split"] == "test", "entry_id"]) <= test_entries
    # The pruning dictionary has the analysis fit's settings, and is another fit.
    pruning_fit = load_hsdl(folder / "pruning_hsdl")
    analysis_fit = load_hsdl(smoke_artifacts / "smoke" / "03_hsdl" / "hsdl")
    assert pruning_fit.get_params() == analysis_fit.get_params()
    assert not (pruning_fit.dictionaries_[0] == analysis_fit.dictionaries_[0]).all()


def test_every_compared_method_keeps_the_same_number_of_experts(smoke_artifacts):
    from moecollab.mask_set import MaskSet

    catalogue = MaskSet.load(smoke_artifacts / "smoke" / "05_pruning").table
    compared = catalogue[catalogue["role"].isin(["method", "baseline"])]
    assert set(compared["method"]) == {"caep", "frequency", "seer", "reap", "output_impact",
                                       "random"}
    assert (compared.groupby("prune_ratio")["kept"].nunique() == 1).all()
    reap = catalogue[catalogue["method"] == "reap"]
    assert (reap["scope"] == "per_layer").all()
    for per_layer in reap["kept_per_layer"]:  # REAP as published: the same count per layer
        assert len(set(per_layer.split())) == 1
    assert {"caep_as_written", "reap_global", "output_impact_global"} <= set(
        catalogue.loc[catalogue["role"] == "variant", "method"])


def test_verdicts_carry_paired_intervals_over_the_same_items(smoke_artifacts):
    import pandas as pd

    folder = smoke_artifacts / "smoke" / "06_evaluation"
    items = pd.read_parquet(folder / "items.parquet")
    documents = items.groupby("mask").apply(
        lambda rows: tuple(sorted(zip(rows["task"], rows["doc_id"], strict=True))),
        include_groups=False)
    assert documents.nunique() == 1  # every model answered exactly the same items
    verdicts = artifacts.read_json(folder / "claims.json")
    for key in ("low", "high"):
        for metric in ("accuracy", "perplexity"):
            verdict = verdicts[key][metric]
            assert verdict["verdict"] in {"supports", "partly", "does not support",
                                          "not judged"}
            assert "95% paired interval" in verdict["reason"]
            for baseline in ("random", "frequency", "seer", "reap", "output_impact"):
                assert f"{baseline} " in verdict["reason"]
    assert "at most 10% counts as little" in verdicts["domain_pruning"]["reason"]
    # Stage 00's routing verdict gates the structure claims.
    healthy = artifacts.read_json(smoke_artifacts / "smoke" / "00_model" / "verdict.json")
    annotation = artifacts.read_json(smoke_artifacts / "smoke" / "04_annotation" / "claims.json")
    assert (annotation["annotation"]["verdict"] == "not judged") == (not healthy["healthy"])
    assert "untrained twin" in annotation["annotation"]["reason"]


def test_a_second_run_skips_every_stage(smoke_artifacts):
    assert runner.run(runner.make_plan("smoke", artifacts_root=smoke_artifacts)) == \
        ["skipped"] * len(STAGE_NAMES)


def test_the_book_builds_without_warnings(smoke_book):
    # smoke_book (conftest) builds with warnings as errors; the browser test reads it too.
    assert smoke_book.is_file()
    chapter = (smoke_book.parent / "book" / "notebooks" / "00_model.html").read_text()
    assert "The reference model" in chapter
    assert "Verdict" in chapter
    downloads = (smoke_book.parent / "book" / "downloads.html").read_text()
    assert "table_1.csv" in downloads and "_downloads" in downloads


def test_the_latex_source_holds_every_chapter(smoke_artifacts, tmp_path):
    tex = runner.build_book("smoke", artifacts_root=smoke_artifacts, strict=True,
                            output_dir=tmp_path, builder="latex")
    source = tex.read_text()
    for stage in STAGES:
        assert stage.title.split(":")[0] in source, stage.name
    assert "Appendix: performance, scale and the record of this run" in source
    assert (tex.parent / "bbm.sty").is_file()  # the stub that spares texlive-fonts-extra


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("xelatex") is None or shutil.which("pdftotext") is None,
                    reason="needs TeX and poppler-utils: make pdf installs them")
def test_the_pdf_handout_opens_with_every_chapter(smoke_artifacts, tmp_path):
    pdf = runner.build_book("smoke", artifacts_root=smoke_artifacts, strict=True,
                            output_dir=tmp_path, builder="pdf")
    info = subprocess.run(["pdfinfo", str(pdf)], capture_output=True, text=True, check=True)
    pages = int(next(line.split()[-1] for line in info.stdout.splitlines()
                     if line.startswith("Pages:")))
    assert pages >= 20
    text = subprocess.run(["pdftotext", str(pdf), "-"], capture_output=True, text=True,
                          check=True).stdout
    for stage in STAGES:
        assert stage.title.split(":")[0] in text, stage.name


def test_stage_00_loads_and_checks_a_pretrained_checkpoint(smoke_artifacts, tmp_path):
    checkpoint = smoke_artifacts / "smoke" / "00_model" / "model"
    plan = runner.make_plan("smoke", overrides=[f"model={checkpoint}"], only="00_model",
                            artifacts_root=tmp_path)
    assert runner.run(plan) == ["ran"]
    folder = tmp_path / "smoke" / "00_model"
    assert artifacts.read_json(folder / "model_ref.json")["model"] == str(checkpoint)
    assert not (folder / "model").exists()
    trained = artifacts.read_json(smoke_artifacts / "smoke" / "00_model" / "routing_health.json")
    loaded = artifacts.read_json(folder / "routing_health.json")
    assert loaded["trained"] == trained["trained"]  # the same model gives the same routing


@pytest.mark.e2e  # a second whole smoke run: make e2e
def test_a_second_run_from_scratch_gives_identical_outputs(smoke_artifacts, tmp_path):
    # Same profile, same seeds, a fresh artifacts folder (and so a fresh evaluation cache):
    # every table, mask, checkpoint and figure must come out byte for byte the same.
    runner.run(runner.make_plan("smoke", artifacts_root=tmp_path))
    for stage in STAGE_NAMES:
        first = artifacts.verify_stage(smoke_artifacts / "smoke" / stage).outputs
        second = artifacts.verify_stage(tmp_path / "smoke" / stage).outputs
        differing = sorted(name for name in first if first[name] != second.get(name))
        assert not differing, f"{stage}: {differing}"
        assert first.keys() == second.keys()
