"""Evaluation time per model: lm-eval's own path against the study's, on stage 06's kind of tasks.

Stage 06 evaluates some 35 models (the unpruned one and every keep-mask) on the same tasks, so
its time is the time per model times the number of models. A randomly initialised model of the
embedded default's shape (4 layers, hidden 256, 128 experts of width 64, top-4, vocabulary 4,096)
is pruned by random keep-masks (router masking, as stage 06 does) and each pruned model is
evaluated on synthetic tasks shaped like the study's: fields of four-option items whose options
are single words, several items cut from each definition (so they share its text), and a
perplexity task per field. Printed side by side, from one run, one torch thread (what each of
stage 06's worker processes uses), paths alternated model by model:

- ``HFLM``: ``lm_eval.simple_evaluate`` with lm-eval's stock Hugging Face model;
- ``SharedContextLM``: the same with :class:`moecollab.scoring.SharedContextLM` (identical
  inputs read once, text tokenized once, the output layer only where a token is scored);
- ``harness``: what stage 06 runs, :func:`moecollab.evaluation.harness._run_lm_eval`:
  ``SharedContextLM`` and lm-eval's steps with the tasks loaded once per process (no dataset
  reading and no report of the machine per model).

Every path gives the same accuracy on every task (checked). Run:
``python benchmarks/bench_evaluation.py`` (about 4 minutes on 2 cores) or ``--quick``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from _record import add_record_flag, record

from moecollab import evaluation
from moecollab.evaluation import harness, hub_environment
from moecollab.models import build_model, embedded_config, train_tokenizer
from moecollab.pruning import random_keep_mask


def synthetic_tasks(task_dir: Path, *, n_fields: int, n_definitions: int, items_per_definition: int,
                    seed: int = 0) -> tuple[list[str], object]:
    """Write cloze-like tasks and perplexity tasks; return the groups and a tokenizer."""
    rng = np.random.default_rng(seed)
    syllables = ["ka", "lo", "mi", "nu", "pe", "ra", "si", "to", "vu", "ze", "bo", "da"]
    words = sorted({"".join(rng.choice(syllables, size=rng.integers(2, 4)))
                    for _ in range(3000)})
    fields = [f"field{index}" for index in range(n_fields)]
    field_words = {field: rng.choice(words, size=60, replace=False) for field in fields}
    rows, texts = [], {}
    for field in fields:
        texts[field] = []
        for definition in range(n_definitions):
            sentence = list(rng.choice(words, size=30))
            texts[field].append(" ".join(sentence))
            for item in range(items_per_definition):
                cut = 10 + 6 * item
                # Two families ask the same blanks with different options, as stage 06's word
                # and field cloze do.
                for family in ("word", "cloze"):
                    options = list(rng.choice(field_words[field], size=4, replace=False))
                    rows.append({"family": family, "item_id": f"{field}-{definition}-{item}",
                                 "domain": field, "split": "test",
                                 "question": " ".join(sentence[:cut]), "choices": options,
                                 "answer": int(rng.integers(4)),
                                 "entry_id": f"{field}-{definition}", "entry_split": "test"})
    items = pd.DataFrame(rows)
    groups = [evaluation.write_mcq_tasks(family_items.drop(columns="family"), task_dir,
                                         splits=("test",), family=family)[-1]
              for family, family_items in items.groupby("family", sort=False)]
    groups.append(evaluation.write_perplexity_tasks({f: t[:20] for f, t in texts.items()},
                                                    task_dir)[-1])
    tokenizer = train_tokenizer([" ".join(words)] + [t for ts in texts.values() for t in ts],
                                vocab_size=4096)
    return groups, tokenizer


def run_path(path: str, model, tokenizer, groups: list[str], task_dir: Path) -> dict:
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from moecollab.scoring import SharedContextLM

    if path == "harness":
        return harness._run_lm_eval(model, tokenizer, groups, task_dir, limit=None,
                                    batch_size=64, max_length=None, num_fewshot=0,
                                    bootstrap_iters=100, random_seed=0)
    language_model = (HFLM(pretrained=model, tokenizer=tokenizer, batch_size=64)
                      if path == "HFLM" else
                      SharedContextLM(pretrained=model, tokenizer=tokenizer, batch_size=64,
                                      encodings=harness._shared_encodings(tokenizer)))
    return lm_eval.simple_evaluate(
        model=language_model, tasks=groups, num_fewshot=0, log_samples=True,
        bootstrap_iters=100, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
        fewshot_random_seed=0,
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False))


def accuracies(raw: dict) -> dict[str, float]:
    return {name: result["acc,none"] for name, result in raw["results"].items()
            if "acc,none" in result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one model per path")
    add_record_flag(parser)
    args = parser.parse_args()
    torch.set_num_threads(1)
    n_fields, n_definitions, per_definition, n_models = ((3, 20, 2, 1) if args.quick
                                                         else (10, 380, 2, 3))
    paths = ["HFLM", "SharedContextLM", "harness"]
    config = embedded_config(vocab_size=4096, n_layers=4, hidden_size=256, n_heads=4,
                             n_experts=128, top_k=4, expert_size=64, seq_len=512)
    base = build_model(config, seed=0).eval()
    times: dict[str, list[float]] = {path: [] for path in paths}
    with tempfile.TemporaryDirectory(prefix="bench-evaluation-") as scratch:
        task_dir = Path(scratch) / "tasks"
        groups, tokenizer = synthetic_tasks(task_dir, n_fields=n_fields,
                                            n_definitions=n_definitions,
                                            items_per_definition=per_definition)
        n_items = 2 * n_fields * n_definitions * per_definition
        with hub_environment.hf_environment(Path(scratch) / "cache", offline=True):
            # Warm-up: the first run of a process pays imports and the first tokenization.
            run_path("harness", base, tokenizer, groups, task_dir)
            for model_index in range(n_models):
                keep = random_keep_mask(4, 128, 0.25 * (1 + model_index % 3),
                                        random_state=model_index, scope="per_layer",
                                        min_per_layer=4)
                model = harness._pruned_copy(base, keep, "mask").eval()
                answers = {}
                order = paths[model_index % 3:] + paths[:model_index % 3]   # rotated
                for path in order:
                    start = time.perf_counter()
                    answers[path] = accuracies(run_path(path, model, tokenizer, groups,
                                                        task_dir))
                    times[path].append(time.perf_counter() - start)
                if not answers["HFLM"] == answers["SharedContextLM"] == answers["harness"]:
                    raise AssertionError("the paths disagree on an accuracy")
    median = {path: statistics.median(values) for path, values in times.items()}
    print(f"{n_items} items in {n_fields} fields, {n_models} pruned models per path, "
          "one torch thread")
    print(f"{'path':18} {'s per model':>12} {'vs HFLM':>8}")
    for path in paths:
        print(f"{path:18} {median[path]:12.2f} {median['HFLM'] / median[path]:7.2f}x")
    if args.record and not args.quick:
        record("evaluation", "Evaluation time per model: lm-eval's stock path against the "
               "study's (tasks of stage 06's kind, one torch thread)",
               [{"measure": f"{path}: s per model", "value": f"{median[path]:.2f}"}
                for path in paths]
               + [{"measure": "harness vs simple_evaluate with SharedContextLM",
                   "value": f"{median['SharedContextLM'] / median['harness']:.2f}x faster"},
                  {"measure": "harness vs simple_evaluate with HFLM",
                   "value": f"{median['HFLM'] / median['harness']:.2f}x faster"}],
               settings=f"{n_items} four-option items (two families asking the same blanks, "
                        f"{n_fields} fields, {per_definition} blanks per definition of 30 words) "
                        f"+ 20 perplexity texts per field; {n_models} random "
                        "keep-masks (router masking) of a random 4x128-expert model; median",
               extra={"seconds": times})


if __name__ == "__main__":
    main()
