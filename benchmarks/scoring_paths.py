"""The scorer's paths side by side at real widths: the scan as the cost model lays it out
("auto") against each path forced for every layer ("tokens": R's factors per token;
"project": each sequence's DW times the factors), ÷ a plain forward + backward over the same
batches, alternating in one process, one torch thread. The scan alone: rank-r queries are
drawn at random (the scorer's work does not depend on the factors' values, as in ``plan``).

    python benchmarks/scoring_paths.py --shape gpt2-4 --tokens 1024 --sequences 2 --repeats 3

Shapes as in ``real_size.py``; prints JSON: the path each layer took under "auto", per repeat
the seconds of each run, each scan ÷ plain, and each forced path ÷ auto. The dense path (R
formed from its factors per batch) is left out: at these widths it is never the cheapest.
"""
from common import interleaved, plain, report, seconds as timed, set_threads, spread
from influence_nb import Queries, ScoreArgs, scan
from influence_nb import scoring
from influence_nb.batching import source
from influence_nb.layers import find_layers
from influence_nb.scoring import Costs, scan_tokens
from real_size import StockLoss, scan_alone_args, world


def main() -> None:
    a = scan_alone_args(__doc__, tokens=1024, sequences=2, repeats=3)
    set_threads(1)
    model, _, corpus, _ = world(a.shape, a.tokens, a.sequences, 1)
    layers = find_layers(model, a.layers)
    queries = Queries.random(layers, a.queries, ScoreArgs.rank)
    tokens = scan_tokens(model, layers)
    args = ScoreArgs(per_layer=False, progress=False)
    model_cost, picked = scoring.scoring_cost, set()

    def auto(*x: int) -> Costs:
        cost = model_cost(*x)
        picked.add(cost.cheapest())
        return cost

    forced = {"auto": auto, "tokens": lambda *x: Costs(0, 1, 1),
              "project": lambda *x: Costs(1, 1, 0)}

    def scan_with(path: str) -> None:
        scoring.scoring_cost = forced[path]
        try:
            scan(model, queries, corpus, args)
        finally:
            scoring.scoring_cost = model_cost

    runs = {"plain": lambda: plain(model, (b for _, b in source(corpus, None, tokens=tokens)
                                           .batches()), StockLoss(), zero_each_batch=True)}
    runs |= {path: (lambda path=path: scan_with(path)) for path in forced}
    seconds = interleaved({k: (lambda fn=fn: timed(fn)) for k, fn in runs.items()}, a.repeats,
                          warmup=False)
    ratio = lambda x, y: spread([u / v for u, v in zip(seconds[x], seconds[y])])  # noqa: E731
    report({"shape": a.shape, "tokens": a.tokens, "sequences": a.sequences, "queries": a.queries,
            "layers": a.layers, "auto_took": sorted(picked),
            "seconds": {k: spread(v) for k, v in seconds.items()},
            "over_plain": {k: ratio(k, "plain") for k in forced},
            "over_auto": {k: ratio(k, "auto") for k in forced if k != "auto"}})


if __name__ == "__main__":
    main()
