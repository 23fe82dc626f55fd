"""Real size: memory bounded whatever the number of queries, batches sized by tokens, a plan
that refuses in one line what cannot fit."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from influence_nb import Corpus, FactorArgs, Influence, ScoreArgs, fit_factors, make_queries, scan
import influence_nb.plan as plan_module
from influence_nb.batching import source, token_batches
from influence_nb.scoring import Costs

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_neox(hidden: int = 32, inner: int = 64, vocab: int = 64, layers: int = 2,
              dtype: torch.dtype = torch.float64):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                           num_attention_heads=4, intermediate_size=inner,
                           max_position_embeddings=256)
    return GPTNeoXForCausalLM(config).to(dtype).eval()


@pytest.fixture(scope="module")
def small(tokenizer):
    """A tiny float64 GPT-NeoX, a corpus of mixed lengths (3 to 60 tokens) in the demo
    tokenizer's ids below 64, and EK-FAC factors."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 60, 40)
    tokens = rng.integers(1, 64, lengths.sum()).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    import pandas as pd
    df = pd.DataFrame({"text": [f"seq {i}" for i in range(len(lengths))]})
    corpus = Corpus(tokens, offsets, df, tokenizer, 64)
    model = tiny_neox()
    factors = fit_factors(model, corpus, FactorArgs(batch_size=8, progress=False))
    prompts = [rng.integers(1, 64, 5).tolist() for _ in range(6)]
    completions = [rng.integers(1, 64, 2).tolist() for _ in range(6)]
    return model, corpus, factors, prompts, completions


def test_token_batches_respect_the_budget_and_cover_every_sequence():
    lengths = np.array([3, 3, 4, 10, 10, 11, 50, 200, 201])
    bounds = token_batches(lengths, 40)
    assert bounds[0] == 0 and bounds[-1] == len(lengths) and np.all(np.diff(bounds) > 0)
    for s, e in zip(bounds[:-1], bounds[1:]):
        assert (e - s) * lengths[s:e].max() <= 40 or e - s == 1   # alone when longer than 40
    # greedy: no batch could have taken its successor's first sequence
    for s, e in zip(bounds[:-2], bounds[1:-1]):
        assert (e - s + 1) * lengths[s:e + 1].max() > 40
    assert list(token_batches(lengths, 10 ** 6, size=4)) == [0, 4, 8, 9]


def test_batches_by_tokens_give_the_scores_of_fixed_batches(small):
    """A scan's numbers do not depend on how sequences are batched (rows restored to the asked
    order), so sizing batches by tokens changes speed and memory, never a score."""
    model, corpus, factors, prompts, completions = small
    queries = make_queries(model, factors, prompts, completions, rank=4)
    fixed = scan(model, queries, corpus, ScoreArgs(batch_size=5, chunk_size=40, progress=False))
    by_tokens = scan(model, queries, corpus, ScoreArgs(batch_tokens=97, progress=False))
    np.testing.assert_allclose(by_tokens[0], fixed[0], rtol=1e-9, atol=1e-12)
    blocks = scan(model, queries, corpus, ScoreArgs(batch_tokens=97, query_block=4,
                                                    progress=False))   # a pass per 4 queries
    np.testing.assert_allclose(blocks[0], by_tokens[0], rtol=1e-12)
    np.testing.assert_allclose(blocks[1], by_tokens[1], rtol=1e-12)
    sizes = [len(rows) for rows, _ in source(corpus, None, tokens=97).batches()]
    assert len(set(sizes)) > 2 and sum(sizes) == len(corpus)   # batch sizes follow lengths


def test_queries_prepared_in_blocks_equal_queries_prepared_at_once(small, monkeypatch):
    model, corpus, factors, prompts, completions = small
    whole = make_queries(model, factors, prompts, completions, rank=None)
    monkeypatch.setattr("influence_nb.queries.QUERY_BYTES", 1)       # one query per block
    blocks = make_queries(model, factors, prompts, completions, rank=None)
    torch.testing.assert_close(blocks.f, whole.f)
    for name, lr in whole.R.items():
        torch.testing.assert_close(blocks.R[name].dense(), lr.dense(), rtol=1e-10, atol=1e-14)


