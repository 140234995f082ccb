"""Training the embedded MoE from scratch: token blocks, a per-layer balancing loss, the loop.

transformers' stock ``load_balancing_loss_func`` pools every layer's tokens before taking the
product, so one layer can collapse onto a few experts while the pooled loss still reads
"balanced" (measured: 17 of 64 experts starved). Here the switch-style loss is computed for each
layer separately and averaged, which kept every expert alive in the same setting.

A model trained on a few million tokens does not develop the topical routing that large MoEs
show after trillions: its routers were measured to be no more field-specific than a random
router's. :func:`sequence_expert_information` is an optional term that rewards routing that is
consistent within a sequence (each training block comes from one document stream of one field)
while the balancing loss keeps every expert in use across the batch. It uses no field labels.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

logger = logging.getLogger(__name__)


@dataclass
class TokenBlocks:
    """Fixed-length token blocks, each from a single domain (or from general text).

    ``input_ids`` has shape ``(n_blocks, seq_len)``; ``domains[i]`` names block i's source.
    Packing one domain per block means a token's context comes from the same field, as in a
    topical document.
    """

    input_ids: torch.Tensor
    domains: list[str]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, indices: Sequence[int]) -> TokenBlocks:
        indices = list(indices)
        return TokenBlocks(self.input_ids[indices], [self.domains[i] for i in indices])


def pack_blocks(texts_by_domain: dict[str, list[str]], tokenizer, seq_len: int,
                seed: int, max_blocks_per_domain: int | None = None) -> TokenBlocks:
    """Shuffle each domain's texts, join them with EOS, cut into ``seq_len`` blocks.

    The tail shorter than ``seq_len`` is dropped; blocks are returned grouped by domain in the
    order of ``texts_by_domain``. The packing is :func:`moecollab.tokens.pack_documents`'s,
    without the per-token provenance training does not need.

    Examples
    --------
    >>> class Tokenizer:  # each word is its id; 0 is EOS
    ...     eos_token_id = 0
    ...     def __call__(self, texts, add_special_tokens=False):
    ...         return {"input_ids": [[int(word) for word in text.split()] for text in texts]}
    >>> texts = {"b": ["1 2", "3", "4 5 6"], "a": ["8 9 10"]}
    >>> blocks = pack_blocks(texts, Tokenizer(), 3, seed=0)  # b's order: 4 5 6, 1 2, 3
    >>> blocks.input_ids.tolist(), blocks.domains
    ([[4, 5, 6], [0, 1, 2], [0, 3, 0], [8, 9, 10]], ['b', 'b', 'b', 'a'])
    """
    from .tokens import pack_documents

    texts = [text for domain_texts in texts_by_domain.values() for text in domain_texts]
    entries = pd.DataFrame({
        "text": texts, "entry_id": np.arange(len(texts)), "split": "",
        "domain": [domain for domain, domain_texts in texts_by_domain.items()
                   for _ in domain_texts]})
    budget = None if max_blocks_per_domain is None else max_blocks_per_domain * seq_len
    packed = pack_documents(entries, tokenizer, seq_len=seq_len, max_tokens_per_domain=budget,
                            seed=seed)
    return TokenBlocks(torch.from_numpy(packed.input_ids), packed.domains)


def _selection_counts(scores: Sequence[torch.Tensor], top_k: int) -> torch.Tensor:
    """How often each expert is among a token's top k by ``scores`` (router logits or
    probabilities, one ``(tokens, n_experts)`` tensor per layer): ``(n_layers, n_experts)``."""
    return torch.stack([
        torch.bincount(layer.topk(top_k, dim=-1).indices.reshape(-1), minlength=layer.shape[-1])
        for layer in scores])


def per_layer_balance_loss(router_logits: Sequence[torch.Tensor], top_k: int,
                           recent_counts: deque | None = None) -> torch.Tensor:
    """Switch-Transformer balancing loss computed per layer, then averaged over layers.

    For one layer with ``E`` experts: ``E · Σ_i f_i P_i`` where ``f_i`` is the share of top-k
    selections that go to expert i and ``P_i`` its mean router probability in this batch. It
    equals 1 when routing is uniform and grows as a layer concentrates on few experts.

    ``recent_counts``, a ``deque(maxlen=w)``, makes ``f`` the share over the last ``w`` batches
    (this one included; the deque is updated): balance is then asked of a window of batches,
    not of each batch. With 16 sequences a batch and 128 experts a layer, one batch cannot use
    every expert evenly unless each sequence spreads its tokens over many experts, which is
    the opposite of specialising; a window lets sequences of one field share their experts
    while the experts stay evenly used over time (the "global-batch" balancing of Qiu et al.,
    2025, with past batches standing in for parallel ones).

    Examples
    --------
    >>> uniform = [torch.zeros(8, 4)]             # every expert equally likely
    >>> round(float(per_layer_balance_loss(uniform, top_k=2)), 4)
    1.0
    """
    layer_probabilities = [logits.float().softmax(dim=-1) for logits in router_logits]
    probabilities = [layer.mean(dim=0) for layer in layer_probabilities]
    counts = _selection_counts(layer_probabilities, top_k).float()
    if recent_counts is not None:
        recent_counts.append(counts.detach())
        counts = torch.stack(tuple(recent_counts)).sum(dim=0)
    selection_share = counts / counts.sum(dim=1, keepdim=True)
    n_experts = counts.shape[1]
    return (n_experts * (selection_share * torch.stack(probabilities)).sum(dim=1)).mean()


def sequence_expert_information(router_logits: Sequence[torch.Tensor],
                                n_sequences: int) -> torch.Tensor:
    """Mutual information (nats) between a token's sequence and its router's distribution.

    Per layer, with ``p_t`` the router's softmax for token ``t``, ``q_s`` the mean of ``p_t``
    over the tokens of sequence ``s`` and ``q`` the mean of ``q_s``:
    ``I = H(q) - mean_s H(q_s)``, averaged over layers. It is 0 when every sequence uses the
    experts alike and ``log(n_experts)`` at most; raising it makes a sequence's tokens prefer
    the same experts while the batch as a whole still spreads over all of them.

    Examples
    --------
    >>> same = [torch.zeros(6, 4)]                        # 2 sequences x 3 tokens, uniform
    >>> round(float(sequence_expert_information(same, 2)), 4)
    0.0
    >>> apart = [torch.tensor([[9., 0, 0, 0]] * 3 + [[0, 0, 0, 9.]] * 3)]
    >>> round(float(sequence_expert_information(apart, 2)), 2)   # close to log 2
    0.69
    """
    values = []
    for logits in router_logits:
        probabilities = logits.float().softmax(dim=-1).view(n_sequences, -1, logits.shape[-1])
        per_sequence = probabilities.mean(dim=1)
        overall = per_sequence.mean(dim=0)
        entropy = -(overall * overall.clamp_min(1e-9).log()).sum()
        sequence_entropy = -(per_sequence * per_sequence.clamp_min(1e-9).log()).sum(-1).mean()
        values.append(entropy - sequence_entropy)
    return torch.stack(values).mean()


@dataclass
class TrainingLog:
    """Losses recorded during training (one row per logged step)."""

    steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    balance_loss: list[float] = field(default_factory=list)
    sequence_information: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    validation_loss: list[float] = field(default_factory=list)
    starved_experts: list[int] = field(default_factory=list)   # on validation text, per eval
    seconds: float = 0.0
    tokens_seen: int = 0


@torch.inference_mode()
def evaluate_blocks(model, blocks: TokenBlocks, batch_size: int, device,
                    loads: bool = True) -> tuple[float, np.ndarray | None]:
    """Mean next-token cross-entropy over the blocks and, with ``loads``, each expert's share
    of its layer's top-k selections on them (``(n_layers, n_experts)``, 1 = the uniform share;
    the embedded model, whose every layer is a MoE layer of the same size)."""
    was_training = model.training
    model.eval()
    total, count, selections = 0.0, 0, None
    for start in range(0, len(blocks), batch_size):
        input_ids = blocks.input_ids[start:start + batch_size].to(device)
        output = model(input_ids=input_ids, output_router_logits=loads)
        logits = output.logits[:, :-1]
        targets = input_ids[:, 1:]
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                 targets.reshape(-1), reduction="sum").item()
        count += targets.numel()
        if loads:
            counts = _selection_counts(output.router_logits, model.config.num_experts_per_tok)
            selections = counts if selections is None else selections + counts
    model.train(was_training)
    share = None
    if selections is not None:
        selections = selections.double().cpu().numpy()
        share = selections / selections.mean(axis=1, keepdims=True)
    return total / max(count, 1), share


def evaluate_loss(model, blocks: TokenBlocks, batch_size: int, device) -> float:
    """Mean next-token cross-entropy over the blocks (any causal LM, pretrained ones too)."""
    return evaluate_blocks(model, blocks, batch_size, device, loads=False)[0]


@contextlib.contextmanager
def _deterministic_algorithms():
    """torch's deterministic algorithms while the block runs, then the caller's setting again.
    ``warn_only``: an operation without a deterministic version (on a GPU) warns, not fails."""
    was_on = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_on, warn_only=was_warn_only)


@_deterministic_algorithms()
def train(model, train_blocks: TokenBlocks, validation_blocks: TokenBlocks, *, n_steps: int,
          batch_size: int, lr: float, balance_coef: float, eval_every: int, seed: int,
          device, specialisation_coef: float = 0.0, warmup_ratio: float = 0.05,
          weight_decay: float = 0.1, min_expert_share: float = 0.2,
          balance_window: int = 1, progress: bool = True) -> TrainingLog:
    """AdamW with linear warm-up and cosine decay on next-token loss + ``balance_coef`` × the
    per-layer balancing loss − ``specialisation_coef`` × :func:`sequence_expert_information`.
    The balancing loss reads expert loads over the last ``balance_window`` batches (1: this
    batch alone; see :func:`per_layer_balance_loss`).

    Batches are drawn without replacement from a seeded permutation of the training blocks
    (a new permutation each epoch), and torch's deterministic algorithms are on while it
    trains, so the same seed gives the same run on the CPU with any number of threads (with
    two, the experts' backward pass summed token gradients in a varying order: two runs of the
    default model parted after 6 steps; the deterministic kernels cost nothing measurable). Every
    evaluation also counts the experts below ``min_expert_share`` of the uniform load on the
    validation blocks, so the log shows when routing became balanced.
    """
    generator = torch.Generator().manual_seed(seed)
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95),
                                  weight_decay=weight_decay)
    warmup = max(1, int(warmup_ratio * n_steps))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress_ratio = (step - warmup) / max(1, n_steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_ratio))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    top_k = model.config.num_experts_per_tok
    if balance_window < 1:
        raise ValueError(f"balance_window must be >= 1; got {balance_window}")
    recent_counts: deque = deque(maxlen=balance_window)
    log = TrainingLog()
    order = torch.randperm(len(train_blocks), generator=generator)
    cursor = 0

    def record_evaluation(step: int) -> None:
        loss, share = evaluate_blocks(model, validation_blocks, batch_size, device)
        log.eval_steps.append(step)
        log.validation_loss.append(loss)
        log.starved_experts.append(int((share < min_expert_share).sum()))

    record_evaluation(0)  # the untrained model anchors the curves
    started = time.perf_counter()
    bar = tqdm(range(n_steps), desc="training", disable=not progress, mininterval=10,
               ascii=True)
    for step in bar:
        if cursor + batch_size > len(order):
            order, cursor = torch.randperm(len(train_blocks), generator=generator), 0
        input_ids = train_blocks.input_ids[order[cursor:cursor + batch_size]].to(device)
        cursor += batch_size
        output = model(input_ids=input_ids, output_router_logits=True)
        logits = output.logits[:, :-1]
        lm_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                  input_ids[:, 1:].reshape(-1))
        balance = per_layer_balance_loss(output.router_logits, top_k, recent_counts)
        information = sequence_expert_information(output.router_logits, input_ids.shape[0])
        loss = lm_loss + balance_coef * balance - specialisation_coef * information
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        log.tokens_seen += input_ids.numel()
        log.steps.append(step + 1)
        log.train_loss.append(lm_loss.item())
        log.balance_loss.append(balance.item())
        log.sequence_information.append(information.item())
        if (step + 1) % eval_every == 0 or step + 1 == n_steps:
            record_evaluation(step + 1)
            bar.set_postfix(train=f"{lm_loss.item():.3f}",
                            validation=f"{log.validation_loss[-1]:.3f}",
                            starved=log.starved_experts[-1])
    log.seconds = time.perf_counter() - started
    model.eval()
    return log


def balanced_blocks(blocks: TokenBlocks, max_per_domain: int | None = None) -> TokenBlocks:
    """The same number of blocks from every domain: the smallest domain's count, at most
    ``max_per_domain``. Statistics such as mutual information need balanced domains."""
    domains = list(dict.fromkeys(blocks.domains))
    positions = {domain: [i for i, d in enumerate(blocks.domains) if d == domain]
                 for domain in domains}
    n_each = min(len(indices) for indices in positions.values())
    if max_per_domain is not None:
        n_each = min(n_each, max_per_domain)
    return blocks.select([i for domain in domains for i in positions[domain][:n_each]])
