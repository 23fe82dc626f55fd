"""Streaming scorer: exact against autograd, invariants, query batching, resumable scans."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from influence_nb.curvature import STRATEGIES, FactorArgs, fit_factors
from influence_nb.data import Corpus
from influence_nb.batching import source
from influence_nb.layers import find_layers
from influence_nb.passes import corpus_pass
from influence_nb.queries import LowRank, make_queries, query_gradients, strategy_queries
from influence_nb.scoring import Costs, ScoreArgs, Scorer, scan, self_influence, token_scores
from influence_nb.session import Influence

TEXTS = [f"{w} number {i} is {'odd' if i % 2 else 'even'}." for i, w in
         enumerate(["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"] * 3)]


def tiny_model(vocab: int, dtype=torch.float64) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=vocab, hidden_size=16, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=32, max_position_embeddings=64)
    return GPTNeoXForCausalLM(cfg).to(dtype).eval()


@pytest.fixture(scope="module")
def setup(tokenizer):
    model = tiny_model(len(tokenizer))
    corpus = Corpus.from_texts(TEXTS, tokenizer, max_len=64)
    factors = fit_factors(model, corpus, FactorArgs(batch_size=5, progress=False))
    tok = lambda s: tokenizer(s)["input_ids"]
    prompts = [tok("alpha number"), tok("gamma number 2 is"), tok("theta")]
    completions = [tok(" 0 is even."), tok(" even"), tok(" number 7")]
    return model, corpus, factors, prompts, completions


def autograd_scores(model, corpus, queries, factors):
    """⟨R_q, ∇ log p(z_m)⟩ with the full autograd gradient of each training sequence."""
    layers = find_layers(model, factors.layer_names)
    out = np.zeros((len(queries), len(corpus)))
    for m in range(len(corpus)):
        ids = torch.tensor(corpus.token_ids(m), dtype=torch.long)[None]
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)
        ll = logp.gather(-1, ids[0, 1:, None]).sum()
        for layer in layers:
            G = layer.as_matrix(torch.autograd.grad(ll, layer.parameters(), retain_graph=True))
            R = queries.R[layer.name].dense()
            out[:, m] += (R * G).sum((-2, -1)).detach().numpy()
    return out


def test_scores_equal_autograd_inner_products(setup):
    model, corpus, factors, prompts, completions = setup
    queries = make_queries(model, factors, prompts, completions, rank=None)
    scores, layer_scores, ids = scan(model, queries, corpus, ScoreArgs(batch_size=4,
                                     chunk_size=8, progress=False))
    exact = autograd_scores(model, corpus, queries, factors)
    np.testing.assert_allclose(scores, exact, rtol=1e-5, atol=1e-9 * np.abs(exact).max())
    assert list(ids) == list(range(len(corpus)))
    np.testing.assert_allclose(layer_scores.sum(1), scores, rtol=1e-12)


def test_token_sum_equals_layer_sum_equals_total(setup):
    model, corpus, factors, prompts, completions = setup
    queries = make_queries(model, factors, prompts, completions, rank=4)
    layers = find_layers(model, queries.layer_names)
    batch = next(corpus.batches(6))
    scorer = Scorer(queries, layers, 6, per_token=True)
    layer_scores, per_seq = corpus_pass(model, layers, source([batch], 6), [scorer],
                                        progress=False)[0]
    # (Q, B, T) with the padding the batch has: each row's token scores, zeros after its end
    tokens = torch.zeros(len(queries), *batch.input_ids.shape, dtype=torch.float64)
    for b, t in enumerate(per_seq):
        tokens[:, b, :t.shape[1]] = torch.from_numpy(t)
    total, _, _ = scan(model, queries, corpus, ScoreArgs(rank=4, batch_size=6, chunk_size=6,
                                                         progress=False), ids=range(6))
    np.testing.assert_allclose(tokens.sum(-1), layer_scores.sum(1), rtol=1e-4)
    np.testing.assert_allclose(layer_scores.sum(1), total, rtol=1e-4)
    assert (tokens * (1 - batch.attention_mask)).abs().max() == 0  # padding scores nothing
    assert tokens.abs().max() > 0
    # and a padded row scores its tokens exactly as the sequence alone
    short = int(batch.attention_mask.sum(1).argmin())
    alone = token_scores(model, queries, corpus, [int(batch.ids[short])])[0][0]
    np.testing.assert_allclose(per_seq[short], alone, rtol=1e-6, atol=1e-12)


def test_dense_factorised_and_projected_paths_agree(setup, monkeypatch):
    model, corpus, factors, prompts, completions = setup
    queries = make_queries(model, factors, prompts, completions, rank=3)
    args = ScoreArgs(batch_size=8, chunk_size=8, progress=False)
    results = []
    for path in (Costs(1, 0, 1), Costs(0, 1, 1), Costs(1, 1, 0)):
        monkeypatch.setattr("influence_nb.scoring.scoring_cost", lambda *a, c=path: c)
        results.append(scan(model, queries, corpus, args)[0])
    for other in results[1:]:
        np.testing.assert_allclose(other, results[0], rtol=1e-8)


def test_cost_model_projects_long_sequences_and_keeps_tokens_for_short_ones():
    """GPT-2 small's MLP widths, 200 rank-32 queries, R formed from its factors: a batch of one
    1,024-token sequence is cheapest projected (measured 0.68× the token path's time on one
    core), eight of 128 tokens per token (projected: 4.3× the token path's time), and an exact
    R (rank ≥ min(out, in)) only dense."""
    from influence_nb.scoring import scoring_cost
    assert scoring_cost(1, 1024, 3072, 769, 200, 32, False, 1, 3).cheapest() == "project"
    assert scoring_cost(8, 128, 3072, 769, 200, 32, False, 1, 3).cheapest() == "tokens"
    full = scoring_cost(1, 1024, 64, 33, 200, 33, False, 1, 3)
    assert full.tokens == full.project == np.inf and np.isfinite(full.dense)


def test_full_rank_equals_unfactored_and_batched_equals_single(setup):
    model, corpus, factors, prompts, completions = setup
    full = make_queries(model, factors, prompts, completions, rank=None)
    R = factors.precondition(query_gradients(model, prompts, completions,
                                             layers=factors.layer_names).grads)
    for name, lr in full.R.items():
        np.testing.assert_allclose(lr.dense().numpy(), R[name].numpy(), rtol=1e-9,
                                   atol=1e-12 * R[name].abs().max().item())
    args = ScoreArgs(batch_size=8, chunk_size=8, progress=False)
    batched = scan(model, full, corpus, args)[0]
    for q in range(len(prompts)):
        one = make_queries(model, factors, [prompts[q]], [completions[q]], rank=None)
        np.testing.assert_allclose(scan(model, one, corpus, args)[0][0], batched[q], rtol=1e-9)
    low = scan(model, make_queries(model, factors, prompts, completions, rank=1), corpus, args)[0]
    assert not np.allclose(low, batched, rtol=1e-3)  # rank 1 really truncates


def test_strategies_prepared_in_one_pass_equal_each_prepared_alone(setup, tokenizer):
    """strategy_queries takes the query gradients once and preconditions them per strategy;
    the session's strategy_scores (LDS's contestants) scores them in one scan."""
    model, corpus, factors, prompts, completions = setup
    together = strategy_queries(model, factors, prompts, completions, [*STRATEGIES, None], 4)
    assert list(together) == list(STRATEGIES)   # None is the fitted one, ekfac: not twice
    alone = {s: make_queries(model, factors, prompts, completions, rank=None, strategy=s)
             for s in STRATEGIES}
    for s in STRATEGIES:
        one = make_queries(model, factors, prompts, completions, rank=4, strategy=s)
        assert together[s].strategy == s and together[s].fingerprint == one.fingerprint
        for name, lr in one.R.items():
            torch.testing.assert_close(together[s].R[name].dense(), lr.dense(), rtol=0, atol=0)
    inf = Influence(model, tokenizer, corpus)
    inf.factors = factors
    got = inf.strategy_scores(alone["ekfac"], baselines=False)
    args = ScoreArgs(rank=None, batch_size=8, per_layer=False, progress=False)
    for s in STRATEGIES:
        np.testing.assert_allclose(got[s], scan(model, alone[s], corpus, args)[0],
                                   rtol=1e-9, atol=1e-12 * np.abs(got[s]).max())
    assert not np.allclose(got["ekfac"], got["identity"], rtol=1e-2)


def test_spilled_queries_score_exactly_as_queries_in_memory(setup, monkeypatch, tmp_path):
    """Queries over spill.SPILL_BYTES live in an unlinked file in the cache folder, one layer's
    pages resident at a time: same factors, same scores (bit for bit), for every strategy
    prepared in one pass, and no file left behind."""
    model, corpus, factors, prompts, completions = setup
    kept = strategy_queries(model, factors, prompts, completions, ["ekfac", "identity"], 4)
    monkeypatch.setattr("influence_nb.queries.SPILL_BYTES", 0)
    monkeypatch.setenv("INFLUENCE_NB_CACHE", str(tmp_path))
    spilled = strategy_queries(model, factors, prompts, completions, ["ekfac", "identity"], 4)
    args = ScoreArgs(batch_size=8, progress=False)
    for s in ("ekfac", "identity"):
        for name, lr in spilled[s].R.items():
            assert lr.spill is not None and kept[s].R[name].spill is None
            torch.testing.assert_close(lr.U, kept[s].R[name].U, rtol=0, atol=0)
        for a, b in zip(scan(model, spilled[s], corpus, args), scan(model, kept[s], corpus, args)):
            np.testing.assert_array_equal(a, b)
        one = spilled[s].take(1, 3)   # views of the file, released like the whole
        assert all(lr.spill is not None for lr in one.R.values())
        np.testing.assert_array_equal(scan(model, one, corpus, args)[0],
                                      scan(model, kept[s].take(1, 3), corpus, args)[0])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("shape", [(2, 7, 5), (2, 5, 7)])  # Gram of the in side, of the out side
def test_low_rank_is_the_best_rank_r_approximation(shape):
    torch.manual_seed(0)
    R = torch.randn(*shape, dtype=torch.float64)
    s = torch.linalg.svdvals(R)
    for r in (1, 3, 5, None):
        lr = LowRank.of(R, r)
        k = 5 if r is None else r
        assert lr.U.shape == (2, shape[1], k) and lr.V.shape == (2, shape[2], k)
        assert (lr.full is R) == (r in (5, None))  # exact: R kept, no factorisation
        err = torch.linalg.matrix_norm(R - lr.U @ lr.V.mT) ** 2  # Eckart–Young: Σ of the rest
        np.testing.assert_allclose(err.numpy(), (s[:, k:] ** 2).sum(-1).numpy(), atol=1e-10)
        np.testing.assert_allclose(lr.dense().numpy(), (lr.U @ lr.V.mT).numpy(), atol=1e-12)
    # float32, as queries are made: the same truncation to float32 rounding
    lr32 = LowRank.of(R.float(), 3)
    np.testing.assert_allclose((lr32.U @ lr32.V.mT).double().numpy(),
                               LowRank.of(R, 3).dense().numpy(), atol=1e-5)


def test_float32_truncation_is_as_good_as_the_svds_where_the_spectrum_decays():
    """Query gradients have decaying spectra: where the cut falls at σ_r/σ_1 ≈ 3e-3, σ_r² sits
    near a float32 Gram's rounding, so the top-r subspace is found only approximately (a query
    prepared alone and in a batch differ there by ~1e-3 of the largest entry) — yet U Vᵀ is an
    exact projection of R, so its error is the optimal one (Eckart–Young) to within 1 %."""
    torch.manual_seed(0)
    Q, o, i, r = 4, 96, 64, 32
    U0, _ = torch.linalg.qr(torch.randn(Q, o, i, dtype=torch.float64))
    V0, _ = torch.linalg.qr(torch.randn(Q, i, i, dtype=torch.float64))
    sigma = torch.logspace(0, -5, i, dtype=torch.float64)  # σ_32/σ_1 ≈ 3.5e-3
    R = U0 * sigma @ V0.mT
    best = (sigma[r:] ** 2).sum().sqrt()
    err = torch.linalg.matrix_norm(R - LowRank.of(R.float(), r).dense().double())
    np.testing.assert_allclose(err.numpy(), best.expand(Q).numpy(), rtol=1e-2)


def test_self_influence_is_the_preconditioned_norm(setup):
    model, corpus, factors, *_ = setup
    si = self_influence(model, factors, corpus, batch_size=7, progress=False)
    assert si.shape == (len(corpus),) and (si > 0).all()
    # the same number through the query path: each sequence as its own "query" (full text)
    ids = corpus.token_ids(3).tolist()
    q = make_queries(model, factors, [ids[:1]], [ids[1:]], rank=None)
    s = scan(model, q, corpus, ScoreArgs(batch_size=8, chunk_size=8, progress=False),
             ids=[3])[0][0, 0]
    np.testing.assert_allclose(s, si[3], rtol=1e-6)


RESUME_SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    from test_scoring import tiny_model
    from influence_nb import demo
    from influence_nb.curvature import Factors
    from influence_nb.data import Corpus
    from influence_nb.queries import make_queries
    from influence_nb.scoring import ScoreArgs, scan
    tok = demo.load()[1]
    model = tiny_model(len(tok))
    corpus = Corpus.from_texts([f"sequence {{i}} says {{i * 7 % 13}}." for i in range(600)], tok)
    factors = Factors.load({factors!r}, model)
    q = make_queries(model, factors, [tok("sequence")["input_ids"]], [tok(" 3 says")["input_ids"]])
    scores = scan(model, q, corpus, ScoreArgs(batch_size=4, chunk_size=8, progress=False),
                  out_dir={out!r})[0]
    import numpy as np; np.save({result!r}, scores)
""")


