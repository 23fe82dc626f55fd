"""``influence-nb score``: the exhaustive scan, every sequence scored on the queries, saved
for ``InfluenceResult.load`` (resumable)."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from .core import Group, Option, Verb, fields, make
from .inputs import LIMIT, ids, io_options, print_top, queries, query_options, session


def options() -> list[Group]:
    from ..curvature import FactorArgs
    from ..scoring import ScoreArgs
    own = (LIMIT,
           Option("strategy", "precondition with another strategy than the fitted one",
                  choices=FactorArgs.CHOICES["strategy"]),
           Option("scan_dir", "resumable chunk directory (default: OUT/scan)", metavar="DIR"))
    return [io_options("directory for the result (InfluenceResult.load)"), query_options(),
            Group(None, own), fields(ScoreArgs)]


def run(ns: argparse.Namespace, rank: int, world: int) -> dict:
    from ..scoring import ScoreArgs
    pairs = queries(ns)
    inf = session(ns, make(ScoreArgs, ns, progress=ns.progress))
    encoded = inf.queries(pairs, strategy=ns.strategy)
    t0 = time.perf_counter()
    result = inf.scan(encoded, ids=ids(ns, inf.corpus),
                      out_dir=ns.scan_dir or Path(ns.out) / "scan")
    seconds = time.perf_counter() - t0
    if rank == 0:
        result.save(ns.out)
        print_top(result, ns.top)
        print(f"\nscored {len(result.ids)} sequences on {len(encoded)} queries in {seconds:.1f} s"
              f" on {world} rank(s) -> {ns.out}")
    return dict(sequences=len(result.ids), queries=len(encoded), seconds=seconds)


VERB = Verb("score", "exhaustive scan: score every sequence on the queries -> InfluenceResult "
            "dir (resumable)", options, run,
            required=("model", "corpus", "factors", "out"), config=True)
