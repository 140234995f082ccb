"""The stage handle a chapter works through: folders, inputs, figures, tables, claims."""

import base64
import json

import matplotlib
import pandas as pd
import pytest

from moecollab import artifacts, claims, notebook
from moecollab.notebook import open_stage


@pytest.fixture
def captured():
    """IPython's display outputs of the block, as the kernel would store them."""
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output

    InteractiveShell.instance()
    with capture_output() as outputs:
        yield outputs


def _glued(outputs) -> dict[str, dict]:
    return {output.metadata["scrapbook"]["name"]: output.data for output in outputs.outputs}


def _finished_stage_00(root, profile: str, *, healthy: bool) -> None:
    folder = root / profile / "00_model"
    folder.mkdir(parents=True)
    artifacts.write_json(folder / "verdict.json", {"healthy": healthy, "text": "..."})
    artifacts.Manifest(stage="00_model", profile=profile, key="k", parameters={}, inputs={},
                       outputs=artifacts.hash_files(folder)).save(folder)


def test_the_output_folder_is_the_runners_or_the_stages_own(tmp_path):
    by_hand = open_stage("02_coactivation", "demo", tmp_path)
    assert by_hand.out == tmp_path / "demo" / "02_coactivation" and by_hand.out.is_dir()
    by_runner = open_stage("02_coactivation", "demo", tmp_path, output_dir=tmp_path / "tmp-run")
    assert by_runner.out == tmp_path / "tmp-run" and by_runner.out.is_dir()


def test_an_input_is_a_finished_stage_or_an_error_naming_what_to_run(tmp_path):
    stage = open_stage("02_coactivation", "demo", tmp_path)
    with pytest.raises(artifacts.ArtifactError, match=r"stage 01_capture has no finished "
                       r"artifacts for profile 'demo'.*--profile demo --only 01_capture"):
        stage.input("01_capture")


@pytest.mark.parametrize("healthy", [True, False])
def test_routing_health_is_stage_00s_verdict(tmp_path, healthy):
    _finished_stage_00(tmp_path, "demo", healthy=healthy)
    assert open_stage("03_hsdl", "demo", tmp_path).routing_healthy is healthy


def test_a_figure_is_saved_with_its_data_and_glued_as_an_image(tmp_path, captured):
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stage = open_stage("02_coactivation", "demo", tmp_path)
    figure, axis = plt.subplots()
    axis.bar(["a", "b"], [3, 5])
    assert stage.figure("fig_counts", figure, "counts.png") is None  # no path on the page
    assert (stage.out / "counts.png").read_bytes().startswith(b"\x89PNG")
    assert (stage.out / "counts.csv").is_file()
    (output,) = captured.outputs
    assert output.metadata["scrapbook"]["name"] == "fig_counts"
    assert output.metadata["moecollab"] == {"data": "counts.csv"}
    png = output.data[notebook.GLUE_PREFIX + "image/png"]
    assert base64.b64decode(png).startswith(b"\x89PNG")


def test_a_table_is_written_and_returned_for_the_cell_to_show(tmp_path):
    stage = open_stage("05_pruning", "demo", tmp_path)
    table = pd.DataFrame({"method": ["caep", "random"], "value": [0.5, 0.25]})
    assert stage.table("summary.csv", table) is table
    pd.testing.assert_frame_equal(pd.read_csv(stage.out / "summary.csv"), table)
    with pytest.raises(ValueError, match="must end in .csv or .parquet"):
        stage.table("summary.txt", table)


def test_values_are_glued_by_name_as_plain_values(tmp_path, captured):
    import numpy as np

    open_stage("01_capture", "demo", tmp_path).glue(n_tokens=np.int64(12), share=0.5,
                                                      label="held out")
    glued = _glued(captured)
    assert {name: data[notebook.GLUE_PREFIX + "text/plain"] for name, data in glued.items()} \
        == {"n_tokens": "12", "share": "0.5", "label": "held out"}


def test_claims_are_written_under_their_keys_and_glued_for_the_prose(tmp_path, captured):
    stage = open_stage("02_coactivation", "demo", tmp_path)
    coverage = claims.Verdict(claims.SUPPORTS, "covers 80% against 20% at random")
    similarity = claims.Verdict(claims.NOT_JUDGED, "routing failed stage 00's check")
    stage.record_claims(coverage=coverage, domain_similarity=similarity)
    written = json.loads((stage.out / "claims.json").read_text())
    assert written == {"coverage": coverage.__dict__, "domain_similarity": similarity.__dict__}
    text = {name: data[notebook.GLUE_PREFIX + "text/plain"]
            for name, data in _glued(captured).items()}
    assert text == {"claim_coverage_verdict": coverage.verdict,
                    "claim_coverage_reason": coverage.reason,
                    "claim_domain_similarity_verdict": similarity.verdict,
                    "claim_domain_similarity_reason": similarity.reason}


def test_json_is_written_key_sorted_and_nothing_is_returned_to_show(tmp_path):
    stage = open_stage("00_model", "demo", tmp_path)
    assert stage.write_json("verdict.json", {"text": "ok", "healthy": True}) is None
    assert (stage.out / "verdict.json").read_text() == \
        '{\n  "healthy": true,\n  "text": "ok"\n}\n'