@pytest.mark.slow
def test_killed_scan_resumes_with_identical_scores(tmp_path, tokenizer):
    model = tiny_model(len(tokenizer))
    fit_factors(model, Corpus.from_texts(TEXTS, tokenizer),
                FactorArgs(batch_size=8, progress=False)).save(tmp_path / "factors")
    script = tmp_path / "scan.py"
    out, result = tmp_path / "scan", tmp_path / "scores.npy"
    script.write_text(RESUME_SCRIPT.format(tests=os.path.dirname(__file__), out=str(out),
                                           factors=str(tmp_path / "factors"),
                                           result=str(result)))
    child = subprocess.Popen([sys.executable, str(script)])
    deadline = time.time() + 120
    while len(list(out.glob("chunk_*.npz"))) < 3 and time.time() < deadline:
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    child.wait()
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("chunk_*.npz")}
    assert 3 <= len(before) < 75, "the scan was not interrupted mid-way"
    subprocess.run([sys.executable, str(script)], check=True)  # resume
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("chunk_*.npz")}
    assert len(after) == 75
    assert all(after[k] == v for k, v in before.items()), "completed chunks were recomputed"
    resumed = np.load(result)
    import shutil
    shutil.rmtree(out)
    subprocess.run([sys.executable, str(script)], check=True)  # uninterrupted, from scratch
    np.testing.assert_array_equal(resumed, np.load(result))


