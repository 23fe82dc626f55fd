"""influence_nb against kronfluence 1.0.1, side by side: EK-FAC fit and scans of 1, 8, 50 and
200 queries, each ÷ a plain forward + backward over the same corpus (MLP layers, the same
token positions in ā āᵀ, damping 0.1 × mean eigenvalue), and the two libraries' scores
compared under matched conventions (empirical Fisher on both sides, influence_nb at full rank).

Three configurations (one torch thread, same process):
- ``reference``: a randomly initialised 2-layer GPT-NeoX, d = 128, on 512 demo sequences cut
  to exactly 64 tokens (long sequences, no padding);
- ``short``: the demo model on 3,150 single sentences of the demo corpus (8–24 tokens, mean
  ≈ 10: many short sequences, where per-query work dominates; ``short_world.py``);
  queries for both: the 120 planted facts' canonical prompts, then paraphrased prompts, up
  to 200;
- ``markov``: built independently of the demo world (``markov_world.py``): its trained 2-layer
  GPT-2 on its 1,000 sequences of a random second-order Markov chain, 200 queries drawn from the
  chain; the MLPs' Conv1D modules become the equal nn.Linear (weight transposed), which is
  what kronfluence tracks.

Timings use each library's default, the true Fisher (labels sampled from the model: inverse-CDF
draws here, ``torch.multinomial`` in the kronfluence task, as in its examples); the scores are
compared on a second pair of fits with deterministic labels. A scan is what a user times:
``inf.scan(pairs)`` (query gradients, preconditioning, the rank-32 truncation, the pass)
against kronfluence's ``compute_pairwise_scores`` with every query in one batch (its fastest
setting: one pass over the corpus). Each timing is repeated, the libraries alternating; the
JSON gives the median and [min, max] of each ratio.

    python benchmarks/peer_kronfluence.py [--repeats 3] [--configs reference short]

kronfluence is optional: ``pip install --no-deps kronfluence==1.0.1`` then
``pip install --no-deps accelerate opt_einsum einconv`` (see kronfluence_scores.py).
"""
import argparse
import json
import sys
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from influence_nb import demo
from influence_nb.curvature import FactorArgs
from influence_nb.data import Corpus
from influence_nb.scoring import ScoreArgs
from influence_nb.session import Influence
from influence_nb.task import Task

sys.path.insert(0, str(Path(__file__).parent))
import short_world  # noqa: E402  (benchmarks/short_world.py)
from kronfluence_scores import KronfluenceEKFAC  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--repeats", type=int, default=3)
p.add_argument("--configs", nargs="+", default=["reference", "short", "markov"])
p.add_argument("--queries", type=int, nargs="+", default=[1, 8, 50, 200])
p.add_argument("--batch-size", type=int, default=32)
a = p.parse_args()
torch.set_num_threads(1)

model_short, tokenizer, corpus_short, pairs = short_world.build(queries=max(a.queries))
corpus_demo = demo.load()[2]


def reference() -> tuple[torch.nn.Module, Corpus]:
    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=128, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=512,
                        max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id)
    ids = [i for i in range(len(corpus_demo)) if len(corpus_demo.token_ids(i)) >= 64][:512]
    texts = [tokenizer.decode(corpus_demo.token_ids(i)[:64]) for i in ids]
    corpus = Corpus.from_records([{"text": t} for t in texts], tokenizer, 64, progress=False)
    return GPTNeoXForCausalLM(cfg).eval(), corpus


def markov() -> tuple[torch.nn.Module, object, Corpus, list]:
    """The Markov world's model with its MLP Conv1D (y = x W + b) as nn.Linear (weight Wᵀ)."""
    from transformers.pytorch_utils import Conv1D

    from markov_world import build   # benchmarks/markov_world.py
    world = build(queries=max(a.queries))
    model = world.model.eval()
    batch = next(iter(world.corpus.batches(8)))
    before = Task().forward(model, batch).detach()
    for name, m in list(model.named_modules()):
        if ".mlp." in name and isinstance(m, Conv1D):
            lin = torch.nn.Linear(*m.weight.shape)
            with torch.no_grad():
                lin.weight.copy_(m.weight.T)
                lin.bias.copy_(m.bias)
            parent, child = name.rsplit(".", 1)
            setattr(model.get_submodule(parent), child, lin)
    torch.testing.assert_close(Task().forward(model, batch), before)  # the same function
    return model, world.tokenizer, world.corpus, world.pairs


