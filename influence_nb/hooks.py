"""Reading a pass off the model: input activations ā and output gradients δ of the tracked
layers (:mod:`~influence_nb.layers`), and the eval mode the pass runs in.

:class:`Capture` records ā (forward hooks) and δ (tensor hooks on the layers' outputs, during a
backward that runs to those outputs' gradient edges, so no parameter gradient is ever
materialised) without wrapping or renaming anything in the user's model; every hook and every
parameter's ``requires_grad`` flag is restored when the context exits.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge

from .layers import TrackedLayer, stat_dtype


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
        self._retain = False       # a backward that another backward of the batch follows
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
        x, version = (self._inputs.get if self._retain else self._inputs.pop)(layer.name)
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

    def backward(self, losses: Tensor, reduce: Callable[[TrackedLayer, Tensor, Tensor], None],
                 retain: bool = False) -> None:
        """δ = ∂(Σ losses)/∂y per tracked layer, each handed with its ā to ``reduce(layer, ā,
        δ)`` as the backward reaches it (parameter .grad untouched). ``retain``: keep the
        graph and the inputs for another backward of the same forward (another loss of the
        same logits, e.g. a second Fisher draw)."""
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
        self._switches, self._reduce, self._retain, self._done = [], reduce, retain, set()
        try:
            edges = [get_gradient_edge(y) for y, _ in self._outputs.values() if y.requires_grad]
            if not retain:
                self._outputs = {}  # the graph holds them; let the backward release each one
            if losses.requires_grad and edges:  # δ comes through the outputs' tensor hooks
                torch.autograd.backward(losses.sum(), inputs=edges, retain_graph=retain)
            for layer in self.layers:
                if layer.name not in self._done:
                    self._hand_over(layer, None)
            self._check_finite()
        finally:
            self._reduce, self._retain = None, False

    def _check_finite(self) -> None:
        if not self._finite:
            return
        flags = torch.stack([ok for _, _, ok in self._finite])
        if not bool(flags.all()):
            name, what, _ = self._finite[int((~flags).nonzero()[0, 0])]
            raise FloatingPointError(f"non-finite {what} layer {name!r}; check the model's "
                                     "weights, inputs and loss (bfloat16 overflow?)")