def test_scores_do_not_depend_on_the_scorer_budget(small, monkeypatch):
    """Dense R kept, formed in blocks of one query against groups of one sequence (each block
    formed again for every group, or each group's DW for every block), the token path in
    blocks, or each sequence's DW projected on blocks of one query's factors: the same
    numbers."""
    model, corpus, factors, prompts, completions = small
    queries = make_queries(model, factors, prompts, completions, rank=3)
    args = ScoreArgs(batch_size=8, chunk_size=40, progress=False)
    monkeypatch.setattr("influence_nb.scoring.scoring_cost", lambda *a: Costs(np.inf, 0, np.inf))
    kept = scan(model, queries, corpus, args)[1]
    monkeypatch.setattr("influence_nb.scoring.SCORE_BYTES", 1)
    others = []
    for per_group in (True, False):
        monkeypatch.setattr("influence_nb.scoring.reform_per_group", lambda *a, g=per_group: g)
        others.append(scan(model, queries, corpus, args)[1])
    for path in (Costs(0, np.inf, np.inf), Costs(np.inf, np.inf, 0)):
        monkeypatch.setattr("influence_nb.scoring.scoring_cost", lambda *a, c=path: c)
        others.append(scan(model, queries, corpus, args)[1])
    for b in others:
        np.testing.assert_allclose(b, kept, rtol=1e-9, atol=1e-13)


