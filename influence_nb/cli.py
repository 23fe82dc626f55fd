"""The ``influence-nb`` command line.

    influence-nb demo      the main job on the embedded demo world
"""
from __future__ import annotations

import argparse
import json
import time


def _demo(args: argparse.Namespace) -> None:
    from . import demo
    from .demo.build import fact_accuracy, perplexity
    t0 = time.time()
    model, tokenizer, corpus = demo.load()
    t_load = time.time() - t0
    print(f"demo world: {corpus}")
    print(f"model: {model.config.model_type}, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters, loaded in {t_load:.1f} s")
    acc, rows = fact_accuracy(model, tokenizer, demo.facts())
    for r in rows[:: max(1, len(rows) // 6)]:
        mark = "ok " if r["correct"] else "MISS"
        print(f"  [{mark}] {r['prompt']} →{r['got']!r}  (planted: {r['expected']!r})")
    report = dict(fact_accuracy=round(acc, 4), n_facts=len(rows),
                  heldout_perplexity=round(perplexity(model, demo.heldout(tokenizer)), 3),
                  seconds=round(time.time() - t0, 1))
    print(json.dumps(report))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="influence-nb", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="the main job on the embedded demo world").set_defaults(
        run=_demo)
    args = p.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
