"""The model's tracked layers: which Linear / Conv1D modules influence is measured on.

For a linear layer y = W x + b, write ā = [x, 1] (the bias as a homogeneous coordinate) and
δ = ∂L/∂y. The gradient of a sequence's loss with respect to [W, b] is then

    DW = Σ_t δ_t ā_tᵀ          # (out, in+1) = einsum('t o, t i -> o i', δ, ā)

so a :class:`TrackedLayer` is all the curvature fit, the query gradients and the scorer need to
know of a layer: its module, its (out, in + bias) shape, and how its parameters' gradients map
to that matrix. :func:`find_layers` picks them by preset per architecture (MLP or attention
blocks, never a mixture-of-experts router), by module name or by glob, without wrapping or
renaming anything in the user's model; :mod:`~influence_nb.hooks` then reads ā and δ off them.

Adapters. A PEFT LoRA layer (``peft.tuners.lora.LoraLayer``, on a Linear or a GPT-2 Conv1D)
computes y = W₀ x + s · B A x with ``base_layer`` (W₀), ``lora_A.<adapter>`` (A, r × in) and
``lora_B.<adapter>`` (B, out × r), all three plain Linear / Conv1D modules. They are tracked as
they are: A and B are two Linear layers like any other (ā of B is A x, δ of A is s Bᵀ δ_y),
read from the model's own modules — the model is never wrapped or rewritten. Presets pick the
adapters when the model has any, the base weights with ``"base:"`` (see :func:`find_layers`).
With the adapter unmerged, the gradient of W₀ equals the gradient of the merged weight
W₀ + s B A of ``merge_and_unload()``'s model (same function, same ā and δ), so base-weight
scores of the two agree; the adapter's gradients are ∇B = s ∇W Aᵀ and ∇A = s Bᵀ ∇W.

Also here: what the rest of the package reads off the model around its layers (its context
length, its vocabulary, the dtype its statistics are kept in).
"""
from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

PRESETS = ("mlp", "attn", "all")
# preset prefixes for a model with adapters: its base weights ("base:mlp"), or the adapters
# and the base weights together ("both:mlp"); an unprefixed preset is the adapters alone
BASE, BOTH = "base:", "both:"
# A module belongs to a preset when one component of its dotted name is in the set:
#   gpt2  h.0.mlp.c_fc, h.0.mlp.c_proj        | h.0.attn.c_attn, h.0.attn.c_proj
#   neox  mlp.dense_h_to_4h, mlp.dense_4h_to_h | attention.query_key_value, attention.dense
#   llama mlp.{gate,up,down}_proj              | self_attn.{q,k,v,o}_proj
_MLP_PARTS = {"mlp", "feed_forward", "ffn"}
_ATTN_PARTS = {"attn", "attention", "self_attn", "self_attention"}
# Mixture of experts: "mlp" means the experts' feed-forward matrices, never a router, so a
# module with one of these components is in neither preset (only in "all"). A router
# (``mlp.gate``) or a shared expert's gate (Qwen2-MoE ``mlp.shared_expert_gate``, out = 1) sits
# in the MLP block but only weighs the experts' outputs: it is no feed-forward matrix, and in
# "mlp" it would add a different kind of parameter on MoE models than on dense ones. Since
# transformers 5 the routed experts are fused 3-D parameters (``mlp.experts.gate_up_proj``
# (E, 2I, H), ``down_proj`` (E, H, I)), not Linear modules, so no preset can track them: on
# Qwen2-MoE "mlp" is the shared expert (every token passes through it); on Mixtral it is empty
# and :func:`find_layers` says why. (Before 5 an expert was Linear modules that run on its routed
# tokens only, which :class:`~influence_nb.hooks.Capture`, reading ā and δ at (B, T) positions,
# does not take.)
_ROUTER_PARTS = {"gate", "router", "shared_expert_gate"}


@dataclass(frozen=True)
class TrackedLayer:
    """A Linear or GPT-2 Conv1D layer whose weights influence is measured on.

    Its gradients use the (out, in + bias) convention: column ``in`` is the bias.
    """
    name: str
    module: nn.Module
    d_in: int
    d_out: int
    bias: bool
    transposed: bool  # Conv1D stores its weight as (in, out)
    # for a LoRA matrix (lora_A / lora_B): the adapted layer's base weight module, else None
    adapter_of: nn.Module | None = None

    @property
    def is_adapter(self) -> bool:
        return self.adapter_of is not None

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in + bias): the shape of this layer's gradients, ā has in + bias columns."""
        return self.d_out, self.d_in + int(self.bias)

    def parameters(self) -> list[nn.Parameter]:
        """[weight] or [weight, bias], in the order :meth:`as_matrix` takes their gradients."""
        return [self.module.weight] + ([self.module.bias] if self.bias else [])

    def as_matrix(self, grads: Sequence[Tensor]) -> Tensor:
        """Gradients of :meth:`parameters` -> one (out, in + bias) matrix."""
        W = grads[0].T if self.transposed else grads[0]
        return torch.cat([W, grads[1][:, None]], dim=1) if self.bias else W

    def split(self, matrix: Tensor) -> list[Tensor]:
        """One (out, in + bias) matrix -> tensors shaped like :meth:`parameters` (the inverse
        of :meth:`as_matrix`)."""
        W = matrix[:, :self.d_in]
        return [W.T if self.transposed else W] + ([matrix[:, self.d_in]] if self.bias else [])


