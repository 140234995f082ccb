"""The evaluation tests' tiny study: a few sentences and four-choice items in three domains.

3 domains × 2 splits × 4 items, each a term and four definitions made of the domain's words;
the sentences train the tests' byte-level BPE tokenizer and are the perplexity texts. The tiny
model, tokenizer and task folder built from them are fixtures in ``tests/conftest.py``.
"""

from __future__ import annotations

import pandas as pd

DOMAINS = ("biology", "chemistry", "law")  # in the corpus's domain order
SPLITS = ("train", "test")
N_ITEMS = 4

WORDS = {
    "biology": ["cell", "gene", "enzyme", "tissue", "organism", "membrane"],
    "chemistry": ["acid", "atom", "molecule", "solvent", "crystal", "reaction"],
    "law": ["court", "judge", "contract", "statute", "tort", "appeal"],
}


def tiny_sentences() -> list[str]:
    return [
        f"The {word} is a kind of {other} studied in {domain}."
        for domain, words in WORDS.items()
        for word in words
        for other in words
    ]


def tiny_items() -> pd.DataFrame:
    rows = []
    for domain in DOMAINS:
        words = WORDS[domain]
        for split in SPLITS:
            for index in range(N_ITEMS):
                term = words[index + (2 if split == "test" else 0)]
                choices = [f"a {words[(index + shift) % 6]} used in {domain}"
                           for shift in range(4)]
                rows.append({
                    "item_id": f"mcq-{domain}-{split}-{index}",
                    "domain": domain,
                    "split": split,
                    "term": term,
                    "question": f"Which definition fits the term '{term}'?",
                    "choices": choices,
                    "answer": index % 4,
                    "entry_id": f"{domain}-{split}-{index}",
                })
    return pd.DataFrame(rows)
