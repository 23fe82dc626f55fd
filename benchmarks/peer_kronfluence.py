"""influence_nb against kronfluence 1.0.1, side by side: EK-FAC fit and scans of 1, 8, 50 and
200 queries, each ÷ a plain forward + backward over the same corpus (the same layers — the MLPs,
or every block linear with ``--layers all`` — the same token positions in ā āᵀ, damping 0.1 ×
mean eigenvalue), and the two libraries' scores compared under matched conventions (empirical
Fisher on both sides, influence_nb at full rank).

influence_nb runs at its defaults (``FactorArgs()``, ``ScoreArgs()``: batches of a token budget);
kronfluence at its best batch size for the configuration: each of ``--kron-batches`` is timed
once (fit and the largest scan) and the fastest at that scan is kept for the repeats.

Four configurations (one torch thread, same process):
- ``reference``: a randomly initialised 2-layer GPT-NeoX, d = 128, on 512 demo sequences cut
  to exactly 64 tokens (long sequences, no padding);
- ``short``: the demo model on 3,150 single sentences of the demo corpus (8–24 tokens, mean
  ≈ 10: many short sequences, where per-query work dominates; ``short_world.py``);
  queries for both: the 120 planted facts' canonical prompts, then paraphrased prompts, up
  to 200;
- ``markov``: built independently of the demo world (``markov_world.py``): its trained 2-layer
  GPT-2 on its 1,000 sequences of a random second-order Markov chain, 200 queries drawn from the
  chain; the MLPs' Conv1D modules become the equal nn.Linear (weight transposed), which is
  what kronfluence tracks (the attention's too with ``--layers all``);
- ``memorized``: built apart from both (``memorized_world.py``): 3,150 short facts (5–13 tokens)
  a 2-layer GPT-NeoX learned to near-certainty without label smoothing, 200 fact queries.

Timings use each library's default, the true Fisher (labels sampled from the model: inverse-CDF
draws here, ``torch.multinomial`` in the kronfluence task, as in its examples); the scores are
compared on a second pair of fits with deterministic labels. A scan is what a user times:
``inf.scan(pairs)`` (query gradients, preconditioning, the rank-32 truncation, the pass)
against kronfluence's ``compute_pairwise_scores`` with every query in one batch (its fastest
setting: one pass over the corpus). Each timing is repeated, the libraries alternating; the
JSON gives the median and [min, max] of each ratio.

    python benchmarks/peer_kronfluence.py [--repeats 3] [--configs reference short]
        [--layers mlp all] [--kron-batches 32 64 128 256]

kronfluence is optional: ``pip install --no-deps kronfluence==1.0.1`` then
``pip install --no-deps accelerate opt_einsum einconv`` (see kronfluence_scores.py).
"""
import argparse
import json
import sys
from importlib.metadata import version

import numpy as np
import torch
from scipy.stats import spearmanr
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from common import World, interleaved, load_world, plain, report, seconds, set_threads, spread
from influence_nb import demo
from influence_nb.curvature import FactorArgs
from influence_nb.data import Corpus
from influence_nb.layers import find_layers
from influence_nb.scoring import ScoreArgs
from influence_nb.session import Influence
from influence_nb.task import Task

LIBRARIES = ("influence_nb", "kronfluence")


def reference(short: World) -> World:
    """A randomly initialised 2-layer GPT-NeoX (d = 128) on 512 demo sequences cut to 64
    tokens, with the short world's tokenizer and queries."""
    tokenizer, corpus_demo = short.tokenizer, demo.load()[2]
    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=128, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=512,
                        max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id)
    ids = [i for i in range(len(corpus_demo)) if len(corpus_demo.token_ids(i)) >= 64][:512]
    texts = [tokenizer.decode(corpus_demo.token_ids(i)[:64]) for i in ids]
    corpus = Corpus.from_records([{"text": t} for t in texts], tokenizer, 64, progress=False)
    return World(GPTNeoXForCausalLM(cfg).eval(), tokenizer, corpus, short.pairs)


def markov(queries: int) -> World:
    """The Markov world's model with its blocks' Conv1D (y = x W + b) as nn.Linear (weight Wᵀ)."""
    from transformers.pytorch_utils import Conv1D
    world = load_world("markov", queries)
    model = world.model.eval()
    batch = next(iter(world.corpus.batches(8)))
    before = Task().forward(model, batch).detach()
    for name, m in list(model.named_modules()):
        if isinstance(m, Conv1D):
            lin = torch.nn.Linear(*m.weight.shape)
            with torch.no_grad():
                lin.weight.copy_(m.weight.T)
                lin.bias.copy_(m.bias)
            parent, child = name.rsplit(".", 1)
            setattr(model.get_submodule(parent), child, lin)
    torch.testing.assert_close(Task().forward(model, batch), before)  # the same function
    return world


def tracked(w: World, layers: str) -> list[str]:
    """The names of the modules both libraries track: influence_nb's preset ``layers``."""
    return [t.name for t in find_layers(w.model, layers)]


def best_batch(w: World, layers: str, batches: list[int], q: int) -> tuple[int, dict]:
    """kronfluence's fastest batch size at a fit and a q-query scan (one run of each per
    batch size) and {batch: [fit s, scan s]}."""
    from kronfluence_scores import KronfluenceEKFAC   # optional: imported when needed
    sweep = {}
    for b in batches:
        with KronfluenceEKFAC(w.model, w.tokenizer, w.corpus, b,
                              modules=tracked(w, layers)) as kron:
            sweep[b] = [round(seconds(kron.fit), 2), round(seconds(
                lambda: kron.scores(w.pairs[:q])), 2)]
    return min(batches, key=lambda b: sweep[b][1]), sweep


