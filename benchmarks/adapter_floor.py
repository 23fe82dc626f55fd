"""Where an adapter-only scan's time goes, against the fine-tune's own step, on the Markov world
(benchmarks/markov_world.py: 2-layer GPT-2, d = 64, LoRA r = 8 on both MLP Conv1Ds, 8 tracked
matrices), built up one mechanism at a time and timed side by side (interleaved repeats, one
torch thread, the same length-bucketed batches):

    plain            forward + backward with the adapter matrices trainable (adapter_scan.py's)
    no_weight_grads  the same, only the first adapter matrix trainable: the backward still
                     reaches every layer, seven weight-gradient products fewer
    forward_hooks    + a forward hook per tracked matrix keeping its input ā
    tensor_hooks     + a no-op hook on each tracked output's gradient
    edges            the backward runs to the outputs' gradient edges instead of a weight
    lean_scan        + the narrow side zeroed at unscored positions and ⟨R, DW_b⟩ per layer by
                     the scorer's batched product: a hand-written minimal scan, the floor of this
                     design (hooks + per-sequence products)
    scan             influence_nb's scan (Influence.scan) of the same sequences

-> JSON: per step the trimmed mean (20 %) in ms and the median ratio plain ÷ step.

    python benchmarks/adapter_floor.py [--n 512] [--repeats 21]
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats
from torch.autograd.graph import get_gradient_edge

p = argparse.ArgumentParser()
p.add_argument("--n", type=int, default=512)
p.add_argument("--repeats", type=int, default=21)
a = p.parse_args()
torch.set_num_threads(1)

from influence_nb.curvature import FactorArgs  # noqa: E402
from influence_nb.layers import find_layers  # noqa: E402
from influence_nb.scoring import ScoreArgs  # noqa: E402
from influence_nb.session import Influence  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from markov_world import build, with_lora  # noqa: E402

world = build(queries=32)
model = with_lora(world)
inf = Influence(model, world.tokenizer, world.corpus,
                score_args=ScoreArgs(rank=32, batch_size=32, progress=False))
inf.fit(FactorArgs(batch_size=32, max_examples=1024, progress=False), cache=True)
queries = inf.queries(world.pairs[:1])
ids = np.random.default_rng(0).choice(len(world.corpus), a.n, replace=False)
batches = list(world.corpus.batches(32, ids=ids[world.corpus.by_length(ids, len(ids))]))
layers = find_layers(model)
# R per layer, flattened for the product (its transpose's when in+1 < out, as the scorer does)
R = {t.name: (lambda R: R.mT if t.shape[1] < t.shape[0] else R)(queries.R[t.name].dense())
     .flatten(1) for t in layers}
task = inf.task


def step(trainable: int, hooks: str = "", edges: bool = False, products: bool = False) -> float:
    """Seconds for the batches with the first ``trainable`` adapter matrices trainable and the
    mechanisms named (hooks: "forward", "tensor")."""
    flags = [(q, q.requires_grad) for q in model.parameters()]
    for q, _ in flags:
        q.requires_grad_(False)
    for t in layers[:trainable]:
        t.module.weight.requires_grad_(True)
    state: dict = {}

    def hook(t, l):
        narrow_a = t.shape[1] < t.shape[0]

        def forward(module, args, y):
            x = args[0].detach()

            def take(g):
                if products:
                    rows, cols = ((x.masked_fill(state["drop"], 0.0), g) if narrow_a
                                  else (g.masked_fill(state["drop"], 0.0), x))
                    state["scores"][l] = R[t.name] @ (rows.mT @ cols).flatten(1).T
            if "tensor" in hooks:
                y.register_hook(take)
            state["outputs"].append(y)
        return forward

    handles = [t.module.register_forward_hook(hook(t, l)) for l, t in enumerate(layers)
               if "forward" in hooks]
    start = time.perf_counter()
    for b in batches:
        state.update(drop=~task.token_mask(b)[..., None], outputs=[], scores=[None] * len(layers))
        loss = task.training_loss(model(input_ids=b.input_ids,
                                        attention_mask=b.attention_mask).logits, b).sum()
        targets = [get_gradient_edge(y) for y in state["outputs"]] if edges else None
        state["outputs"] = []
        torch.autograd.backward(loss, inputs=targets)
        if products:
            torch.stack(state["scores"], 1).double().numpy()
    seconds = time.perf_counter() - start
    for h in handles:
        h.remove()
    model.zero_grad(set_to_none=True)
    for q, flag in flags:
        q.requires_grad_(flag)
    return seconds


def scan() -> float:
    start = time.perf_counter()
    inf.scan(queries, ids=ids)
    return time.perf_counter() - start


steps = dict(plain=lambda: step(len(layers)),
             no_weight_grads=lambda: step(1),
             forward_hooks=lambda: step(1, "forward"),
             tensor_hooks=lambda: step(1, "forward tensor"),
             edges=lambda: step(1, "forward tensor", edges=True),
             lean_scan=lambda: step(1, "forward tensor", edges=True, products=True),
             scan=scan)
runs: dict[str, list[float]] = {k: [] for k in steps}
for f in steps.values():   # warm-up
    f()
for _ in range(a.repeats):
    for k, f in steps.items():
        runs[k].append(f())
print(json.dumps(dict(
    world="markov + LoRA r=8 (random adapter)", n=a.n, batch_size=32, repeats=a.repeats,
    threads=torch.get_num_threads(),
    steps={k: dict(ms=round(1000 * float(stats.trim_mean(v, 0.2)), 1),
                   ratio=round(float(np.median([p / s for p, s in zip(runs["plain"], v)])), 3))
           for k, v in runs.items()}), indent=1))
