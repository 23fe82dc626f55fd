"""The embedded demo world: a generated corpus with planted facts, its BPE tokenizer and a tiny
GPT-NeoX trained on it (built by :mod:`influence_nb.demo.build`, committed under ``assets/``).

    model, tokenizer, corpus = demo.load()
    facts = demo.facts()          # the planted facts, with prompts, completions, flipped probes

Every function takes ``world``: the committed assets (default), a folder written by
``build``, or the name of a preset ("validation", "micro"), built into the cache on first use.

The package reads one way: :mod:`.vocabulary` and :mod:`.velnish` (words, the second language)
→ :mod:`.world` (the generator) → :mod:`.build` (tokenizer, model, presets) → :mod:`.loader`
(a built world read back) → :mod:`.finetune` (the demo assistant) → this facade, which adds the
query sets of the checks. It imports :mod:`.build` and :mod:`.finetune` only when called:
``python -m influence_nb.demo.build`` (or ``.finetune``) runs that module as ``__main__``, which
the package must not have imported before.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..checks import checked, whole
from ..data import Corpus
from .loader import World, facts, heldout, load, locate, recipe
from .velnish import translate
from .world import ASSETS, Fact, WorldConfig, generate

__all__ = ["ASSETS", "Fact", "WorldConfig", "facts", "finetuned", "first_token", "generate",
           "heldout", "load", "locate", "query_set", "recipe", "spread_facts", "translate",
           "word_order", "world_path"]


def world_path(name: str) -> Path:
    """The cache folder of the preset ``name``, built there on first use
    (:func:`influence_nb.demo.build.world_path`)."""
    from .build import world_path
    return world_path(name)


def finetuned(world: World = ASSETS, path: str | os.PathLike | None = None
              ) -> tuple[Any, Any, Corpus, Corpus]:
    """The demo assistant (:func:`influence_nb.demo.finetune.load_finetuned`): the demo model
    with its LoRA adapter, unmerged; tokenizer; the pretraining corpus; the fine-tuning
    dialogues, labels on the answers only."""
    from .finetune import load_finetuned
    return load_finetuned(world, path)


def query_set(world: World = ASSETS, tokenizer: Any = None) -> tuple[list[tuple[str, str]],
                                                                    list[str]]:
    """(prompt, completion) pairs of four kinds, and each pair's kind: planted facts (every
    other fact, canonical prompt), paraphrased prompts, facts asked in Velnish, and held-out
    arithmetic and code (the model never trained on them) — for checks across query kinds."""
    from transformers import AutoTokenizer
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(locate(world))
    all_facts = facts(world)
    pairs = [(f.prompt(), f.completion) for f in all_facts[::2]]
    kinds = ["fact"] * len(pairs)
    for f in all_facts[1::6]:
        pairs.append((f.prompt(3), f.completion))
        kinds.append("fact, paraphrase")
    for f in all_facts[1::8]:
        text = translate(f.statement(0), frozenset((f.subject + " " + f.obj).split()))
        pairs.append((text[:text.index(f.obj)].rstrip(), " " + f.obj))
        kinds.append("fact, Velnish")
    held = heldout(tokenizer, world).df
    for text in held.loc[(held["kind"] == "arithmetic") & (held["lang"] == "en"), "text"][:3]:
        cut = text.index("Answer:") + len("Answer:")
        pairs.append((text[:cut], text[cut:]))
        kinds.append("arithmetic")
    code = held.loc[(held["theme"] == "binary_search") & held["text"].str.contains("return")]
    for text in code["text"][:2]:
        cut = text.index("return") + len("return")
        pairs.append((text[:cut], text[cut:].rstrip("\n")))
        kinds.append("code")
    return pairs, kinds


def spread_facts(n: int, world: World = ASSETS) -> list[Fact]:
    """``n`` planted facts spread evenly over the list (so over every relation)."""
    all_facts = facts(world)
    n = whole(n, f"n (the world has {len(all_facts)} facts)", 1, len(all_facts) + 1)
    return [all_facts[i] for i in np.linspace(0, len(all_facts) - 1, n).astype(int)]


def first_token(fact: Fact, tokenizer: Any, paraphrase: int = 0) -> tuple[str, str]:
    """The fact's query measured on the object's first token only: (prompt, that token)."""
    return fact.prompt(paraphrase), tokenizer.decode(tokenizer(fact.completion)["input_ids"][:1])


@checked()
def word_order(session: Any, facts: list[Fact]) -> dict:
    """Paper §5.3.4 on planted facts: each fact's ordered statement and its flipped statement
    (object → subject) scored against the fact's own query, measured on the whole object and on
    the object's first token. Per measurement: the mean ordered and flipped scores, their ratio
    ``flipped_over_ordered`` and the median of the per-fact ratios; ``session`` is an
    :class:`~influence_nb.session.Influence` on the world the facts belong to."""
    tok, n = session.tokenizer, whole(len(facts), "len(facts)", low=1)
    queries = {"whole object": [(f.prompt(), f.completion) for f in facts],
               "first token": [first_token(f, tok) for f in facts]}
    texts = [t for f in facts for t in (f.statement(0), f.flipped())]
    claim: dict = {"n_facts": n}
    for name, qs in queries.items():
        S = session.score_texts(texts, qs).scores.reshape(n, n, 2)[np.arange(n), np.arange(n)]
        claim[name] = {"ordered": round(float(S[:, 0].mean()), 2),
                       "flipped": round(float(S[:, 1].mean()), 2),
                       "flipped_over_ordered": round(float(S[:, 1].mean() / S[:, 0].mean()), 4),
                       "median_per_fact": round(float(np.median(S[:, 1] / S[:, 0])), 4)}
    return claim
