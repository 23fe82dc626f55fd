"""The one corpus pass and what it owns: several consumers in one sweep, the same numbers as
separate passes, the context check for every consumer, the batch contract, ids, and the bugs
that lived in the five copies of the loop."""
import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from influence_nb.curvature import FactorArgs, fit_factors
from influence_nb.data import Corpus
from influence_nb.batching import source
from influence_nb.checks import as_ids
from influence_nb.layers import find_layers
from influence_nb.passes import Consumer, Gradients, Recording, corpus_pass
from influence_nb.queries import Queries, make_queries
from influence_nb.scoring import Costs, ScoreArgs, Scorer, SelfInfluence, scan, self_influence
from influence_nb.session import Influence
from influence_nb.sketch import Projection, SketchArgs, Sketcher, build_sketches
from influence_nb.task import Task

from test_scoring import TEXTS, tiny_model


@pytest.fixture(scope="module")
def setup(tokenizer):
    model = tiny_model(len(tokenizer))
    corpus = Corpus.from_texts(TEXTS, tokenizer, max_len=64)
    factors = fit_factors(model, corpus, FactorArgs(batch_size=5, progress=False))
    tok = lambda s: tokenizer(s)["input_ids"]  # noqa: E731
    queries = make_queries(model, factors, [tok("alpha number"), tok("theta")],
                           [tok(" 0 is even."), tok(" number 7")], rank=None)
    return model, corpus, factors, queries


def test_one_sweep_feeds_several_consumers_with_the_numbers_of_separate_passes(setup, tmp_path):
    """Scores, self-influence and sketches from one pass over shuffled ids equal what each
    computes alone, in the order the ids were asked for (the length bucketing undone)."""
    model, corpus, factors, queries = setup
    layers = find_layers(model, factors.layer_names)
    ids = np.random.default_rng(0).permutation(len(corpus))[:17]
    proj = Projection.draw(factors, SketchArgs(m=16))
    consumers = [Scorer(queries, layers, len(ids)), SelfInfluence(factors, len(ids)),
                 Sketcher(proj, len(ids)), Gradients(layers)]
    (layer_scores, _), selfinf, (sketches, _), (DW, losses) = corpus_pass(
        model, layers, source(corpus, 4, ids), consumers, progress=False)
    alone = scan(model, queries, corpus, ScoreArgs(rank=None, batch_size=8, chunk_size=8,
                                                  progress=False), ids=ids)
    np.testing.assert_allclose(layer_scores, alone[1], rtol=1e-9)
    np.testing.assert_allclose(selfinf, self_influence(model, factors, corpus, 3, ids,
                                                       progress=False), rtol=1e-9)
    for r, i in enumerate(ids):  # the gradients are each sequence's own, in the asked order
        one = corpus_pass(model, layers, source(corpus, 1, [i]), [Gradients(layers)],
                          progress=False)[0][0]
        for name in DW:
            torch.testing.assert_close(DW[name][r], one[name][0], rtol=1e-9, atol=1e-12)
    # the sketches of the shared sweep are the stored ones (chunk of its own, other bucketing)
    store = build_sketches(model, factors, corpus, tmp_path, SketchArgs(m=16, progress=False),
                           ids=ids)
    np.testing.assert_allclose(sketches.astype(np.float64),
                               np.asarray(store.data[store.rows_of(ids)], np.float64),
                               rtol=2e-3, atol=1e-3 * np.abs(sketches).max())
    assert losses.shape == (len(ids),) and bool((losses < 0).all())  # Σ log p of each sequence


def test_every_consumer_checks_the_context_length(setup, tokenizer, tmp_path):
    """A corpus of sequences longer than the model's context is refused by the fit, the scan,
    self-influence and the sketch build alike (one check, in the pass)."""
    model, _, factors, queries = setup
    long = Corpus.from_texts([" ".join(["alpha"] * 100)], tokenizer, max_len=100)
    assert long.max_len > model.config.max_position_embeddings
    calls = [lambda: fit_factors(model, long, FactorArgs(progress=False)),
             lambda: scan(model, queries, long, ScoreArgs(progress=False)),
             lambda: self_influence(model, factors, long, progress=False),
             lambda: build_sketches(model, factors, long, tmp_path,
                                    SketchArgs(m=16, progress=False))]
    for call in calls:
        with pytest.raises(ValueError, match="longer than the model's context of 64"):
            call()


