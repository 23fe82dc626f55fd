"""The corpus pass against another checkout of influence_nb (e.g. the previous commit), side by
side in one run: speed ratios to a plain forward + backward, and peak memory. Prints JSON.

    git worktree add /tmp/before HEAD~1
    python benchmarks/pass_compare.py --before /tmp/before [--repeats 3]

Each measurement runs in a fresh subprocess with one torch thread, alternating between the two
trees (``PYTHONPATH``), ``--repeats`` times; the JSON gives the median and the spread (min, max)
of each figure per tree. Figures:

The speed figures are measured on the demo world (``fit``, ``scan``, ``sketch``) and on an
independent one (``*_wide``: the wider tiny GPT-NeoX below at random init, on 128 sequences of
random tokens, queries cut from its own sequences; 128 sequences for every figure).

- ``fit_ratio``: EK-FAC fit (2 passes) ÷ plain forward + backward, same batches (demo model,
  512 sequences, batch 16);
- ``scan_1q_ratio`` / ``scan_50q_ratio``: plain fwd+bwd throughput ÷ scan throughput for 1 and
  50 queries at rank 32 (1,024 sequences, batch 32): a ratio of times, lower is better;
- ``sketch_ratio``: sketch build (m = 256) ÷ plain fwd+bwd (1,024 sequences, batch 32);
- ``fit_peak_mb`` / ``scan_peak_mb``: the rise of the process's peak resident memory during a
  fit (or a one-query scan) at batch 32 (VmHWM reset just before it), on the demo model and on
  a wider tiny GPT-NeoX (hidden 512, MLP 2048, 4 layers, 128-token sequences);
  ``plain_peak_mb``: the same for one plain forward + backward at batch 32, the floor.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from common import (ChildFailed, encode, fact_pairs, interleaved, length_batches,
                    one_thread_env, plain, report, reset_peak, run_child, sample_ids,
                    set_threads, spread, status_mib)

# The child imports influence_nb inside its functions: from the tree under test (PYTHONPATH).

KINDS = ("fit", "scan", "sketch", "fit_wide", "scan_wide", "sketch_wide", "fit_memory_demo",
         "fit_memory_wide", "scan_memory_demo", "scan_memory_wide")


def wide_world() -> tuple:
    """(model, tokenizer, corpus): the wider tiny GPT-NeoX at random init on 128 sequences of
    random demo-tokenizer tokens."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from influence_nb import demo
    from influence_nb.data import Corpus
    _, tokenizer, _ = demo.load()
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(
        vocab_size=len(tokenizer), hidden_size=512, intermediate_size=2048,
        num_hidden_layers=4, num_attention_heads=8, max_position_embeddings=128)).eval()
    rng = np.random.default_rng(0)
    texts = [" ".join(tokenizer.convert_ids_to_tokens(rng.integers(10, len(tokenizer), 200)
                                                       .tolist())) for _ in range(128)]
    return model, tokenizer, Corpus.from_texts(texts, tokenizer, max_len=128)


def fit_ratio(model, corpus, n: int) -> dict:
    """EK-FAC fit of n sequences (batch 16) ÷ plain fwd+bwd over the fit's batches."""
    from influence_nb.curvature import FactorArgs, fit_factors
    ids = np.arange(n)
    batches = length_batches(corpus, ids, 16, window=64 * 16)
    plain(model, batches[:2])  # warm-up
    base = plain(model, batches)
    t = time.perf_counter()
    fit_factors(model, corpus, FactorArgs(batch_size=16, max_examples=n, progress=False))
    return dict(fit_ratio=(time.perf_counter() - t) / base, plain_s=base)


def queries_of(tokenizer, corpus, wide: bool) -> tuple[list, list]:
    """50 (prompt, completion) token ids: on the wide world a span of a training sequence
    and the 3 tokens after it, on the demo world the planted facts."""
    if wide:
        seqs = [corpus.token_ids(i).tolist() for i in range(50)]
        return [s[:8] for s in seqs], [s[8:11] for s in seqs]
    from influence_nb import demo
    return encode(tokenizer, fact_pairs((demo.facts() * 2)[:50]))


def pass_ratios(kind: str, model, tokenizer, corpus, n: int) -> dict:
    """A scan (1 and 50 queries, rank 32) or a sketch build (m = 256) of n sequences ÷ plain
    fwd+bwd over the same batches (batch 32)."""
    from influence_nb.curvature import FactorArgs, fit_factors
    from influence_nb.queries import make_queries
    from influence_nb.scoring import ScoreArgs, scan
    from influence_nb.sketch import SketchArgs, build_sketches
    factors = fit_factors(model, corpus, FactorArgs(batch_size=32, max_examples=256,
                                                    progress=False))
    ids = sample_ids(len(corpus), n)
    batches = length_batches(corpus, ids, 32)
    plain(model, batches[:2])
    base = plain(model, batches)
    out = {"plain_s": base}
    if kind.startswith("scan"):
        prompts, completions = queries_of(tokenizer, corpus, kind.endswith("wide"))
        for q in (1, 50):
            queries = make_queries(model, factors, prompts[:q], completions[:q], rank=32)
            t = time.perf_counter()
            scan(model, queries, corpus, ScoreArgs(batch_size=32, progress=False), ids=ids)
            out[f"scan_{q}q_ratio"] = (time.perf_counter() - t) / base
        return out
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        build_sketches(model, factors, corpus, tmp, SketchArgs(m=256, progress=False), ids=ids)
        out["sketch_ratio"] = (time.perf_counter() - t) / base
    return out


