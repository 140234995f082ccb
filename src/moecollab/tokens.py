"""Token blocks from corpus text: the one packer, for training, capture and calibration.

Each block of ``seq_len`` tokens comes from one domain; entries are joined with the EOS token.
Every token carries the entry it came from, its domain and split, and the text piece it
decodes to, so later chapters can colour text by collaboration pattern. Training reads the
same blocks without the provenance (:func:`moecollab.training.pack_blocks`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch


def token_pieces(tokenizer) -> np.ndarray:
    """The readable text of every token id (byte-level pieces decoded one by one)."""
    return np.array([tokenizer.decode([token_id]) for token_id in range(len(tokenizer))],
                    dtype=object)


def domain_streams(entries: pd.DataFrame, tokenizer, *, max_tokens_per_domain: int | None,
                   seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per domain: a token stream and, for each token, the row of ``entries`` it came from.

    Entries are taken in a seeded random order until the domain's budget is reached (None: no
    budget, every entry); the EOS separator after an entry belongs to that entry. One
    generator draws each domain's order in turn, in the order domains first appear.
    """
    rng = np.random.default_rng(seed)
    eos = tokenizer.eos_token_id
    budget = math.inf if max_tokens_per_domain is None else max_tokens_per_domain
    streams = {}
    for domain, rows in entries.groupby("domain", sort=False, observed=True):
        order = rows.index.to_numpy()[rng.permutation(len(rows))]
        token_ids, owners, count = [], [], 0
        # Tokenise in chunks so a small budget does not tokenise a whole large domain.
        for start in range(0, len(order), 512):
            chunk = order[start:start + 512]
            encoded = tokenizer(entries.loc[chunk, "text"].tolist(),
                                add_special_tokens=False)["input_ids"]
            for row, ids in zip(chunk, encoded, strict=True):
                token_ids.append(np.asarray([*ids, eos], dtype=np.int64))
                owners.append(np.full(len(ids) + 1, row, dtype=np.int64))
                count += len(ids) + 1
                if count >= budget:
                    break
            if count >= budget:
                break
        if token_ids:
            stream, owner = np.concatenate(token_ids), np.concatenate(owners)
            streams[str(domain)] = (stream[:max_tokens_per_domain],
                                    owner[:max_tokens_per_domain])
    return streams


@dataclass
class DocumentBlocks:
    """Token blocks of ``seq_len`` tokens, each from one domain, with each token's entry row.

    Only integer arrays are held; the per-token strings are made batch by batch in
    :meth:`batches`, so memory for metadata stays proportional to a batch.
    """

    input_ids: np.ndarray       # (n_blocks, seq_len) token ids
    entry_rows: np.ndarray      # (n_blocks, seq_len) index into the two arrays below
    domains: list[str]          # domain of each block
    entry_ids: np.ndarray       # entry id of each entry row
    entry_splits: np.ndarray    # split of each entry row

    def __len__(self) -> int:
        return len(self.domains)

    @property
    def n_tokens(self) -> int:
        return int(self.input_ids.size)

    def batches(self, batch_size: int, pieces: np.ndarray) -> Iterator[dict[str, object]]:
        """Dicts for :func:`moecollab.capture.capture_routing`: ``input_ids`` and per-token
        ``entry_id``, ``domain``, ``split``, ``text_piece``, and per-sequence ``block_id``.

        ``pieces`` is :func:`token_pieces` of the tokenizer."""
        seq_len = self.input_ids.shape[1]
        for start in range(0, len(self), batch_size):
            ids = self.input_ids[start:start + batch_size]
            rows = self.entry_rows[start:start + batch_size]
            yield {
                "input_ids": torch.from_numpy(ids),
                "block_id": np.arange(start, start + len(ids)),
                "entry_id": self.entry_ids[rows].tolist(),
                "domain": [[self.domains[start + i]] * seq_len for i in range(len(ids))],
                "split": self.entry_splits[rows].tolist(),
                "text_piece": pieces[ids].tolist(),
            }


def pack_documents(entries: pd.DataFrame, tokenizer, *, seq_len: int,
                   max_tokens_per_domain: int | None, seed: int = 0) -> DocumentBlocks:
    """Blocks from each domain's entries, at most ``max_tokens_per_domain`` tokens each.

    Parameters
    ----------
    entries : DataFrame with ``text``, ``entry_id``, ``domain`` and ``split``
    tokenizer : a transformers tokenizer with an EOS token
    seq_len : tokens per block; a domain's tail shorter than a block is dropped
    max_tokens_per_domain : token budget of every domain; None for every entry
    seed : order of entries within a domain
    """
    entries = entries.reset_index(drop=True)
    blocks, rows, block_domains = [], [], []
    streams = domain_streams(entries, tokenizer, max_tokens_per_domain=max_tokens_per_domain,
                             seed=seed)
    for domain, (stream, owner) in streams.items():
        n_blocks = len(stream) // seq_len
        blocks.append(stream[: n_blocks * seq_len].reshape(n_blocks, seq_len))
        rows.append(owner[: n_blocks * seq_len].reshape(n_blocks, seq_len))
        block_domains += [domain] * n_blocks
    if not block_domains:
        raise ValueError(f"no domain has enough text for one block of seq_len={seq_len}")
    return DocumentBlocks(np.concatenate(blocks), np.concatenate(rows), block_domains,
                          entries["entry_id"].to_numpy(), entries["split"].to_numpy())
