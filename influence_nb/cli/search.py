"""``influence-nb search``: candidates retrieved from the sketch store and rescored exactly,
until a recall target is met (``--recall``, the default) or for a fixed budget
(``--candidates``), saved for ``InfluenceResult.load`` with search.json (candidates, timings,
recall, rescored fraction)."""
from __future__ import annotations

import argparse
from pathlib import Path

from .core import Group, Option, Verb, field_docs, fields, fraction, make, positive, share
from .inputs import io_options, print_top, queries, query_options, session


def options() -> list[Group]:
    from ..index import IndexArgs
    from ..scoring import ScoreArgs
    docs = field_docs(IndexArgs.__doc__)
    own = (Option("index", "the `sketch` output directory (required)", metavar="DIR"),
           Option("recall", "expected share of each query's exhaustive top-k (each sign) to "
                  "find, rescoring in rounds until a bound says so (default: 0.95 unless "
                  "--candidates)", type=share),
           Option("k", "the top-k the recall target is about (default: 10)", type=positive(int),
                  default=10),
           Option("candidates", "a fixed budget instead: sequences rescored per query, half per "
                  "sign", type=positive(int)),
           Option("lexical", "share of the positive half taken from BM25 matches (default: 0 "
                  "where the sketch's calibrated recall is ≥ 0.99, else 0.5)", type=fraction),
           *(Option(name, f"{docs[name]} (default: as built)", type=positive(int))
             for name in ("nprobe", "ef_search", "refine")))
    return [io_options("directory for the result (InfluenceResult.load)"), query_options(),
            Group(None, own), fields(ScoreArgs, skip=("progress", "chunk_size"))]


def run(ns: argparse.Namespace, rank: int, world: int) -> dict:
    from ..retriever import Retriever
    from ..scoring import ScoreArgs
    from ..store import write_json
    pairs = queries(ns)
    inf = session(ns, make(ScoreArgs, ns, progress=ns.progress))
    retriever = Retriever.open(inf, ns.index, ns.lexical)
    retriever.index.set_params(ns.nprobe, ns.ef_search, ns.refine)
    result = retriever.search(pairs, ns.candidates, recall=ns.recall, k=ns.k)
    if rank == 0:
        result.save(ns.out)
        info = dict(candidates=[len(c) for c in result.candidates], timings=result.timings,
                    estimated_recall=result.estimated_recall, search_size=result.search_size,
                    rescored_fraction=result.rescored_fraction,
                    read_fraction=result.read_fraction, met=result.met,
                    rounds=result.rounds)
        write_json(Path(ns.out) / "search.json", info)
        print_top(result, ns.top)
        print(f"\nrescored {len(result.ids)} candidates of {len(retriever.sketches)} sketched "
              f"sequences in {sum(result.timings.values()):.2f} s on {world} rank(s) -> {ns.out}")
    return dict(sequences=len(result.ids), timings=result.timings)


VERB = Verb("search", "retrieve candidates from the index, rescore them exactly -> "
            "InfluenceResult dir", options, run,
            required=("model", "corpus", "factors", "index", "out"), config=True)