def seconds(fn) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def plain(model: torch.nn.Module, corpus: Corpus, task: Task) -> None:
    for b in corpus.batches(a.batch_size):
        task.training_loss(task.forward(model, b), b).sum().backward()
    model.zero_grad(set_to_none=True)


def spread(x: list[float]) -> list[float]:
    return [round(float(np.median(x)), 3), round(min(x), 3), round(max(x), 3)]


out = dict(kronfluence=version("kronfluence"), influence_nb=version("influence_nb"),
           torch=torch.__version__, threads=torch.get_num_threads(), batch_size=a.batch_size,
           repeats=a.repeats, configs={})
for name in a.configs:
    tok, queries = tokenizer, pairs
    if name == "markov":
        model, tok, corpus, queries = markov()
    else:
        model, corpus = reference() if name == "reference" else (model_short, corpus_short)
    task = Task()  # each library's default: the true Fisher, labels sampled
    lengths = [len(corpus.token_ids(i)) for i in range(len(corpus))]
    base, fit, scan = [], {"influence_nb": [], "kronfluence": []}, {}
    plain(model, corpus, task)  # warm-up
    with KronfluenceEKFAC(model, tok, corpus, a.batch_size) as kron:
        for r in range(a.repeats):
            base.append(seconds(lambda: plain(model, corpus, task))[0])
            inf = Influence(model, tok, corpus, task=task,
                            score_args=ScoreArgs(batch_size=a.batch_size, progress=False))
            fit["influence_nb"].append(seconds(lambda: inf.fit(
                FactorArgs(batch_size=a.batch_size, progress=False)))[0])
            fit["kronfluence"].append(seconds(kron.fit)[0])
            for q in a.queries:
                s = scan.setdefault(q, {"influence_nb": [], "kronfluence": []})
                s["influence_nb"].append(seconds(lambda: inf.scan(queries[:q]))[0])
                s["kronfluence"].append(seconds(lambda: kron.scores(queries[:q]))[0])
        base.append(seconds(lambda: plain(model, corpus, task))[0])
    # matched conventions (deterministic labels on both sides; influence_nb at full rank)
    with KronfluenceEKFAC(model, tok, corpus, a.batch_size, empirical_fisher=True) as kron:
        kron.fit()
        theirs = kron.scores(queries)
    inf = Influence(model, tok, corpus, task=Task(empirical_fisher=True),
                    score_args=ScoreArgs(rank=None, batch_size=a.batch_size, progress=False))
    inf.fit(FactorArgs(batch_size=a.batch_size, progress=False))
    ours = inf.scan(queries).scores
    rho = [spearmanr(o, k).statistic for o, k in zip(ours, theirs)]
    scale = np.median(np.abs(ours).sum(1) / np.abs(theirs).sum(1))
    b = float(np.median(base))
    out["configs"][name] = dict(
        sequences=len(corpus), mean_tokens=round(float(np.mean(lengths)), 1),
        plain_fwd_bwd_s=spread(base),
        fit_over_plain={k: spread([x / b for x in v]) for k, v in fit.items()},
        fit_ratio=spread([x / y for x, y in zip(fit["influence_nb"], fit["kronfluence"])]),
        scan_over_plain={q: {k: spread([x / b for x in v]) for k, v in s.items()}
                         for q, s in scan.items()},
        scan_ratio={q: spread([x / y for x, y in zip(s["influence_nb"], s["kronfluence"])])
                    for q, s in scan.items()},
        spearman_matched=dict(mean=round(float(np.mean(rho)), 7), min=round(float(min(rho)), 7),
                              queries=len(rho)),
        scale_ours_over_theirs=round(float(scale), 4))
    print(json.dumps({name: out["configs"][name]}), file=sys.stderr, flush=True)
out["goals"] = dict(scan_ratio="≤ 1.0 at every query count", fit_ratio="≤ 0.5",
                    spearman_matched="≥ 0.9999")
print(json.dumps(out, indent=1))