SCAN_PEAK = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import numpy as np, torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    from test_real_size import tiny_neox
    import influence_nb.queries as queries_module
    import influence_nb.scoring as scoring
    from influence_nb import FactorArgs, ScoreArgs, fit_factors, make_queries, scan
    from influence_nb.data import Batch
    q, layers, rank, spill, whole = map(int, sys.argv[1:])
    scoring.SCORE_BYTES = 32 << 20
    queries_module.QUERY_BYTES = 8 << 20
    queries_module.SPILL_BYTES = spill
    model = tiny_neox(hidden=256, inner=1024, vocab=128, layers=layers, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    batches = [dict(input_ids=torch.randint(1, 128, (8, 64), generator=g),
                    attention_mask=torch.ones(8, 64, dtype=torch.long))]
    factors = fit_factors(model, batches, FactorArgs(progress=False))
    ids = torch.randint(1, 128, (q, 12), generator=g)
    prepare = lambda n=q: make_queries(model, factors, ids[:n, :10], ids[:n, 10:], rank=rank)

    class Rows:   # a corpus of 32 sequences of 64 tokens
        offsets = np.arange(0, 33 * 64, 64)
        fingerprint = "rows"
        def __len__(self): return 32
        def batches(self, n, ids):
            x = torch.randint(1, 128, (len(ids), 64), generator=torch.Generator().manual_seed(1))
            yield Batch(x, torch.ones_like(x), np.asarray(ids))
        def by_length(self, ids, window): return np.arange(len(ids))

    def vm(key):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    args = ScoreArgs(batch_tokens=1024, progress=False, per_layer=False)
    queries = None if whole else prepare()
    scan(model, queries or prepare(2), Rows(), args)          # warm (2 queries: the same paths)
    base = vm("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    queries = queries or prepare()
    assert (queries.R[queries.layer_names[0]].spill is not None) == (spill == 0)
    scan(model, queries, Rows(), args)
    print(json.dumps(vm("VmHWM") - base))
""")


def scan_peak(tmp_path, *argv: int) -> int:
    """Peak resident bytes of SCAN_PEAK's run (q, layers, rank, spill bytes, whole: with the
    queries' preparation) above what the process held before it."""
    script = tmp_path / "peak.py"
    script.write_text(SCAN_PEAK.format(tests=os.path.dirname(__file__)))
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    return json.loads(subprocess.run([sys.executable, str(script), *map(str, argv)], env=env,
                                     capture_output=True, text=True, check=True
                                     ).stdout.splitlines()[-1])


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's VmHWM")
@pytest.mark.slow
def test_a_scans_memory_does_not_grow_with_the_queries(tmp_path):
    """Peak resident memory of a scan over and above its prepared queries, with 4 and with
    64 queries: dense R for 64 queries would be 64 × 4 layers × 1 MB = 256 MB; bounded by
    the scorer's budget (32 MB here) it stays within it."""
    peak = {q: scan_peak(tmp_path, q, 2, 8, 1 << 40, 0) for q in (4, 64)}
    assert peak[64] - peak[4] < 48 << 20, peak     # the budget, and not 256 MB
    assert peak[4] < 256 << 20, peak


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's VmHWM")
@pytest.mark.slow
def test_spilled_queries_keep_preparation_and_scan_flat_in_the_queries(tmp_path):
    """Peak resident memory of preparing and scanning 8 and 128 rank-32 queries on 8 linears
    of 1,024 × 257: their factors take 1.3 MB a query, 168 MB for 128 — held in memory they
    add that; spilled to a file (queries.spilled_factors), one linear's at a time (21 MB)."""
    peak = {(q, spill): scan_peak(tmp_path, q, 4, 32, spill, 1)
            for q, spill in ((8, 0), (128, 0), (128, 1 << 40))}
    assert peak[128, 1 << 40] - peak[8, 0] > 120 << 20, peak    # in memory: it grows
    assert peak[128, 0] - peak[8, 0] < 32 << 20, peak           # spilled: flat


def test_plan_predicts_and_refuses_in_one_line(small, tokenizer, monkeypatch):
    model, corpus, factors, prompts, completions = small
    inf = Influence(model, tokenizer, corpus)
    p = inf.plan(FactorArgs(progress=False), ScoreArgs(progress=False), queries=[1, 30])
    assert p.seconds["covariance"] > 0 and p.seconds["scan 30"] > 0
    assert 0 < p.seconds["prepare 1"] < p.seconds["prepare 30"]   # one query run, 29 modelled
    assert p.scan_peak[30] > p.scan_peak[1] and p.memory["factors"] > 0
    assert p.n_sequences == len(corpus) and "scan of 30 queries" in str(p)
    json.dumps(p.summary())
    monkeypatch.setattr(plan_module, "available_memory", lambda device: 1 << 10)
    with pytest.raises(MemoryError, match=r"^the fit needs ≈ .* GB more but .* available .*; ") as e:
        inf.fit(FactorArgs(progress=False))
    assert "\n" not in str(e.value)
    inf.factors = factors
    with pytest.raises(MemoryError, match=r"^a scan of 2 queries needs .*fewer queries") as e:
        inf.scan([("a", "b"), ("c", "d")])
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("args", [dict(m=16), dict(m=16, exact_bytes=0),
                                  dict(m=16, variant="whitened")], ids=["exact", "sketch", "white"])
def test_plan_predicts_the_sketch_store_it_builds(small, tokenizer, tmp_path, monkeypatch, args):
    """With SketchArgs the plan says whether the store will keep exact token factors, as the
    build decides, and its size on disk: to the byte, but for the factors of each sequence's
    last token, which nothing scores (the plan counts every token, as ``exact_bytes`` does);
    it times the build and refuses, in one line, one that cannot fit."""
    from influence_nb.projection import SketchArgs
    from influence_nb.sketch import build_sketches
    from influence_nb.tokens import token_bytes
    model, corpus, factors = small[:3]
    args = SketchArgs(progress=False, **args)
    p = Influence(model, tokenizer, corpus).plan(FactorArgs(progress=False),
                                                 ScoreArgs(progress=False), sketch=args)
    store = build_sketches(model, factors, corpus, tmp_path, args)
    on_disk = sum(f.stat().st_size for f in tmp_path.iterdir()
                  if f.suffix in (".bin", ".f16", ".f32", ".i32"))
    assert p.keeps_exact == (store.exact is not None) == (args.exact_bytes > 0)
    unscored = len(corpus) * token_bytes(factors.shapes) if p.keeps_exact else 0
    assert p.store_bytes - unscored == on_disk
    timed = {k.split()[1] for k in p.seconds if k.startswith("sketch ")}
    assert timed == ({"eigen", "whitened"} if args.variant == "auto" else {args.variant})
    assert min(p.seconds[f"sketch {v}"] for v in timed) > 0
    assert p.sketch_peak > p.memory["factors"]
    assert ("with" if p.keeps_exact else "without") + " exact token factors" in str(p)
    json.dumps(p.summary())
    p.available = p.sketch_peak - 1
    with pytest.raises(MemoryError, match=r"^the sketch build needs ≈ .* GB more .*; ") as e:
        p.check("sketch")
    assert "\n" not in str(e.value)


def test_plan_counts_the_eigenvalue_hash_of_the_first_query(small, monkeypatch):
    """The first query of a process hashes every fitted eigenvalue (Factors.factors_id: 0.29 s
    on Pythia-160m's MLPs, a query against the plan's identity bases pays none): the plan
    times the same function on a sample and scales it to the numbers factors_id hashes."""
    import influence_nb.curvature as curvature
    factors = small[2]
    hashed = []
    real = curvature.hash_eigenvalues
    monkeypatch.setattr(curvature, "hash_eigenvalues",
                        lambda h, t: (hashed.append(t.numel()), real(h, t)))
    factors._id.clear()
    factors.factors_id()
    sampled = []
    clock = iter([0.0, 1.0])   # one second for the plan's sample
    monkeypatch.setattr(plan_module, "hash_eigenvalues", lambda h, t: sampled.append(t.numel()))
    monkeypatch.setattr(plan_module.time, "perf_counter", lambda: next(clock))
    seconds = plan_module._hash_seconds(factors.shapes, factors.args.strategy)
    assert seconds * sampled[0] == pytest.approx(sum(hashed), rel=1e-12)
    assert sum(hashed) > sum(o * i for o, i in factors.shapes.values())   # Λ and λ_A, λ_S


def test_plan_counts_a_recording_only_while_it_is_kept(small, monkeypatch):
    """EK-FAC's fit records ā and δ for its eigenvalue pass while they fit RECORD_BYTES and
    keeps them through the eigendecompositions; a recording that outgrows the budget is dropped
    in the first pass, when only A's and S's sums are held (Pythia-160m at 1,024 tokens: the
    plan's fit peak 1.35× the measured with the recording counted throughout, 1.10 without)."""
    model, corpus = small[0], small[1]
    args = FactorArgs(batch_size=8)
    kept = plan_module.plan(model, corpus, args, ScoreArgs(), 1, measure=False)
    m = kept.memory
    assert kept.fit_peak == m["factors"] + m["accumulators"] + m["eigh"] + m["batch"] \
        + m["recording"] and m["recording"] > 0
    monkeypatch.setattr(plan_module.passes, "RECORD_BYTES", m["recording"] // 2)
    dropped = plan_module.plan(model, corpus, args, ScoreArgs(), 1, measure=False)
    m = dropped.memory
    assert dropped.fit_peak == max(m["factors"] + m["accumulators"] + m["eigh"] + m["batch"],
                                   m["accumulators"] + m["recording"] + m["batch"])
    assert dropped.fit_peak < kept.fit_peak


def test_plan_times_the_fisher_draws_the_fit_would_make(small, tokenizer):
    """A plan runs its batch forward once more for a fit of several Fisher draws (the fit's
    second covariance pass: a forward, draws − 1 backwards), with the draws given or, by
    default, chosen from the batch as the fit chooses them (here the batch is the corpus)."""
    model, corpus = small[0], small[1]
    inf = Influence(model, tokenizer, corpus)
    forwards = []
    handle = model.register_forward_hook(lambda *_: forwards.append(1))
    try:
        counts = {}
        for draws in (1, 3, None):
            forwards.clear()
            inf.plan(FactorArgs(draws=draws, progress=False), ScoreArgs(progress=False))
            counts[draws] = len(forwards)
    finally:
        handle.remove()
    chosen = fit_factors(model, corpus, FactorArgs(progress=False)).args.draws
    assert counts[3] == counts[1] + 1 and counts[None] == counts[1] + (chosen > 1)


def test_cli_plan_prints_the_plan_and_refuses_in_one_line(tmp_path, capsys, monkeypatch):
    from influence_nb import demo
    from influence_nb.cli import main
    common = ["plan", "--model", str(demo.ASSETS), "--corpus", str(demo.ASSETS / "corpus.parquet"),
              "--no-progress", "--max-examples", "64", "--queries", "1", "8"]
    main([*common, "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "scan of 8 queries" in out and "eigendecomposition" in out and "sketch store" in out
    summary = json.loads((tmp_path / "plan.json").read_text())
    assert summary["sequences"] == 64 and set(summary["scan_peak_gb"]) == {"1", "8"}
    monkeypatch.setattr(plan_module, "available_memory", lambda device: 1 << 10)
    with pytest.raises(SystemExit) as exit:
        main(common)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit.value.code == 2 and len(err) == 1
    assert err[0].startswith("influence-nb plan: error: the fit needs ≈")


def test_float32_eigendecompositions_rank_sequences_like_float64(small):
    """The fit's fixed cost in lower precision: the same scores to Spearman ≥ 0.999 and within
    a few 1e-3 of the largest, on every query (float64 model, so only the eigh differs)."""
    from scipy.stats import spearmanr
    model, corpus, _, prompts, completions = small
    scores = {}
    for precision in ("float64", "float32"):
        f = fit_factors(model, corpus, FactorArgs(batch_size=8, eigh_precision=precision,
                                                  progress=False))
        q = make_queries(model, f, prompts, completions, rank=None)
        scores[precision] = scan(model, q, corpus, ScoreArgs(batch_size=8, chunk_size=40,
                                                             progress=False))[0]
    for a, b in zip(scores["float32"], scores["float64"]):
        assert spearmanr(a, b).statistic >= 0.999
        assert np.abs(a - b).max() <= 5e-3 * np.abs(b).max()
    assert not np.array_equal(scores["float32"], scores["float64"])   # it did change something


@pytest.mark.parametrize("path", [Costs(np.inf, 0, np.inf), Costs(0, np.inf, np.inf),
                                  Costs(np.inf, np.inf, 0)], ids=["dense", "tokens", "project"])
def test_bfloat16_scans_rank_sequences_like_float64(small, tokenizer, monkeypatch, path):
    """``ScoreArgs(precision="bfloat16")``: the queries' factors stored in bfloat16 (half the
    bytes, in the plan too) and both scoring paths in bfloat16 give the float64 scores within
    2 % of the largest and in the same order (Spearman ≥ 0.999 per query)."""
    from scipy.stats import spearmanr
    model, corpus, factors, prompts, completions = small
    inf = Influence(model, tokenizer, corpus, factors)
    q64 = make_queries(model, factors, prompts, completions, rank=3)
    q16 = inf.queries(list(zip(*[map(tokenizer.decode, x) for x in (prompts, completions)])),
                      rank=3, precision="bfloat16")
    lr64, lr16 = q64.R[q64.layer_names[0]], q16.R[q64.layer_names[0]]
    assert lr16.U.dtype == torch.bfloat16 and lr16.U.nbytes * 4 == lr64.U.nbytes
    monkeypatch.setattr("influence_nb.scoring.scoring_cost", lambda *a: path)
    args = ScoreArgs(batch_size=8, chunk_size=40, progress=False)
    exact = scan(model, q64, corpus, args)[0]
    low = scan(model, q64, corpus, ScoreArgs(batch_size=8, chunk_size=40, progress=False,
                                             precision="bfloat16"))[0]
    for a, b in zip(low, exact):
        assert spearmanr(a, b).statistic >= 0.999
        assert np.abs(a - b).max() <= 2e-2 * np.abs(b).max()
    assert not np.array_equal(low, exact)   # it did change something
    memory = {p: plan_module.plan(model, corpus, FactorArgs(batch_size=8),
                                  ScoreArgs(precision=p), 4, measure=False).memory["query"]
              for p in ("float32", "bfloat16")}
    assert memory["bfloat16"] * 4 == memory["float32"]   # a float64 model: 8 bytes, then 2


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_chunked_log_probabilities_equal_cross_entropy(dtype, monkeypatch):
    """The vocabulary-wide path (chunks of a few rows) gives the log-probabilities and the
    gradient of a cross-entropy, for a float64 or a bfloat16 model."""
    from influence_nb.task import next_token_logprobs
    torch.manual_seed(0)
    x = torch.randn(3, 7, 50, dtype=dtype, requires_grad=True)
    y = torch.randint(0, 50, (3, 7))
    g = torch.randn(3, 7, dtype=torch.float64)
    ref = -torch.nn.functional.cross_entropy(x.double().reshape(21, 50), y.reshape(21),
                                             reduction="none").reshape(3, 7)
    (ref * g).sum().backward()
    expected, x.grad = x.grad.clone(), None
    monkeypatch.setattr("influence_nb.task.LOGIT_BYTES", 3 * 50 * 4)   # 3 rows per chunk
    out = next_token_logprobs(x, y)
    assert out.dtype == torch.promote_types(dtype, torch.float32)
    (out.double() * g).sum().backward()
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=0, atol=1e-5)
    torch.testing.assert_close(out.double(), ref.detach(), **tol)
    torch.testing.assert_close(x.grad.double(), expected.double(),
                               **(tol if dtype == torch.float64 else dict(rtol=0, atol=2e-2)))


def test_fisher_probe_in_chunks_draws_like_the_whole(monkeypatch):
    """Chunked over positions, the label probe draws the very labels of one pass over all
    positions (sequential uniforms); the Gaussian probe's draws change with the chunks but each
    row's gradient keeps its defining properties: it sums to zero over the vocabulary (r ⟂ 1)
    and vanishes where the mask is off."""
    from influence_nb.task import FisherProbe
    torch.manual_seed(0)
    x = torch.randn(3, 7, 50, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(3, 7) > 0.3

    def draw(probe: str, budget: int):
        monkeypatch.setattr("influence_nb.task.LOGIT_BYTES", budget)
        value = FisherProbe.apply(x, mask, torch.Generator().manual_seed(5), probe)
        return value, torch.autograd.grad(value.sum(), x)[0]

    whole, chunked = draw("label", 1 << 30), draw("label", 3 * 50 * 4)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=0)
    _, r = draw("gaussian", 3 * 50 * 4)
    torch.testing.assert_close(r.sum(-1), torch.zeros(3, 7, dtype=torch.float64), atol=1e-12, rtol=0)
    assert r[~mask].abs().max() == 0 and r[mask].abs().max() > 0


def test_scan_batches_take_more_tokens_where_tokens_are_cheap():
    """ScoreArgs(batch_tokens=None): when the scorer forms most of R again per batch, 4 bytes
    for 2 vocabulary-wide numbers and each tracked ā, δ per token within SCAN_BATCH_BYTES, from
    1,024 to 4,096 tokens; 1,024 when it keeps most of R; a given budget stands."""
    from influence_nb.layers import find_layers
    from influence_nb.scoring import SCAN_BATCH_BYTES, scan_tokens
    for vocab, expected in ((50_257, 1024), (64, 4096)):
        model = tiny_neox(vocab=vocab)
        assert scan_tokens(model, find_layers(model, "mlp")) == expected
    model = tiny_neox(vocab=16_000)
    layers = find_layers(model, "all")
    per_token = 4 * (2 * 16_000 + sum(o + i for o, i in (t.shape for t in layers)))
    assert scan_tokens(model, layers) == SCAN_BATCH_BYTES // per_token == 2047
    assert scan_tokens(model, layers, 97) == 97
    assert scan_tokens(tiny_neox(vocab=64), layers, None, formed=0.5) == 1024
