"""The ``influence-nb`` command line: batch jobs that write what the notebook API reads.

    influence-nb fit     --model DIR --corpus FILE --out runs/factors          Factors.load(...)
    influence-nb sketch  --model DIR --corpus FILE --factors runs/factors --out runs/search
                                                               Retriever.open(inf, "runs/search")
    influence-nb score   ... --factors runs/factors --query PROMPT COMPLETION --out runs/scan
                                                                      InfluenceResult.load(...)
    influence-nb search  ... --index runs/search --query PROMPT COMPLETION --out runs/found
    influence-nb validate tail-patch ... --factors runs/factors --query PROMPT COMPLETION --out D
    influence-nb validate lds --world validation --out runs/lds      retrains from scratch
    influence-nb demo      the main job on the embedded demo world

--model is any Hugging Face causal-LM directory (the demo's: influence_nb/demo/assets); --corpus
a .txt / .jsonl / .parquet file or a saved datasets.Dataset directory. Every option can also come
from --config FILE.toml: top-level keys apply to every subcommand that has them, a table
[fit] / [sketch] / [score] / [search] / [validate.tail-patch] / [validate.lds] to that one;
flags override the file. Spell keys like the flags (max_examples or max-examples).

On several processes or machines, launch with torchrun (gloo on CPU, NCCL on GPU); the corpus is
sharded over the ranks and the artifacts are the same as one process writes:

    torchrun --nproc_per_node 8 -m influence_nb.cli fit --model DIR --corpus FILE --out F
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import typing
from typing import Any

from ..checks import first_line
from . import demo, fit, plan, score, search, sketch, validate
from .core import CLIError, OneLineParser, add_verbs, config_defaults

VERBS = (fit.VERB, plan.VERB, sketch.VERB, score.VERB, search.VERB, validate.VERB, demo.VERB)


def parser(defaults: dict | None = None) -> argparse.ArgumentParser:
    """The ``influence-nb`` parser; ``defaults`` {verb: {option: value}} (from --config) over
    the declared defaults."""
    p = OneLineParser(prog="influence-nb", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    add_verbs(p, VERBS, "command", defaults or {})
    return p


def main(argv: list[str] | None = None) -> None:
    """Parse ``argv`` (default: the command line), run the verb, print its summary as one JSON
    line; any failure is one line on stderr and exit 2 (130 when interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        defaults = config_defaults(argv, VERBS)
    except CLIError as e:
        parser().error(str(e))
    p = parser(defaults)
    ns = p.parse_args(argv)
    missing = [k for k in ns.verb.required if getattr(ns, k) is None]
    if missing:
        p.error(f"{ns.words} needs --{missing[0].replace('_', '-')} (a flag or a --config key)")

    from .. import distributed
    created = distributed.init()  # a no-op unless launched by torchrun
    rank, world = distributed.rank_world()
    ns.out = getattr(ns, "out", None)                   # demo writes nothing
    if hasattr(ns, "progress"):
        ns.progress = ns.progress and rank == 0
    t0 = time.perf_counter()
    try:
        summary = ns.verb.run(ns, rank, world)
        distributed.barrier()  # rank 0 writes the outputs: no rank goes on before they exist
    except (Exception, KeyboardInterrupt) as e:  # one line, never a traceback
        _fail(ns.words, e, f" (rank {rank})" if world > 1 else "")
    finally:
        if created:
            distributed.finish()
    if summary is not None and rank == 0:
        print(json.dumps(dict(command=ns.command, out=str(ns.out), ranks=world,
                              total_seconds=round(time.perf_counter() - t0, 2),
                              **{k: rounded(v) for k, v in summary.items()}), default=str))


def rounded(v: Any) -> Any:
    """A float to 4 significant digits (1e-4 stays 1e-4, never 0.0), else ``v`` itself."""
    return float(f"{v:.4g}") if isinstance(v, float) else v


def _fail(command: str, e: BaseException, where: str) -> typing.NoReturn:
    """Report ``e`` in one line and exit 2 (130 when interrupted); with
    INFLUENCE_NB_TRACEBACK set, re-raise it instead of exiting."""
    if isinstance(e, KeyboardInterrupt):
        message = "interrupted; what was committed is kept and a rerun resumes it"
    elif isinstance(e, (ValueError, TypeError, KeyError, OSError, ArithmeticError,
                        MemoryError)):
        message = first_line(e)        # ours name the fix; an OSError names the file
    else:                               # a library's failure: say whose, keep it short
        message = (f"{type(e).__name__}: {first_line(e)} (set INFLUENCE_NB_TRACEBACK=1 "
                   "to see where)")
    print(f"influence-nb {command}: error{where}: {message}", file=sys.stderr)
    if os.environ.get("INFLUENCE_NB_TRACEBACK"):
        raise e
    sys.exit(130 if isinstance(e, KeyboardInterrupt) else 2)
