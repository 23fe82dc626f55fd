"""bfloat16 scans against float32, side by side at real widths: the scan alone (no fit: the
scorer's work does not depend on the factors' values, so rank-r queries are drawn at random, as
``plan`` does) ÷ a plain forward + backward over the same batches, the three alternating in one
process, one torch thread.

    python benchmarks/precision_speed.py --shape gpt2-12 --sequences 8 --queries 200 --repeats 2

Shapes as in ``real_size.py``; prints JSON: per repeat the seconds of plain, the float32 and the
bfloat16 scan, each scan ÷ plain, and bfloat16 ÷ float32.
"""
from common import interleaved, plain, report, seconds as timed, set_threads, spread
from influence_nb import Queries, ScoreArgs, scan
from influence_nb.batching import source
from influence_nb.layers import find_layers
from influence_nb.scoring import scan_tokens
from real_size import StockLoss, scan_alone_args, world


def main() -> None:
    a = scan_alone_args(__doc__, tokens=128, sequences=8, repeats=2)
    set_threads(1)
    model, _, corpus, _ = world(a.shape, a.tokens, a.sequences, 1)
    queries = Queries.random(find_layers(model, a.layers), a.queries, ScoreArgs.rank)
    tokens = scan_tokens(model, find_layers(model, a.layers))
    runs = {"plain": lambda: plain(model, (b for _, b in source(corpus, None, tokens=tokens)
                                           .batches()), StockLoss(), zero_each_batch=True)}
    for precision in ("float32", "bfloat16"):
        args = ScoreArgs(precision=precision, per_layer=False, progress=False)
        runs[precision] = lambda args=args: scan(model, queries, corpus, args)
    seconds = interleaved({k: (lambda fn=fn: timed(fn)) for k, fn in runs.items()}, a.repeats,
                          warmup=False)
    ratio = lambda x, y: spread([u / v for u, v in zip(seconds[x], seconds[y])])  # noqa: E731
    report({"shape": a.shape, "tokens": a.tokens, "sequences": a.sequences, "queries": a.queries,
            "layers": a.layers, "seconds": {k: spread(v) for k, v in seconds.items()},
            "float32_over_plain": ratio("float32", "plain"),
            "bfloat16_over_plain": ratio("bfloat16", "plain"),
            "bfloat16_over_float32": ratio("bfloat16", "float32")})


if __name__ == "__main__":
    main()
