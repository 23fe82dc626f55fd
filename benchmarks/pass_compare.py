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
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _rss_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux)
    except OSError:
        pass


def child(kind: str) -> dict:
    """One measurement in this process (run with the tree under test on PYTHONPATH)."""
    import numpy as np
    import torch

    import influence_nb
    from influence_nb.curvature import FactorArgs, fit_factors
    from influence_nb.queries import make_queries
    from influence_nb.scoring import ScoreArgs, scan
    from influence_nb.sketch import SketchArgs, build_sketches
    from influence_nb.task import Task
    torch.set_num_threads(1)
    task = Task()

    def plain(model, batches) -> float:
        t = time.perf_counter()
        for b in batches:
            task.training_loss(task.forward(model, b), b).sum().backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    wide = kind.endswith("wide")
    if not wide:
        from influence_nb import demo
        model, tokenizer, corpus = demo.load()
    else:  # the wider tiny model, random tokens
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
        corpus = Corpus.from_texts(texts, tokenizer, max_len=128)
    out = dict(tree=str(Path(influence_nb.__file__).parent.parent))
    n_fit, n_scan = (128, 128) if wide else (512, 1024)
    if kind.split("_")[0] == "fit" and "memory" not in kind:
        args = FactorArgs(batch_size=16, max_examples=n_fit, progress=False)
        ids = np.arange(n_fit)
        batches = list(corpus.batches(16, ids=ids[corpus.by_length(ids, 64 * 16)]))
        plain(model, batches[:2])  # warm-up
        base = plain(model, batches)
        t = time.perf_counter()
        fit_factors(model, corpus, args)
        out.update(fit_ratio=(time.perf_counter() - t) / base, plain_s=base)
    elif kind.split("_")[0] in ("scan", "sketch") and "memory" not in kind:
        factors = fit_factors(model, corpus, FactorArgs(batch_size=32, max_examples=256,
                                                        progress=False))
        ids = np.random.default_rng(0).choice(len(corpus), n_scan, replace=False)
        batches = list(corpus.batches(32, ids=ids[corpus.by_length(ids, len(ids))]))
        plain(model, batches[:2])
        base = plain(model, batches)
        out["plain_s"] = base
        if kind.startswith("scan"):
            if wide:  # queries: a span of a training sequence and the 3 tokens after it
                seqs = [corpus.token_ids(i).tolist() for i in range(50)]
                prompts, completions = [s[:8] for s in seqs], [s[8:11] for s in seqs]
            else:
                facts = demo.facts() * 2
                prompts = [tokenizer(f.prompt())["input_ids"] for f in facts[:50]]
                completions = [tokenizer(f.completion, add_special_tokens=False)["input_ids"]
                               for f in facts[:50]]
            for n in (1, 50):
                q = make_queries(model, factors, prompts[:n], completions[:n], rank=32)
                t = time.perf_counter()
                scan(model, q, corpus, ScoreArgs(batch_size=32, progress=False), ids=ids)
                out[f"scan_{n}q_ratio"] = (time.perf_counter() - t) / base
        else:
            with tempfile.TemporaryDirectory() as tmp:
                t = time.perf_counter()
                build_sketches(model, factors, corpus, tmp, SketchArgs(m=256, progress=False),
                               ids=ids)
                out["sketch_ratio"] = (time.perf_counter() - t) / base
    else:  # {fit, scan}_memory_{demo, wide}
        n = 512 if kind.endswith("demo") else 128
        batches = list(corpus.batches(32, ids=np.arange(32)))
        plain(model, batches)  # warm-up: the allocator's pools for one fwd+bwd at batch 32
        if kind.startswith("scan"):
            factors = fit_factors(model, corpus, FactorArgs(batch_size=32, max_examples=64,
                                                            progress=False))
            ids = tokenizer("a b c")["input_ids"]
            q = make_queries(model, factors, [ids[:2]], [ids[2:]], rank=32)
        before = _rss_mb("VmRSS")
        _reset_peak()
        plain(model, batches)  # what one training step's forward + backward takes
        plain_rise = _rss_mb("VmHWM") - before
        before = _rss_mb("VmRSS")
        _reset_peak()
        if kind.startswith("scan"):
            scan(model, q, corpus, ScoreArgs(batch_size=32, progress=False), ids=np.arange(n))
        else:
            fit_factors(model, corpus, FactorArgs(batch_size=32, max_examples=n, progress=False))
        out.update(peak_rise_mb=_rss_mb("VmHWM") - before, plain_peak_rise_mb=plain_rise,
                   rss_before_mb=before)
    return out


KINDS = ("fit", "scan", "sketch", "fit_wide", "scan_wide", "sketch_wide", "fit_memory_demo",
         "fit_memory_wide", "scan_memory_demo", "scan_memory_wide")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", required=True, help="the other checkout (its root directory)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.child)))
        return
    trees = {"before": Path(a.before).resolve(), "after": Path(__file__).resolve().parent.parent}
    runs: dict[str, dict[str, list[dict]]] = {t: {} for t in trees}
    for _ in range(a.repeats):
        for kind in a.kinds.split(","):
            for name, root in trees.items():  # alternate, so machine load hits both alike
                # large blocks straight from mmap, returned on free: resident memory follows
                # the live tensors, so the peak is theirs, not the allocator's cache
                env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1",
                           MALLOC_MMAP_THRESHOLD_="65536")
                res = subprocess.run([sys.executable, __file__, "--before", a.before, "--child",
                                      kind], capture_output=True, text=True, env=env, cwd=root)
                if res.returncode:
                    raise SystemExit(f"{name} {kind} failed:\n{res.stderr[-3000:]}")
                row = json.loads(res.stdout.strip().splitlines()[-1])
                assert Path(row["tree"]) == root, f"{name} imported {row['tree']}, not {root}"
                runs[name].setdefault(kind, []).append(row)
    report: dict = {"repeats": a.repeats, "threads": 1, "trees": {k: str(v) for k, v in trees.items()}}
    for name in trees:
        figures = {}
        for kind, rows in runs[name].items():
            for key in rows[0]:
                if key in ("tree", "plain_s", "rss_before_mb"):
                    continue
                label = (f"{key}_wide" if kind.endswith("wide") else key) if "peak" not in key else \
                    f"{'plain' if key.startswith('plain') else kind.split('_')[0]}_peak_mb_" \
                    f"{kind.split('_')[-1]}"
                values = [r[key] for r in rows]
                figures[label] = dict(median=round(statistics.median(values), 3),
                                      min=round(min(values), 3), max=round(max(values), 3))
        report[name] = figures
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
