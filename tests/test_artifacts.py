"""The artifact contract: atomic writes, manifests, and detection of damaged outputs."""

import json

import pytest

from moecollab import artifacts


def make_stage(folder):
    folder.mkdir(parents=True)
    (folder / "table.csv").write_text("a,b\n1,2\n")
    (folder / "model").mkdir()
    (folder / "model" / "weights.bin").write_bytes(b"\x00" * 64)
    manifest = artifacts.Manifest(stage="00_model", profile="p", key="k", parameters={"n": 1},
                                  inputs={}, outputs=artifacts.hash_files(folder))
    manifest.save(folder)
    return manifest


def test_atomic_path_leaves_nothing_when_the_block_fails(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError), artifacts.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_verify_stage_accepts_an_intact_folder(tmp_path):
    manifest = make_stage(tmp_path / "s")
    assert artifacts.verify_stage(tmp_path / "s") == manifest
    assert set(manifest.outputs) == {"table.csv", "model/weights.bin"}


@pytest.mark.parametrize(("damage", "message"), [
    (lambda f: (f / "table.csv").write_text("a,b\n1,3\n"), "table.csv does not match"),
    (lambda f: (f / "model" / "weights.bin").write_bytes(b"\x00" * 10), "weights.bin does not"),
    (lambda f: (f / "table.csv").unlink(), "table.csv is missing"),
    (lambda f: (f / "stray.txt").write_text("x"), "stray.txt is not listed"),
    (lambda f: (f / "manifest.json").write_text("{not json"), "not a valid manifest"),
])
def test_verify_stage_names_the_damaged_file(tmp_path, damage, message):
    make_stage(tmp_path / "s")
    damage(tmp_path / "s")
    with pytest.raises(artifacts.ArtifactError, match=message):
        artifacts.verify_stage(tmp_path / "s")


def test_hand_edited_manifest_is_detected(tmp_path):
    make_stage(tmp_path / "s")
    path = tmp_path / "s" / "manifest.json"
    content = json.loads(path.read_text())
    content["outputs"]["table.csv"] = "0" * 64
    path.write_text(json.dumps(content))
    with pytest.raises(artifacts.ArtifactError, match="table.csv does not match"):
        artifacts.verify_stage(tmp_path / "s")


def test_load_stage_names_the_command_to_run(tmp_path):
    with pytest.raises(artifacts.ArtifactError, match="--only 00_model"):
        artifacts.load_stage("p", "00_model", root=tmp_path)


def test_replace_folder_swaps_in_the_new_stage(tmp_path):
    old, new = tmp_path / "stage", tmp_path / ".stage.partial"
    old.mkdir()
    (old / "a").write_text("old")
    new.mkdir()
    (new / "a").write_text("new")
    artifacts.replace_folder(new, old)
    assert (old / "a").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage"]