def peak_rise(kind: str, model, tokenizer, corpus) -> dict:
    """{fit, scan}_memory_{demo, wide}: the rise of peak resident memory during a fit or a
    one-query scan at batch 32, and during one plain fwd+bwd at batch 32 (the floor)."""
    from influence_nb.curvature import FactorArgs, fit_factors
    from influence_nb.queries import make_queries
    from influence_nb.scoring import ScoreArgs, scan
    n = 512 if kind.endswith("demo") else 128
    batches = list(corpus.batches(32, ids=np.arange(32)))
    plain(model, batches)  # warm-up: the allocator's pools for one fwd+bwd at batch 32
    if kind.startswith("scan"):
        factors = fit_factors(model, corpus, FactorArgs(batch_size=32, max_examples=64,
                                                        progress=False))
        ids = tokenizer("a b c")["input_ids"]
        q = make_queries(model, factors, [ids[:2]], [ids[2:]], rank=32)
    before = status_mib("VmRSS")
    reset_peak()
    plain(model, batches)  # what one training step's forward + backward takes
    plain_rise = status_mib("VmHWM") - before
    before = status_mib("VmRSS")
    reset_peak()
    if kind.startswith("scan"):
        scan(model, q, corpus, ScoreArgs(batch_size=32, progress=False), ids=np.arange(n))
    else:
        fit_factors(model, corpus, FactorArgs(batch_size=32, max_examples=n, progress=False))
    return dict(peak_rise_mb=status_mib("VmHWM") - before, plain_peak_rise_mb=plain_rise,
                rss_before_mb=before)


def child(kind: str) -> dict:
    """One measurement in this process (run with the tree under test on PYTHONPATH)."""
    import influence_nb
    from influence_nb import demo
    set_threads(1)
    wide = kind.endswith("wide")
    model, tokenizer, corpus = wide_world() if wide else demo.load()
    out = dict(tree=str(Path(influence_nb.__file__).parent.parent))
    if "memory" in kind:
        return out | peak_rise(kind, model, tokenizer, corpus)
    if kind.split("_")[0] == "fit":
        return out | fit_ratio(model, corpus, 128 if wide else 512)
    return out | pass_ratios(kind, model, tokenizer, corpus, 128 if wide else 1024)


def in_child(kind: str, name: str, root: Path, before: str) -> dict:
    """:func:`child` in a fresh one-thread process with the tree ``root`` on PYTHONPATH."""
    # large blocks straight from mmap, returned on free: resident memory follows the live
    # tensors, so the peak is theirs, not the allocator's cache
    env = one_thread_env(PYTHONPATH=str(root), MALLOC_MMAP_THRESHOLD_="65536")
    try:
        line = run_child([__file__, "--before", before, "--child", kind], env=env, cwd=root)
    except ChildFailed as e:
        raise SystemExit(f"{name} {kind} failed:\n{e}") from None
    row = json.loads(line)
    assert Path(row["tree"]) == root, f"{name} imported {row['tree']}, not {root}"
    return row


def label(key: str, kind: str) -> str:
    """The report's name of a child's figure ``key`` measured by ``kind``."""
    if "peak" not in key:
        return f"{key}_wide" if kind.endswith("wide") else key
    return f"{'plain' if key.startswith('plain') else kind.split('_')[0]}_peak_mb_" \
        f"{kind.split('_')[-1]}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", required=True, help="the other checkout (its root directory)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        report(child(a.child), indent=None)
        return
    trees = {"before": Path(a.before).resolve(), "after": Path(__file__).resolve().parent.parent}
    kinds = a.kinds.split(",")
    runs = interleaved({(kind, name): (lambda kind=kind, name=name, root=root:
                                       in_child(kind, name, root, a.before))
                        for kind in kinds for name, root in trees.items()},
                       a.repeats, warmup=False)   # alternating, so machine load hits both alike
    out: dict = {"repeats": a.repeats, "threads": 1,
                 "trees": {k: str(v) for k, v in trees.items()}}
    for name in trees:
        out[name] = {label(key, kind): dict(zip(("median", "min", "max"),
                                                spread(r[key] for r in runs[kind, name])))
                     for kind in kinds for key in runs[kind, name][0]
                     if key not in ("tree", "plain_s", "rss_before_mb")}
    report(out)


if __name__ == "__main__":
    main()
