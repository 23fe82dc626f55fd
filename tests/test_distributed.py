"""torchrun --nproc_per_node 2 (gloo, CPU) against one process, through the CLI: the same
factors (basis-invariant checks, float64 model), byte-identical sketches, the same scan and search
top-k, and a rank killed mid-scan whose completed chunks are kept on restart."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

from influence_nb.cli import main
from influence_nb.curvature import Factors
from influence_nb.demo import ASSETS
from influence_nb.results import InfluenceResult

pytestmark = pytest.mark.slow  # kernels / torchrun: `make test`, not `make check`

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
WORKER = textwrap.dedent("""
    import json, os, sys
    from influence_nb import distributed, scoring
    from influence_nb.cli import main
    if os.environ["RANK"] == "1" and os.environ.get("DIE_AFTER_BATCHES"):
        update, calls = scoring.Scorer.update, [0]
        def dying(self, *a, **kw):               # Scorer.update: once per scored batch
            calls[0] += 1
            if calls[0] > int(os.environ["DIE_AFTER_BATCHES"]):
                os._exit(1)                      # a rank that dies mid-scan
            return update(self, *a, **kw)
        scoring.Scorer.update = dying
    if os.environ["RANK"] == "0" and os.environ.get("SLOW_SAVE"):
        import time
        from influence_nb.curvature import Factors
        save = Factors.save
        def slow(self, *a, **kw):                # rank 0 writes the factors late
            time.sleep(float(os.environ["SLOW_SAVE"]))
            return save(self, *a, **kw)
        Factors.save = slow
    swap = json.loads(os.environ.get("RANK1_SWAP", "{}"))  # rank 1 given other inputs
    distributed.init()
    for argv in json.loads(sys.argv[1]):
        main([swap.get(a, a) for a in argv] if os.environ["RANK"] == "1" else argv)
    distributed.finish()
""")
QUERIES = [("alpha number 3 is", " odd."), ("the gamma", " number 10")]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A tiny float64 GPT-NeoX (a Hugging Face directory), a corpus file and the queries."""
    root = tmp_path_factory.mktemp("dist")
    tokenizer = AutoTokenizer.from_pretrained(ASSETS)
    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=32, max_position_embeddings=64)
    GPTNeoXForCausalLM(cfg).to(torch.float64).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    with open(root / "corpus.jsonl", "w") as fh:
        for i in range(72):  # 72 sequences: 9 scan chunks of 8, 18 fit batches of 4
            text = f"{words[i % 8]} number {i} is {'odd' if i % 2 else 'even'}" + "." * (i % 5)
            fh.write(json.dumps({"text": text}) + "\n")
    (root / "worker.py").write_text(WORKER)
    (root / "queries.jsonl").write_text(
        "".join(json.dumps(dict(prompt=p, completion=c)) + "\n" for p, c in QUERIES))
    return root


def steps(root, out):
    """fit -> sketch -> search -> score, with small settings, writing under ``out``."""
    common = ["--model", str(root / "model"), "--corpus", str(root / "corpus.jsonl"),
              "--dtype", "float64", "--no-progress"]
    queries = ["--factors", str(out / "factors"), "--queries", str(root / "queries.jsonl")]
    return [["fit", *common, "--out", str(out / "factors"), "--batch-size", "4"],
            ["sketch", *common, "--factors", str(out / "factors"), "--out", str(out / "search"),
             "--batch-size", "4", "--chunk-size", "8"],
            ["search", *common, *queries, "--index", str(out / "search"),
             "--out", str(out / "found"), "--candidates", "16", "--batch-size", "4"],
            ["score", *common, *queries, "--out", str(out / "scan"), "--batch-size", "4",
             "--chunk-size", "8"]]


def torchrun(root, argvs, **env):
    """Run ``argvs`` on two ranks; the result's ``why`` holds each rank's error lines."""
    run = subprocess.run([*TORCHRUN, str(root / "worker.py"), json.dumps(argvs)],
                          capture_output=True, text=True, timeout=300,
                          env=os.environ | {"OMP_NUM_THREADS": "1"} | env)
    run.why = "\n".join(line for line in run.stderr.splitlines() if "error" in line.lower())
    return run


