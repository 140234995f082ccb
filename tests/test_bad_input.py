"""Bad input, one table: every user mistake fails early, in one line that names the value given
and what is allowed, without a traceback and (from the command line) with a non-zero exit.

Two tables share one shape (an id, how to provoke the mistake, what the message must say):
``CLI_CASES`` run ``python -m moecollab run`` and must stop at planning time, before any stage
folder is written; ``CALL_CASES`` call the public functions a notebook or a user calls directly.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tiny_models import padded_batch, tiny_dense_model

from moecollab import hsdl, models, pruning
from moecollab.capture import capture_routing
from moecollab.data import corpus
from moecollab.moe_arch import UnsupportedModelError
from moecollab.params import ParameterError

ROOT = Path(__file__).resolve().parents[1]


def dense_checkpoint(tmp_path: Path) -> str:
    """A real safetensors checkpoint of a model without experts (a tiny Llama)."""
    folder = tmp_path / "dense"
    tiny_dense_model().save_pretrained(folder)
    return str(folder)


def checkpoint_without_safetensors(tmp_path: Path) -> str:
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "olmoe"}))
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    return str(folder)


# id, arguments after `run` (a callable of tmp_path where a file is needed), message start
CLI_CASES = [
    ("unknown parameter", ["-p", "n_atom=[4, 2]"],
     "error: unknown parameter 'n_atom' for any stage (from -p); did you mean 'n_atoms'?"),
    ("unknown stage", ["-p", "07_report.n_top=3"], "error: unknown stage '07_report'"),
    ("wrong type", ["-p", "03_hsdl.n_epochs=many"],
     "error: parameter 'n_epochs' of stage 03_hsdl must be of type int; got 'many'"),
    ("ratio of 1", ["-p", "05_pruning.prune_ratios=[0.5, 1.0]"],
     "error: parameter 'prune_ratios' of stage 05_pruning every element must be in [0, 1); "
     "got [0.5, 1.0]"),
    ("negative ratio", ["-p", "05_pruning.domain_prune_ratio=-0.1"],
     "error: parameter 'domain_prune_ratio' of stage 05_pruning must be in [0, 1); got -0.1"),
    ("top_k above the experts left", ["-p", "05_pruning.prune_ratios=[0.25, 0.98]"],
     "error: parameter 'prune_ratios' of stage 05_pruning: 0.98 leaves 2 of 128 experts per "
     "layer, fewer than top_k (4); allowed: ratios <= 0.96875"),
    ("top_k above the experts", ["-p", "00_model.top_k=129"],
     "error: parameter 'top_k' of stage 00_model must be <= n_experts (128); got 129"),
    ("zero atoms", ["-p", "03_hsdl.n_atoms=[0]"],
     "error: parameter 'n_atoms' of stage 03_hsdl every element must be >= 1; got [0]"),
    ("a sweep of zero atoms", ["-p", "03_hsdl.sweep_atoms=[8, 0]"],
     "error: parameter 'sweep_atoms' of stage 03_hsdl every element must be >= 1; got [8, 0]"),
    ("calibration on evaluated text", ["-p", "05_pruning.calibration_split=validation"],
     "error: parameter 'calibration_split' of stage 05_pruning: 'validation' holds the held-out "
     "entries whose cloze items stage 06 evaluates"),
    ("unknown field", ["-p", "domains=[biology, astrology]"],
     "error: parameter 'domains' of stage 00_model must be one of 'biology'"),
    ("unknown profile", ["--profile", "nope"], "error: unknown profile 'nope'; available:"),
    ("missing profile file", ["--profile", "no/such.yml"],
     "error: profile file 'no/such.yml' does not exist"),
    ("missing model", ["-p", "model=/no/such/checkpoint"],
     "error: model '/no/such/checkpoint' is not a folder here and the hub is offline"),
    ("model without safetensors",
     lambda tmp: ["-p", f"model={checkpoint_without_safetensors(tmp)}"],
     "error: model folder '{tmp}/pickled' has no .safetensors weights"),
    ("model without a router", lambda tmp: ["-p", f"model={dense_checkpoint(tmp)}"],
     "error: model '{tmp}/dense' has model_type 'llama', which has no router moecollab can "
     "read; supported: olmoe"),
    ("unknown dtype", ["-p", "dtype=bf16"],
     "error: parameter 'dtype' of stage 00_model must be one of 'auto', 'float32', 'bfloat16'"),
    ("unknown device_map", ["-p", "device_map=gpus"],
     "error: parameter 'device_map' of stage 00_model must be one of '', 'auto'"),
    ("tasks without the corpus tasks", ["-p", "tasks=[paper]"],
     "error: parameter 'tasks' of stage 06_evaluation must include 'local'"),
    ("vllm without exported checkpoints", ["-p", "backend=vllm"],
     "error: parameter 'backend' of stage 06_evaluation: vllm evaluates the checkpoints stage "
     "05_pruning exports, and export is off"),
    ("--only a missing stage", ["--only", "07_report"], "error: --only '07_report' is not a stage"),
]


@pytest.mark.parametrize(("args", "message"), [case[1:] for case in CLI_CASES],
                         ids=[case[0] for case in CLI_CASES])
def test_cli_stops_before_any_stage_with_one_line(args, message, tmp_path):
    args = args(tmp_path) if callable(args) else args
    result = subprocess.run(
        [sys.executable, "-m", "moecollab", "run", "--profile", "default", *args],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
             "HOME": str(tmp_path)})
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(message.format(tmp=tmp_path)), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def corpus_file(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "corpus.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as stream:
        stream.write("\n".join(lines) + "\n")
    return path


def entry(domain: str, split: str, number: int) -> str:
    return json.dumps({"entry_id": f"{domain}-{number}", "headword": f"word{number}",
                       "domain": domain, "source": "gcide", "split": split,
                       "text": "a text", "definition": "a definition"})


def one_domain_corpus(tmp_path: Path) -> Path:
    return corpus_file(tmp_path, [entry("biology", split, n)
                                  for n, split in enumerate(corpus.SPLITS)])


def routing_matrix(sign: float = 1.0) -> np.ndarray:
    return sign * np.random.default_rng(0).random((40, 8))


# id, a callable of tmp_path that makes the mistake, the error type, a regex the message matches
CALL_CASES = [
    ("HSDL with zero atoms", lambda tmp: hsdl.HSDL(n_atoms=(4, 0)).fit(routing_matrix()),
     ValueError, r"n_atoms must be a non-empty tuple or list of positive ints; got \(4, 0\)"),
    ("HSDL on negative input", lambda tmp: hsdl.HSDL(n_atoms=(4, 2)).fit(routing_matrix(-1.0)),
     ValueError, r"X must be non-negative; got minimum -0\.\d+"),
    ("HSDL on NaN", lambda tmp: hsdl.HSDL(n_atoms=(4,)).fit(np.full((4, 4), np.nan)),
     ValueError, r"X contains NaN or infinity"),
    ("CAEP at ratio 1", lambda tmp: pruning.caep_keep_mask(
        np.ones((8, 2)), np.ones((2, 5)), 0.9, 1.0),
     ValueError, r"prune_ratio must be in \[0, 1\); got 1\.0"),
    ("scores pruned below top_k", lambda tmp: pruning.keep_mask_from_scores(
        np.ones((2, 4)), 0.75, min_per_layer=2),
     ValueError, r"must leave at least min_per_layer=2 experts .*got 0\.75"),
    ("random mask below top_k", lambda tmp: pruning.random_keep_mask(
        2, 4, 0.75, random_state=0, min_per_layer=3),
     ValueError, r"min_per_layer=3 .*got 0\.75"),
    ("unknown corpus field", lambda tmp: corpus.load_corpus(domains=["biology", "astrology"]),
     corpus.CorpusError, r"unknown domain 'astrology'; allowed: biology, medicine"),
    ("corpus without a field", lambda tmp: corpus.load_corpus(
        one_domain_corpus(tmp), domains=["biology", "law"]),
     corpus.CorpusError, r"corpus is missing domain 'law' \(have: biology\)"),
    ("malformed corpus line", lambda tmp: corpus.load_corpus(corpus_file(
        tmp, [entry("biology", "train", 0), '{"entry_id": "x", ']), domains=["biology"]),
     corpus.CorpusError, r"corpus .*corpus\.jsonl\.gz line 2: malformed JSON"),
    ("corpus line without a field", lambda tmp: corpus.load_corpus(corpus_file(
        tmp, [json.dumps({"entry_id": "x"})]), domains=["biology"]),
     corpus.CorpusError, r"line 1: missing required field\(s\) headword"),
    ("missing model folder", lambda tmp: models.load_model(tmp / "no_such_model"),
     ParameterError, r"model '.*no_such_model' is not a folder here and the hub is offline"),
    ("model without safetensors", lambda tmp: models.load_model(
        checkpoint_without_safetensors(tmp)),
     ValueError, r"has no \.safetensors weights"),
    ("capture a model without a router", lambda tmp: capture_routing(
        tiny_dense_model(), [padded_batch()], progress=False),
     UnsupportedModelError, r"LlamaForCausalLM \(model_type='llama'\) is not a supported MoE"),
]


@pytest.mark.parametrize(("call", "error", "pattern"), [case[1:] for case in CALL_CASES],
                         ids=[case[0] for case in CALL_CASES])
def test_public_functions_reject_bad_input_in_one_line(call, error, pattern, tmp_path,
                                                       monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(error, match=pattern) as raised:
        call(tmp_path)
    assert "\n" not in str(raised.value)

