"""Tests of moecollab.scoring: SharedContextLM gives lm-eval's HFLM numbers, request by request.

A tiny OLMoE and a byte-level BPE tokenizer; requests with shared contexts (one-token options),
multi-token continuations, a context longer than the model's window, and whole local lm-eval
tasks (multiple choice, one-word cloze, perplexity) compared document by document.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from lm_eval.evaluator import evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager, get_task_dict
from tiny_models import EXTRA_FAMILIES, FAMILIES, VOCAB_SIZE, tiny_model

from moecollab import evaluation
from moecollab.models import train_tokenizer
from moecollab.scoring import SharedContextLM

WORDS = ["cell", "gene", "acid", "atom", "court", "judge", "tissue", "solvent", "statute"]


@pytest.fixture(scope="module")
def tokenizer():
    sentences = [f"The {a} and the {b} are studied." for a in WORDS for b in WORDS]
    return train_tokenizer(sentences, VOCAB_SIZE)


@pytest.fixture(scope="module")
def model():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tiny_model("olmoe").eval()
    torch.set_num_threads(threads)


def _requests(tokenizer, max_length: int):
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    context = encode("The cell and the")
    long_context = encode(" ".join(["The gene and the acid are studied."] * 40))
    assert len(long_context) > max_length
    requests = []
    for word in WORDS:  # one-token options that share a context, as a cloze item's do
        requests.append((("", ""), context, encode(f" {word}")[:1]))
    for word in WORDS[:4]:  # multi-token continuations
        requests.append((("", ""), context, encode(f" {word} are studied in a lab.")))
    # a cloze item cut at several words of one text: each context begins the next
    sentence = encode(" ".join(["The gene and the acid are studied by the court."] * 2))
    for cut in (3, 6, 9, 14):
        for word in WORDS[:4]:
            requests.append((("", ""), sentence[:cut], encode(f" {word}")[:1]))
    requests.append((("", ""), long_context, encode(" court")))
    requests.append((("", ""), encode("The"), encode(" judge and the statute.")))
    return requests


def test_loglikelihoods_equal_hflm_request_by_request(model, tokenizer):
    reference = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4, max_length=64)
    shared = SharedContextLM(pretrained=model, tokenizer=tokenizer, batch_size=3, max_length=64)
    requests = _requests(tokenizer, max_length=64)
    expected = reference._loglikelihood_tokens(requests, disable_tqdm=True)
    found = shared._loglikelihood_tokens(requests, disable_tqdm=True)
    assert len(found) == len(expected)
    np.testing.assert_allclose([value for value, _ in found],
                               [value for value, _ in expected], rtol=0, atol=1e-4)
    assert [greedy for _, greedy in found] == [greedy for _, greedy in expected]


def test_each_input_is_read_once_inside_the_longest_it_begins(model, tokenizer, monkeypatch):
    shared = SharedContextLM(pretrained=model, tokenizer=tokenizer, batch_size=64)
    rows = []
    original = shared._score_batch

    def counting(windows, n_scored):
        rows.extend(windows)
        return original(windows, n_scored)

    monkeypatch.setattr(shared, "_score_batch", counting)
    requests = _requests(tokenizer, max_length=shared.max_length)
    shared._loglikelihood_tokens(requests, disable_tqdm=True)
    assert len(rows) == len(set(rows))
    # No input the model read begins another: each was read inside the longest one.
    assert not any(a != b and b[:len(a)] == a for a in rows for b in rows)
    # The four multi-token continuations of one context (which the one-token options' input
    # begins), the long context, "The judge and the statute" and the text cut at four words.
    assert len(rows) == 4 + 1 + 1 + 1


def test_a_batch_holds_at_most_max_batch_tokens_padded_positions(model, tokenizer,
                                                                  monkeypatch):
    # Inputs are read longest first; a cap on padded positions splits a batch where a long
    # input would pad many short ones, and changes no result beyond float rounding.
    requests = _requests(tokenizer, max_length=64)
    results, shapes = {}, {}
    for cap in (10**6, 40):
        shared = SharedContextLM(pretrained=model, tokenizer=tokenizer, batch_size=8,
                                 max_length=64, max_batch_tokens=cap)
        seen: list[tuple[int, int]] = []
        original = shared._score_batch

        def recording(windows, positions, original=original, seen=seen):
            seen.append((len(windows), max(len(window) for window in windows)))
            return original(windows, positions)

        monkeypatch.setattr(shared, "_score_batch", recording)
        results[cap] = shared._loglikelihood_tokens(requests, disable_tqdm=True)
        shapes[cap] = seen
    assert all(count * longest <= 40 or count == 1 for count, longest in shapes[40])
    assert any(count * longest > 40 for count, longest in shapes[10**6])  # the cap bit
    assert sum(count for count, _ in shapes[40]) == sum(count for count, _ in shapes[10**6])
    np.testing.assert_allclose([value for value, _ in results[40]],
                               [value for value, _ in results[10**6]], rtol=0, atol=1e-5)
    assert [greedy for _, greedy in results[40]] == [greedy for _, greedy in results[10**6]]
    with pytest.raises(ValueError, match="max_batch_tokens must be a positive int"):
        SharedContextLM(pretrained=model, tokenizer=tokenizer, max_batch_tokens=0)


def _cloze_items() -> pd.DataFrame:
    rows = []
    for index, word in enumerate(WORDS):
        others = [other for other in WORDS if other != word][index % 5:index % 5 + 3]
        choices = [*others[:index % 4], word, *others[index % 4:]]
        rows.append({"item_id": f"cloze-{index}", "domain": "biology", "split": "test",
                     "term": word, "question": f"The {WORDS[index - 1]} and the",
                     "choices": choices, "answer": index % 4, "entry_id": f"e{index}"})
    return pd.DataFrame(rows)


def test_whole_tasks_match_hflm_document_by_document(model, tokenizer, tmp_path):
    items = _cloze_items()
    evaluation.write_mcq_tasks(items, tmp_path, splits=("test",))
    evaluation.write_mcq_tasks(items, tmp_path, splits=("test",), family="cloze")
    evaluation.write_perplexity_tasks(
        {"biology": [f"The {a} and the {b} are studied."
                     for a, b in zip(WORDS, WORDS[1:], strict=False)]},
        tmp_path)
    tasks = get_task_dict(["moecollab_mcq_test", "moecollab_cloze_test", "moecollab_ppl"],
                          TaskManager(include_path=str(tmp_path), include_defaults=False))
    outputs = {}
    encodings: dict = {}
    for name, language_model in (
            ("hflm", HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8)),
            ("shared", SharedContextLM(pretrained=model, tokenizer=tokenizer, batch_size=8,
                                       encodings=encodings))):
        outputs[name] = evaluate(lm=language_model, task_dict=tasks, log_samples=True,
                                 bootstrap_iters=0)
    assert encodings  # the shared dictionary was filled
    cloze = [task for task in outputs["hflm"]["samples"] if "_cloze_" in task]
    assert cloze
    for task in cloze:  # a cloze prompt is the unfinished text itself, options follow it
        for sample in outputs["hflm"]["samples"][task]:
            assert sample["arguments"][0][0] == sample["doc"]["question"]
            assert sample["arguments"][0][1] == " " + sample["doc"]["choices"][0]
    for task, samples in outputs["hflm"]["samples"].items():
        ours = outputs["shared"]["samples"][task]
        assert [s["doc_id"] for s in ours] == [s["doc_id"] for s in samples]
        for theirs, mine in zip(samples, ours, strict=True):
            for metric in ("acc", "acc_norm"):
                assert theirs.get(metric) == mine.get(metric)
            np.testing.assert_allclose(_loglikelihoods(mine), _loglikelihoods(theirs), atol=1e-4)


def _loglikelihoods(sample) -> np.ndarray:
    """A logged sample's log-likelihoods: one per choice, or the document's for perplexity."""
    return np.array([response[0] if isinstance(response, (list, tuple)) else response
                     for response in sample["filtered_resps"]], dtype=float)


@pytest.mark.parametrize("family", FAMILIES + EXTRA_FAMILIES)
def test_every_family_keeps_its_logits_when_only_scored_positions_reach_the_output_layer(
        family, tokenizer):
    # Families scale or cap logits after the output layer (Granite divides them, some add a
    # bias): narrowing the layer's input must leave every log-likelihood as HFLM computes it.
    model = tiny_model(family).eval()
    requests = _requests(tokenizer, max_length=64)
    expected = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4, max_length=64
                    )._loglikelihood_tokens(requests, disable_tqdm=True)
    found = SharedContextLM(pretrained=model, tokenizer=tokenizer, batch_size=5, max_length=64
                            )._loglikelihood_tokens(requests, disable_tqdm=True)
    np.testing.assert_allclose([value for value, _ in found],
                               [value for value, _ in expected], rtol=0, atol=1e-4)


def test_pairs_are_split_as_hflm_splits_them_and_once_per_tokenizer(model, tokenizer,
                                                                    monkeypatch):
    reference = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4)
    encodings: dict = {}
    first = SharedContextLM(pretrained=model, tokenizer=tokenizer, batch_size=4,
                            encodings=encodings)
    pairs = [("The cell and the", " gene"), ("The cell and the ", "gene"),   # trailing space
             ("The court", " and the judge are studied."), ("cell", "ular")]
    for context, continuation in pairs:
        assert (first._encode_pair(context, continuation)
                == reference._encode_pair(context, continuation))
    expected = reference._encode_pair(*pairs[1])
    calls = []
    monkeypatch.setattr(HFLM, "tok_encode", lambda *args, **kwargs: calls.append(args))
    second = SharedContextLM(pretrained=model, tokenizer=tokenizer, batch_size=4,
                             encodings=encodings)   # another model of the same study
    split = second._encode_pair(*pairs[1])
    assert split == expected and not calls
    split[0].append(-1)   # a caller changing its lists does not change the memo
    assert second._encode_pair(*pairs[1]) == expected

