"""PEFT / LoRA adapters: the adapter matrices are tracked layers like any other, read from the
model's own modules; their scores are checked against the exact damped Fisher and against
autograd, and base-weight scores of an unmerged adapter against the merged model's."""
import copy

import numpy as np
import pytest
import torch

peft = pytest.importorskip("peft")

from influence_nb import validate  # noqa: E402
from influence_nb.curvature import FactorArgs, fit_factors, model_fingerprint  # noqa: E402
from influence_nb.data import Corpus  # noqa: E402
from influence_nb.layers import find_layers, has_adapters  # noqa: E402
from influence_nb.queries import make_queries  # noqa: E402
from influence_nb.scoring import ScoreArgs, scan  # noqa: E402
from influence_nb.session import Influence  # noqa: E402
from influence_nb.sketch import SketchArgs, build_sketches  # noqa: E402

from test_scoring import TEXTS, autograd_scores, tiny_model  # noqa: E402

NEOX_MLP = ["dense_h_to_4h", "dense_4h_to_h"]


pytestmark = pytest.mark.usefixtures("one_thread")


def lora(model: torch.nn.Module, targets: list[str], r: int = 4, seed: int = 0,
         conv1d: bool = False, b_scale: float = 0.1) -> torch.nn.Module:
    """``model`` with LoRA adapters on ``targets`` in the model's dtype, as after a short
    fine-tune: A random, B random at ``b_scale`` × peft's random init (peft's default B = 0
    makes the gradient of A vanish), so s·B·A is a small change of W₀."""
    torch.manual_seed(seed)
    dtype = next(model.parameters()).dtype
    config = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, lora_dropout=0.1,
                             fan_in_fan_out=conv1d, init_lora_weights=False)
    model = peft.get_peft_model(model, config).to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.mul_(b_scale)
    return model


@pytest.fixture(scope="module")
def adapted(tokenizer):
    """A tiny GPT-NeoX (Linear layers) with LoRA on its MLP, a corpus, an EK-FAC fit on the
    adapters and three queries."""
    model = lora(tiny_model(len(tokenizer)), NEOX_MLP)
    corpus = Corpus.from_texts(TEXTS, tokenizer, max_len=64)
    inf = Influence(model, tokenizer, corpus,
                    score_args=ScoreArgs(rank=None, batch_size=4, chunk_size=8, progress=False))
    inf.fit(FactorArgs(batch_size=5, draws=1, progress=False))
    pairs = [("alpha number", " 0 is even."), ("gamma number 2 is", " even"),
             ("theta", " number 7")]
    return inf, pairs


def test_presets_pick_the_adapters_and_base_weights_on_request(adapted):
    inf, _ = adapted
    model = inf.model
    assert has_adapters(model) and not has_adapters(tiny_model(8))
    names = [t.name.split("layers.")[-1] for t in find_layers(model)]
    assert names == [f"{k}.mlp.{m}.lora_{ab}.default" for k in (0, 1) for m in NEOX_MLP
                     for ab in "AB"]
    assert all(t.is_adapter for t in find_layers(model))
    assert inf.factors.shapes[find_layers(model)[0].name] == (4, 16)      # A: r × d (no bias)
    assert inf.factors.shapes[find_layers(model)[1].name] == (32, 4)      # B: 4d × r
    base = [t.name.split("layers.")[-1] for t in find_layers(model, "base:mlp")]
    assert base == [f"{k}.mlp.{m}.base_layer" for k in (0, 1) for m in NEOX_MLP]
    both = [t.name.split("layers.")[-1] for t in find_layers(model, "both:mlp")]
    assert both == [f"{k}.mlp.{m}.{part}" for k in (0, 1) for m in NEOX_MLP
                    for part in ("lora_A.default", "lora_B.default", "base_layer")]
    with pytest.raises(ValueError, match="LoRA adapters but none in preset 'attn'.*base:attn"):
        find_layers(model, "attn")
    with pytest.raises(ValueError, match="unknown layer preset 'base:ffn'"):
        find_layers(model, "base:ffn")
    merged = copy.deepcopy(model)
    merged.merge_adapter()
    with pytest.raises(ValueError, match="merged into its base weights.*unmerge_adapter"):
        find_layers(merged)
    assert len(find_layers(merged, "base:mlp")) == 4
    # factors are tied to the adapter and to the base weights it adapts
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.base_model.model.gpt_neox.layers[0].mlp.dense_h_to_4h.base_layer.weight.mul_(2)
    assert (model_fingerprint(other, find_layers(other))
            != model_fingerprint(model, find_layers(model)))


def test_adapter_scores_equal_autograd_inner_products(adapted):
    """Total, per-layer and per-token scores on the adapter parameters equal ⟨R_q, autograd
    gradient of lora_A / lora_B⟩ to 1e-5 relative, and the base weights stay frozen."""
    inf, pairs = adapted
    frozen = {n for n, p in inf.model.named_parameters() if not p.requires_grad}
    queries = inf.queries(pairs, rank=None)
    res = inf.scan(queries)
    exact = autograd_scores(inf.model, inf.corpus, queries, inf.factors)
    assert np.abs(exact).max() > 1e-3
    np.testing.assert_allclose(res.scores, exact, rtol=1e-5, atol=1e-9 * np.abs(exact).max())
    np.testing.assert_allclose(res.layer_scores.sum(1), res.scores, rtol=1e-10)
    assert res.layer_profile(0).index.str.contains("lora_B").sum() == 4
    tokens = res.tokens(1, 5)["score"].sum()
    np.testing.assert_allclose(tokens, res.scores[1, 5], rtol=1e-8)
    assert {n for n, p in inf.model.named_parameters() if not p.requires_grad} == frozen
    assert any("base_layer" in n for n in frozen)