def test_batches_as_mappings_objects_and_dataclasses(setup):
    """One batch contract: a dict, an object with .to, or a plain object with tensor fields give
    the same factors."""
    model, corpus, _, _ = setup
    batches = list(corpus.batches(6))

    @dataclass
    class Plain:  # no .to: the pass moves its tensors itself
        input_ids: torch.Tensor
        attention_mask: torch.Tensor

    args = FactorArgs(progress=False)
    fits = [fit_factors(model, [dict(input_ids=b.input_ids, attention_mask=b.attention_mask)
                                for b in batches], args),
            fit_factors(model, batches, args),
            fit_factors(model, [Plain(b.input_ids, b.attention_mask) for b in batches], args)]
    for f in fits[1:]:
        for name, lf in f.layers.items():
            torch.testing.assert_close(lf.Lambda, fits[0].layers[name].Lambda)
    assert fits[0].n_tokens == fits[2].n_tokens > 0


def test_ids_must_be_integers(setup):
    model, corpus, factors, queries = setup
    args = ScoreArgs(rank=None, progress=False)
    with pytest.raises(TypeError, match="boolean mask"):
        scan(model, queries, corpus, args, ids=np.arange(len(corpus)) < 3)
    with pytest.raises(TypeError, match="boolean mask"):
        self_influence(model, factors, corpus, ids=[True, False, True], progress=False)
    with pytest.raises(TypeError, match="integers"):
        as_ids([0.5, 1.0], 10)
    with pytest.raises(IndexError, match="out of range"):
        scan(model, queries, corpus, args, ids=[0, len(corpus)])
    assert as_ids(np.array([2.0, 0.0]), 3).tolist() == [2, 0]


def test_concatenated_queries_keep_their_factors_and_are_searchable(setup, tmp_path):
    """Queries.concat keeps the one factors id (so sketch search takes concatenated queries) and
    refuses queries preconditioned with different factors."""
    model, corpus, factors, queries = setup
    both = Queries.concat([queries, queries])
    assert both.factors_id == queries.factors_id == factors.factors_id()
    assert len(both) == 4 and both.rank is None
    store = build_sketches(model, factors, corpus, tmp_path, SketchArgs(m=16, progress=False))
    x = store.query_sketches(model, factors, both)
    np.testing.assert_allclose(x[:2], x[2:])
    other = fit_factors(model, corpus, FactorArgs(batch_size=5, damping_factor=0.5,
                                                  progress=False))
    q_other = make_queries(model, other, queries.prompts, queries.completions, rank=None)
    with pytest.raises(ValueError, match="different factors_id"):
        Queries.concat([queries, q_other])


def test_factor_cache_key_includes_the_batch_size_and_the_task(setup, tokenizer, tmp_path, monkeypatch):
    """The length buckets and the seeded per-batch Fisher labels depend on the batch size, the
    Fisher on the task: a fit with another batch size or task is not served from the cache."""
    model, corpus, _, _ = setup
    monkeypatch.setenv("INFLUENCE_NB_CACHE", str(tmp_path))
    inf = Influence(model, tokenizer, corpus)
    a = inf.fit(FactorArgs(batch_size=5, progress=False), cache=True)
    b = inf.fit(FactorArgs(batch_size=7, progress=False), cache=True)
    again = inf.fit(FactorArgs(batch_size=5, progress=True), cache=True)  # bars: same key
    empirical = Influence(model, tokenizer, corpus, task=Task(empirical_fisher=True)).fit(
        FactorArgs(batch_size=5, progress=False), cache=True)   # another Fisher: another fit
    assert len(list(tmp_path.glob("factors-*"))) == 3 and empirical.empirical_fisher
    assert a.factors_id() == again.factors_id() != b.factors_id()
    name = next(iter(a.layers))
    assert not torch.allclose(a.layers[name].Lambda, b.layers[name].Lambda)


def test_session_scan_uses_the_rank_it_is_given(setup, tokenizer):
    model, corpus, factors, _ = setup
    inf = Influence(model, tokenizer, corpus, factors, ScoreArgs(rank=None, progress=False))
    pair = ("alpha number", " 0 is even.")
    full = inf.scan(pair).scores
    one = inf.scan(pair, args=ScoreArgs(rank=1, progress=False)).scores
    assert not np.allclose(full, one, rtol=1e-3)
    np.testing.assert_allclose(one, inf.scan(inf.queries(pair, rank=1)).scores, rtol=1e-12)


