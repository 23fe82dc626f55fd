"""Real size: the models researchers load, at their widths and vocabularies (random init: no
download), on random token sequences — time and peak memory of a fit and of scans at several
query counts, against a plain forward + backward on the same batches, and what `plan`
predicted beforehand.

Each stage runs in a fresh process (one torch thread), so its peak RSS (VmHWM) is its own:
model + factors + one batch's activations + the stated budgets; the plain baseline runs after
the stage, in the same process. The fit's per-sequence ratio leaves out its fixed costs,
reported apart: the eigendecompositions and a small corpus's extra Fisher draws. Prints JSON.

    python benchmarks/real_size.py --shape gpt2-4 --tokens 128 --sequences 32 --queries 1 50 200
    python benchmarks/real_size.py --shape llama-0.5b --tokens 128 --sequences 4 --blocks 4
    python benchmarks/real_size.py --shape gpt2-12 --queries 200 --precision float32 bfloat16

``--precision``: the scans' ``ScoreArgs(precision=...)``, each scanned (and planned) in turn
from the same fit. ``--sketch``: also a stage that builds the corpus's sketch store at the
default ``SketchArgs`` (its time, peak and size on disk, against the plan's).

Shapes: gpt2-4 / gpt2-12 (GPT-2 small widths: d 768, MLP 3,072, vocabulary 50,257; 4 or 12
blocks), pythia-160m (GPT-NeoX, vocabulary 50,304, untied head), llama-0.5b (d 1,536, SwiGLU MLP
4,096, 16 blocks, grouped-query attention 12/4 heads, RoPE, RMSNorm, vocabulary 32,000).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

from common import (ChildFailed, World, one_thread_env, plain, report, reset_peak, run_child,
                    set_threads, status_mib)
from influence_nb import Corpus, FactorArgs, Influence, ScoreArgs
from influence_nb.projection import SketchArgs, resolve_variant
from influence_nb.sketch import build_sketches
from influence_nb.batching import source
from influence_nb.layers import find_layers
from influence_nb.scoring import scan_tokens
from influence_nb.task import Task

SHAPES = {
    "gpt2-4": ("GPT2Config", dict(n_layer=4, n_embd=768, n_head=12, vocab_size=50257,
                                  n_positions=1024)),
    "gpt2-12": ("GPT2Config", dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257,
                                   n_positions=1024)),
    "pythia-160m": ("GPTNeoXConfig", dict(vocab_size=50304, hidden_size=768, num_hidden_layers=12,
                                          num_attention_heads=12, intermediate_size=3072,
                                          rotary_pct=0.25, max_position_embeddings=2048,
                                          use_parallel_residual=True, tie_word_embeddings=False)),
    "llama-0.5b": ("LlamaConfig", dict(vocab_size=32000, hidden_size=1536, intermediate_size=4096,
                                       num_hidden_layers=16, num_attention_heads=12,
                                       num_key_value_heads=4, max_position_embeddings=2048,
                                       tie_word_embeddings=False)),
}


class StockLoss(Task):
    """A user's training step's loss: torch's cross-entropy summed over every position (the
    sequences are random tokens, all full length), the whole (B·T, V) log-softmax at once."""

    def training_loss(self, logits: torch.Tensor, batch: object) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1),
                                                 batch.input_ids[:, 1:].flatten(),
                                                 reduction="sum")


def peak_gb() -> float:
    """This process's peak resident memory since the last reset, GB."""
    return status_mib("VmHWM") / 1024


def world(shape: str, tokens: int, sequences: int, queries: int) -> World:
    """The shape at random init on random token sequences, and random queries: seeded, so every
    stage's process builds the same."""
    torch.manual_seed(0)
    kind, kw = SHAPES[shape]
    config = getattr(transformers, kind)(**kw)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    V = config.vocab_size
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(V)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0",
                                                     pad_token="t0")
    rng = np.random.default_rng(0)
    text = lambda n: " ".join(f"t{i}" for i in rng.integers(1, V, n))  # noqa: E731
    corpus = Corpus.from_texts([text(tokens) for _ in range(sequences)], tokenizer, tokens)
    pairs = [(text(16), text(4)) for _ in range(queries)]
    return World(model, tokenizer, corpus, pairs)


