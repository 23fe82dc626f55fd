"""``influence-nb sketch``: the corpus's sketches and their FAISS index, the directory
``Retriever.open`` reads (sketches/ and index/)."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from .core import Group, Verb, fields, make
from .inputs import FACTORS, LIMIT, ids, io_options, session


def options() -> list[Group]:
    from ..index import IndexArgs
    from ..sketch import SketchArgs
    return [io_options("directory for sketches/ and index/"), Group(None, (FACTORS, LIMIT)),
            fields(SketchArgs), fields(IndexArgs, "index_")]


def run(ns: argparse.Namespace, rank: int, world: int) -> dict:
    from ..index import IndexArgs, SketchIndex
    from ..sketch import SketchArgs, build_sketches
    sketch_args = make(SketchArgs, ns, progress=ns.progress)
    index_args = make(IndexArgs, ns, "index_", progress=ns.progress)
    inf = session(ns)
    out = Path(ns.out)
    t0 = time.perf_counter()
    sketches = build_sketches(inf.model, inf.factors, inf.corpus, out / "sketches",
                              sketch_args, ids(ns, inf.corpus), inf.task)
    seconds = time.perf_counter() - t0
    if rank == 0:  # the index is derived from the sketches: rebuilt on every run
        index = SketchIndex.build(sketches, out / "index", index_args)
        exact = ("with exact token factors" if sketches.exact is not None else
                 "sketch alone (the corpus's token factors exceed --exact-bytes)")
        print(f"{len(sketches)} sketches of {sketches.dim} dims, {exact}, in {seconds:.1f} s on "
              f"{world} rank(s); {index!r} -> {out}")
    return dict(sequences=len(sketches), dim=sketches.dim, seconds=seconds,
                exact=sketches.exact is not None)


VERB = Verb("sketch", "sketch the corpus and build the FAISS index -> dir with sketches/ and "
            "index/ (Retriever.open)", options, run,
            required=("model", "corpus", "factors", "out"), config=True)