def test_factors_checksum_refuses_flipped_bytes(setup, tmp_path):
    _, _, factors, _ = setup
    factors.save(tmp_path)
    file = tmp_path / json.loads((tmp_path / "manifest.json").read_text())["tensors"]
    blob = bytearray(file.read_bytes())
    blob[-5] ^= 0x40
    file.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="SHA-256"):
        type(factors).load(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt or not a manifest"):
        type(factors).load(tmp_path)
    assert json.loads(json.dumps(factors.manifest()))["format"].endswith("/2")


def test_grouping_sequences_changes_no_number(setup, monkeypatch):
    """Consumers that form per-sequence gradients do so in groups bounded by GROUP_BYTES (the
    scorer by its SCORE_BYTES): one sequence at a time gives the same Λ, dense-path scores
    and self-influence."""
    model, corpus, factors, queries = setup
    monkeypatch.setattr("influence_nb.scoring.scoring_cost", lambda *a: Costs(np.inf, 0, np.inf))
    args = ScoreArgs(rank=None, batch_size=8, chunk_size=8, progress=False)

    def run():
        f = fit_factors(model, corpus, FactorArgs(batch_size=5, progress=False))
        return (f, scan(model, queries, corpus, args)[1],
                self_influence(model, factors, corpus, 8, progress=False))

    whole = run()
    monkeypatch.setattr("influence_nb.passes.GROUP_BYTES", 1)
    monkeypatch.setattr("influence_nb.scoring.SCORE_BYTES", 1)
    single = run()
    for name, lf in whole[0].layers.items():
        torch.testing.assert_close(single[0].layers[name].Lambda, lf.Lambda, rtol=1e-10,
                                   atol=1e-12 * lf.Lambda.max().item())
    np.testing.assert_allclose(single[1], whole[1], rtol=1e-10)
    np.testing.assert_allclose(single[2], whole[2], rtol=1e-10)


def test_a_cached_fit_runs_once_while_others_wait(setup, tokenizer, tmp_path, monkeypatch):
    """Two sessions asking for the same cached factors at once (two notebooks, two test
    workers): one fits, the other waits on the entry's lock and loads what it saved."""
    import threading
    import time

    from influence_nb import session
    model, corpus, _, _ = setup
    monkeypatch.setenv("INFLUENCE_NB_CACHE", str(tmp_path))
    fits = []

    def slow_fit(*a, **kw):   # long enough that the second request arrives during the fit
        fits.append(1)
        time.sleep(0.5)
        return fit_factors(*a, **kw)

    monkeypatch.setattr(session, "fit_factors", slow_fit)
    args = FactorArgs(batch_size=5, progress=False)
    got = [None, None]

    def ask(i):
        got[i] = Influence(model, tokenizer, corpus).fit(args, cache=True)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
        time.sleep(0.1)
    for t in threads:
        t.join()
    assert len(fits) == 1 and got[0].factors_id() == got[1].factors_id()


def test_a_corrupt_cache_entry_is_refitted_and_a_foreign_chunk_refused(setup, tokenizer, tmp_path,
                                                                       monkeypatch):
    model, corpus, _, queries = setup
    monkeypatch.setenv("INFLUENCE_NB_CACHE", str(tmp_path / "cache"))
    inf = Influence(model, tokenizer, corpus)
    args = FactorArgs(batch_size=5, progress=False)
    first = inf.fit(args, cache=True)
    entry = next((tmp_path / "cache").glob("factors-*"))
    (entry / "manifest.json").write_text("{torn")
    with pytest.warns(UserWarning, match="unusable"):
        again = inf.fit(args, cache=True)
    assert again.factors_id() == first.factors_id()
    assert type(first).load(entry).factors_id() == first.factors_id()  # the entry was replaced

    out = tmp_path / "scan"
    sargs = ScoreArgs(rank=None, batch_size=8, chunk_size=8, progress=False)
    scan(model, queries, corpus, sargs, out)
    np.savez(out / "chunk_0000000000.npz", layer_scores=np.zeros(3))  # an older or foreign file
    with pytest.raises(ValueError, match="not written by this store"):
        scan(model, queries, corpus, sargs, out)


def test_a_scan_folder_is_tied_to_its_model(setup, tmp_path):
    """Reopening a scan folder with other weights is refused, not answered with the old scores."""
    import copy
    model, corpus, _, queries = setup
    sargs = ScoreArgs(rank=None, batch_size=8, chunk_size=8, progress=False)
    scan(model, queries, corpus, sargs, tmp_path)
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.01)
    with pytest.raises(ValueError, match="holds a scan of other model"):
        scan(other, queries, corpus, sargs, tmp_path)


