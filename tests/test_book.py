"""What the book makes of an executed notebook and of the manifests (no Sphinx needed)."""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from moecollab import artifacts, book
from moecollab.stages import STAGES

STAGE = STAGES[3]  # 03_hsdl
ROOT = Path("/home/someone/moecollab")
ARTIFACTS = ROOT / "artifacts"
WORK = ARTIFACTS / "smoke" / ".03_hsdl.partial-k2j4x9"


def executed_notebook():
    """A notebook as papermill leaves it: defaults, injected values, a glued figure."""
    parameters = new_code_cell(
        'profile: str = "default"  # profile\nn_atoms: list[int] = [32, 16]  # atoms\n'
        'seed: int = 0  # seed', metadata={"tags": ["parameters"]})
    injected = new_code_cell(
        f'profile = "smoke"\nn_atoms = [6, 3]\nseed = 0\nartifacts_root = "{ARTIFACTS}"\n'
        f'output_dir = "{WORK}"\n', metadata={"tags": ["injected-parameters"]})
    figure = new_code_cell("glue('fig_loss', fig_loss)", outputs=[
        new_output("display_data", data={"application/papermill.record/image/png": "iVBOR"},
                   metadata={"scrapbook": {"name": "fig_loss"},
                             "moecollab": {"data": "loss_curves.csv"}}),
        new_output("execute_result", data={"text/plain": f"PosixPath('{WORK}/codes.npy')"},
                   execution_count=3)])
    caption = new_markdown_cell("Before.\n\n```{glue:figure} fig_loss\n:name: fig-loss\n\n"
                                "Loss per epoch.\n```\n\nAfter.")
    notebook = new_notebook(cells=[parameters, injected, figure, caption])
    notebook.metadata["papermill"] = {
        "parameters": {"profile": "smoke", "n_atoms": [6, 3], "artifacts_root": str(ARTIFACTS),
                       "output_dir": str(WORK)},
        "output_path": str(ARTIFACTS / "smoke" / "executed" / ".03_hsdl.a1b2.tmp.ipynb")}
    return notebook


def chapter(manifest=None):
    manifest = manifest or {"parameters": {"n_atoms": [6, 3], "seed": 0}}
    return book.chapter_notebook(executed_notebook(), STAGE, manifest, root=ROOT,
                                 artifacts_root=ARTIFACTS, profile="smoke")


def test_the_injected_cell_becomes_a_table_of_what_the_run_changed():
    cells = chapter().cells
    assert [cell.metadata.get("tags", []) for cell in cells[:2]] == [["parameters"],
                                                                     ["run-parameters"]]
    table = cells[1]
    assert table.cell_type == "markdown"
    assert "| `n_atoms` | `[32, 16]` | `[6, 3]` |" in table.source
    assert "seed" not in table.source  # unchanged from its default
    assert "python -m moecollab run --profile smoke --only 03_hsdl" in table.source


def test_no_machine_path_or_temporary_name_is_left():
    text = nbformat.writes(chapter())
    for leftover in (str(ROOT), ".partial-", ".tmp.ipynb"):
        assert leftover not in text
    assert "PosixPath('artifacts/smoke/03_hsdl/codes.npy')" in text
    assert '"output_path": "artifacts/smoke/executed/03_hsdl.ipynb"' in text
    parameters = chapter().metadata.papermill.parameters
    assert parameters == {"profile": "smoke", "n_atoms": [6, 3], "seed": 0}


def test_a_glued_figure_links_its_csv_under_its_caption():
    caption = chapter().cells[3].source
    assert caption == ("Before.\n\n```{glue:figure} fig_loss\n:name: fig-loss\n\n"
                       "Loss per epoch.\n\n"
                       "Data: {download}`loss_curves.csv </book/data/03_hsdl/loss_curves.csv>`"
                       "\n```\n\nAfter.")


def test_a_run_with_every_default_says_so():
    cells = chapter({"parameters": {"n_atoms": [32, 16], "seed": 0}}).cells
    assert cells[1].source.startswith("**Parameters of this run.** Profile `smoke` used every "
                                      "default above.")


def test_the_status_page_lists_when_and_how_long_each_stage_ran(tmp_path):
    profile = tmp_path / "artifacts" / "toy"
    for stage, seconds, torch in (("00_model", 754.2, "2.13.0"), ("03_hsdl", 3.0, "2.13.1")):
        manifest = artifacts.Manifest(
            stage=stage, profile="toy", key="ab" * 32, parameters={}, inputs={}, outputs={},
            versions={"torch": torch}, seconds=seconds, finished="2026-11-30T21:51:03+00:00",
            machine={"system": "Linux x86_64", "cpu_cores": 2})
        (profile / stage).mkdir(parents=True)
        manifest.save(profile / stage)
    (tmp_path / "book").mkdir()
    page = book.write_status_page(tmp_path, "toy", book.load_manifests(profile)).read_text()
    assert ("| {doc}`00_model · The reference model <notebooks/00_model>` | 2026-11-30 21:51 "
            "| 12 min 34 s | {download}`00_model.ipynb <notebooks/00_model.ipynb>` |") in page
    assert "| 01_capture | not run |" in page
    assert "Total run time: 12 min 37 s." in page
    assert "Machine: Linux x86_64, 2 CPU cores." in page
    assert "| torch | 2.13.0, 2.13.1 |" in page and "different versions" in page
