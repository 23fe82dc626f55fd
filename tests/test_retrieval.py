"""Candidate retrieval: sketches, FAISS index, exact rescoring, BM25, search-size estimate."""
from dataclasses import replace

import numpy as np
import pytest
import torch

from influence_nb.calibration import Calibration, CalibrationArgs, rank_fractions
from influence_nb.curvature import FactorArgs, fit_factors
from influence_nb.data import Corpus
from influence_nb.layers import find_layers
from influence_nb.index import IndexArgs, IndexFileError, SketchIndex
from influence_nb.scoring import ScoreArgs
from influence_nb.retriever import Retriever
from influence_nb.search import BM25, PowerLawTail, recall_at_k, search_size
from influence_nb import projection
from influence_nb.projection import SketchArgs, resolve_variant
from influence_nb.session import Influence
from influence_nb.sketch import SketchError, Sketches, build_sketches

from test_scoring import tiny_model

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]
TEXTS = [f"{w} number {i} is {'odd' if i % 2 else 'even'} and {WORDS[(i * 7) % 10]} too."
         for i, w in enumerate(WORDS * 6)]
PAIRS = [("alpha number", " 0 is even"), ("gamma number 2 is", " even"),
         ("theta number", " 7 is odd and")]
SMALL = SketchArgs(exact_bytes=0, m=64, batch_size=8, chunk_size=16, progress=False)
EXACT = SketchArgs(m=64, batch_size=8, chunk_size=16, progress=False)   # tokens kept: small


@pytest.fixture(scope="module")
def session(tokenizer):
    model = tiny_model(len(tokenizer), torch.float32)
    corpus = Corpus.from_texts(TEXTS, tokenizer, max_len=64)
    factors = fit_factors(model, corpus, FactorArgs(batch_size=12, progress=False))
    return Influence(model, tokenizer, corpus, factors,
                     ScoreArgs(rank=None, batch_size=8, chunk_size=16, progress=False))


@pytest.fixture(scope="module")
def exact(session):
    return session.scan(PAIRS)