def test_sampled_labels_and_their_gradient_are_the_log_softmax_ones():
    """The two-level draw gives, for the same uniform, the label one cumulative sum over all V
    classes gives (V not a multiple of the block); the "label" probe's value and gradient with
    respect to the logits equal autograd through log_softmax at those labels."""
    from influence_nb.task import FisherProbe, sample_labels
    g = torch.Generator().manual_seed(0)
    B, T, V = 3, 5, 103
    logits = (3 * torch.randn(B, T, V, generator=g, dtype=torch.float64)).requires_grad_()
    p = logits.detach().softmax(-1).flatten(0, 1)
    cdf = p.cumsum(-1)
    u = torch.rand(B * T, 1, generator=torch.Generator().manual_seed(7), dtype=p.dtype)
    expected = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(1)
    assert torch.equal(sample_labels(p, torch.Generator().manual_seed(7)), expected)

    mask = torch.rand(B, T, generator=g) > 0.3
    w = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)   # any upstream gradient
    ours = FisherProbe.apply(logits, mask, torch.Generator().manual_seed(7), "label")
    (grad,) = torch.autograd.grad((ours * w).sum(), logits)
    y = expected.view(B, T, 1)
    ref = -(logits.log_softmax(-1).gather(-1, y).squeeze(-1) * mask).sum(1)
    (ref_grad,) = torch.autograd.grad((ref * w).sum(), logits)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)
    assert grad[~mask].abs().max() == 0


def test_the_gaussian_probe_has_the_fisher_covariance():
    """The "gaussian" probe's logit gradient r has mean 0, sums to 0 over the vocabulary like
    p − onehot(y), and E[r rᵀ] = diag(p) − p pᵀ (200,000 draws at one position: within
    0.004 of it; dropping the −p pᵀ term would be off by up to 0.16); zero where masked."""
    from influence_nb.task import FisherProbe
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5], dtype=torch.float64)
    p = logits.softmax(-1)
    x = logits.expand(1, 200_000, 5).clone().requires_grad_()
    mask = torch.ones(1, 200_000, dtype=torch.bool)
    mask[0, :10] = False
    (r,) = torch.autograd.grad(FisherProbe.apply(x, mask, torch.Generator().manual_seed(0),
                                                 "gaussian").sum(), x)
    assert r[0, :10].abs().max() == 0
    r = r[0, 10:]
    torch.testing.assert_close(r.sum(-1), torch.zeros(len(r), dtype=r.dtype), atol=1e-12,
                               rtol=0)
    assert r.mean(0).abs().max() < 0.004
    torch.testing.assert_close(r.T @ r / len(r), torch.diag(p) - torch.outer(p, p), atol=4e-3,
                               rtol=0)
    with pytest.raises(ValueError,
                       match=r"Task\(fisher_probe='labels'\): must be one of 'gaussian', 'label'"):
        Task(fisher_probe="labels")


