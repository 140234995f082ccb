"""lm-eval's Hugging Face model, made cheaper where the study's tasks repeat work.

:class:`SharedContextLM` is lm-eval's own ``HFLM`` with one method replaced: the one that turns
(context, continuation) token pairs into log-likelihoods. Tasks, prompts, metrics, aggregation
and standard errors stay lm-eval's. Three savings, none of which changes a number (a test
compares every per-document result with ``HFLM``'s):

- **An input is read once, inside the longest input it begins.** The model reads
  ``context + continuation[:-1]``; every option of a one-word cloze item is the same input, so
  four requests cost one forward pass, and since a causal model's output at a position depends
  only on the tokens up to it, an input that begins another one is scored at its positions
  within the longer one: the cloze items cut from one definition at several words cost one
  forward pass together. (``HFLM`` shares one-token continuations of one context only.)
- **Text is tokenized once.** lm-eval encodes every context and every context + continuation
  for each model it evaluates, and splits each pair into context and continuation tokens; the
  encodings and the splits can be kept in a dictionary the caller shares between the models of
  one study (``encodings``), since they depend on the tokenizer only.
- **The output layer runs only where a token is scored.** A model's vocabulary projection and
  log-softmax cost as much as the rest of a small model; for a cloze item only the last
  position of the context is scored. Each batch asks the model for the span of positions its
  rows score (``logits_to_keep``), and a hook on the output layer narrows that layer's input
  to the scored (row, position) pairs, so the model's own forward still runs and any scaling a
  family applies to its logits is kept.

Batches are the distinct inputs sorted by length (longest first), right-padded like ``HFLM``'s,
so a batch's scored spans overlap and its padding is small; a batch holds at most
``batch_size`` inputs and at most ``max_batch_tokens`` padded positions (default
:data:`TOKENS_PER_INPUT` × ``batch_size``), so a few long texts are not padded alongside many
short ones.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

logger = logging.getLogger(__name__)

Request = tuple[Any, list[int], list[int]]

#: Padded positions a batch may hold per input of ``batch_size`` (a batch of 64 inputs: 2,048
#: positions). Inputs are read longest first, and a count-only batch of a few long texts and
#: many short ones is mostly padding: on the embedded model, evaluating with this cap took
#: about three quarters of the time of count-only batches of 64, with the same accuracies.
TOKENS_PER_INPUT = 32


class SharedContextLM(HFLM):
    """``HFLM`` whose log-likelihoods share identical inputs and skip unscored positions.

    Build it as ``HFLM`` with an in-memory model (``SharedContextLM(pretrained=model,
    tokenizer=tokenizer, batch_size=64)``); causal language models only. ``batch_size`` counts
    distinct inputs per forward pass, ``max_batch_tokens`` caps their padded positions (None:
    :data:`TOKENS_PER_INPUT` × ``batch_size``). ``encodings``, a dictionary, keeps the
    tokenizer's output between instances that share the tokenizer (pass the same one to each).
    """

    def __init__(self, *args: Any, encodings: dict | None = None,
                 max_batch_tokens: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if max_batch_tokens is not None and max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be a positive int or None; "
                             f"got {max_batch_tokens!r}")
        self._encodings = {} if encodings is None else encodings
        self._max_batch_tokens = max_batch_tokens

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

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        # lm-eval's split of a (context, continuation) pair into tokens, kept with the
        # encodings: it encodes context + continuation and the context for every option of
        # every item, for each model (~7% of a model's time on stage 06's tasks).
        key = ("pair", self.backend, context, continuation)
        if key not in self._encodings:
            context_enc, continuation_enc = super()._encode_pair(context, continuation)
            self._encodings[key] = (tuple(context_enc), tuple(continuation_enc))
        context_enc, continuation_enc = self._encodings[key]
        return list(context_enc), list(continuation_enc)

    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False,
                              override_bs: int | None = None) -> list[tuple[float, bool]]:
        if self.backend != "causal":
            return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
        batch_size = override_bs or (self.batch_size if isinstance(self.batch_size, int)
                                     else 64)
        # What the model reads for each request (truncated from the left like HFLM).
        windows = []
        max_length = self.max_length   # a property that reads the model's config each time
        for _, context, continuation in requests:
            if not context or not continuation:
                raise ValueError("every request needs a non-empty context and continuation")
            windows.append(tuple((context + continuation)[-(max_length + 1):][:-1]))
        # Each input is read inside the longest input it begins (its host), and each host
        # once: the positions a request scores are the same positions of the host.
        host_of = prefix_hosts(windows)
        positions: dict[tuple[int, ...], set[int]] = {}
        requests_of: dict[tuple[int, ...], list[int]] = {}
        for index, ((_, _, continuation), window) in enumerate(
                zip(requests, windows, strict=True)):
            host = host_of[window]
            positions.setdefault(host, set()).update(
                range(len(window) - len(continuation), len(window)))
            requests_of.setdefault(host, []).append(index)
        order = sorted(positions, key=lambda window: (-len(window), window))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        bar = tqdm(total=len(order), disable=disable_tqdm or self.rank != 0, ascii=True,
                   desc="distinct inputs", mininterval=10)
        max_tokens = self._max_batch_tokens or TOKENS_PER_INPUT * batch_size
        for batch in batches_of(order, batch_size, max_tokens):
            log_probs, row_of = self._score_batch(batch, [sorted(positions[host])
                                                          for host in batch])
            # The model's most likely token at each scored row, for lm-eval's is_greedy.
            greedy = log_probs.argmax(dim=-1)
            single: list[tuple[int, int, int]] = []   # (request, row, token), one-token ones
            for host in batch:
                rows_of_host = row_of[host]
                for index in requests_of[host]:
                    continuation = requests[index][2]
                    end = len(windows[index])
                    rows = [rows_of_host[position]
                            for position in range(end - len(continuation), end)]
                    if len(continuation) == 1:
                        single.append((index, rows[0], continuation[0]))
                        continue
                    tokens = torch.tensor(continuation)
                    picked = log_probs[rows].gather(1, tokens[:, None]).squeeze(1)
                    results[index] = (float(picked.sum()), bool((greedy[rows] == tokens).all()))
            if single:  # most requests (cloze options): one gather for the whole batch
                indices, rows, tokens = (torch.tensor(column)
                                         for column in zip(*single, strict=True))
                picked = log_probs[rows, tokens].tolist()
                is_greedy = (greedy[rows] == tokens).tolist()
                for index, value, greedy_hit in zip(indices.tolist(), picked, is_greedy,
                                                    strict=True):
                    results[index] = (value, greedy_hit)
            bar.update(len(batch))
        bar.close()
        return results

    @torch.no_grad()
    def _score_batch(self, windows: list[tuple[int, ...]], positions: list[list[int]]
                     ) -> tuple[torch.Tensor, dict[tuple[int, ...], dict[int, int]]]:
        """Log-probabilities of the next token at the given positions of each window: one
        float32 row per (window, position) on the CPU, and each window's row of each of its
        positions."""
        length = len(windows[0])  # the longest: windows are sorted by length
        input_ids = torch.zeros((len(windows), length), dtype=torch.long)
        for row, window in enumerate(windows):
            input_ids[row, :len(window)] = torch.tensor(window)
        first = min(min(wanted) for wanted in positions)
        last = max(len(window) for window in windows)
        keep = torch.arange(first, last, device=self.device)
        rows = torch.tensor([row for row, wanted in enumerate(positions) for _ in wanted],
                            device=self.device)
        columns = torch.tensor([position - first for wanted in positions for position in wanted],
                               device=self.device)

        # The output layer reads only the scored positions: its input (the kept span of every
        # row) is narrowed to them, so whatever the family does to logits afterwards still
        # applies, to one row of len(rows) positions.
        def scored_only(module, args):
            return (args[0][rows, columns].unsqueeze(0), *args[1:])

        head = self.model.get_output_embeddings()
        hook = head.register_forward_pre_hook(scored_only)
        try:
            with torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                                enabled=self.mixed_precision_dtype is not None):
                # No key/value cache: nothing is generated, and filling one costs a copy per layer.
                logits = self.model(input_ids.to(self.device), logits_to_keep=keep,
                                    use_cache=False).logits
        finally:
            hook.remove()
        if logits.shape[:2] != (1, len(rows)):
            raise RuntimeError(f"the output layer of {type(self.model).__name__} did not keep "
                               f"the scored positions (logits of shape {tuple(logits.shape)}, "
                               f"expected (1, {len(rows)}, vocabulary))")
        log_probs = F.log_softmax(logits[0], dim=-1, dtype=self.softmax_dtype).float().cpu()
        row_of: dict[tuple[int, ...], dict[int, int]] = {}
        offset = 0
        for window, wanted in zip(windows, positions, strict=True):
            row_of[window] = {position: offset + row for row, position in enumerate(wanted)}
            offset += len(wanted)
        return log_probs, row_of


def batches_of(windows: list[tuple[int, ...]], batch_size: int, max_tokens: int
               ) -> Iterator[list[tuple[int, ...]]]:
    """Consecutive batches of ``windows`` (sorted longest first): at most ``batch_size`` windows
    and at most ``max_tokens`` padded positions (the first window's length times the count),
    but never empty.

    Examples
    --------
    >>> [len(batch) for batch in batches_of([(1,) * 5, (2,) * 4, (3,) * 2, (4,) * 2], 3, 8)]
    [1, 2, 1]
    """
    batch: list[tuple[int, ...]] = []
    for window in windows:
        if batch and (len(batch) == batch_size
                      or len(batch[0]) * (len(batch) + 1) > max_tokens):
            yield batch
            batch = []
        batch.append(window)
    if batch:
        yield batch


def prefix_hosts(windows) -> dict[tuple[int, ...], tuple[int, ...]]:
    """Each distinct window mapped to a window that begins with it and begins no other window
    (itself when no other window begins with it).

    In sorted order the windows that begin with ``w`` follow ``w`` directly, so ``w``'s host
    is the host of the next window when that window begins with ``w``.

    Examples
    --------
    >>> hosts = prefix_hosts([(1, 2), (1, 2, 3), (1,), (4,), (1, 5)])
    >>> hosts[(1,)], hosts[(1, 2)], hosts[(4,)]
    ((1, 2, 3), (1, 2, 3), (4,))
    """
    ordered = sorted(set(windows))
    hosts: dict[tuple[int, ...], tuple[int, ...]] = {}
    following: tuple[int, ...] | None = None
    for window in reversed(ordered):
        if following is not None and following[:len(window)] == window:
            hosts[window] = hosts[following]
        else:
            hosts[window] = window
        following = window
    return hosts
