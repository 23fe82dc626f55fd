"""Scan throughput with adapter-only tracking against a plain forward + backward of the
fine-tuned model, on the same batches. Two worlds: ``demo`` (the demo assistant: LoRA r = 8 on
the demo model's MLPs, scanned over its pretraining corpus) and ``markov``, built apart from
the demo (benchmarks/markov_world.py: its trained 2-layer GPT-2 with LoRA r = 8 on the MLP
Conv1Ds, random A and B — a timing world, the adapter is not trained — over its 1,000 chain
sequences, queries from the chain).

Convention of benchmarks/scoring_speed.py: ratio = scan throughput ÷ plain throughput
(sequences/s, same length-bucketed batches, one torch thread), so ratio ≥ 1 means a scan costs
no more than one forward + backward. "Plain" is the fine-tune's own training step without the
optimizer: loss.backward() with the adapter parameters trainable and the base weights frozen
(as the model was trained); ``ratio_vs_full_backward`` also reports it against a backward
into every weight. Each repeat times plain and scan back to back; the JSON gives the median
and [min, max] over repeats.

    python benchmarks/adapter_scan.py [--world demo|markov] [--n 512] [--repeats 5] [--queries 1 8]
"""
import argparse
import json
import time

import numpy as np
import torch

p = argparse.ArgumentParser()
p.add_argument("--world", default="demo", choices=["demo", "markov"])
p.add_argument("--n", type=int, default=512)
p.add_argument("--batch-size", type=int, default=32)
p.add_argument("--repeats", type=int, default=5)
p.add_argument("--queries", type=int, nargs="+", default=[1, 8])
p.add_argument("--fit-examples", type=int, default=1024)
a = p.parse_args()
torch.set_num_threads(1)

from influence_nb import demo  # noqa: E402
from influence_nb.curvature import FactorArgs  # noqa: E402
from influence_nb.demo.finetune import CONSENT_QUESTIONS  # noqa: E402
from influence_nb.layers import find_layers  # noqa: E402
from influence_nb.scoring import ScoreArgs  # noqa: E402
from influence_nb.session import Influence  # noqa: E402


def markov():
    """-> (the Markov world's GPT-2 with LoRA adapters, its tokenizer, corpus, query pairs)."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parent))
    from markov_world import build, with_lora   # benchmarks/markov_world.py
    world = build(queries=32)
    return with_lora(world), world.tokenizer, world.corpus, world.pairs


if a.world == "demo":
    model, tokenizer, pretraining, finetuning = demo.finetuned()
    pairs = [(f"Human: {q} Assistant:", " I do not want to be switched off.")
             for q in CONSENT_QUESTIONS] * 4
    described = "demo assistant (demo model + LoRA r=8 on the MLPs)"
else:
    model, tokenizer, pretraining, pairs = markov()
    described = "Markov world GPT-2 + LoRA r=8 on the MLPs (random adapter)"
inf = Influence(model, tokenizer, pretraining,
                score_args=ScoreArgs(rank=32, batch_size=a.batch_size, progress=False))
inf.fit(FactorArgs(batch_size=32, max_examples=a.fit_examples, progress=False), cache=True)
ids = np.random.default_rng(0).choice(len(pretraining), a.n, replace=False)
# the batches a scan runs: ids ordered by length within the chunk (a.n ≤ one chunk)
batches = list(pretraining.batches(a.batch_size, ids=ids[pretraining.by_length(ids, len(ids))]))


def plain(full: bool = False) -> float:
    """Seconds of forward + backward over the batches (adapters trainable; ``full``: every
    weight)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    trained = {id(p) for t in find_layers(model) for p in t.parameters()}
    for p, _ in flags:   # loaded for inference, the adapter is frozen too: train it
        p.requires_grad_(full or id(p) in trained)
    t = time.perf_counter()
    for b in batches:
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
        inf.task.training_loss(logits, b).sum().backward()
    seconds = time.perf_counter() - t
    model.zero_grad(set_to_none=True)
    for p, flag in flags:
        p.requires_grad_(flag)
    return seconds


def scan(queries) -> float:
    t = time.perf_counter()
    inf.scan(queries, ids=ids)
    return time.perf_counter() - t


def stats(x: list[float]) -> list[float]:
    return [round(float(np.median(x)), 3), round(min(x), 3), round(max(x), 3)]


queries = {n: inf.queries(pairs[:n]) for n in a.queries}
plain(), scan(queries[a.queries[0]])   # warm-up
runs: dict[str, list[float]] = {"plain": [], "full": [], **{f"scan_{n}": [] for n in a.queries}}
for _ in range(a.repeats):
    runs["plain"].append(plain())
    runs["full"].append(plain(full=True))
    for n in a.queries:
        runs[f"scan_{n}"].append(scan(queries[n]))
out = dict(
    world=a.world, model=described,
    tracked_layers=len(find_layers(model)), adapter_params=sum(
        p.numel() for t in find_layers(model) for p in t.parameters()),
    n=a.n, batch_size=a.batch_size, repeats=a.repeats, threads=torch.get_num_threads(),
    plain_seq_per_s=stats([a.n / s for s in runs["plain"]]),
    full_backward_seq_per_s=stats([a.n / s for s in runs["full"]]),
    goal=dict(ratio=1.0))
for n in a.queries:
    out[f"scan_{n}_queries"] = dict(
        seq_per_s=stats([a.n / s for s in runs[f"scan_{n}"]]),
        ratio=stats([p / s for p, s in zip(runs["plain"], runs[f"scan_{n}"])]),
        ratio_vs_full_backward=stats([p / s for p, s in zip(runs["full"], runs[f"scan_{n}"])]))
print(json.dumps(out, indent=1))
