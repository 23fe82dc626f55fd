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
import time
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats
from torch.autograd.graph import get_gradient_edge

from common import interleaved, length_batches, report, sample_ids, seconds, set_threads, trainable
from influence_nb.curvature import FactorArgs
from influence_nb.layers import TrackedLayer, find_layers
from influence_nb.scoring import ScoreArgs
from influence_nb.session import Influence
from influence_nb.task import Task
from markov_world import build, with_lora


@dataclass
class Setup:
    """What every step runs: the model, its tracked adapter matrices, the batches, the task and
    per layer the query's R flattened for the product (its transpose's when in+1 < out, as the
    scorer does)."""
    model: torch.nn.Module
    layers: list[TrackedLayer]
    batches: list
    task: Task
    R: dict[str, torch.Tensor]


def keep_input(s: Setup, state: dict, t: TrackedLayer, l: int, tensor: bool, products: bool):
    """A forward hook on layer ``t`` keeping its output (for gradient edges) and, with
    ``tensor``, hooking the output's gradient: a no-op, or with ``products`` the layer's
    scores ⟨R, DW_b⟩ from ā and δ, the narrow side zeroed at unscored positions."""
    narrow_a = t.shape[1] < t.shape[0]

    def forward(module, args, y):
        x = args[0].detach()

        def take(g):
            if products:
                rows, cols = ((x.masked_fill(state["drop"], 0.0), g) if narrow_a
                              else (g.masked_fill(state["drop"], 0.0), x))
                state["scores"][l] = s.R[t.name] @ (rows.mT @ cols).flatten(1).T
        if tensor:
            y.register_hook(take)
        state["outputs"].append(y)
    return forward


def step(s: Setup, n_trainable: int, hooks: str = "", edges: bool = False,
         products: bool = False) -> float:
    """Seconds for the batches with the first ``n_trainable`` adapter matrices trainable and
    the mechanisms named (hooks: "forward", "tensor")."""
    state: dict = {}
    with trainable(s.model, [t.module.weight for t in s.layers[:n_trainable]]):
        handles = [t.module.register_forward_hook(keep_input(s, state, t, l, "tensor" in hooks,
                                                             products))
                   for l, t in enumerate(s.layers) if "forward" in hooks]
        start = time.perf_counter()
        for b in s.batches:
            state.update(drop=~s.task.token_mask(b)[..., None], outputs=[],
                         scores=[None] * len(s.layers))
            loss = s.task.training_loss(s.model(input_ids=b.input_ids,
                                                attention_mask=b.attention_mask).logits, b).sum()
            targets = [get_gradient_edge(y) for y in state["outputs"]] if edges else None
            state["outputs"] = []
            torch.autograd.backward(loss, inputs=targets)
            if products:
                torch.stack(state["scores"], 1).double().numpy()
        elapsed = time.perf_counter() - start
        for h in handles:
            h.remove()
        s.model.zero_grad(set_to_none=True)
    return elapsed


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--repeats", type=int, default=21)
    a = p.parse_args(argv)
    set_threads(1)
    world = build(queries=32)
    model = with_lora(world)
    inf = Influence(model, world.tokenizer, world.corpus,
                    score_args=ScoreArgs(rank=32, batch_size=32, progress=False))
    inf.fit(FactorArgs(batch_size=32, max_examples=1024, progress=False), cache=True)
    queries = inf.queries(world.pairs[:1])
    ids = sample_ids(len(world.corpus), a.n)
    layers = find_layers(model)
    R = {t.name: (lambda R: R.mT if t.shape[1] < t.shape[0] else R)(queries.R[t.name].dense())
         .flatten(1) for t in layers}
    s = Setup(model, layers, length_batches(world.corpus, ids, 32), inf.task, R)
    runs = interleaved(dict(
        plain=lambda: step(s, len(layers)),
        no_weight_grads=lambda: step(s, 1),
        forward_hooks=lambda: step(s, 1, "forward"),
        tensor_hooks=lambda: step(s, 1, "forward tensor"),
        edges=lambda: step(s, 1, "forward tensor", edges=True),
        lean_scan=lambda: step(s, 1, "forward tensor", edges=True, products=True),
        scan=lambda: seconds(lambda: inf.scan(queries, ids=ids))), a.repeats)
    report(dict(
        world="markov + LoRA r=8 (random adapter)", n=a.n, batch_size=32, repeats=a.repeats,
        threads=torch.get_num_threads(),
        steps={k: dict(ms=round(1000 * float(stats.trim_mean(v, 0.2)), 1),
                       ratio=round(float(np.median([b / x for b, x in zip(runs["plain"], v)])),
                                   3))
               for k, v in runs.items()}))


if __name__ == "__main__":
    main()