def test_bad_queries_and_corpora_get_clear_errors(setup, tokenizer):
    model, corpus, factors, *_ = setup
    inf = Influence(model, tokenizer, corpus, factors)
    with pytest.raises(ValueError, match="empty completion"):
        inf.queries(("alpha number", ""))
    with pytest.raises(ValueError, match="context"):
        inf.queries(("alpha " * 70, " beta"))
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers
    other = Tokenizer(models.WordLevel({"[UNK]": 0, "alpha": 1}, unk_token="[UNK]"))
    other.pre_tokenizer = pre_tokenizers.Whitespace()
    other = PreTrainedTokenizerFast(tokenizer_object=other)
    with pytest.raises(ValueError, match="another tokenizer"):
        inf.scan(("alpha", " number"), corpus=Corpus.from_texts(["alpha alpha"], other))
    with pytest.raises(ValueError, match="another tokenizer"):
        Influence(model, other, corpus)


def test_a_query_the_model_is_certain_of_warns(setup, tokenizer):
    """log p ≈ 0 means a vanishing query gradient: the session says so instead of returning
    silently tiny scores; an uncertain query stays quiet, and so does a custom measurement."""
    import copy
    import warnings

    from influence_nb.task import Task
    model, corpus, factors, *_ = setup
    certain = copy.deepcopy(model)
    target = tokenizer(" even", add_special_tokens=False)["input_ids"][0]
    word = tokenizer.decode([target])                             # a one-token completion
    with torch.no_grad():          # every position's hidden state is 1, and only `target` reads it
        certain.gpt_neox.final_layer_norm.weight.zero_()
        certain.gpt_neox.final_layer_norm.bias.fill_(1.0)
        out = certain.get_output_embeddings().weight
        out.zero_()
        out[target] = 2.0                                         # logit 32: p ≈ 1 − 1e-11
    # its Fisher is ~0 (nothing to learn): the gradient dot product stands in for EK-FAC
    plain = fit_factors(certain, corpus, FactorArgs(strategy="identity", progress=False))
    inf = Influence(certain, tokenizer, corpus, plain)
    with pytest.warns(UserWarning, match=f"certain of 1 of 2 queries.*'{word}'"):
        q = inf.queries([("gamma number 2 is", word), ("gamma number 2 is", " odd")])
    assert float(q.f[0]) > -1e-3 > float(q.f[1])

    class Margin(Task):            # a measurement of one's own: no opinion on its value
        def measurement(self, logits, batch):
            return super().measurement(logits, batch)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Influence(model, tokenizer, corpus, factors).queries(("gamma number 2 is", word))
        Influence(certain, tokenizer, corpus, plain, task=Margin()).queries(
            ("gamma number 2 is", word))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_scan_checks_its_scores_and_names_the_layer_where_nan_entered(setup, tokenizer, bad):
    """A scan skips the pass's per-layer finiteness reductions (the scorer checks its scores
    on the host); a non-finite batch runs again with them, so the error still names the layer
    where NaN/inf entered, not the first layer that its backward reached."""
    from influence_nb.hooks import Capture
    _, corpus, factors, prompts, completions = setup
    model = tiny_model(len(tokenizer))
    queries = make_queries(model, factors, prompts, completions)
    with torch.no_grad():
        model.gpt_neox.layers[1].post_attention_layernorm.weight[3] = bad
    checked = []
    original = Capture.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        checked.append(self.check_finite)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Capture, "__init__", spy)
        with pytest.raises(FloatingPointError, match=r"activations \(NaN/inf\) entering layer "
                                                      r"'gpt_neox\.layers\.1\.mlp\.dense_h_to_4h'"):
            scan(model, queries, corpus, ScoreArgs(batch_size=4, progress=False))
        assert checked == [False]        # a scan runs without the per-layer reductions
        with pytest.raises(FloatingPointError, match=r"'gpt_neox\.layers\.1\.mlp\.dense_h_to_4h'"):
            fit_factors(model, corpus, FactorArgs(batch_size=5, progress=False))
        assert checked == [False, True]  # a fit's statistics keep them
