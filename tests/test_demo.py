"""The committed demo world: small, quick to load, and the model knows its planted facts."""
import json
import subprocess
import sys
import warnings
from dataclasses import replace

import numpy as np
import pytest

from influence_nb import demo
from influence_nb.curvature import fit_factors
from influence_nb.demo.build import fact_accuracy, perplexity
from influence_nb.scoring import ScoreArgs
from influence_nb.session import DEMO_FACTORS, DEMO_FIT, Influence


def test_load_is_consistent():
    model, tok, corpus = demo.load()
    assert len(corpus) >= 20_000
    assert corpus.df["n_tokens"].max() <= model.config.max_position_embeddings
    assert corpus.tokenizer_fingerprint == demo.load()[2].tokenizer_fingerprint


def test_artifacts_are_small():
    sizes = {p.name: p.stat().st_size for p in demo.ASSETS.iterdir()}
    assert sizes["model.safetensors"] <= 20 * 2**20
    assert sum(sizes.values()) <= 24 * 2**20


def test_demo_session_starts_from_the_shipped_factors():
    """Influence.demo() loads DEMO_FIT's factors shipped with the world (no fit, no warning):
    fitted on this model and corpus, on its 4,096-sequence sample, and small."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inf = Influence.demo()
    f = inf.factors
    # draws=None is resolved by the fit (one draw on this world)
    assert replace(f.args, progress=DEMO_FIT.progress, draws=None) == DEMO_FIT and f.args.draws == 1
    assert f.corpus_fingerprint == inf.corpus.fingerprint and f.n_examples == 4096
    assert inf.n_train == len(inf.corpus) == 20_000
    files = list((demo.ASSETS / DEMO_FACTORS).iterdir())
    assert sorted(p.suffix for p in files) == [".json", ".safetensors"]   # no lock, no temporary
    assert sum(p.stat().st_size for p in files) <= 16 * 2**20   # float16 eigenvectors


@pytest.mark.slow
def test_shipped_factors_score_as_a_fresh_fit():
    """The shipped factors are what the package's fit makes of DEMO_FIT today, checked on the
    top block's two linears (a layer's factors do not depend on which others are tracked, and
    fitting two of eight halves the cost): their eigenvalues and Λ agree to float32 rounding,
    and scores of two facts over 300 sequences to 1e-4 of their scale (float16 eigenvectors)."""
    model, tok, corpus = demo.load()
    shipped = Influence.demo().factors
    top = shipped.layer_names[-2:]
    fresh = fit_factors(model, corpus, replace(DEMO_FIT, layers=top, draws=shipped.args.draws,
                                               progress=False))
    for n in top:
        for k in ("lambda_A", "lambda_S", "Lambda"):
            x, y = getattr(shipped.layers[n], k), getattr(fresh.layers[n], k)
            assert (x - y).abs().max() <= 1e-5 * y.abs().max(), (n, k)
    kept = replace(shipped, args=fresh.args, model_fingerprint=fresh.model_fingerprint,
                   shapes={n: shipped.shapes[n] for n in top},
                   layers={n: shipped.layers[n] for n in top})
    facts = demo.facts()[:2]
    pairs, ids = [(f.prompt(), f.completion) for f in facts], np.arange(0, 20_000, 67)
    a, b = (Influence(model, tok, corpus, factors=f, score_args=ScoreArgs(progress=False))
            .scan(pairs, ids=ids).scores for f in (kept, fresh))
    assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max()


def test_model_knows_the_planted_facts(world):
    model, tok, _ = world
    acc, rows = fact_accuracy(model, tok, demo.facts())
    assert acc >= 0.9, [r for r in rows if not r["correct"]][:5]
    report = json.loads((demo.ASSETS / "build.json").read_text())
    assert abs(report["fact_accuracy"] - acc) < 1e-9


def test_heldout_perplexity_is_finite_and_near_the_build_report(world):
    model, tok, _ = world
    ppl = perplexity(model, demo.heldout(tok))
    report = json.loads((demo.ASSETS / "build.json").read_text())
    assert 1.0 < ppl < 20.0
    assert abs(ppl - report["heldout_perplexity"]) / ppl < 1e-3


@pytest.mark.slow
def test_build_from_scratch_runs_end_to_end(tmp_path):
    """A tiny world through the same build path as the committed one."""
    code = ("from influence_nb.demo.build import *; from influence_nb.demo.world import *; "
            f"r = build(__import__('pathlib').Path({str(tmp_path)!r}), "
            "WorldConfig(n_sequences=300, n_heldout=30, facts_per_relation=2, "
            "mentions_per_name=4), "
            "ModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, "
            "vocab_size=1000), TrainConfig(epochs=1, warmup_steps=5)); print(r['n_sequences'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "300"
    model, tok, corpus = demo.load(tmp_path)
    assert len(corpus) == 300 and model.config.hidden_size == 32
