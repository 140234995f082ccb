"""Capture batches carry each token's provenance."""

import numpy as np
import pandas as pd

from moecollab import tokens


class WordTokenizer:
    """Each word is its id; id 0 is EOS."""

    eos_token_id = 0
    vocabulary = ["<eos>", "acid", "base", "salt", "writ", "court", "law"]

    def __len__(self):
        return len(self.vocabulary)

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[self.vocabulary.index(w) for w in t.split()] for t in texts]}

    def decode(self, ids):
        return " ".join(self.vocabulary[i] for i in ids)


ENTRIES = pd.DataFrame({
    "entry_id": ["c1", "c2", "c3", "l1", "l2"],
    "domain": ["chemistry"] * 3 + ["law"] * 2,
    "split": ["test", "test", "validation", "test", "test"],
    "text": ["acid base", "salt", "acid salt base", "writ court", "law writ law"],
}, index=[10, 11, 12, 13, 14])


def test_blocks_stay_within_a_domain_and_tokens_know_their_entry():
    tokenizer = WordTokenizer()
    blocks = tokens.pack_documents(ENTRIES, tokenizer, seq_len=3, max_tokens_per_domain=100)
    batches = list(blocks.batches(batch_size=2, pieces=tokens.token_pieces(tokenizer)))
    assert sum(len(b["input_ids"]) for b in batches) == len(blocks) == 9 // 3 + 7 // 3
    by_entry = dict(zip(ENTRIES["entry_id"], ENTRIES["text"], strict=True))
    for batch in batches:
        for ids, entry_ids, domains, pieces in zip(batch["input_ids"].tolist(), batch["entry_id"],
                                                   batch["domain"], batch["text_piece"],
                                                   strict=True):
            assert len(set(domains)) == 1
            for token_id, entry, piece in zip(ids, entry_ids, pieces, strict=True):
                assert piece == tokenizer.vocabulary[token_id]
                assert token_id == 0 or piece in by_entry[entry].split()
                expected_domain = ENTRIES.set_index("entry_id").loc[entry, "domain"]
                assert domains[0] == expected_domain


def test_budget_limits_tokens_per_domain():
    blocks = tokens.pack_documents(ENTRIES, WordTokenizer(), seq_len=2, max_tokens_per_domain=4)
    assert blocks.domains == ["chemistry", "chemistry", "law", "law"]
    assert blocks.n_tokens == 8
    assert np.isin(blocks.entry_ids[blocks.entry_rows], ENTRIES["entry_id"]).all()
