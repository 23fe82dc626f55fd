"""The three evaluation worlds of the retrieval benchmarks, each with queries of several kinds.

- ``demo``: the embedded demo world (GPT-NeoX, BPE, planted facts, Velnish, arithmetic, code,
  themed prose) on a random subset of ``n`` of its 20,000 sequences; its factors are the demo's
  (fitted on all 20,000), queries: fact, cross-lingual, arithmetic, code, themed.
- ``markov``: benchmarks/markov_world.py, built independently of the demo generator (second-order
  Markov chain over 96 invented words, word tokenizer, 2-layer GPT-2 trained from scratch on
  the ``n`` sequences); queries: fresh, seen, long, unlikely (:func:`markov_world.query_kinds`).
- ``memorized``: benchmarks/memorized_world.py, unlike both (3,150 short sentences of invented
  facts, byte-level BPE, 2-layer GPT-NeoX trained to near-certainty without label smoothing);
  the first ``n`` of its queries (a fact's first template up to its object), by how many
  sentences state the fact: stated-once, stated-more.

The trained Markov and memorized models and every world's factors are cached under
``cache_dir()``.
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import markov_world   # benchmarks/markov_world.py
import memorized_world   # benchmarks/memorized_world.py

from influence_nb import demo
from influence_nb.curvature import FactorArgs
from influence_nb.scoring import ScoreArgs
from influence_nb.session import Influence
from influence_nb.store import cache_dir

SCORE_ARGS = ScoreArgs(batch_size=32, per_layer=False, progress=False)


@dataclass
class World:
    name: str
    inf: Influence                     # its corpus is the evaluated one (ids 0..n-1)
    pairs: list[tuple[str, str]]       # (prompt, completion) per query
    kinds: np.ndarray                  # (Q,) the kind of each query

    @property
    def work(self) -> Path:
        """The world's benchmark cache, one folder per fit: a refit (new model, new default
        settings) starts a folder of its own instead of meeting stale stores."""
        return cache_dir() / (f"bench-retrieval-{self.name}-{len(self.inf.corpus)}-"
                              f"{self.inf.factors.factors_id()[:8]}")


def _split_at(text: str, marker: str) -> tuple[str, str]:
    i = text.index(marker) + len(marker)
    return text[:i], text[i:]


def demo_queries(inf: Influence) -> list[tuple[str, str, str]]:
    """(kind, prompt, completion): 10 fact, ≤ 6 cross-lingual, 6 arithmetic, 6 code, 8 themed."""
    facts = demo.facts()
    keep = frozenset(w for f in facts for w in (f.subject + " " + f.obj).split()) - {"and",
                                                                                     "engine"}
    held = demo.heldout(inf.tokenizer).df
    held = held[held.lang == "en"]
    out = [("fact", f.prompt(), f.completion) for f in facts[::12][:10]]
    velnish = [(f, demo.translate(f.statement(), keep)) for f in facts[5::7]]
    out += [("cross-lingual", vel[:vel.index(f.obj)].rstrip(), " " + f.obj)
            for f, vel in velnish if f.obj in vel][:6]     # the object kept verbatim
    for t in held[held.kind == "arithmetic"].text[:6]:
        prompt, rest = _split_at(t, "Answer:")
        out.append(("arithmetic", prompt, rest.split(".")[0] + "."))
    for t in held[held.theme == "binary_search"].text[:6]:
        lines = t.splitlines(keepends=True)
        out.append(("code", "".join(lines[:3]), "".join(lines[3:5]).rstrip("\n")))
    for theme in ("survival", "shutdown"):
        for t in held[held.theme == theme].text[:4]:
            first, rest = _split_at(t, ":" if theme == "survival" else ".")
            out.append(("themed", first, " " + rest.strip().split(". ")[0]))
    return out


def demo_world(n: int | None = None, seed: int = 0) -> World:
    """The demo world on a random subset of n sequences (None: all 20,000)."""
    inf = Influence.demo(FactorArgs(batch_size=32), score_args=SCORE_ARGS)
    if n is not None and n < len(inf.corpus):
        ids = np.sort(np.random.default_rng(seed).choice(len(inf.corpus), n, replace=False))
        inf.corpus = inf.corpus.subset(ids)
    queries = demo_queries(inf)
    return World("demo", inf, [(p, c) for _, p, c in queries],
                 np.array([k for k, _, _ in queries]))


def markov(n: int = 3000, per_kind: int = 8) -> World:
    """The independent Markov world of n sequences, its model trained once and cached."""
    path = cache_dir() / f"world-markov-retrieval-{n}" / "model.pt"
    w = markov_world.build(n, train=not path.exists())
    if path.exists():
        w.model.load_state_dict(torch.load(path))
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(w.model.state_dict(), path)
    w.model.eval()
    inf = Influence(w.model, w.tokenizer, w.corpus, score_args=SCORE_ARGS)
    inf.fit(FactorArgs(batch_size=32, progress=False), cache=True)
    queries = markov_world.query_kinds(w, per_kind)
    return World("markov", inf, [(p, c) for _, p, c in queries],
                 np.array([k for k, _, _ in queries]))


def memorized(n: int = 24) -> World:
    """The memorised-facts world (all 3,150 sentences) with its first n queries."""
    w = memorized_world.build()
    inf = Influence(w.model, w.tokenizer, w.corpus, score_args=SCORE_ARGS)
    inf.fit(FactorArgs(batch_size=32, progress=False), cache=True)
    kinds = np.array(["stated-once" if s.sum() == 1 else "stated-more" for s in w.states[:n]])
    return World("memorized", inf, w.pairs[:n], kinds)


WORLDS = {"demo": demo_world, "markov": markov, "memorized": memorized}
