"""Shared fixtures. Everything here runs offline and on the CPU."""

import os

# Before transformers / datasets / lm_eval are imported anywhere.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smoke_artifacts(tmp_path_factory):
    """The smoke profile run once through the real runner, shared by every test that reads it."""
    from moecollab import runner
    from moecollab.stages import STAGE_NAMES

    root = tmp_path_factory.mktemp("artifacts")
    outcomes = runner.run(runner.make_plan("smoke", artifacts_root=root))
    assert outcomes == ["ran"] * len(STAGE_NAMES)
    return root


@pytest.fixture(scope="session")
def smoke_book(smoke_artifacts, tmp_path_factory):
    """The smoke book's HTML, built once with warnings as errors; the index page's path."""
    from moecollab import runner

    return runner.build_book("smoke", artifacts_root=smoke_artifacts, strict=True,
                             output_dir=tmp_path_factory.mktemp("book"))