def timings(w: World, layers: str, queries: list[int], repeats: int, batch_size: int) -> dict:
    """{run: [seconds per repeat]}: plain fwd+bwd (one more after the repeats), each library's
    fit, and its scan of the first q queries for each q, the libraries alternating; influence_nb
    at its defaults, kronfluence at ``batch_size``; each library's default, the true Fisher
    (labels sampled)."""
    from kronfluence_scores import KronfluenceEKFAC
    task = Task()
    session: dict[str, Influence] = {}

    def base() -> float:
        return plain(w.model, w.corpus.batches(batch_size), task)

    def fit_ours() -> float:
        session["inf"] = Influence(w.model, w.tokenizer, w.corpus, task=task,
                                   score_args=ScoreArgs(progress=False))
        return seconds(lambda: session["inf"].fit(FactorArgs(layers=layers, progress=False)))

    base()  # warm-up
    with KronfluenceEKFAC(w.model, w.tokenizer, w.corpus, batch_size,
                          modules=tracked(w, layers)) as kron:
        runs = {"plain": base, ("fit", "influence_nb"): fit_ours,
                ("fit", "kronfluence"): lambda: seconds(kron.fit)}
        for q in queries:
            runs["scan", q, "influence_nb"] = lambda q=q: seconds(
                lambda: session["inf"].scan(w.pairs[:q]))
            runs["scan", q, "kronfluence"] = lambda q=q: seconds(
                lambda: kron.scores(w.pairs[:q]))
        out = interleaved(runs, repeats, warmup=False)
        out["plain"].append(base())
    return out


def matched(w: World, layers: str, batch_size: int) -> dict:
    """The two libraries' scores under matched conventions: deterministic labels on both
    sides, influence_nb at full rank."""
    from kronfluence_scores import KronfluenceEKFAC
    with KronfluenceEKFAC(w.model, w.tokenizer, w.corpus, batch_size,
                          empirical_fisher=True, modules=tracked(w, layers)) as kron:
        kron.fit()
        theirs = kron.scores(w.pairs)
    inf = Influence(w.model, w.tokenizer, w.corpus, task=Task(empirical_fisher=True),
                    score_args=ScoreArgs(rank=None, batch_size=batch_size, progress=False))
    inf.fit(FactorArgs(layers=layers, batch_size=batch_size, progress=False))
    ours = inf.scan(w.pairs).scores
    rho = [spearmanr(o, k).statistic for o, k in zip(ours, theirs)]
    scale = np.median(np.abs(ours).sum(1) / np.abs(theirs).sum(1))
    return dict(spearman_matched=dict(mean=round(float(np.mean(rho)), 7),
                                      min=round(float(min(rho)), 7), queries=len(rho)),
                scale_ours_over_theirs=round(float(scale), 4))


def figures(w: World, runs: dict, queries: list[int]) -> dict:
    """A configuration's report: each fit and scan ÷ the median plain fwd+bwd, and
    influence_nb ÷ kronfluence, as [median, min, max]."""
    b = float(np.median(runs["plain"]))
    fit = {lib: runs["fit", lib] for lib in LIBRARIES}
    scan = {q: {lib: runs["scan", q, lib] for lib in LIBRARIES} for q in queries}
    lengths = [len(w.corpus.token_ids(i)) for i in range(len(w.corpus))]
    return dict(
        sequences=len(w.corpus), mean_tokens=round(float(np.mean(lengths)), 1),
        plain_fwd_bwd_s=spread(runs["plain"]),
        fit_over_plain={k: spread([x / b for x in v]) for k, v in fit.items()},
        fit_ratio=spread([x / y for x, y in zip(fit["influence_nb"], fit["kronfluence"])]),
        scan_over_plain={q: {k: spread([x / b for x in v]) for k, v in s.items()}
                         for q, s in scan.items()},
        scan_ratio={q: spread([x / y for x, y in zip(s["influence_nb"], s["kronfluence"])])
                    for q, s in scan.items()})


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--configs", nargs="+", default=["reference", "short", "markov", "memorized"])
    p.add_argument("--layers", nargs="+", default=["mlp", "all"], choices=["mlp", "all"])
    p.add_argument("--queries", type=int, nargs="+", default=[1, 8, 50, 200])
    p.add_argument("--kron-batches", type=int, nargs="+", default=[32, 64, 128, 256])
    a = p.parse_args(argv)
    set_threads(1)
    short = load_world("short", max(a.queries))
    worlds = {"reference": lambda: reference(short), "short": lambda: short,
              "markov": lambda: markov(max(a.queries)),
              "memorized": lambda: load_world("memorized", max(a.queries))}
    out = dict(kronfluence=version("kronfluence"), influence_nb=version("influence_nb"),
               torch=torch.__version__, threads=torch.get_num_threads(), repeats=a.repeats,
               influence_nb_args=dict(fit=repr(FactorArgs()), score=repr(ScoreArgs())),
               configs={})
    for name in a.configs:
        w = worlds[name]()
        for layers in a.layers:
            b, sweep = best_batch(w, layers, a.kron_batches, max(a.queries))
            runs = timings(w, layers, a.queries, a.repeats, b)
            key = f"{name}/{layers}"
            out["configs"][key] = (dict(kron_batch=b, kron_sweep_fit_scan_s=sweep)
                                   | figures(w, runs, a.queries) | matched(w, layers, b))
            print(json.dumps({key: out["configs"][key]}), file=sys.stderr, flush=True)
    out["goals"] = dict(scan_ratio="≤ 1.0 at every query count", fit_ratio="≤ 0.5",
                        spearman_matched="≥ 0.9999")
    report(out)


if __name__ == "__main__":
    main()
