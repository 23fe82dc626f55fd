"""``influence-nb demo``: the main job on the embedded demo world, sized to finish in about a
minute on 2 cores: the model's planted-fact accuracy and perplexity, EK-FAC factors fitted on a
random sample of the corpus, and each query's BM25 candidates scored exactly
(``--fit-sample all --candidates all``: the whole corpus, ≈ 20 min)."""
from __future__ import annotations

import argparse
import time

from .core import CLIError, Group, Option, Verb, count_or_all, positive


def options() -> list[Group]:
    return [Group(None, (
        Option("facts", "indices of the planted facts to query", type=int, nargs="+",
               default=[0, 45, 100]),
        Option("batch_size", "sequences per batch of the fit (default: 32)", type=positive(int),
               default=32),
        Option("fit_sample", "fit the factors on N sequences drawn at random, or `all` "
               "(default: 512; all 20,000 take ≈ 10 min on 2 cores)", type=count_or_all,
               default=512, metavar="N"),
        Option("candidates", "score the K best BM25 matches of each query exactly, or `all` "
               "for an exhaustive scan (default: 100)", type=count_or_all, default=100,
               metavar="K"),
        Option("heldout", "held-out sequences for the perplexity, or `all` (default: 200)",
               type=count_or_all, default=200, metavar="N"),
        Option("seed", "seed of the random samples (default: 0)", type=int, default=0),
        Option("threads", "torch threads (default: 1: the demo model's matrices are tiny, and "
               "more threads only contend, the more so on a busy machine)", type=positive(int),
               default=1)))]


def run(ns: argparse.Namespace, rank: int, world: int) -> dict:
    """Accuracy and perplexity, factors on a sample, the facts' top influences printed."""
    import numpy as np
    import torch

    from .. import demo
    from ..scoring import ScoreArgs
    from ..session import Influence
    torch.set_num_threads(ns.threads)
    t0 = time.time()
    facts = demo.facts()
    bad = [i for i in ns.facts if not 0 <= i < len(facts)]
    if bad:
        raise CLIError(f"--facts {bad[0]}: the demo world has facts 0 … {len(facts) - 1}")
    model, tokenizer, corpus = demo.load()
    print(f"demo world: {corpus}")
    print(f"model: {model.config.model_type}, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters, "
          f"loaded in {time.time() - t0:.1f} s")
    rng = np.random.default_rng(ns.seed)
    acc, ppl = _model_quality(model, tokenizer, facts, rng, ns.heldout)
    factors = _fit(model, corpus, rng, ns)
    picked = [facts[i] for i in ns.facts]
    inf = Influence(model, tokenizer, corpus, factors=factors,
                    score_args=ScoreArgs(progress=False))
    result = _scan(inf, picked, ns.candidates)
    _print_top(result, picked)
    return dict(fact_accuracy=round(acc, 4), heldout_perplexity=round(ppl, 3),
                fit_sequences=factors.n_examples, scored_sequences=len(result.ids),
                seconds=round(time.time() - t0, 1))


def _model_quality(model, tokenizer, facts, rng, n_heldout: int | None) -> tuple[float, float]:
    """(greedy accuracy on the planted facts, perplexity on a held-out sample), printed."""
    from .. import demo
    from ..demo.build import fact_accuracy, perplexity
    acc, _ = fact_accuracy(model, tokenizer, facts)
    heldout = demo.heldout(tokenizer)
    held = heldout.subset(_sample(rng, len(heldout), n_heldout))
    ppl = perplexity(model, held)
    print(f"planted-fact accuracy {acc:.3f} over {len(facts)} facts (greedy), perplexity "
          f"{ppl:.2f} on {_share(len(held), len(heldout), 'a random sample')} held-out sequences")
    return acc, ppl


def _fit(model, corpus, rng, ns: argparse.Namespace):
    """EK-FAC factors on --fit-sample sequences drawn at random."""
    from ..curvature import FactorArgs, fit_factors
    t1 = time.time()
    sample = corpus.subset(_sample(rng, len(corpus), ns.fit_sample))
    factors = fit_factors(model, sample, FactorArgs(batch_size=ns.batch_size, progress=False))
    print(f"\nEK-FAC factors fitted on {_share(len(sample), len(corpus), 'a random sample')} "
          f"sequences ({factors.n_tokens:,} tokens) in {time.time() - t1:.1f} s")
    return factors


def _scan(inf, picked, candidates: int | None):
    """The facts' queries scored exactly on their ``candidates`` best BM25 matches (None:
    every sequence)."""
    import numpy as np

    from ..search import BM25
    pairs = [(f.prompt(), f.completion) for f in picked]
    t1 = time.time()
    if candidates is None:
        ids, how = None, "every sequence"
    else:
        texts = inf.corpus.df["text"].tolist()
        ids = np.unique(np.concatenate(BM25(texts).top([p + c for p, c in pairs], candidates)))
        how = (f"the {candidates} best BM25 matches of each query's prompt + completion "
               f"({len(ids):,} of {len(inf.corpus):,} sequences)")
    result = inf.scan(pairs, ids=ids)
    print(f"scored exactly: {how}, on {len(picked)} queries in {time.time() - t1:.1f} s")
    return result


def _print_top(result, picked) -> None:
    """Each fact's five most influential sequences; * marks those that state the fact."""
    for q, f in enumerate(picked):
        print(f"\nquery {q}: {f.prompt()!r} → {f.completion!r}  (fact {f.id}, "
              f"log p = {result.queries[q]['logprob']:.3f})")
        for rank, row in result.top(q, 5).iterrows():
            mark = "*" if f.id in list(row["fact_ids"]) else " "
            print(f"  {rank}.{mark} {row['score']:9.2f}  [{row['kind']}/{row['lang']}] "
                  f"{row['text'][:90]!r}")
    print("\n(* = states the queried fact; positive = raises log p(completion | prompt); "
          "influence-nb demo --fit-sample all --candidates all fits and scans the whole corpus)")


def _sample(rng, n: int, size: int | None):
    """Sorted ids of ``size`` of ``n`` rows drawn without replacement (all for None)."""
    import numpy as np
    if size is None or size >= n:
        return np.arange(n)
    return np.sort(rng.choice(n, size, replace=False))


def _share(part: int, whole: int, what: str) -> str:
    """"all 20,000" or "512 of 20,000 (what)"."""
    return f"all {whole:,}" if part == whole else f"{part:,} of {whole:,} ({what})"


VERB = Verb("demo", "the main job on the embedded demo world: fact accuracy, EK-FAC factors, "
            "top influential sequences of three planted facts", options, run)