def _as_tracked(name: str, module: nn.Module, adapter_of: nn.Module | None = None
                ) -> TrackedLayer | None:
    if isinstance(module, nn.Linear):
        d_out, d_in = module.weight.shape
        return TrackedLayer(name, module, d_in, d_out, module.bias is not None, False, adapter_of)
    if isinstance(module, Conv1D):
        d_in, d_out = module.weight.shape
        return TrackedLayer(name, module, d_in, d_out, module.bias is not None, True, adapter_of)
    return None


def _is_lora(module: nn.Module) -> bool:
    """A PEFT LoRA layer (duck-typed: peft stays optional): ``base_layer`` plus ``lora_A`` /
    ``lora_B`` dicts of modules, one per adapter name."""
    return (isinstance(getattr(module, "lora_A", None), nn.ModuleDict)
            and isinstance(getattr(module, "lora_B", None), nn.ModuleDict)
            and isinstance(getattr(module, "base_layer", None), nn.Module))


def adapter_layers(name: str, module: nn.Module) -> list[TrackedLayer]:
    """The active adapters' A and B matrices of the LoRA layer ``module`` called ``name``
    (an adapter of another kind, or one that does not run in the forward, is a one-line error)."""
    if any(getattr(module, "use_dora", {}).get(a, False) for a in module.lora_A):
        raise ValueError(f"{name} is a DoRA adapter: its magnitude rescales the update outside "
                         "lora_A / lora_B, which is not supported; track the base weights "
                         "(layers='base:mlp') or use plain LoRA")
    if getattr(module, "merged", False):
        raise ValueError(f"the adapters of {name} are merged into its base weights, so lora_A / "
                         "lora_B do not run; call model.unmerge_adapter() to score adapter "
                         "parameters, or track the base weights with layers='base:mlp' (or "
                         "'base:all')")
    if getattr(module, "disable_adapters", False):
        raise ValueError(f"the adapters of {name} are disabled, so lora_A / lora_B do not run; "
                         "enable them or track the base weights with layers='base:mlp'")
    active = getattr(module, "active_adapters", None) or list(module.lora_A)
    active = [active] if isinstance(active, str) else list(active)
    found = []
    for key in ("lora_A", "lora_B"):
        for adapter, m in getattr(module, key).items():
            if adapter in active and (t := _as_tracked(f"{name}.{key}.{adapter}", m,
                                                       module.base_layer)) is not None:
                found.append(t)
    order = {f"{name}.{k}.{a}": i for i, (k, a) in enumerate(
        (k, a) for a in module.lora_A for k in ("lora_A", "lora_B"))}
    return sorted(found, key=lambda t: order[t.name])  # A then B, adapter by adapter


def has_adapters(model: nn.Module) -> bool:
    """Whether the model holds PEFT LoRA layers (merged or not)."""
    return any(_is_lora(m) for m in model.modules())


def candidate_layers(model: nn.Module, base: bool | None = None,
                     skipped: list[str] | None = None) -> list[TrackedLayer]:
    """Every trackable layer, in module order, without the input and output embeddings:
    with ``base`` False the LoRA matrices only (an adapter that cannot be tracked is an error),
    True the rest (base weights of adapted layers and plain layers), None both (with
    ``skipped``, an adapter that cannot be tracked is left out and the reason appended)."""
    excluded = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        emb = getattr(model, getter, lambda: None)()
        if emb is not None:
            excluded.add(id(emb))
    inside_lora: set[int] = set()   # the lora_A / lora_B modules (and whatever they hold)
    found = []
    for name, m in model.named_modules():
        if id(m) in excluded or id(m) in inside_lora:
            continue
        if _is_lora(m):
            inside_lora |= {id(x) for key in ("lora_A", "lora_B") for x in
                            getattr(m, key).modules()}
            if base is not True:
                try:
                    found += adapter_layers(name, m)
                except ValueError as e:
                    if base is False or skipped is None:
                        raise
                    skipped.append(str(e))
        elif base is not False and (t := _as_tracked(name, m)) is not None:
            found.append(t)
    return found


def _fused_experts(model: nn.Module) -> bool:
    """Whether an MLP block of the model holds experts as one 3-D parameter (transformers ≥ 5
    MoE layers: ``mlp.experts.gate_up_proj`` (experts, out, in))."""
    return any(p.ndim == 3 and "experts" in name.split(".") for name, p in model.named_parameters())


