"""Tracked layers and the capture of their input activations ā and output gradients δ.

For a linear layer y = W x + b, write ā = [x, 1] (the bias as a homogeneous coordinate) and
δ = ∂L/∂y. The gradient of a sequence's loss with respect to [W, b] is then

    DW = Σ_t δ_t ā_tᵀ          # (out, in+1) = einsum('t o, t i -> o i', δ, ā)

which is all the curvature fit, the query gradients and the scorer need. :class:`Capture`
records ā (forward hooks) and δ (tensor hooks on the layers' outputs, during a backward that
runs to those outputs' gradient edges, so no parameter gradient is ever materialised) without
wrapping or renaming anything in the user's model; every hook and every parameter's
``requires_grad`` flag is restored when the context exits.

Adapters. A PEFT LoRA layer (``peft.tuners.lora.LoraLayer``, on a Linear or a GPT-2 Conv1D)
computes y = W₀ x + s · B A x with ``base_layer`` (W₀), ``lora_A.<adapter>`` (A, r × in) and
``lora_B.<adapter>`` (B, out × r), all three plain Linear / Conv1D modules. They are tracked as
they are: A and B are two Linear layers like any other (ā of B is A x, δ of A is s Bᵀ δ_y),
read from the model's own modules — the model is never wrapped or rewritten. Presets pick the
adapters when the model has any, the base weights with ``"base:"`` (see :func:`find_layers`).
With the adapter unmerged, the gradient of W₀ equals the gradient of the merged weight
W₀ + s B A of ``merge_and_unload()``'s model (same function, same ā and δ), so base-weight
scores of the two agree; the adapter's gradients are ∇B = s ∇W Aᵀ and ∇A = s Bᵀ ∇W.
"""
from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge
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
# tokens only, which :class:`Capture`, reading ā and δ at (B, T) positions, does not take.)
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
    if isinstance(layers, str):
        prefix = next((p for p in (BASE, BOTH) if layers.startswith(p)), "")
        preset = layers[len(prefix):]
        if preset not in PRESETS and prefix:
            raise ValueError(f"unknown layer preset {layers!r}; use one of {PRESETS} (or "
                             f"'{BASE}mlp', '{BOTH}mlp' etc. for a model's base weights under "
                             "adapters) or a list of module names / globs")
        if preset not in PRESETS:
            layers = [layers]                             # one module name or glob
    if isinstance(layers, str):
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
                             f"module for preset {layers!r}; pass layers='all' or a list of "
                             "module names")
        return found
    skipped: list[str] = []
    candidates = candidate_layers(model, skipped=skipped)
    found = []
    for pattern in layers:
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


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put the model in eval mode (no dropout) and restore every module's flag on exit."""
    flags = [m.training for m in model.modules()]
    if not any(flags):  # already in eval mode, as a loaded model is: nothing to undo
        yield model
        return
    model.eval()
    try:
        yield model
    finally:
        if all(flags):  # one recursive call (Module.train recurses: one per module is quadratic)
            model.train()
        else:
            for m, training in zip(model.modules(), flags):
                m.train(training)