def scan_alone_args(doc: str, tokens: int, sequences: int, repeats: int) -> argparse.Namespace:
    """The command line of a benchmark that times scans alone on one of :data:`SHAPES` (random
    queries, no fit: ``precision_speed.py``, ``scoring_paths.py``), with its defaults."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--shape", choices=SHAPES, default="gpt2-4")
    p.add_argument("--tokens", type=int, default=tokens)
    p.add_argument("--sequences", type=int, default=sequences)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--layers", default="mlp")
    p.add_argument("--repeats", type=int, default=repeats)
    return p.parse_args()


def plain_seconds(model, corpus, batch_tokens: int) -> float:
    """A plain training step's forward + backward (parameter gradients formed, then dropped) over
    the corpus in the batches a scan uses, seconds."""
    batches = (b for _, b in source(corpus, None, tokens=batch_tokens).batches())
    return plain(model, batches, StockLoss(), zero_each_batch=True)


def stage(a: argparse.Namespace) -> dict:
    """One stage in this process: "fit" (saves factors to a.dir), "scan" with a.q queries or
    "sketch" (the store in a.dir/sketches)."""
    set_threads(1)
    if a.spill_bytes is not None:   # where many queries' factors go to a file (spill.py)
        import influence_nb.plan
        import influence_nb.queries
        influence_nb.queries.SPILL_BYTES = influence_nb.plan.SPILL_BYTES = a.spill_bytes
    model, tokenizer, corpus, pairs = world(a.shape, a.tokens, a.sequences, a.q or 1)
    for p in model.parameters():
        p.requires_grad_(True)
    fargs = FactorArgs(layers=a.layers, blocks=a.blocks, eigh_precision=a.eigh_precision,
                       draws=a.draws, progress=False)
    sargs = ScoreArgs(progress=False, per_layer=False, precision=a.precision[0])
    inf = Influence(model, tokenizer, corpus, score_args=sargs)
    out = {"model_gb": sum(p.numel() * p.element_size() for p in model.parameters()) / 2 ** 30}
    # the stage first, then the plain baseline: the allocator keeps what a pass frees, so a
    # stage measured after the baseline would carry the baseline's memory in its peak
    if a.stage == "fit":   # planned before anything else has run in this process, as a user would
        sketch = SketchArgs(progress=False) if a.sketch else None
        out["plan"] = {p: inf.plan(fargs, replace(sargs, precision=p), queries=a.queries,
                                   sketch=sketch).summary() for p in a.precision}
        reset_peak()
        start = time.perf_counter()
        factors = inf.fit(fargs, path=a.dir)
        out |= {"fit_s": time.perf_counter() - start, "fit_peak_gb": peak_gb(),
                "timings_s": getattr(factors, "timings", None),
                "draws": getattr(factors.args, "draws", None),
                "factors_gb": sum(f.stat().st_size for f in Path(a.dir).glob("*.safetensors"))
                / 2 ** 30}
    elif a.stage == "sketch":
        factors = inf.load_factors(a.dir)
        shutil.rmtree(Path(a.dir) / "sketches", ignore_errors=True)   # built anew, not resumed
        reset_peak()
        start = time.perf_counter()
        store = build_sketches(model, factors, corpus, Path(a.dir) / "sketches",
                               SketchArgs(progress=False))
        out |= {"sketch_s": time.perf_counter() - start, "sketch_peak_gb": peak_gb(),
                "store_gb": sum(f.stat().st_size for f in store.path.iterdir()) / 2 ** 30,
                "exact": store.exact is not None,
                "variant": resolve_variant(factors, SketchArgs())}
    else:
        inf.load_factors(a.dir)
        reset_peak()
        start = time.perf_counter()
        queries = inf.queries(pairs[:a.q])
        prepared = time.perf_counter()
        inf.scan(queries)
        out |= {"queries": a.q, "prepare_s": prepared - start,
                "scan_s": time.perf_counter() - prepared, "scan_peak_gb": peak_gb()}
    reset_peak()
    base = plain_seconds(model, corpus, scan_tokens(model, find_layers(model, a.layers),
                                                    sargs.batch_tokens))
    return out | {"plain_s_per_seq": base / a.sequences, "plain_peak_gb": peak_gb()}


def run(args: list[str]) -> dict:
    """A stage's figures from a fresh one-thread process, or {"error": its last stderr line}."""
    try:
        return json.loads(run_child([__file__, *args], env=one_thread_env()))
    except ChildFailed as e:
        return {"error": str(e).splitlines()[-1]}


