"""The ``influence-nb`` command line.

    influence-nb demo      the main job on the embedded demo world
"""
from __future__ import annotations

import argparse
import json
import time


def _demo(args: argparse.Namespace) -> None:
    from . import demo
    from .curvature import FactorArgs
    from .demo.build import fact_accuracy, perplexity
    from .session import Influence, cache_dir
    t0 = time.time()
    model, tokenizer, corpus = demo.load()
    print(f"demo world: {corpus}")
    print(f"model: {model.config.model_type}, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters, "
          f"loaded in {time.time() - t0:.1f} s")
    facts = demo.facts()
    acc, _ = fact_accuracy(model, tokenizer, facts)
    ppl = perplexity(model, demo.heldout(tokenizer))
    print(f"planted-fact accuracy {acc:.3f} over {len(facts)} facts, "
          f"held-out perplexity {ppl:.2f}")

    inf = Influence(model, tokenizer, corpus)
    t1 = time.time()
    inf.fit(FactorArgs(batch_size=args.batch_size), cache=True)
    print(f"\nEK-FAC factors over {inf.factors.n_examples} sequences "
          f"({time.time() - t1:.1f} s; cached in {cache_dir()})")
    picked = [facts[i] for i in args.facts]
    t1 = time.time()
    result = inf.scan([(f.prompt(), f.completion) for f in picked])
    print(f"scored {len(corpus)} sequences on {len(picked)} queries in {time.time() - t1:.1f} s")
    for q, f in enumerate(picked):
        print(f"\nquery {q}: {f.prompt()!r} → {f.completion!r}  (fact {f.id})")
        for rank, row in result.top(q, 5).iterrows():
            mark = "*" if f.id in list(row["fact_ids"]) else " "
            print(f"  {rank}.{mark} {row['score']:9.2f}  [{row['kind']}/{row['lang']}] "
                  f"{row['text'][:90]!r}")
    print("\n(* = states the queried fact; positive = raises log p(completion | prompt))")
    print(json.dumps(dict(fact_accuracy=round(acc, 4), heldout_perplexity=round(ppl, 3),
                          seconds=round(time.time() - t0, 1))))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="influence-nb", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="the main job on the embedded demo world: fact accuracy, "
                       "EK-FAC factors, top influential sequences of three planted facts")
    d.add_argument("--facts", type=int, nargs="+", default=[0, 45, 100],
                   help="indices of the planted facts to query")
    d.add_argument("--batch-size", type=int, default=32)
    d.set_defaults(run=_demo)
    args = p.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