def test_flat_retrieval_and_rescoring_equal_exhaustive_top_k(session, exact, tmp_path):
    ret = Retriever.build(session, tmp_path, SketchArgs(exact_bytes=0, m=1024, progress=False),
                          IndexArgs(progress=False), lexical=0)
    assert ret.index.kind == "flat"
    everything = ret.search(PAIRS, candidates=2 * len(TEXTS), probe=0)
    assert sorted(everything.ids) == list(range(len(TEXTS)))
    tol = dict(rtol=1e-5, atol=1e-6 * np.abs(exact.scores).max())  # float32, other batching
    np.testing.assert_allclose(everything.scores, exact.scores[:, everything.ids], **tol)
    res = ret.search(PAIRS, candidates=len(TEXTS) // 2, probe=0)  # half the corpus rescored
    assert len(res.ids) < len(TEXTS) and set(res.timings) == {"queries", "sketch", "search",
                                                             "bm25", "rescore"}
    np.testing.assert_allclose(res.scores, exact.scores[:, res.ids], **tol)  # exact scores
    for sign in ("positive", "negative"):
        assert recall_at_k(res, exact, k=5, sign=sign).tolist() == [1.0] * len(PAIRS)
    for q in range(len(PAIRS)):  # the candidates are the sketch index's exact Flat top-k
        x = ret.sketches.query_sketches(session.model, session.factors, session.queries(PAIRS))
        dots = ret.sketches.data.astype(np.float32) @ x[q]
        top = ret.sketches.ids[np.argsort(-dots)[:len(TEXTS) // 4]]
        assert set(top) <= set(res.candidates[q])


def test_hybrid_candidates_add_bm25_matches_to_the_positive_half(session, exact, tmp_path):
    ret = Retriever.build(session, tmp_path, SketchArgs(exact_bytes=0, m=256, progress=False),
                          IndexArgs(progress=False), lexical=0.5)
    K = 24
    res = ret.search(PAIRS, candidates=K, probe=0)
    words = BM25(TEXTS).top([p + c for p, c in PAIRS], K // 4)     # half of the positive half
    x = ret.sketches.query_sketches(session.model, session.factors, session.queries(PAIRS))
    for q in range(len(PAIRS)):
        order = ret.sketches.ids[np.argsort(-(ret.sketches.data.astype(np.float32) @ x[q]))]
        expected = set(words[q]) | set(order[:K // 4]) | set(order[::-1][:K // 2])
        assert set(res.candidates[q]) == expected and len(res.candidates[q]) <= K
    tol = dict(rtol=1e-5, atol=1e-6 * np.abs(exact.scores).max())
    np.testing.assert_allclose(res.scores, exact.scores[:, res.ids], **tol)
    with pytest.raises(ValueError, match=r"lexical=1.5\): must be a finite number in \[0, 1\]"):
        Retriever(session, ret.sketches, ret.index, lexical=1.5)


def test_multi_query_recall_is_each_querys_own_not_the_unions(session, exact, tmp_path):
    """A search of several queries rescores the union of their candidates; recall_at_k must
    credit query q with its own candidates only — what a search of q alone finds."""
    ret = Retriever.build(session, tmp_path, SketchArgs(exact_bytes=0, m=64, variant="whitened",
                                                        progress=False),
                          IndexArgs(progress=False), lexical=0)
    K, k = 6, 5
    together = ret.search(PAIRS, candidates=K, probe=0)
    honest = recall_at_k(together, exact, k=k)
    for q, pair in enumerate(PAIRS):
        alone = ret.search([pair], candidates=K, probe=0)
        assert set(alone.candidates[0]) == set(together.candidates[q])
        assert honest[q] == recall_at_k(alone, session.scan([pair]), k=k)[0]
    union = [len(set(together.top(q, k)["id"]) & set(exact.top(q, k)["id"])) / k
             for q in range(len(PAIRS))]
    assert max(u - h for u, h in zip(union, honest)) > 0   # the union would have looked better


def test_search_reports_estimated_recall_and_search_size(session, tmp_path, monkeypatch):
    cal = CalibrationArgs(sample=40, queries=4, completion=2)
    ret = Retriever.build(session, tmp_path, SMALL, IndexArgs(progress=False), lexical=0)
    ret.calibration_args = cal
    res = ret.search(PAIRS, candidates=12, probe=30)
    est = res.estimated_recall
    assert 0 <= est["positive"] <= 1 and 0 <= est["negative"] <= 1
    assert est["calibration_sample"] == 40 and est["calibration_queries"] == 4
    assert len(res.search_size) == len(PAIRS)
    assert (tmp_path / "sketches" / "calibration.json").exists()
    scans = []
    monkeypatch.setattr(Influence, "scan", lambda *a, **kw: scans.append(1))
    again = Retriever.open(session, tmp_path, lexical=0)
    again.calibration_args = cal
    assert again.calibration == ret.calibration and not scans   # scanned once per store
    full = again.calibration.recall(len(TEXTS), len(TEXTS))
    assert full["positive"] == full["negative"] == 1.0          # everything rescored: found


def test_bm25_joins_only_where_the_calibrated_sketch_falls_short(session, tmp_path):
    built = Retriever.build(session, tmp_path, SMALL, IndexArgs(progress=False), lexical=None)
    n = len(built.sketches)
    for fraction, split in ((0.0, (0, 10, 10)),      # the sketch finds them all
                            (0.9, (5, 5, 10))):      # it does not: K/4 from BM25
        cal = Calibration("x", n, 10, 1, [[fraction]] * 4, [[0.0]] * 4, {})
        ret = Retriever(session, built.sketches, built.index, calibration=cal)
        assert ret.calibration is cal and ret.split(20) == split


def test_candidates_at_the_extremes_are_clamped_or_refused(session, exact, tmp_path):
    """candidates=10**9 is the whole corpus (it once grew to 20 GB); 0 is refused in one line;
    1 and lexical=1.0 (BM25 only: no sketch search on the positive side) give a result, never
    a bare FAISS assertion."""
    ret = Retriever.build(session, tmp_path, SMALL, IndexArgs(progress=False), lexical=0)
    everything = ret.search(PAIRS, candidates=10 ** 9, probe=0)
    assert sorted(everything.ids) == list(range(len(TEXTS)))
    for lexical, k in ((0, 1), (1.0, 1), (1.0, 2), (0.5, 1)):
        ret.lexical = lexical
        res = ret.search(PAIRS[:1], candidates=k, probe=0)
        assert len(res.candidates[0]) == k and set(res.ids) == set(res.candidates[0])
        np.testing.assert_allclose(res.scores, exact.scores[:1, res.ids], rtol=1e-5,
                                   atol=1e-6 * np.abs(exact.scores).max())
    for bad, error in ((0, ValueError), (-1, ValueError), (2.5, TypeError), (True, TypeError)):
        with pytest.raises(error, match=r"Retriever.search\(candidates=.*\): must be an integer ≥ 1") as e:
            ret.search(PAIRS, candidates=bad)
        assert "\n" not in str(e.value)
    _, ids = ret.index.search(np.ones((2, ret.sketches.dim), np.float32), 0)
    assert ids.shape == (2, 0)


def test_rank_fractions():
    exact = np.array([[5.0, 4, 3, 2, 1, 0]])
    approx = np.array([[0.0, 5, 4, 3, 2, 1]])   # the sketch puts the best last
    pos, neg = rank_fractions(exact, approx, 2)
    np.testing.assert_allclose(pos, [[5 / 6, 0]])
    np.testing.assert_allclose(neg, [[1 / 6, 2 / 6]])


def test_eigen_sketch_with_every_coordinate_is_exact(session, exact, tmp_path):
    """Keeping all eigenbasis coordinates, the eigen sketch's inner products are the scores
    (exact whitening per coordinate, no random measurement); fewer keep the largest Λ/λ."""
    n_params = sum(o * i for o, i in session.factors.shapes.values())
    sk = build_sketches(session.model, session.factors, session.corpus, tmp_path,
                        SketchArgs(exact_bytes=0, m=n_params, variant="eigen", batch_size=8,
                                   progress=False))
    assert sk.dim == n_params
    approx = sk.query_sketches(session.model, session.factors, session.queries(PAIRS)) \
        @ sk.data.astype(np.float32).T
    np.testing.assert_allclose(approx, exact.scores[:, sk.ids], rtol=2e-2,
                               atol=2e-3 * np.abs(exact.scores).max())   # float16 storage
    assert resolve_variant(session.factors, SketchArgs(m=n_params)) == "eigen"   # coverage 1


@pytest.mark.parametrize("variant", ["eigen", "whitened"])
def test_stored_norms_bound_the_sketch_error(session, exact, tmp_path, variant):
    """Eigen: per layer, |score − sketch estimate| ≤ ‖query rest‖ · ‖sequence rest‖ (Cauchy–
    Schwarz in the whitened eigenbasis over the dropped coordinates), so the error lies within
    their sum over the layers. Random: the norms are the sketch's own per layer (its JL
    scale), and the error is a fraction of their products' sum."""
    m = 16 if variant == "eigen" else 64
    sk = build_sketches(session.model, session.factors, session.corpus, tmp_path,
                        SketchArgs(exact_bytes=0, m=m, variant=variant, batch_size=8,
                                   progress=False))
    queries = session.queries(PAIRS)
    x = sk.query_sketches(session.model, session.factors, queries)
    bound = sk.noise_scale(sk.query_rest(session.factors, queries, x))
    S = exact.scores[:, sk.ids]
    err = np.abs(S - x @ sk.data.astype(np.float32).T)
    if variant == "eigen":
        assert (err <= bound + 1e-2 * np.abs(S).max()).all()      # float16 sketches
    else:
        layers = np.split(sk.data.astype(np.float64), len(sk.manifest["layers"]), 1)
        own = np.stack([np.linalg.norm(part, axis=1) for part in layers], 1)
        np.testing.assert_allclose(sk.norms, own, rtol=2e-3)
        assert np.median(err / bound) < 0.5
    assert (bound > 0).all()
    print(f"{variant}: |error| / bound median {np.median(err / bound):.3f}")


def many_pairs(n: int) -> list[tuple[str, str]]:
    """n queries from the corpus's texts (the words before "is" and the rest), and others."""
    texts = [f"{WORDS[(3 * i) % 10]} number {i % 13} is {'odd' if i % 3 else 'even'}"
             for i in range(n)]
    return [(t[:t.index(" is")], t[t.index(" is"):]) for t in texts]


@pytest.mark.parametrize("variant", ["eigen", "whitened"])
def test_recall_target_is_kept_over_many_queries(session, tmp_path, variant):
    """The bound's coverage: over many queries, each searched alone at recall=0.8 (k = 3), the
    exhaustive top-3 of both signs lands among the rescored sequences at least at the promised
    rate (up to the sampling error of 16 queries)."""
    sk = build_sketches(session.model, session.factors, session.corpus, tmp_path / "s",
                        SketchArgs(exact_bytes=0, m=16 if variant == "eigen" else 64,
                                   variant=variant, batch_size=8, progress=False))
    ret = Retriever(session, sk, SketchIndex.build(sk, tmp_path / "i", IndexArgs(progress=False)),
                    calibration=CalibrationArgs(sample=60, queries=8))
    pairs = many_pairs(16)
    S = session.scan(pairs).scores[:, sk.ids]
    found, fractions = [], []
    for q, pair in enumerate(pairs):
        res = ret.search([pair], recall=0.8, k=3, probe=0)
        rows = sk.rows_of(res.candidates[0])
        for sign in (1, -1):
            found.append(np.isin(np.argsort(-sign * S[q])[:3], rows).mean())
        fractions.append(res.rescored_fraction[0])
        assert res.met == [True] and 0 <= min(res.estimated_recall["positive"]) <= 1
        np.testing.assert_allclose(res.scores[0], S[q, sk.rows_of(res.ids)], rtol=1e-4,
                                   atol=1e-5 * np.abs(S[q]).max())
    print(f"{variant}: recall {np.mean(found):.3f}, rescored {np.mean(fractions):.3f}")
    assert np.mean(found) >= 0.8 - 0.05


def test_recall_target_beyond_the_budget_says_so(session, tmp_path):
    """A target the budget cannot reach stops at the budget, flags the query unmet and warns in
    one line; a budget and a target together with candidates= are refused."""
    ret = Retriever.build(session, tmp_path, SMALL, IndexArgs(progress=False), lexical=0)
    ret.calibration_args = CalibrationArgs(sample=40, queries=4)
    with pytest.warns(UserWarning, match=r"1 of 1 queries stopped at budget=0.3 below "
                      r"recall=0.999 .*; raise budget= or lower recall="):
        res = ret.search(PAIRS[:1], recall=0.999, budget=0.3)
    assert res.met == [False] and res.rescored_fraction[0] <= 0.3
    assert min(res.estimated_recall["positive"] + res.estimated_recall["negative"]) < 0.999
    full = ret.search(PAIRS[:1], recall=0.999)                 # no budget: met, maybe all
    assert full.met == [True] and full.rounds >= 1
    with pytest.raises(ValueError, match=r"search\(candidates=10, recall=0.9\): give one"):
        ret.search(PAIRS, candidates=10, recall=0.9)
    with pytest.raises(ValueError, match=r"recall=1.0\): must be"):
        ret.search(PAIRS, recall=1.0)


def test_store_of_format_1_serves_fixed_searches_and_refuses_a_recall_target(session, tmp_path):
    """A store written before the norms (format 1) still opens and serves candidates=K; a
    recall target asks, in one line, for a rebuild; growing it is refused."""
    from influence_nb import store
    from influence_nb.sketch import FORMAT_1
    path = tmp_path / "sketches"
    built = build_sketches(session.model, session.factors, session.corpus, path, SMALL,
                           ids=range(50))
    manifest = store.read_manifest(path / "sketches.json", built.manifest["format"],
                                   SketchError, "")
    manifest |= dict(format=FORMAT_1, chunks=[c[:3] for c in manifest["chunks"]])
    manifest.pop("tokens")
    store.write_manifest(path / "sketches.json", manifest)
    (path / "norms.f32").unlink()
    old = Sketches.open(path, session.model, session.factors)
    ret = Retriever(session, old, SketchIndex.build(old, tmp_path / "index",
                                                    IndexArgs(progress=False)), lexical=0)
    assert old.manifest["format"] == FORMAT_1
    assert len(ret.search(PAIRS, candidates=12, probe=0).ids) > 0
    with pytest.raises(SketchError, match=r"predates the per-sequence norms .* rebuild it "
                       r"with build_sketches\(\.\.\.\) in a new directory, or search with "
                       r"candidates=K$"):
        ret.search(PAIRS, recall=0.9)
    assert len(build_sketches(session.model, session.factors, session.corpus, path, SMALL,
                              ids=range(50))) == 50          # nothing to add: opens as it is
    with pytest.raises(SketchError, match="format 1, before per-sequence norms: it cannot "
                       "grow; build the sketches in a new directory"):
        build_sketches(session.model, session.factors, session.corpus, path, SMALL)


@pytest.mark.parametrize("dense", [0, 10 ** 9])
def test_eigen_sketch_block_and_coordinate_paths_agree(session, tmp_path, monkeypatch, dense):
    args = SketchArgs(exact_bytes=0, m=48, variant="eigen", batch_size=8, progress=False)
    want = build_sketches(session.model, session.factors, session.corpus, tmp_path / "a", args)
    monkeypatch.setattr(projection, "DENSE_GATHER", dense)  # 0: coordinate by coordinate
    got = build_sketches(session.model, session.factors, session.corpus, tmp_path / "b", args)
    np.testing.assert_allclose(got.data.astype(np.float32), want.data.astype(np.float32),
                               rtol=1e-2, atol=1e-3 * np.abs(want.data).max())


@pytest.mark.parametrize("variant", ["eigen", "whitened"])
def test_sketch_inner_products_correlate_with_exact_scores(session, exact, tmp_path, variant):
    args = SketchArgs(exact_bytes=0, m=256, variant=variant, batch_size=8, progress=False)
    sk = build_sketches(session.model, session.factors, session.corpus, tmp_path, args)
    approx = sk.query_sketches(session.model, session.factors, session.queries(PAIRS)) \
        @ sk.data.astype(np.float32).T
    r = [np.corrcoef(approx[q], exact.scores[q, sk.ids])[0, 1] for q in range(len(PAIRS))]
    print(f"{variant}: Pearson per query {np.round(r, 3).tolist()}")
    assert min(r) > 0.8


def test_identity_factors_get_the_random_sketch_without_a_basis(session, tmp_path):
    """No curvature, nothing to whiten: "auto" is the whitened sketch with B = I, s = 1, and
    the eigen sketch, which needs an eigenbasis, is refused."""
    identity = fit_factors(session.model, session.corpus,
                           FactorArgs(strategy="identity", progress=False))
    inf = Influence(session.model, session.tokenizer, session.corpus, identity,
                    session.score_args)
    assert resolve_variant(identity, SketchArgs()) == "whitened"
    sk = build_sketches(inf.model, identity, inf.corpus, tmp_path,
                        SketchArgs(exact_bytes=0, m=256, batch_size=8, progress=False))
    approx = sk.query_sketches(inf.model, identity, inf.queries(PAIRS)) \
        @ sk.data.astype(np.float32).T
    exact = inf.scan(PAIRS).scores
    assert min(np.corrcoef(a, s)[0, 1] for a, s in zip(approx, exact[:, sk.ids])) > 0.8
    with pytest.raises(ValueError, match="eigen sketch needs K-FAC or EK-FAC"):
        build_sketches(inf.model, identity, inf.corpus, tmp_path / "e",
                       SketchArgs(exact_bytes=0, variant="eigen", progress=False))


def test_sketch_inner_products_are_unbiased(session, exact, tmp_path):
    """Averaged over projection seeds, ⟨sketch_q, sketch_m⟩ → the exact score (no bias from the
    whitening or the scaling): the mean over 24 seeds of m = 64 is within a few standard errors
    of the exact scores."""
    ids, queries = range(12), session.queries(PAIRS)
    draws = []
    for seed in range(24):
        args = SketchArgs(exact_bytes=0, m=64, variant="whitened", seed=seed, batch_size=12,
                          chunk_size=12, progress=False)
        sk = build_sketches(session.model, session.factors, session.corpus, tmp_path / str(seed),
                            args, ids=ids)
        draws.append(sk.query_sketches(session.model, session.factors, queries)
                     @ sk.data.astype(np.float32).T)
    draws = np.stack(draws)                                   # (seeds, Q, n)
    err = (draws.mean(0) - exact.scores[:, :12]) / (draws.std(0) / np.sqrt(len(draws)))
    assert np.abs(err).mean() < 1.5 and np.abs(err).max() < 5   # z-scores of the mean


def test_corrupt_or_truncated_files_give_clear_errors(session, tmp_path):
    sk = build_sketches(session.model, session.factors, session.corpus, tmp_path / "s", SMALL)
    SketchIndex.build(sk, tmp_path / "i", IndexArgs(kind="ivfsq8", nlist=4, progress=False))
    data = tmp_path / "s" / "sketches.f16"
    blob = data.read_bytes()
    data.write_bytes(blob[:-10])
    with pytest.raises(SketchError, match="truncated"):
        Sketches.open(tmp_path / "s")
    data.write_bytes(blob[:100] + bytes(10) + blob[110:])
    with pytest.raises(SketchError, match="corrupt"):
        Sketches.open(tmp_path / "s")
    data.write_bytes(blob)
    (tmp_path / "s" / "sketches.json").write_text("{not json")
    with pytest.raises(SketchError, match="corrupt"):
        Sketches.open(tmp_path / "s")
    shard = tmp_path / "i" / "shard_000.faiss"
    blob = shard.read_bytes()
    shard.write_bytes(blob[:len(blob) // 2])
    with pytest.raises(IndexFileError, match="truncated"):
        SketchIndex.load(tmp_path / "i", sk)
    shard.write_bytes(blob[:-4] + b"xxxx")
    with pytest.raises(IndexFileError, match="corrupt"):
        SketchIndex.load(tmp_path / "i", sk)


def test_sketches_and_index_are_tied_to_model_and_factors(session, tmp_path, tokenizer):
    sk = build_sketches(session.model, session.factors, session.corpus, tmp_path / "s", SMALL)
    SketchIndex.build(sk, tmp_path / "i", IndexArgs(progress=False))
    other = tiny_model(len(tokenizer), torch.float32)
    with torch.no_grad():
        find_layers(other, session.factors.layer_names)[0].module.weight.add_(1.0)
    with pytest.raises(SketchError, match="another model"):
        Sketches.open(tmp_path / "s", other, session.factors)
    refit = fit_factors(session.model, session.corpus,
                        FactorArgs(batch_size=12, damping_factor=0.5, progress=False))
    with pytest.raises(SketchError, match="other factors"):
        build_sketches(session.model, refit, session.corpus, tmp_path / "s", SMALL)
    resketched = build_sketches(session.model, refit, session.corpus, tmp_path / "s2", SMALL)
    with pytest.raises(IndexFileError, match="other sketches"):
        SketchIndex.load(tmp_path / "i", resketched)


def test_appended_sequences_keep_old_ids(session, tmp_path):
    first = build_sketches(session.model, session.factors, session.corpus, tmp_path,
                           SMALL, ids=range(20, 40))
    old = np.array(first.data)
    grown = build_sketches(session.model, session.factors, session.corpus, tmp_path, SMALL)
    assert grown.ids[:20].tolist() == list(range(20, 40))
    np.testing.assert_array_equal(grown.data[:20], old)
    assert sorted(grown.ids.tolist()) == list(range(len(TEXTS)))
    whole = build_sketches(session.model, session.factors, session.corpus, tmp_path / "w", SMALL)
    np.testing.assert_allclose(grown.data[grown.rows_of(whole.ids)].astype(np.float32),
                               whole.data.astype(np.float32), rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("exact", [False, True])
def test_interrupted_sketch_build_resumes(session, tmp_path, monkeypatch, exact):
    """Killed in its third chunk after partial writes (the ragged token files too), a build
    resumes after the two committed chunks, byte for byte the store of one uninterrupted run."""
    args = EXACT if exact else SMALL
    calls = []
    batches = Corpus.batches

    def flaky(self, batch_size, ids=None, progress=False):
        calls.append(len(ids))
        if len(calls) == 3:  # dies in the third chunk, after a partial write
            for name in ("sketches.f16", "token_counts.i32", "tokens.f16"):
                if (tmp_path / name).exists():
                    with open(tmp_path / name, "ab") as fh:
                        fh.write(b"\x01" * 77)
            raise KeyboardInterrupt
        return batches(self, batch_size, ids, progress)

    monkeypatch.setattr(Corpus, "batches", flaky)
    with pytest.raises(KeyboardInterrupt):
        build_sketches(session.model, session.factors, session.corpus, tmp_path, args)
    assert len(Sketches.open(tmp_path)) == 2 * args.chunk_size   # two committed chunks
    calls.clear()
    resumed = build_sketches(session.model, session.factors, session.corpus, tmp_path, args)
    assert sum(calls) == len(TEXTS) - 2 * args.chunk_size        # done chunks not redone
    monkeypatch.undo()
    whole = build_sketches(session.model, session.factors, session.corpus, tmp_path / "w", args)
    assert resumed.ids.tolist() == whole.ids.tolist()
    np.testing.assert_array_equal(resumed.data, whole.data)
    assert (resumed.exact is None) == (not exact)
    for got, want in zip(resumed.exact or (), whole.exact or ()):
        np.testing.assert_array_equal(got, want)
    Sketches.open(tmp_path)  # CRCs verify


def test_sharded_approximate_index_matches_flat(tmp_path, session):
    sk = build_sketches(session.model, session.factors, session.corpus, tmp_path / "s", SMALL)
    flat = SketchIndex.build(sk, tmp_path / "f", IndexArgs(kind="flat", shard_size=25,
                                                           progress=False))
    hnsw = SketchIndex.build(sk, tmp_path / "h", IndexArgs(kind="hnsw", shard_size=25,
                                                           progress=False))
    x = np.random.default_rng(0).normal(size=(4, sk.dim)).astype(np.float32)
    exact = sk.data.astype(np.float32) @ x.T
    want = sk.ids[np.argsort(-exact, axis=0)[:5].T]
    for index in (flat, SketchIndex.load(tmp_path / "h", sk)):
        assert len(index.shards) == 3
        np.testing.assert_array_equal(index.search(x, 5)[1], want)


def test_bm25_and_search_size():
    bm = BM25(["the cat sat", "the dog sat on the dog", "a bird", "cat cat cat"])
    s = bm.scores(["cat"])[0]
    assert s[0] > 0 and s[1] == 0 and s[3] > s[0]  # binary presence, shorter document wins
    assert bm.top(["dog sat"], 1)[0].tolist() == [1]
    rng = np.random.default_rng(0)
    sample = rng.pareto(2.0, 200_000) + 1           # P(x > t) = t^-2
    law = PowerLawTail.fit(sample, tail=0.05)
    assert abs(law.alpha - 2.0) < 0.1
    est = search_size(sample, np.full(10, 100.0))    # P(x > 100) = 1e-4 -> 1e5 sequences
    assert 0.7e5 < est["n_sequences"] < 1.4e5



def test_exact_token_factors_give_every_score_within_their_rounding_bound(session, exact,
                                                                          tmp_path):
    """A short corpus keeps each sequence's token factors (manifest ``tokens``); estimates
    from them are the exhaustive scores to float16 rounding, inside the stated bound H; the
    factors' files are checksummed like the sketches."""
    from influence_nb import tokens
    sk = build_sketches(session.model, session.factors, session.corpus, tmp_path / "s", EXACT)
    counts, norms, data, scales = sk.exact
    assert sk.manifest["tokens"] and counts.tolist() == (np.diff(session.corpus.offsets) - 1
                                                         ).tolist()   # the scored positions
    assert data.shape == (counts.sum(), tokens.width(session.factors.shapes))
    queries = session.queries(PAIRS)
    s_hat, H = sk.exact_scores(session.model, session.factors, queries)
    S = exact.scores[:, sk.ids]
    assert (np.abs(S - s_hat) <= H).all()
    np.testing.assert_allclose(s_hat, S, rtol=0, atol=3e-3 * np.abs(S).max())
    assert H.max() < 0.05 * np.abs(S).max()   # a rounding's bound (the m = 64 sketch's: 1.4)
    for q in range(len(PAIRS)):                         # hence the same top-5 either sign
        for sign in (1, -1):
            assert set(np.argsort(-sign * s_hat[q])[:5]) == set(np.argsort(-sign * S[q])[:5])
    rows = np.array([3, 17, 40])                        # any rows, as calibration asks
    np.testing.assert_allclose(sk.exact_scores(session.model, session.factors, queries, rows)[0],
                               s_hat[:, rows], rtol=1e-6)
    blob = (tmp_path / "s" / "tokens.f16").read_bytes()
    (tmp_path / "s" / "tokens.f16").write_bytes(blob[:64] + bytes(16) + blob[80:])
    with pytest.raises(SketchError, match="corrupt"):
        Sketches.open(tmp_path / "s")


def test_exact_factors_are_kept_only_within_their_byte_budget(session, tmp_path):
    from influence_nb import tokens
    shapes, corpus = session.factors.shapes, session.corpus
    need = corpus.offsets[-1] * tokens.token_bytes(shapes) + len(TEXTS) * 4 * (1 + len(shapes))
    for budget, kept in ((need, True), (need - 1, False), (0, False)):
        sk = build_sketches(session.model, session.factors, corpus, tmp_path / str(budget),
                            SketchArgs(exact_bytes=budget, m=64, progress=False), ids=range(20))
        assert sk.manifest["tokens"] == kept and (sk.exact is None) == (not kept)
    grown = build_sketches(session.model, session.factors, corpus, tmp_path / str(need),
                           SketchArgs(exact_bytes=0, m=64, progress=False))   # the store decides
    assert len(grown) == len(TEXTS) and grown.manifest["tokens"]
    whole = build_sketches(session.model, session.factors, corpus, tmp_path / "whole",
                           SketchArgs(m=64, progress=False, chunk_size=64, batch_size=8))
    order = np.argsort(grown.ids)                        # appended rows: the same per sequence
    np.testing.assert_array_equal(grown.exact[0][order], whole.exact[0])
    np.testing.assert_allclose(grown.exact[1][order], whole.exact[1], rtol=1e-6)
    s = session.queries(PAIRS)
    want = whole.exact_scores(session.model, session.factors, s)[0]   # to float16's rounding
    np.testing.assert_allclose(grown.exact_scores(session.model, session.factors, s)[0][:, order],
                               want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_a_sketch_build_batches_by_tokens(session, tmp_path, monkeypatch):
    """By default a build's batches hold SketchArgs.batch_tokens padded tokens (a longer
    sequence alone) and at most batch_sequences sequences, not a fixed count of sequences —
    32 of 1,024 tokens are 13 GB of logits at a 50 K vocabulary — and give the sketches of
    one sequence a batch."""
    sizes, rows, batches = [], [], Corpus.batches

    def counted(self, batch_size, ids=None, progress=False):
        for b in batches(self, batch_size, ids, progress):
            sizes.append(b.input_ids.numel())
            rows.append(len(b.input_ids))
            yield b

    monkeypatch.setattr(Corpus, "batches", counted)
    longest = int(np.diff(session.corpus.offsets).max())
    args = replace(EXACT, batch_size=None, batch_tokens=2 * longest)
    by_tokens = build_sketches(session.model, session.factors, session.corpus, tmp_path / "t",
                               args)
    assert max(sizes) <= 2 * longest and len(sizes) < len(TEXTS)
    alone = build_sketches(session.model, session.factors, session.corpus, tmp_path / "1",
                           replace(EXACT, batch_size=1))
    assert by_tokens.ids.tolist() == alone.ids.tolist()
    np.testing.assert_allclose(by_tokens.data.astype(np.float32), alone.data.astype(np.float32),
                               rtol=2e-3, atol=1e-4)
    rows.clear()
    capped = build_sketches(session.model, session.factors, session.corpus, tmp_path / "c",
                            replace(args, batch_tokens=1 << 20, batch_sequences=2))
    assert max(rows) == 2 and sum(rows) == len(TEXTS)
    np.testing.assert_allclose(capped.data.astype(np.float32), alone.data.astype(np.float32),
                               rtol=2e-3, atol=1e-4)


@pytest.mark.parametrize("seqs", [3, 0])
def test_a_chunk_holds_at_most_its_bytes_of_token_factors(session, tmp_path, monkeypatch, seqs):
    """A build holds a chunk's token factors in memory until it writes them: chunks are cut at
    sketch.CHUNK_BYTES (here about 3 sequences' worth, or less than one: a sequence a chunk),
    and the store holds what whole chunks give, in the same order."""
    from influence_nb import sketch, tokens
    whole = build_sketches(session.model, session.factors, session.corpus, tmp_path / "w", EXACT)
    per, lengths = tokens.token_bytes(session.factors.shapes), np.diff(session.corpus.offsets)
    budget = seqs * per * int(lengths.max())
    monkeypatch.setattr(sketch, "CHUNK_BYTES", budget)
    cut = build_sketches(session.model, session.factors, session.corpus, tmp_path / "c", EXACT)
    sizes = np.array([c[0] for c in cut.manifest["chunks"]])
    starts = np.r_[0, np.cumsum(sizes)]
    held = [lengths[cut.ids[s:e]].sum() * per for s, e in zip(starts[:-1], starts[1:])]
    assert (sizes == 1).all() if not seqs else ((sizes[:-1] >= 3).all()
                                                and (sizes <= EXACT.chunk_size).all())
    assert len(sizes) > -(-len(TEXTS) // EXACT.chunk_size)     # the bytes cut, not the count
    assert all(h <= budget for h, n in zip(held, sizes) if n > 1)
    assert cut.ids.tolist() == whole.ids.tolist()
    np.testing.assert_allclose(cut.data.astype(np.float32), whole.data.astype(np.float32),
                               rtol=2e-3, atol=1e-4)
    for got, want in zip(cut.exact, whole.exact):
        np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64),
                                   rtol=2e-3, atol=1e-4)
    Sketches.open(tmp_path / "c")   # CRCs verify


@pytest.mark.parametrize("args", [EXACT, replace(EXACT, exact_bytes=0)], ids=["exact", "sketch"])
def test_a_build_checks_the_free_disk_first(session, tmp_path, monkeypatch, args):
    """store_bytes bounds what a build writes (to each sequence's unscored last token), and a
    build whose store would not fit on the disk stops before sketching, in one line."""
    import shutil
    from influence_nb import sketch
    built = build_sketches(session.model, session.factors, session.corpus, tmp_path / "b", args)
    written = sum(f.stat().st_size for f in (tmp_path / "b").iterdir()
                  if f.suffix not in (".json", ".lock", "") and f.is_file())
    need = sketch.store_bytes(built.manifest, session.corpus, built.ids)
    last = len(TEXTS) * sketch.tokens.token_bytes(session.factors.shapes) \
        if built.manifest.get("tokens") else 0
    assert need - last == written
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(sketch.shutil, "disk_usage",
                        lambda p: usage._replace(free=need - 1))
    with pytest.raises(SketchError, match=r"GiB are free; free some space") as err:
        build_sketches(session.model, session.factors, session.corpus, tmp_path / "full", args)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "full" / "sketches.json").exists()
    monkeypatch.setattr(sketch.shutil, "disk_usage", lambda p: usage._replace(free=need))
    build_sketches(session.model, session.factors, session.corpus, tmp_path / "fits", args)


@pytest.mark.parametrize("m", [16, 64])
def test_recall_target_with_exact_factors_rescores_the_best_of_what_it_read(session, tmp_path,
                                                                            m):
    """With exact factors the hunt's rounds read exact scores instead of rescoring: it reads
    what the same sketch's search without them rescores, and the model then rescores each
    sign's best max(2k, 1 %) of that (2k here). Every query's exhaustive top-k of both signs is
    among them."""
    args = replace(EXACT, m=m, variant="eigen")
    ret = Retriever.build(session, tmp_path / "exact", args, IndexArgs(progress=False))
    alone = Retriever.build(session, tmp_path / "alone", replace(args, exact_bytes=0),
                            IndexArgs(progress=False))
    for r in (ret, alone):
        r.calibration_args = CalibrationArgs(sample=40, queries=4)
    pairs = many_pairs(12)
    exhaustive = session.scan(pairs)
    S, found, read, rescored = exhaustive.scores[:, ret.sketches.ids], [], [], []
    for q, pair in enumerate(pairs):
        res = ret.search([pair], recall=0.95, k=3)
        rows = ret.sketches.rows_of(res.candidates[0])
        found += [np.isin(np.argsort(-sign * S[q])[:3], rows).mean() for sign in (1, -1)]
        assert res.rescored_fraction[0] == 12 / len(TEXTS) <= res.read_fraction[0] <= 1
        np.testing.assert_allclose(res.scores[0], exhaustive.scores[q, res.ids], rtol=1e-4,
                                   atol=1e-5 * np.abs(S[q]).max())
        read.append(res.read_fraction[0])
        rescored.append(alone.search([pair], recall=0.95, k=3).rescored_fraction[0])
        fixed = ret.search([pair], candidates=24, probe=0)  # the best 12 of each sign
        for part in ("positive", "negative"):
            assert recall_at_k(fixed, session.scan([pair]), k=3, sign=part)[0] == 1.0
    assert np.mean(found) == 1.0
    assert abs(np.mean(read) - np.mean(rescored)) <= 0.05     # the same hunt, other answers
