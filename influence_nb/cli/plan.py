"""``influence-nb plan``: the memory and time of a fit and of scans, predicted from one batch on
this model, corpus and machine; a run that cannot fit is refused in one line."""
from __future__ import annotations

import argparse
from pathlib import Path

from .core import Group, Option, Verb, fields, make, positive
from .inputs import io_options, load_corpus, load_model


def options() -> list[Group]:
    from ..curvature import FactorArgs
    from ..projection import SketchArgs
    from ..scoring import ScoreArgs
    return [io_options("directory for plan.json (optional)"),
            Group(None, (Option("queries", "query counts to plan scans for (default: 1 50 200)",
                                type=positive(int), nargs="+", default=[1, 50, 200]),)),
            fields(FactorArgs), fields(ScoreArgs, "score_"), fields(SketchArgs, "sketch_")]


def run(ns: argparse.Namespace, rank: int, world: int) -> dict:
    from ..curvature import FactorArgs
    from ..plan import plan
    from ..projection import SketchArgs
    from ..scoring import ScoreArgs
    from ..store import write_json
    fit_args = make(FactorArgs, ns, progress=False)
    score_args = make(ScoreArgs, ns, "score_", progress=False)
    sketch_args = make(SketchArgs, ns, "sketch_", progress=False)
    model, tokenizer = load_model(ns)
    result = plan(model, load_corpus(ns, model, tokenizer), fit_args, score_args, ns.queries,
                  sketch=sketch_args)
    if rank == 0:
        print(result)
        if ns.out:
            write_json(Path(ns.out) / "plan.json", result.summary())
    result.check()                      # a run that cannot fit: one line naming what to change
    return result.summary()


VERB = Verb("plan", "predict the memory and time of a fit, of scans and of a sketch build on "
            "this model, corpus and machine (one batch is run); refuse what cannot fit", options, run,
            required=("model", "corpus"))
