"""A world of many short sequences, shared by the benchmarks: the demo model on 3,150 single
sentences cut from the demo corpus (8–24 tokens, mean ≈ 10; facts, filler, arithmetic,
Velnish), and 200 planted-fact queries (the 120 canonical prompts, then paraphrases).

Per-query work (query gradients, preconditioning, the contraction with each sequence's
gradient) dominates here, unlike on the demo corpus's sequences of up to 128 tokens; and a fit
sees ~10 tokens per sequence, so its Fisher estimate is noisier.
"""
import re

import numpy as np

from common import fact_pairs
from influence_nb import demo
from influence_nb.data import Corpus


def build(n: int = 3150, queries: int = 200, seed: int = 0):
    """-> (model, tokenizer, corpus, pairs)."""
    model, tokenizer, full = demo.load()
    sentences = dict.fromkeys(s for text in full.df["text"]
                              for s in re.split(r"(?<=[.!?])\s+", text))
    rows = [s for s in sentences if 8 <= len(tokenizer(s)["input_ids"]) <= 24]
    rows = [rows[i] for i in np.random.default_rng(seed).choice(len(rows), n, replace=False)]
    corpus = Corpus.from_records([{"text": t} for t in rows], tokenizer, 128, progress=False)
    facts = demo.facts()
    pairs = fact_pairs(facts) + [(f.prompt(1 + i % 3), f.completion)
                                 for i, f in enumerate(facts)]
    return model, tokenizer, corpus, pairs[:queries]
