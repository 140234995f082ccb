"""lm-eval's Hugging Face model, made cheaper where the study's tasks repeat work.

:class:`SharedContextLM` is lm-eval's own ``HFLM`` with one method replaced: the one that turns
(context, continuation) token pairs into log-likelihoods. Tasks, prompts, metrics, aggregation
and standard errors stay lm-eval's. Two savings, neither of which changes a number (a test
compares every per-document result with ``HFLM``'s):

- **Identical inputs run once.** The model reads ``context + continuation[:-1]``; every option
  of a one-word cloze item is the same input, so four requests cost one forward pass. (``HFLM``
  already shares one-token continuations; here any repeated input is shared, and nothing is
  kept per request.)
- **Text is tokenized once.** lm-eval encodes every context and every context + continuation
  for each model it evaluates; the encodings can be kept in a dictionary the caller shares
  between the models of one study (``encodings``), since they depend on the tokenizer only.
- **The output layer runs only where a token is scored.** A model's vocabulary projection and
  log-softmax cost as much as the rest of a small model; for a cloze item only the last
  position of the context is scored. Each batch asks the model for the logits of the span of
  positions its rows score (``logits_to_keep``), through the model's own forward, so any
  scaling a family applies to its logits is kept.

Batches are the distinct inputs sorted by length (longest first), right-padded like ``HFLM``'s,
so a batch's scored spans overlap and its padding is small.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

logger = logging.getLogger(__name__)

Request = tuple[Any, list[int], list[int]]


class SharedContextLM(HFLM):
    """``HFLM`` whose log-likelihoods share identical inputs and skip unscored positions.

    Build it as ``HFLM`` with an in-memory model (``SharedContextLM(pretrained=model,
    tokenizer=tokenizer, batch_size=64)``); causal language models only. ``batch_size`` counts
    distinct inputs per forward pass. ``encodings``, a dictionary, keeps the tokenizer's
    output between instances that share the tokenizer (pass the same one to each).
    """

    def __init__(self, *args: Any, encodings: dict | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._encodings = {} if encodings is None else encodings

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   left_truncate_len: int | None = None, **kwargs: Any) -> list[int]:
        key = (string, add_special_tokens, left_truncate_len)
        if kwargs or key not in self._encodings:
            encoding = super().tok_encode(string, add_special_tokens, left_truncate_len,
                                          **kwargs)
            if kwargs:
                return encoding
            self._encodings[key] = encoding
        return list(self._encodings[key])

    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False,
                              override_bs: int | None = None) -> list[tuple[float, bool]]:
        if self.backend != "causal":
            return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
        batch_size = override_bs or (self.batch_size if isinstance(self.batch_size, int)
                                     else 64)
        # What the model reads for each request (truncated from the left like HFLM) and how
        # many of its last positions are scored.
        inputs: dict[tuple[int, ...], int] = {}
        plan = []
        for _, context, continuation in requests:
            if not context or not continuation:
                raise ValueError("every request needs a non-empty context and continuation")
            window = tuple((context + continuation)[-(self.max_length + 1):][:-1])
            n_scored = len(continuation)
            inputs[window] = max(inputs.get(window, 0), n_scored)
            plan.append((window, continuation))
        order = sorted(inputs, key=lambda window: (-len(window), window))
        scored: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        bar = tqdm(total=len(order), disable=disable_tqdm or self.rank != 0, ascii=True,
                   desc="distinct inputs", mininterval=10)
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            scored.update(self._score_batch(batch, [inputs[window] for window in batch]))
            bar.update(len(batch))
        bar.close()
        results = []
        for window, continuation in plan:
            log_probs, greedy = scored[window]
            n = len(continuation)
            tokens = torch.tensor(continuation)
            picked = log_probs[-n:].gather(1, tokens[:, None]).squeeze(1)
            answer = (float(picked.sum()), bool((greedy[-n:] == tokens).all()))
            results.append(answer)
        return results

    @torch.no_grad()
    def _score_batch(self, windows: list[tuple[int, ...]], n_scored: list[int]
                     ) -> dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]]:
        """Log-probabilities of the next token at each window's last ``n_scored`` positions
        (as float32 on the CPU, one row per position) and the greedy tokens there."""
        length = len(windows[0])  # the longest: windows are sorted by length
        input_ids = torch.zeros((len(windows), length), dtype=torch.long)
        for row, window in enumerate(windows):
            input_ids[row, :len(window)] = torch.tensor(window)
        first = min(len(window) - n for window, n in zip(windows, n_scored, strict=True))
        last = max(len(window) for window in windows)
        keep = torch.arange(first, last, device=self.device)
        with torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                            enabled=self.mixed_precision_dtype is not None):
            logits = self.model(input_ids.to(self.device), logits_to_keep=keep).logits
        log_probs = F.log_softmax(logits, dim=-1, dtype=self.softmax_dtype)
        out = {}
        for row, (window, n) in enumerate(zip(windows, n_scored, strict=True)):
            positions = slice(len(window) - n - first, len(window) - first)
            selected = log_probs[row, positions].float().cpu()
            out[window] = (selected, selected.argmax(dim=-1))
        return out