def find_layers(model: nn.Module, layers: str | Sequence[str] = "mlp") -> list[TrackedLayer]:
    """The model's tracked layers, in module order.

    ``layers``: a preset — ``"mlp"`` (the paper's choice), ``"attn"``, ``"all"`` (every Linear /
    Conv1D except the input and output embeddings) — or a module name or fnmatch glob
    (``"*.mlp.c_fc"``), or a list of them, each of which must match at least one Linear / Conv1D.

    On a model with PEFT LoRA adapters a preset selects the adapters' ``lora_A`` / ``lora_B``
    matrices of the layers in the preset (the parameters that were fine-tuned);
    ``"base:mlp"``, ``"base:attn"``, ``"base:all"`` the base weights instead (each adapted
    layer's ``base_layer`` and the layers without adapters), and ``"both:mlp"`` etc. the two
    together (one block per matrix: per-layer scores then compare adapter and base-weight
    influence). On a plain model ``"base:x"`` and ``"both:x"`` are ``"x"``.
    """
    if not isinstance(layers, str):
        return _named_layers(model, layers)
    prefix = next((p for p in (BASE, BOTH) if layers.startswith(p)), "")
    preset = layers[len(prefix):]
    if preset in PRESETS:
        return _preset_layers(model, prefix, preset)
    if prefix:
        raise ValueError(f"unknown layer preset {layers!r}; use one of {PRESETS} (or "
                         f"'{BASE}mlp', '{BOTH}mlp' etc. for a model's base weights under "
                         "adapters) or a list of module names / globs")
    return _named_layers(model, [layers])                 # one module name or glob


def _preset_layers(model: nn.Module, prefix: str, preset: str) -> list[TrackedLayer]:
    """The layers of ``preset`` ("mlp", "attn", "all") under ``prefix`` ("", BASE, BOTH): a
    module is in "mlp" / "attn" when a component of its name is, and it is no router."""
    adapters = has_adapters(model)
    base = {BASE: True, BOTH: None, "": False}[prefix]
    candidates = candidate_layers(model, base=base if adapters else None)
    parts = {"mlp": _MLP_PARTS, "attn": _ATTN_PARTS, "all": None}[preset]
    found = [t for t in candidates if parts is None or (
        parts & set(t.name.split(".")) and not _ROUTER_PARTS & set(t.name.split(".")))]
    if not found and adapters and base is False:
        raise ValueError(f"the model has LoRA adapters but none in preset {preset!r}; "
                         "pick the preset of the adapted modules ('attn', 'all'), or "
                         f"track base weights with '{BASE}{preset}'")
    if not found and preset == "mlp" and _fused_experts(model):
        raise ValueError("no trackable layers for preset 'mlp': the model's MLP experts are "
                         "fused 3-D parameters (a mixture of experts), not Linear modules, "
                         "and cannot be tracked; use layers='attn'")
    if not found:
        raise ValueError(f"no trackable layers: the model has no torch.nn.Linear or Conv1D "
                         f"module for preset {prefix + preset!r}; pass layers='all' or a list of "
                         "module names")
    return found


def _named_layers(model: nn.Module, patterns: Sequence[str]) -> list[TrackedLayer]:
    """The layers whose names match ``patterns`` (names or fnmatch globs, each matching at
    least one trackable module), in module order."""
    skipped: list[str] = []
    candidates = candidate_layers(model, skipped=skipped)
    found = []
    for pattern in patterns:
        hits = [t for t in candidates if fnmatch.fnmatchcase(t.name, pattern)]
        if not hits and skipped:
            raise ValueError(f"layer {pattern!r} matches no trackable module: {skipped[0]}")
        if not hits:
            names = ", ".join(t.name for t in candidates[:8]) or "none"
            raise ValueError(f"layer {pattern!r} is not a preset ({', '.join(PRESETS)}) and "
                             "matches no Linear/Conv1D module of the model (trackable: "
                             f"{names}{', ...' if len(candidates) > 8 else ''})")
        found += [t for t in hits if t not in found]
    if not found:
        raise ValueError("no trackable layers: the list of layer names is empty; pass names, "
                         "globs or a preset ('mlp', 'attn', 'all')")
    order = {t.name: i for i, t in enumerate(candidates)}
    return sorted(found, key=lambda t: order[t.name])


def context_length(model: nn.Module) -> int | None:
    """The longest sequence the model accepts, from its config, or None if it does not say."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    return None


def vocab_size(model: nn.Module) -> int | None:
    """Rows of the model's input embedding (the token ids it accepts), or None if unknown."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    return getattr(emb, "num_embeddings", None)


def stat_dtype(model: nn.Module) -> torch.dtype:
    """float64 for a float64 model, float32 otherwise (bfloat16 / float16 models included)."""
    dtype = next(model.parameters()).dtype
    return torch.float64 if dtype == torch.float64 else torch.float32

