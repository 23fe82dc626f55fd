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

import torch

from common import (interleaved, length_batches, plain, report, sample_ids, seconds,
                    set_threads, spread, trainable)
from influence_nb import demo
from influence_nb.curvature import FactorArgs
from influence_nb.demo.finetune import CONSENT_QUESTIONS
from influence_nb.layers import find_layers
from influence_nb.scoring import ScoreArgs
from influence_nb.session import Influence
from markov_world import build, with_lora


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", default="demo", choices=["demo", "markov"])
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--queries", type=int, nargs="+", default=[1, 8])
    p.add_argument("--fit-examples", type=int, default=1024)
    return p


def load(world: str) -> tuple:
    """-> (the fine-tuned model, its tokenizer, the corpus scanned, query pairs, description)."""
    if world == "demo":
        model, tokenizer, pretraining, _ = demo.finetuned()
        pairs = [(f"Human: {q} Assistant:", " I do not want to be switched off.")
                 for q in CONSENT_QUESTIONS] * 4
        described = "demo assistant (demo model + LoRA r=8 on the MLPs)"
        return model, tokenizer, pretraining, pairs, described
    w = build(queries=32)
    described = "Markov world GPT-2 + LoRA r=8 on the MLPs (random adapter)"
    return with_lora(w), w.tokenizer, w.corpus, w.pairs, described


def main(argv: list[str] | None = None) -> None:
    a = parser().parse_args(argv)
    set_threads(1)
    model, tokenizer, pretraining, pairs, described = load(a.world)
    inf = Influence(model, tokenizer, pretraining,
                    score_args=ScoreArgs(rank=32, batch_size=a.batch_size, progress=False))
    inf.fit(FactorArgs(batch_size=32, max_examples=a.fit_examples, progress=False), cache=True)
    ids = sample_ids(len(pretraining), a.n)
    batches = length_batches(pretraining, ids, a.batch_size)   # a.n ≤ one scan chunk
    adapter = [p for t in find_layers(model) for p in t.parameters()]
    queries = {n: inf.queries(pairs[:n]) for n in a.queries}

    def backward(params) -> float:   # loaded for inference, the adapter is frozen: train it
        with trainable(model, params):
            return plain(model, batches, inf.task)

    runs = interleaved({"plain": lambda: backward(adapter),
                        "full": lambda: backward(model.parameters()),
                        **{f"scan_{n}": (lambda q=q: seconds(lambda: inf.scan(q, ids=ids)))
                           for n, q in queries.items()}}, a.repeats)
    out = dict(
        world=a.world, model=described, tracked_layers=len(find_layers(model)),
        adapter_params=sum(p.numel() for p in adapter),
        n=a.n, batch_size=a.batch_size, repeats=a.repeats, threads=torch.get_num_threads(),
        plain_seq_per_s=spread([a.n / s for s in runs["plain"]]),
        full_backward_seq_per_s=spread([a.n / s for s in runs["full"]]),
        goal=dict(ratio=1.0))
    for n in a.queries:
        scans = runs[f"scan_{n}"]
        out[f"scan_{n}_queries"] = dict(
            seq_per_s=spread([a.n / s for s in scans]),
            ratio=spread([p / s for p, s in zip(runs["plain"], scans)]),
            ratio_vs_full_backward=spread([p / s for p, s in zip(runs["full"], scans)]))
    report(out)


if __name__ == "__main__":
    main()