def test_a_recorded_first_pass_gives_the_eigenvalues_of_a_second_model_pass(setup, monkeypatch):
    """EK-FAC replays the covariance pass's ā and δ (its first draw) when they fit in
    RECORD_BYTES: the same factors as running the model again (same labels), with one pass
    over the model instead of two; past the budget the fit runs the second pass. With several
    draws, each batch still runs forward once in the covariance pass."""
    model, corpus = setup[0], setup[1]
    forwards = []
    handle = model.register_forward_hook(lambda *_: forwards.append(1))
    batches = -(-len(corpus) // 5)
    try:
        for draws in (1, 3):
            fits = {}
            for budget in (1 << 30, 5000):
                monkeypatch.setattr("influence_nb.passes.RECORD_BYTES", budget)
                forwards.clear()
                fits[budget] = fit_factors(model, corpus, FactorArgs(batch_size=5, draws=draws,
                                                                     progress=False))
                fits[budget, "batches"] = len(forwards)
            assert fits[1 << 30, "batches"] == batches and fits[5000, "batches"] == 2 * batches
            for name, f in fits[1 << 30].layers.items():
                torch.testing.assert_close(f.Lambda, fits[5000].layers[name].Lambda, rtol=1e-6,
                                           atol=0)
                assert f.Lambda.abs().sum() > 0
            assert fits[1 << 30].factors_id() == fits[5000].factors_id()
    finally:
        handle.remove()


class PerDraw(Consumer):
    """Σ ā and Σ δ δᵀ of every layer, per Fisher draw."""

    def __init__(self):
        self.a, self.S, self.updates = {}, {}, []

    def update_layer(self, layer, a, delta, batch):
        key = (batch.draw, layer.name)
        d = delta.flatten(0, 1)[batch.tokens]
        self.a[key] = self.a.get(key, 0) + a.flatten(0, 1)[batch.tokens].sum(0)
        self.S[key] = self.S.get(key, 0) + d.T @ d

    def update(self, batch):
        self.updates.append((batch.k, batch.draw, len(batch)))

    def finish(self):
        return self


def test_several_fisher_draws_share_the_forward_and_the_first_is_the_single_draw(setup):
    """corpus_pass(draws=k) runs each batch forward once and backward k times, feeding every
    draw as a batch of its own: ā is the same in every draw, draw 0 is exactly a one-draw
    pass's (so a fit's Λ, from draw 0, is a one-draw fit's in the same basis) and the other
    draws differ; a Recording keeps draw 0 only."""
    model, corpus = setup[0], setup[1]
    layers = find_layers(model, "mlp")
    src = source(corpus, 5)
    one, three, rec = PerDraw(), PerDraw(), Recording()
    corpus_pass(model, layers, src, [one], "fisher", seed=3, progress=False)
    corpus_pass(model, layers, src, [three, rec], "fisher", seed=3, progress=False, draws=3)
    batches = -(-len(corpus) // 5)
    assert [u[:2] for u in three.updates] == [(k, j) for k in range(batches) for j in range(3)]
    for t in layers:
        n = t.name
        torch.testing.assert_close(three.S[0, n], one.S[0, n], rtol=1e-5, atol=1e-9)
        for j in (1, 2):
            torch.testing.assert_close(three.a[j, n], three.a[0, n])
            assert (three.S[j, n] - three.S[0, n]).norm() > 0.05 * three.S[0, n].norm()
    assert len(rec.batches) == batches and all(b.draw == 0 for b, _ in rec.batches)


def test_several_fisher_draws_average_the_noise_of_S_and_keep_the_counts(setup):
    """FactorArgs(draws=k) draws every sequence's output gradients k times in the covariance
    pass: A (label-free) and the counts are the one-draw fit's, and the seed-to-seed
    difference of S shrinks (≈ 1/√k of one draw's; asserted < 0.7 at k = 4)."""
    model, corpus = setup[0], setup[1]
    fit = lambda draws, seed: fit_factors(  # noqa: E731
        model, corpus, FactorArgs(batch_size=5, draws=draws, seed=seed, progress=False))
    one, four = [fit(1, s) for s in (0, 1)], [fit(4, s) for s in (0, 1)]
    assert (four[0].n_examples, four[0].n_tokens) == (one[0].n_examples, one[0].n_tokens)
    S = lambda f: [Q @ torch.diag(lam) @ Q.T for Q, lam in  # noqa: E731
                   ((torch.block_diag(*l.Q_S), l.lambda_S) for l in f.layers.values())]
    spread = {}
    for k, (a, b) in (("one", one), ("four", four)):
        num = sum((x - y).norm() ** 2 for x, y in zip(S(a), S(b)))
        spread[k] = float(num.sqrt() / sum(x.norm() ** 2 for x in S(a)).sqrt())
    for n, f in four[0].layers.items():
        torch.testing.assert_close(f.lambda_A, one[0].layers[n].lambda_A, rtol=1e-5, atol=1e-7)
    assert spread["four"] < 0.7 * spread["one"], spread
    with pytest.raises(ValueError, match="empirical Fisher"):
        fit_factors(model, corpus, FactorArgs(draws=2, progress=False),
                    Task(empirical_fisher=True))


def test_a_pass_runs_in_eval_mode_and_gives_back_each_modules_flag(setup):
    """Dropout is off during a pass (the scores of a model left in training mode are the
    eval-mode ones) and every module's training flag is as it was afterwards, mixed or not."""
    model, corpus, _, queries = setup
    args = ScoreArgs(rank=None, batch_size=4, progress=False)
    expected = scan(model, queries, corpus, args)[0]
    dropout = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropout, "the tiny model needs dropout for this test"
    for m in dropout:
        m.p = 0.5
    try:
        for setting in ("all", "mixed"):
            model.train()
            if setting == "mixed":
                dropout[0].eval()
            flags = [m.training for m in model.modules()]
            np.testing.assert_allclose(scan(model, queries, corpus, args)[0], expected,
                                       rtol=1e-9)
            assert [m.training for m in model.modules()] == flags
    finally:
        for m in dropout:
            m.p = 0.0
        model.eval()


class _Branches(torch.nn.Module):
    """x -> lin1 -> tanh -> lin2 (the loss), lin3 beside it (its output is not used), lin4
    whose output is changed in place when ``inplace == "output"``, lin1's input when
    ``inplace == "input"``."""

    def __init__(self, inplace: str = ""):
        super().__init__()
        torch.manual_seed(0)
        self.lin1, self.lin2, self.lin3, self.lin4 = (torch.nn.Linear(3, 3) for _ in range(4))
        self.inplace = inplace

    def forward(self, x):
        self.lin3(x)
        y4 = self.lin4(x)
        if self.inplace == "output":
            y4.mul_(2.0)
        h = x * 1.0
        y1 = self.lin1(h)
        if self.inplace == "input":
            h.add_(1.0)
        return self.lin2(torch.tanh(y1)) + y4


def _captured(net, x, layers):
    from influence_nb.hooks import Capture
    got = {}
    with Capture(net, layers) as cap:
        cap.start(torch.ones(x.shape[:2], dtype=torch.bool))
        losses = net(x).pow(2).sum((1, 2))
        cap.backward(losses, lambda layer, a, d: got.__setitem__(layer.name, (a, d)))
    return got, losses


def test_capture_hands_over_each_outputs_gradient_and_zero_where_the_loss_does_not_reach():
    """δ of every tracked layer is autograd's ∂L/∂y (ā the input with the bias column), a layer
    whose output the loss does not use gets δ = 0, and no parameter gradient is formed."""
    net = _Branches().double()
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    layers = find_layers(net, "all")
    got, _ = _captured(net, x, layers)
    assert set(got) == {"lin1", "lin2", "lin3", "lin4"}
    assert all(p.grad is None and p.requires_grad for p in net.parameters())  # flags given back
    outs, ins = {}, {}

    def keep(module, args, y):
        name = next(n for n in got if getattr(net, n) is module)
        outs[name], ins[name] = y, args[0]

    hooks = [getattr(net, n).register_forward_hook(keep) for n in got]
    loss = net(x).pow(2).sum()
    for h in hooks:
        h.remove()
    used = ["lin1", "lin2", "lin4"]
    for n, g in zip(used, torch.autograd.grad(loss, [outs[n] for n in used])):
        torch.testing.assert_close(got[n][1], g, rtol=1e-12, atol=0)
        torch.testing.assert_close(got[n][0][..., :3], ins[n].detach(), rtol=0, atol=0)
        assert bool((got[n][0][..., 3] == 1).all())
    assert bool((got["lin3"][1] == 0).all())


def test_capture_refuses_an_input_or_output_changed_in_place_a_layer_without_autograd_and_one_run_twice():
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    for where, name in (("output", "lin4"), ("input", "lin1")):
        net = _Branches(inplace=where).double()
        with pytest.raises(RuntimeError, match=f"{where} of layer '{name}' was modified in place"):
            _captured(net, x, find_layers(net, "all"))
    frozen = _Branches().double()
    frozen.lin3.forward = torch.no_grad()(frozen.lin3.forward)  # a layer run without autograd
    with pytest.raises(RuntimeError, match="'lin3' ran without autograd"):
        _captured(frozen, x, find_layers(frozen, "all"))
    twice = torch.nn.Sequential(net.lin1, net.lin1)
    with pytest.raises(RuntimeError, match="'0' ran twice"):
        _captured(twice, x, find_layers(twice, "all"))