def test_adapter_scores_match_the_exact_damped_fisher():
    """GPT-2 (Conv1D base layers, fan_in_fan_out) with LoRA on its MLP: EK-FAC on the adapter
    parameters against the exact layer-wise damped Fisher, Spearman ≥ 0.95 over 12 queries
    (0.985 measured; 0.93 when s·B·A is as large as W₀, B at peft's full random scale)."""
    model, data, prompts, completions = validate.toy_problem(n_sequences=1024)
    model = lora(model, ["c_fc", "c_proj"], conv1d=True)
    r = validate.compare(model, data, prompts, completions, lissa_depth=0)
    assert r["n_params"] == 2 * (4 * 8 + 16 * 4 + 4 * 16 + 8 * 4)   # adapters only
    rho = r["spearman"]["layerwise"]
    assert rho["ekfac"] >= 0.95, rho
    assert rho["ekfac"] >= rho["identity"] + 0.1


def test_base_weights_unmerged_equal_the_merged_model(adapted):
    """Tracking the base weights W₀ of an unmerged adapter scores exactly what tracking the
    merged weights W₀ + s·B·A of merge_and_unload()'s plain model scores: same function, same
    ā and δ, same Fisher."""
    inf, pairs = adapted
    scores = []
    for model, layers in ((inf.model, "base:mlp"),
                          (copy.deepcopy(inf.model).merge_and_unload(), "mlp")):
        assert has_adapters(model) == (layers == "base:mlp")
        factors = fit_factors(model, inf.corpus, FactorArgs(layers=layers, batch_size=5,
                                                            progress=False))
        prompts, completions = inf.encode(pairs)
        queries = make_queries(model, factors, prompts, completions, rank=None)
        scores.append(scan(model, queries, inf.corpus, ScoreArgs(progress=False))[0])
    np.testing.assert_allclose(scores[0], scores[1], rtol=1e-7, atol=1e-10 * np.abs(scores[1]).max())
    assert np.abs(scores[0]).max() > 1e-3


def test_untrained_adapter_is_a_clear_error(tokenizer):
    """peft's default init (B = 0) makes lora_A's gradient vanish: a one-line error, not NaN."""
    model = tiny_model(len(tokenizer))
    model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=NEOX_MLP)).double()
    corpus = Corpus.from_texts(TEXTS[:6], tokenizer, max_len=64)
    inf = Influence(model, tokenizer, corpus, score_args=ScoreArgs(progress=False))
    inf.fit(FactorArgs(batch_size=6, progress=False))
    with pytest.raises(ValueError, match="zero curvature.*untrained adapter"):
        inf.queries([("alpha", " number")])


def test_adapter_sketches_approximate_the_scores(adapted, tmp_path):
    inf, pairs = adapted
    exact = inf.scan(pairs).scores
    sk = build_sketches(inf.model, inf.factors, inf.corpus, tmp_path,
                        SketchArgs(m=512, batch_size=8, chunk_size=8, progress=False))
    approx = sk.query_sketches(inf.model, inf.factors, inf.queries(pairs)) @ \
        sk.data.astype(np.float32).T
    assert min(validate.pearson(a, b) for a, b in zip(approx, exact[:, sk.ids])) > 0.9


def test_a_joint_fit_restricted_to_the_adapters_equals_an_adapter_fit(adapted):
    """EK-FAC is block-diagonal per matrix with per-matrix damping, and both fits draw the same
    Fisher labels (at the same number of draws, pinned: by default each layer set chooses its
    own): a "both:mlp" fit's queries restricted to the adapters score exactly what an
    adapter-only fit scores — and its base-weight part what a "base:mlp" fit scores."""
    inf, pairs = adapted
    joint = Influence(inf.model, inf.tokenizer, inf.corpus, score_args=inf.score_args)
    joint.fit(FactorArgs(layers="both:mlp", batch_size=5, draws=1, progress=False))
    assert len(joint.factors.shapes) == 12
    q = joint.queries(pairs, rank=None)
    adapters = joint.scan(q.select(["*.lora_*"]))
    assert adapters.layer_names == inf.factors.layer_names
    np.testing.assert_allclose(adapters.scores, inf.scan(pairs).scores, rtol=1e-9)
    base = Influence(inf.model, inf.tokenizer, inf.corpus, score_args=inf.score_args)
    base.fit(FactorArgs(layers="base:mlp", batch_size=5, draws=1, progress=False))
    np.testing.assert_allclose(joint.scan(q.select("*.base_layer")).scores,
                               base.scan(pairs).scores, rtol=1e-9)
    with pytest.raises(ValueError, match="match none of the queries' layers"):
        q.select(["*.attention.*"])