class Capture:
    """Hands each tracked layer's ā (B, T, in + bias) and δ (B, T, out) of a batch to a
    reducer as soon as the layer's δ is known, one layer at a time.

    Use as a context manager; per batch::

        with Capture(model, layers) as cap:
            cap.start(mask)                    # (B, T): 1 where a token counts, 0 for padding
            losses = task.training_loss(task.forward(model, batch), batch)   # (B,)
            cap.backward(losses, reduce)       # reduce(layer, ā, δ) per layer, δ = ∂ Σ losses / ∂ y

    Only :mod:`influence_nb.passes` runs this loop; consumers of a pass are the reducers.

    The forward hook keeps a reference to the layer's input (refusing, by its version, an
    in-place change to it before the backward; likewise the output's) and hooks the output's
    gradient: when the backward reaches the layer, ā and δ are built in
    ``dtype`` (float32 by default, statistics need it even when the model runs in bfloat16),
    handed over and dropped. So no float32 copy of every layer's ā and δ is ever held at once,
    and no δ outlives its layer: the backward's targets are the outputs' gradient edges
    (``torch.autograd.graph.get_gradient_edge``), so autograd runs exactly the graph between the
    loss and the tracked outputs, keeps no gradient of an output (it is no leaf) and forms no
    parameter gradient; a tensor hook on each output hands δ over.
    At unscored positions the narrower of ā and δ is exactly zero, which makes every product
    δ_t ā_tᵀ zero there (the wider one is the model's own tensor, uncopied: a reducer that uses
    it alone selects the scored positions, and never writes to either). A layer the loss does
    not depend on gets δ = 0 after the backward. Non-finite activations or gradients raise an
    error naming the layer, checked once per batch (one host synchronisation, not one per layer);
    ``check_finite=False`` leaves that to the reducer (a scorer checks its scores on the host).
    """

    def __init__(self, model: nn.Module, layers: Sequence[TrackedLayer],
                 dtype: torch.dtype | None = None, check_finite: bool = True):
        self.model, self.layers = model, list(layers)
        self.dtype = dtype or stat_dtype(model)
        self.check_finite = check_finite
        self._inputs: dict[str, tuple[Tensor, int]] = {}
        self._outputs: dict[str, tuple[Tensor, int]] = {}
        self._reduce: Callable[[TrackedLayer, Tensor, Tensor], None] | None = None
        self._done: set[str] = set()
        self._finite: list[tuple[str, str, Tensor]] = []  # (layer, what, 0-d bool on device)
        self._mask: Tensor | None = None
        self._drop: Tensor | None = None
        self._handles: list = []
        self._switches: list = []  # the pre-hooks' handles, removed after the first forward
        self._requires_grad: list[tuple[nn.Parameter, bool]] = []

    def __enter__(self) -> "Capture":
        # The pass forms no parameter gradient, so no parameter needs one: the forward then
        # records only the graph between the tracked layers and the loss, and saves no input
        # for a weight gradient. A tracked layer whose input carries no graph (the first ones)
        # gets its weight switched on just before it runs, so that its output has one (the
        # first forward decides; the flags stay, so the pre-hooks go after it).
        self._requires_grad = [(p, p.requires_grad) for p in self.model.parameters()]
        for p, _ in self._requires_grad:
            p.requires_grad_(False)
        for layer in self.layers:
            self._switches.append(layer.module.register_forward_pre_hook(self._pre_hook(layer)))
            self._handles.append(layer.module.register_forward_hook(
                self._hook(layer, self._grad_hook(layer))))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles + self._switches:
            h.remove()
        for p, flag in self._requires_grad:
            p.requires_grad_(flag)
        self._handles, self._switches, self._requires_grad = [], [], []
        self._clear()

    def _clear(self) -> None:
        self._inputs, self._outputs, self._done, self._finite = {}, {}, set(), []

    def start(self, mask: Tensor) -> None:
        """Begin a batch: forget the previous one; ``mask`` (B, T) selects the counted tokens."""
        self._clear()
        self._mask = mask.to(torch.bool)
        self._drop = ~self._mask[..., None]  # (B, T, 1): positions zeroed in ā or δ

    @staticmethod
    def _pre_hook(layer: TrackedLayer):
        weight = layer.module.weight

        def pre_hook(module: nn.Module, args: tuple) -> None:
            if not (args[0].requires_grad or weight.requires_grad):
                weight.requires_grad_(True)
        return pre_hook

    def _hook(self, layer: TrackedLayer, take: Callable[[Tensor], None]):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            if self._mask is None:
                raise RuntimeError("Capture.start(mask) must be called before the forward pass")
            if layer.name in self._inputs:
                raise RuntimeError(f"layer {layer.name!r} ran twice in one forward pass; "
                                   "modules reused within a pass cannot be tracked — exclude it")
            x = args[0].detach()
            if self.check_finite:  # one reduction; NaN/inf anywhere make it non-finite
                self._finite.append((layer.name, "activations (NaN/inf) entering",
                                     torch.isfinite(x.sum())))
            self._inputs[layer.name] = (x, x._version)
            if output.requires_grad:
                output.register_hook(take)
            elif torch.is_grad_enabled():  # (under torch.no_grad the loss has no gradient)
                raise RuntimeError(f"layer {layer.name!r} ran without autograd (inside "
                                   "torch.no_grad in the model?), so its δ cannot be read; "
                                   "exclude the layer")
            self._outputs[layer.name] = (output, output._version)
        return hook

    def _grad_hook(self, layer: TrackedLayer):
        def hook(g: Tensor) -> None:
            if self._reduce is not None and layer.name not in self._done:
                self._hand_over(layer, g)
        return hook

    def _hand_over(self, layer: TrackedLayer, g: Tensor | None) -> None:
        """Build ā and δ of ``layer`` (δ = 0 for g None), the narrower zeroed at unscored
        positions, reduce them, drop the input."""
        B, T = self._mask.shape
        x, version = self._inputs.pop(layer.name)
        if x._version != version:  # (no weight gradient is formed, so autograd would not see it)
            raise RuntimeError(f"the input of layer {layer.name!r} was modified in place after the "
                               "layer ran, so its ā cannot be read; exclude the layer")
        x = x.reshape(B, T, layer.d_in)
        if layer.bias:
            a = x.new_empty(B, T, layer.shape[1], dtype=self.dtype)
            a[..., :layer.d_in] = x
            a[..., -1] = 1.0
        else:  # no copy in the model's dtype (LoRA matrices and bias-free projections)
            a = x.to(self.dtype)
        if g is None:  # the loss does not depend on this layer
            delta = torch.zeros(B, T, layer.d_out, dtype=self.dtype, device=self._mask.device)
        else:
            if self.check_finite:
                self._finite.append((layer.name, "gradients (NaN/inf) at the output of",
                                     torch.isfinite(g.sum())))
            delta = g.reshape(B, T, layer.d_out).to(self.dtype)
        # m_t² = m_t: Σ_t (m_t δ_t) ā_tᵀ = Σ_t (m_t δ_t)(m_t ā_t)ᵀ, so zeroing the narrower side
        # (r columns of a LoRA matrix) at unscored positions makes every product exact
        if a.shape[-1] <= layer.d_out:  # in place unless a is the model's own input
            a = a.masked_fill(self._drop, 0.0) if a is x else a.masked_fill_(self._drop, 0.0)
        else:  # never in place: g flows on through the backward
            delta = delta.masked_fill(self._drop, 0.0)
        self._done.add(layer.name)
        self._reduce(layer, a, delta)

    def backward(self, losses: Tensor, reduce: Callable[[TrackedLayer, Tensor, Tensor], None]
                 ) -> None:
        """δ = ∂(Σ losses)/∂y per tracked layer, each handed with its ā to ``reduce(layer, ā,
        δ)`` as the backward reaches it (parameter .grad untouched)."""
        for layer in self.layers:
            if layer.name not in self._outputs:
                raise RuntimeError(f"layer {layer.name!r} did not run in the forward pass; "
                                   "exclude it from the tracked layers")
            output, version = self._outputs[layer.name]
            if output._version != version:
                raise RuntimeError(f"the output of layer {layer.name!r} was modified in place after "
                                   "the layer ran, so its δ cannot be read; exclude the layer")
        for h in self._switches:
            h.remove()
        self._switches, self._reduce = [], reduce
        try:
            edges = [get_gradient_edge(y) for y, _ in self._outputs.values() if y.requires_grad]
            self._outputs = {}  # the graph holds them; let the backward release each one
            if losses.requires_grad and edges:  # δ comes through the outputs' tensor hooks
                torch.autograd.backward(losses.sum(), inputs=edges)
            for layer in self.layers:
                if layer.name not in self._done:
                    self._hand_over(layer, None)
            self._check_finite()
        finally:
            self._reduce = None

    def _check_finite(self) -> None:
        if not self._finite:
            return
        flags = torch.stack([ok for _, _, ok in self._finite])
        if not bool(flags.all()):
            name, what, _ = self._finite[int((~flags).nonzero()[0, 0])]
            raise FloatingPointError(f"non-finite {what} layer {name!r}; check the model's "
                                     "weights, inputs and loss (bfloat16 overflow?)")