def compare(fit: dict, scans: dict, precision: str, sketch: dict | None = None) -> dict:
    """What the plan predicted ÷ what was measured (1.0: exact; the goal is within ±30 %)."""
    plan = (fit.get("plan") or {}).get(precision)
    if not plan:
        return {}
    p, t, held = plan["seconds"], fit.get("timings_s") or {}, plan["resident_gb"]
    out = {"fit_passes_s": [p["covariance"] + p.get("eigenvalues", 0),
                            t.get("covariance", 0) + t.get("eigenvalues", 0)],
           "draws_s": [p.get("draws", 0), t.get("draws")],
           "eigendecomposition_s": [p["eigendecomposition"], t.get("eigendecomposition")],
           "fit_peak_gb": [held + plan["fit_peak_gb"], fit["fit_peak_gb"]]}
    for q, s in scans.items():
        if "error" not in s and f"scan {q}" in p:
            out[f"scan {q}_s"] = [p[f"scan {q}"], s["scan_s"]]
            out[f"prepare {q}_s"] = [p[f"prepare {q}"], s["prepare_s"]]
            out[f"scan {q}_peak_gb"] = [held + plan["scan_peak_gb"][str(q)], s["scan_peak_gb"]]
    if sketch and "sketch_peak_gb" in plan and "error" not in sketch:
        out |= {"sketch_s": [p[f"sketch {sketch['variant']}"], sketch["sketch_s"]],
                "sketch_peak_gb": [held + plan["sketch_peak_gb"], sketch["sketch_peak_gb"]],
                "store_gb": [plan["store_gb"], sketch["store_gb"]]}
    return {k: [round(v[0], 2), round(v[1], 2), round(v[0] / v[1], 3)] for k, v in out.items()
            if v[1]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=SHAPES, default="gpt2-4")
    p.add_argument("--tokens", type=int, default=128, help="tokens per sequence")
    p.add_argument("--sequences", type=int, default=32)
    p.add_argument("--queries", type=int, nargs="+", default=[1, 50, 200])
    p.add_argument("--layers", default="mlp")
    p.add_argument("--blocks", type=int, default=1)
    p.add_argument("--eigh-precision", default="float64", choices=["float64", "float32"])
    p.add_argument("--precision", nargs="+", default=["float32"], choices=["float32", "bfloat16"],
                   help="ScoreArgs(precision=...) of the scans, each in turn")
    p.add_argument("--draws", type=int, default=None,
                   help="FactorArgs(draws=...); default None: the fit chooses (a few sequences "
                        "of wide layers choose many, see docs/design.md)")
    p.add_argument("--spill-bytes", type=int, default=None,
                   help="queries' factors beyond this many bytes spill to a file (default: "
                        "spill.SPILL_BYTES); a large value keeps them in memory, for an A/B")
    p.add_argument("--keep", default=None,
                   help="a folder for the fit (factors and its figures): a later run with the "
                        "same shape, tokens, sequences and fit flags reuses it instead of fitting")
    p.add_argument("--sketch", action="store_true",
                   help="also build the corpus's sketch store (default SketchArgs) in a stage")
    p.add_argument("--stage", choices=["fit", "scan", "sketch"], help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    p.add_argument("--q", type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.stage:
        report(stage(a), indent=None)
        return
    common = [f"--shape={a.shape}", f"--tokens={a.tokens}", f"--sequences={a.sequences}",
              f"--layers={a.layers}", f"--blocks={a.blocks}",
              f"--eigh-precision={a.eigh_precision}",
              *([f"--draws={a.draws}"] if a.draws else []),
              *([f"--spill-bytes={a.spill_bytes}"] if a.spill_bytes is not None else []),
              *(["--sketch"] if a.sketch else []),
              "--queries", *map(str, a.queries)]
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(a.keep or tmp)
        d.mkdir(parents=True, exist_ok=True)
        key = json.dumps([a.shape, a.tokens, a.sequences, a.layers, a.blocks, a.eigh_precision,
                          a.draws, a.precision, a.sketch])
        kept = d / "fit.json"
        earlier = json.loads(kept.read_text()) if kept.exists() else {}
        if earlier.get("key") == key:
            fit = earlier["fit"] | {"reused": str(d)}
        else:
            fit = run([*common, "--precision", *a.precision, "--stage=fit", f"--dir={d}"])
            if "error" not in fit:   # a failed fit is not kept for the next run to reuse
                kept.write_text(json.dumps({"key": key, "fit": fit}))
        scans = {p: {q: run([*common, "--precision", p, "--stage=scan", f"--dir={d}", f"--q={q}"])
                     for q in a.queries} for p in a.precision} if "error" not in fit else {}
        sketch = run([*common, "--precision", a.precision[0], "--stage=sketch", f"--dir={d}"]) \
            if a.sketch and "error" not in fit else None
    out = {"shape": a.shape, "tokens": a.tokens, "sequences": a.sequences, "layers": a.layers,
           "blocks": a.blocks, "eigh_precision": a.eigh_precision, "spill_bytes": a.spill_bytes,
           "fit": fit, "scans": scans, "sketch": sketch, "machine": os.uname().nodename,
           "load": os.getloadavg()[0]}
    if "error" not in fit:
        t = fit.get("timings_s") or {}
        # fixed costs, apart: the eigendecompositions (cubic in the widths) and a small corpus's
        # extra Fisher draws (they top S up to a sample size set by the widths, not the corpus)
        fixed = ("eigendecomposition", "draws")
        per_seq = sum(v for k, v in t.items() if k not in fixed) / a.sequences
        out["fit_per_seq_over_plain"] = per_seq / fit["plain_s_per_seq"] if t else None
        out["fit_fixed_s"] = {k: t.get(k, 0.0) for k in fixed}
        out["scan_over_plain"] = {p: {q: s["scan_s"] / a.sequences / s["plain_s_per_seq"]
                                      for q, s in by_q.items() if "error" not in s}
                                  for p, by_q in scans.items()}
        out["plan_vs_measured"] = {p: compare(fit, by_q, p, sketch if p == a.precision[0]
                                              else None) for p, by_q in scans.items()}
    report(out)


if __name__ == "__main__":
    main()
