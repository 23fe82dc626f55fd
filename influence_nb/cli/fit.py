"""``influence-nb fit``: EK-FAC / K-FAC factors over a corpus, saved for ``Factors.load``."""
from __future__ import annotations

import argparse
import time

from .core import Group, Verb, fields, make
from .inputs import io_options, load_corpus, load_model


def options() -> list[Group]:
    from ..curvature import FactorArgs
    return [io_options("directory for the factors (Factors.load)"), fields(FactorArgs)]


def run(ns: argparse.Namespace, rank: int, world: int) -> dict:
    from ..curvature import FactorArgs, fit_factors
    args = make(FactorArgs, ns, progress=ns.progress)   # bad values fail before any loading
    model, tokenizer = load_model(ns)
    corpus = load_corpus(ns, model, tokenizer)
    t0 = time.perf_counter()
    factors = fit_factors(model, corpus, args)
    seconds = time.perf_counter() - t0
    if rank == 0:
        factors.save(ns.out)
        print(f"{factors.args.strategy} factors of {len(factors.shapes)} layers over "
              f"{factors.n_examples} sequences ({factors.n_tokens} tokens) in {seconds:.1f} s "
              f"on {world} rank(s) -> {ns.out}")
    return dict(sequences=factors.n_examples, tokens=factors.n_tokens, seconds=seconds)


VERB = Verb("fit", "fit EK-FAC / K-FAC factors over a corpus -> Factors dir", options, run,
            required=("model", "corpus", "out"), config=True)
