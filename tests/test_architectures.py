"""Layer presets and exact scores on the architectures researchers load.

Each model is built locally from a tiny config with random weights (no download): GPT-2
(Conv1D layers with bias), GPT-NeoX / Pythia (fused query_key_value), Llama with grouped-query
attention (fewer key/value heads than query heads) with an untied and a tied output head, and
two mixtures of experts: Qwen2-MoE (bias on q/k/v, a shared expert beside the routed ones) and
Mixtral (routed experts only).

For each, ``find_layers(model, "mlp" | "attn" | "all")`` must return exactly the expected
modules with their (out, in + bias) shapes: the presets are disjoint, ``"all"`` is their union
(plus, on Qwen2-MoE, the shared expert's scalar gate, which is no feed-forward matrix) and no
preset ever holds the input embedding or ``lm_head``. Since transformers 5 a MoE's routed experts
are fused 3-D parameters, not Linear modules: no preset can track them, Qwen2-MoE's "mlp" is its
shared expert, and Mixtral's "mlp" is a one-line error (see the comment at ``_ROUTER_PARTS`` in
influence_nb/layers.py).

Then, per architecture, one end-to-end exactness check in float64: EK-FAC factors fitted on two
padded batches, full-rank queries from :func:`make_queries`, scores from :func:`scan`, against
the same factors applied to plain-autograd gradients: score = ⟨(G + λ)⁻¹ ∇ log p(completion |
prompt), ∇ Σ_t log p(z_t | z_<t)⟩, so a positive score means training on the sequence raises the
completion's log-probability.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from transformers import (GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM,
                          LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM,
                          Qwen2MoeConfig, Qwen2MoeForCausalLM)

import influence_nb
from influence_nb import Corpus, FactorArgs, ScoreArgs
from influence_nb.layers import find_layers

pytestmark = pytest.mark.usefixtures("one_thread")

V = 48        # vocabulary of the tiny models (token 0: bos / eos / padding)
LAYERS = 2    # decoder blocks in every tiny model

# a small GQA-shaped decoder: 4 query heads of 4 dimensions, 2 key/value heads
DECODER = dict(vocab_size=V, hidden_size=16, num_hidden_layers=LAYERS, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=32, bos_token_id=0,
               eos_token_id=0, pad_token_id=0)


def build(arch: str) -> nn.Module:
    """A tiny float64 model of the architecture, random init, in eval mode."""
    torch.manual_seed(0)
    if arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=32, n_embd=12,
                                           n_layer=LAYERS, n_head=2, bos_token_id=0,
                                           eos_token_id=0))
    elif arch == "neox":
        model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=V, hidden_size=16,
                                                 num_hidden_layers=LAYERS, num_attention_heads=2,
                                                 intermediate_size=24,
                                                 max_position_embeddings=32, bos_token_id=0,
                                                 eos_token_id=0))
    elif arch in ("llama", "llama_tied"):
        model = LlamaForCausalLM(LlamaConfig(intermediate_size=24,
                                             tie_word_embeddings=arch == "llama_tied", **DECODER))
    elif arch == "qwen2_moe":  # the eager experts: the default grouped_mm refuses float64
        model = Qwen2MoeForCausalLM(Qwen2MoeConfig(
            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
            shared_expert_intermediate_size=20, intermediate_size=24,
            experts_implementation="eager", **DECODER))
    elif arch == "mixtral":
        model = MixtralForCausalLM(MixtralConfig(num_local_experts=4, num_experts_per_tok=2,
                                                 intermediate_size=8,
                                                 experts_implementation="eager", **DECODER))
    else:
        raise ValueError(arch)
    return model.to(torch.float64).eval()


ARCHS = ["gpt2", "neox", "llama", "llama_tied", "qwen2_moe", "mixtral"]
GQA = {"q_proj": (16, 16), "k_proj": (8, 16), "v_proj": (8, 16), "o_proj": (16, 16)}

# per architecture: the block prefix, then {module suffix: (out, in + bias)} of one block for
# "mlp" and for "attn", and the modules in "all" only (neither preset)
EXPECTED = {
    "gpt2": ("transformer.h",                 # Conv1D, bias everywhere, n_inner = 4 · 12
             {"mlp.c_fc": (48, 13), "mlp.c_proj": (12, 49)},
             {"attn.c_attn": (36, 13), "attn.c_proj": (12, 13)}, {}),
    "neox": ("gpt_neox.layers",
             {"mlp.dense_h_to_4h": (24, 17), "mlp.dense_4h_to_h": (16, 25)},
             {"attention.query_key_value": (48, 17), "attention.dense": (16, 17)}, {}),
    "llama": ("model.layers",                  # no bias anywhere
              {"mlp.gate_proj": (24, 16), "mlp.up_proj": (24, 16), "mlp.down_proj": (16, 24)},
              {f"self_attn.{k}": s for k, s in GQA.items()}, {}),
    "qwen2_moe": ("model.layers",              # bias on q, k, v only; routed experts fused
                  {"mlp.shared_expert.gate_proj": (20, 16), "mlp.shared_expert.up_proj": (20, 16),
                   "mlp.shared_expert.down_proj": (16, 20)},
                  {"self_attn.q_proj": (16, 17), "self_attn.k_proj": (8, 17),
                   "self_attn.v_proj": (8, 17), "self_attn.o_proj": (16, 16)},
                  {"mlp.shared_expert_gate": (1, 16)}),
    "mixtral": ("model.layers", {},            # every expert fused: nothing for "mlp"
                {f"self_attn.{k}": s for k, s in GQA.items()}, {}),
}
EXPECTED["llama_tied"] = EXPECTED["llama"]


def expected(arch: str, part: str) -> list[tuple[str, tuple[int, int]]]:
    """[(module name, shape)] of one preset ("mlp", "attn", "extra" or "all"), module order."""
    prefix, mlp, attn, extra = EXPECTED[arch]
    # every block registers its attention before its MLP (and the shared expert before its gate)
    block = {"mlp": mlp, "attn": attn, "extra": extra, "all": {**attn, **mlp, **extra}}
    return [(f"{prefix}.{i}.{suffix}", shape) for i in range(LAYERS)
            for suffix, shape in block[part].items()]


def named(layers) -> list[tuple[str, tuple[int, int]]]:
    return [(t.name, t.shape) for t in layers]


# -- presets ------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_presets_pick_exact_modules_and_shapes(arch):
    model = build(arch)
    presets = {p: find_layers(model, p) for p in ("attn", "all")}
    if arch == "mixtral":
        with pytest.raises(ValueError, match="experts are fused 3-D parameters.*layers='attn'"):
            find_layers(model, "mlp")
        presets["mlp"] = []
    else:
        presets["mlp"] = find_layers(model, "mlp")
    for preset in ("mlp", "attn", "all"):
        assert named(presets[preset]) == expected(arch, preset), preset

    mlp, attn, every = ({t.name for t in presets[p]} for p in ("mlp", "attn", "all"))
    assert not mlp & attn                                          # disjoint
    assert every == mlp | attn | {n for n, _ in expected(arch, "extra")}
    assert len(every) == len(presets["all"])                       # no module twice

    # the shapes are those of the parameters, in the (out, in + bias) convention
    for t in presets["all"]:
        weight = t.module.weight
        out, d_in = weight.shape[::-1] if t.transposed else weight.shape
        assert t.transposed == (arch == "gpt2")                    # Conv1D stores (in, out)
        assert t.shape == (out, d_in + (t.module.bias is not None))
        assert t.as_matrix([torch.zeros_like(p) for p in t.parameters()]).shape == t.shape

    # neither embedding is tracked, tied or not; the routers are no Linear, so they are not either
    embeddings = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    assert not embeddings & {id(p) for t in presets["all"] for p in t.parameters()}
    assert not any("lm_head" in n or "embed" in n or n.endswith(".gate") for n in every)


def test_llama_heads_tied_and_untied_and_grouped_query_attention():
    untied, tied = build("llama"), build("llama_tied")
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
    for model in (untied, tied):
        attn = {t.name.rsplit(".", 1)[-1]: t.shape for t in find_layers(model, "attn")}
        assert attn["k_proj"][0] == attn["v_proj"][0] == attn["q_proj"][0] // 2   # GQA
        # lm_head is a plain Linear, yet not even a glob over every module picks it
        assert "lm_head" not in {t.name for t in find_layers(model, ["*"])}


def test_moe_router_is_in_no_preset():
    """The router decides which experts run, the shared expert's gate how much the shared expert
    counts: neither is a feed-forward matrix, so "mlp" leaves them out; "all" keeps the one that
    is a Linear module."""
    model = build("qwen2_moe")
    block = model.model.layers[0].mlp
    assert not isinstance(block.gate, nn.Linear)                   # transformers ≥ 5 router
    assert block.experts.gate_up_proj.shape == (4, 16, 16)         # fused: (experts, 2 · 8, 16)
    assert isinstance(block.shared_expert_gate, nn.Linear)
    gates = [t.name for t in find_layers(model, "all") if t.name.endswith("shared_expert_gate")]
    assert gates == [f"model.layers.{i}.mlp.shared_expert_gate" for i in range(LAYERS)]
    assert not set(gates) & {t.name for p in ("mlp", "attn") for t in find_layers(model, p)}
    # named explicitly, it is tracked like any other Linear
    assert named(find_layers(model, ["*.0.mlp.shared_expert_gate"])) == [(gates[0], (1, 16))]


# -- exactness ----------------------------------------------------------------------------------

class IdTokenizer:
    """Just enough of a tokenizer for a Corpus of token ids: ids are their own text."""
    pad_token_id = 0

    def decode(self, ids) -> str:
        return " ".join(str(int(i)) for i in ids)

    def get_vocab(self) -> dict[str, int]:
        return {str(i): i for i in range(V)}


SEQUENCES = [[3, 7, 1, 9, 4, 12, 5, 8], [11, 2, 6], [5, 5, 13, 1, 20],
             [17, 4, 4, 9, 30, 2, 41], [8, 19, 3, 3], [25, 6, 14, 7, 2, 9]]
PROMPTS, COMPLETIONS = [[3, 7, 1], [17, 4]], [[9, 4], [4, 9, 30]]


def padded(seqs: list[list[int]]) -> dict:
    T = max(map(len, seqs))
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, :len(s)], mask[b, :len(s)] = torch.tensor(s), 1
    return {"input_ids": ids, "attention_mask": mask}


def log_likelihood(model: nn.Module, prompt: list[int], target: list[int]) -> torch.Tensor:
    """Σ log p(target | prompt, earlier targets), one unpadded sequence."""
    ids = torch.tensor([prompt + target])
    logp = model(input_ids=ids).logits[0, len(prompt) - 1:-1].log_softmax(-1)
    return logp.gather(1, torch.tensor(target)[:, None]).sum()


def autograd_gradient(model: nn.Module, layers, f: torch.Tensor) -> dict[str, torch.Tensor]:
    grads = iter(torch.autograd.grad(f, [p for t in layers for p in t.parameters()]))
    return {t.name: t.as_matrix([next(grads) for _ in t.parameters()]) for t in layers}


@pytest.mark.parametrize("arch", ARCHS)
def test_scan_scores_equal_autograd(arch):
    """EK-FAC scores from fit_factors → make_queries → scan equal ⟨(G + λ)⁻¹ ∇f_q, ∇ log p(z_m)⟩
    built from plain autograd gradients and the same factors, to 1e-8 relative."""
    model = build(arch)
    preset = "attn" if arch == "mixtral" else "mlp"    # Mixtral has no trackable MLP matrix
    factors = influence_nb.fit_factors(model, [padded(SEQUENCES[:3]), padded(SEQUENCES[3:])],
                                       FactorArgs(strategy="ekfac", layers=preset,
                                                  progress=False))
    layers = find_layers(model, preset)
    assert factors.layer_names == [t.name for t in layers]
    queries = influence_nb.make_queries(model, factors, PROMPTS, COMPLETIONS, rank=None)
    corpus = Corpus.from_tokenized([{"input_ids": s} for s in SEQUENCES], IdTokenizer())
    scores, _, ids = influence_nb.scan(model, queries, corpus,
                                       ScoreArgs(batch_size=3, chunk_size=6, progress=False))
    assert list(ids) == list(range(len(SEQUENCES)))

    # the reference: every gradient from autograd, preconditioned by the fitted factors
    R = factors.precondition({name: torch.stack(g) for name, g in zip(
        factors.layer_names, zip(*(autograd_gradient(model, layers, log_likelihood(
            model, p, c)).values() for p, c in zip(PROMPTS, COMPLETIONS))))})
    exact = np.zeros((len(PROMPTS), len(SEQUENCES)))
    for m, seq in enumerate(SEQUENCES):
        G = autograd_gradient(model, layers, log_likelihood(model, seq[:1], seq[1:]))
        for name, g in G.items():
            assert g.abs().max() > 1e-8                       # a real gradient reaches it
            exact[:, m] += (R[name] * g).sum((-2, -1)).detach().numpy()
    np.testing.assert_allclose(scores, exact, rtol=1e-8, atol=1e-10 * np.abs(exact).max())
    assert np.abs(exact).max() > 1e-6
