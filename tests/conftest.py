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


# The evaluation tests' tiny study (tests/test_evaluation_*.py): one tiny OLMoE (3 layers,
# 8 experts, vocabulary 512), a byte-level BPE tokenizer trained on a few sentences, and local
# lm-eval tasks of tests/tiny_evaluation.py's items. Built once per test module.


@pytest.fixture(scope="module")
def tokenizer():
    from tiny_evaluation import tiny_sentences
    from tiny_models import VOCAB_SIZE

    from moecollab.models import train_tokenizer

    tokenizer = train_tokenizer(tiny_sentences(), VOCAB_SIZE)
    assert len(tokenizer) <= VOCAB_SIZE  # every id is a row of the model's embedding
    return tokenizer


@pytest.fixture(scope="module")
def model():
    import torch
    from tiny_models import tiny_model

    # One thread: on the shared 2-core machine two busy-waiting threads are ~200x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tiny_model("olmoe")
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    from tiny_evaluation import DOMAINS, tiny_items, tiny_sentences

    from moecollab import evaluation

    folder = tmp_path_factory.mktemp("tasks")
    evaluation.write_mcq_tasks(tiny_items(), folder)
    evaluation.write_perplexity_tasks(
        {domain: tiny_sentences()[i * 12:(i + 1) * 12:4] for i, domain in enumerate(DOMAINS)},
        folder)
    return folder


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")
