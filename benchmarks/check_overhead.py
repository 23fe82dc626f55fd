"""What the argument checks at the public doors (influence_nb.checks.checked) cost, against a
one-query scan of the demo world (issue #28: at most 1 %).

Counts the rule checks one scan crosses (every checked door it passes through, the user's call
included), times each door's check alone on a stub with the door's own signature and rules
(the body does nothing), and the scan itself. Prints JSON.

    python benchmarks/check_overhead.py [--calls 20000] [--repeats 3] [--sample 0]

--sample N scans N sequences instead of all 20,000 (a quicker, harsher ratio).
"""
import argparse
import inspect
import time
from collections import Counter

import numpy as np

from common import fact_pairs, interleaved, report, sample_ids, set_threads, spread
from influence_nb import checks, demo
from influence_nb.checks import checked
from influence_nb.results import InfluenceResult
from influence_nb.scoring import ScoreArgs
from influence_nb.session import Influence


def stub_of(door):
    """The door's argument check alone: a do-nothing body with the door's signature and rules
    (the arguments are passed by keyword, so the rules table is what checks them)."""
    fn = door.__wrapped__

    def body(*args, **kwargs):
        return None
    body.__signature__ = inspect.signature(fn)
    body.__qualname__ = fn.__qualname__
    stub = checked()(body)
    stub(None)                      # its first call resolves names (here: none); then the door's
    stub.rules.update(door.rules)   # own rules, as its first call resolved them
    return stub, body


def per_call(door, kwargs: dict, calls: int) -> float:
    """Seconds the check adds to one call of ``door`` with ``kwargs`` (checked minus bare)."""
    stub, body = stub_of(door)

    def timing(fn):
        def run() -> float:
            start = time.perf_counter()
            for _ in range(calls):
                fn(None, **kwargs)
            return (time.perf_counter() - start) / calls
        return run
    out = interleaved({"checked": timing(stub), "bare": timing(body)}, repeats=5)
    return max(0.0, min(out["checked"]) - min(out["bare"]))    # the least disturbed round


def counted_checks(run) -> tuple[object, Counter]:
    """(run(), {door: rule checks it made there})."""
    n: Counter = Counter()
    check = checks.Rule.check

    def counting(self, value, owner, arg):
        n[owner] += 1
        return check(self, value, owner, arg)
    checks.Rule.check = counting
    try:
        return run(), n
    finally:
        checks.Rule.check = check


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=20000, help="calls per micro-timing")
    p.add_argument("--repeats", type=int, default=3, help="scans timed")
    p.add_argument("--sample", type=int, default=0, help="sequences scanned (0: all)")
    a = p.parse_args(argv)
    set_threads(1)
    inf = Influence.demo(score_args=ScoreArgs(progress=False))
    pair = fact_pairs(demo.spread_facts(1))[0]
    ids = sample_ids(len(inf.corpus), a.sample) if a.sample else None
    scan = lambda: inf.scan(pair, ids=ids)                                     # noqa: E731
    res, n_checks = counted_checks(scan)
    scan_s = []
    for _ in range(a.repeats):
        start = time.perf_counter()
        scan()
        scan_s.append(time.perf_counter() - start)
    res.top(0)
    # the doors a notebook crosses most: the scan itself, and the result's tables after it
    given = dict(queries=pair, ids=ids)
    doors = {"Influence.scan": per_call(Influence.scan, given, a.calls),
             "InfluenceResult.top": per_call(InfluenceResult.top,
                                             dict(q=0, k=10, sign="positive"), a.calls)}
    per_check = doors["Influence.scan"] / len(given)
    overhead = sum(n_checks.values()) * per_check            # every rule check the scan made, at scan's rate
    report(dict(scan_seconds=spread(scan_s), sequences=len(res.ids), rule_checks_per_scan=dict(n_checks),
                check_us_per_call={k: round(v * 1e6, 3) for k, v in doors.items()},
                overhead_us_per_scan=round(overhead * 1e6, 2),
                overhead_percent_of_scan=float(f"{100 * overhead / min(scan_s):.2g}"),
                threads=1, calls=a.calls, repeats=a.repeats))


if __name__ == "__main__":
    main()