def test_two_ranks_equal_one_process(job, capsys):
    one, two = job / "one", job / "two"
    torch.set_num_threads(1)
    for argv in steps(job, one):
        main(argv)
    capsys.readouterr()

    # two ranks; rank 1 dies after 4 scan batches (its chunks 8 and 24), in the last step;
    # rank 0 saves the factors late, which rank 1 must wait for before it sketches
    run = torchrun(job, steps(job, two), DIE_AFTER_BATCHES="4", SLOW_SAVE="3")
    assert run.returncode != 0, run.stderr[-2000:]
    chunks = two / "scan" / "scan"
    before = {p.name: p.stat().st_mtime_ns for p in chunks.glob("chunk_*.npz")}
    assert {"chunk_0000000008.npz", "chunk_0000000024.npz"} <= set(before) and len(before) < 9, \
        (sorted(before), run.why)
    run = torchrun(job, steps(job, two)[-1:])  # restart the scan
    assert run.returncode == 0, run.stderr[-2000:]
    after = {p.name: p.stat().st_mtime_ns for p in chunks.glob("chunk_*.npz")}
    assert len(after) == 9 and all(after[k] == v for k, v in before.items())

    # factors: A, S and (G + λI)⁻¹ V are basis-invariant; equal within 1e-5 relative
    f1, f2 = Factors.load(one / "factors"), Factors.load(two / "factors")
    assert (f1.n_examples, f1.n_tokens) == (f2.n_examples, f2.n_tokens) == (72, f1.n_tokens)
    dense = lambda Q, lam: (Q[0] * lam) @ Q[0].T
    g = torch.Generator().manual_seed(0)
    V = {n: torch.randn(3, *s, generator=g, dtype=torch.float64) for n, s in f1.shapes.items()}
    P1, P2 = f1.precondition(V), f2.precondition(V)
    rel = lambda x, y: float((x - y).norm() / x.norm())
    for n, a in f1.layers.items():
        b = f2.layers[n]
        assert rel(dense(a.Q_A, a.lambda_A), dense(b.Q_A, b.lambda_A)) < 1e-5
        assert rel(dense(a.Q_S, a.lambda_S), dense(b.Q_S, b.lambda_S)) < 1e-5
        assert rel(P1[n], P2[n]) < 1e-5

    # sketches: the merged per-rank parts are the single-process store, value for value
    # (a coordinate that rounds to zero may keep either sign of zero: -0.0 == 0.0)
    assert (one / "search/sketches/rows.bin").read_bytes() == \
           (two / "search/sketches/rows.bin").read_bytes()
    np.testing.assert_array_equal(np.fromfile(one / "search/sketches/sketches.f16", np.float16),
                                  np.fromfile(two / "search/sketches/sketches.f16", np.float16))
    assert not (two / "search/sketches.parts").exists()

    # the exhaustive scan and the search: the same top-k, the same scores
    for result in ("scan", "found"):
        r1, r2 = InfluenceResult.load(one / result), InfluenceResult.load(two / result)
        assert len(r1.ids) == (72 if result == "scan" else len(r1.ids)) and len(r1.ids) >= 16
        np.testing.assert_allclose(r2.scores, r1.scores, rtol=1e-9, atol=0)
        for q in range(len(QUERIES)):
            for sign in ("positive", "negative"):
                assert list(r1.top(q, 5, sign)["id"]) == list(r2.top(q, 5, sign)["id"])


def test_ranks_given_other_inputs_refuse_to_fit_or_sketch(job, capsys):
    """Every rank checks that the others hold the same corpus, weights (all of them, not only
    the tracked layers) and arguments before fitting or sketching; none mixes its statistics."""
    out = job / "disagree"
    lines = (job / "corpus.jsonl").read_text().splitlines()
    lines[5] = json.dumps({"text": "one other sequence"})
    (job / "corpus_b.jsonl").write_text("\n".join(lines) + "\n")
    model = GPTNeoXForCausalLM.from_pretrained(job / "model", dtype=torch.float64)
    with torch.no_grad():
        model.gpt_neox.embed_in.weight[3, 0] += 0.5          # an untracked weight differs
    model.save_pretrained(job / "model_b")
    AutoTokenizer.from_pretrained(job / "model").save_pretrained(job / "model_b")
    fit, sketch = steps(job, out)[:2]
    main(fit)
    capsys.readouterr()
    for argv, swap, what in [
            (fit, {str(job / "model"): str(job / "model_b")},
             "the model, corpus and FactorArgs of the fit"),
            (sketch, {str(job / "corpus.jsonl"): str(job / "corpus_b.jsonl")},
             "the model, factors, corpus, store and SketchArgs of the sketch")]:
        run = torchrun(job, [argv], RANK1_SWAP=json.dumps(swap))
        assert run.returncode != 0
        assert f"error (rank 0): the ranks disagree on {what}" in run.stderr, run.stderr[-2000:]
    assert not (out / "search").exists() or not (out / "search" / "sketches.json").exists()
