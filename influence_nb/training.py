"""Training a causal LM on a corpus — from scratch, on any subset, with a fixed recipe.

Counterfactual checks (:mod:`influence_nb.validate`: LDS, leave-k-out) need the one thing an
influence estimate predicts: the model that training *would* have produced on other data. A
:class:`Retrainer` is that function for a Hugging Face causal LM and a :class:`TrainConfig`
recipe; any callable ``(ids, seed) -> model`` can stand in for it. What keys a store of its
retrains is its :func:`code_fingerprint`.

    retrain = Retrainer(model.config, corpus, TrainConfig(epochs=14))
    model_without = retrain(np.setdiff1d(np.arange(len(corpus)), removed), seed=0)

A training step is one function, :func:`update` (loss, gradient clip, AdamW), written out of
place so that :mod:`influence_nb.validate.replay` can differentiate through it; a
:class:`TrainRecord` keeps what a replay of the run needs.
"""
from __future__ import annotations

import hashlib
import json
import math
import types
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, ClassVar

import numpy as np
import torch
from einops import rearrange
import torch.nn.functional as F
from torch import nn

from .checks import as_ids, check_args, checked
from .data import Corpus
from .progress import tqdm


@dataclass
class TrainConfig:
    """A next-token training recipe: AdamW, linear warm-up then cosine decay to 10 % of ``lr``,
    gradient clipping at 1, batches bucketed by length and visited in a seeded random order.

    label_smoothing keeps the model from certainty, as a pretrained LM is: a planted fact
    is learned (greedy decoding gets it) but its statements keep log p ≈ −0.2 per token instead
    of ≈ 0, so their gradients, and hence their influence, do not vanish (see notebook 02).
    ``seed`` orders the batches (the initialisation is the model factory's business)."""
    epochs: int = 8
    batch_size: int = 64
    lr: float = 2e-3
    warmup_steps: int = 200
    weight_decay: float = 0.01
    label_smoothing: float = 0.2
    seed: int = 0

    MINIMUM: ClassVar[dict[str, float]] = {"epochs": 1, "batch_size": 1, "lr": 0.0,
                                           "warmup_steps": 1, "seed": 0}
    WITHIN: ClassVar[dict[str, str]] = {"weight_decay": "[0, inf)", "label_smoothing": "[0, 1)"}

    def __post_init__(self) -> None:
        check_args(self)


BETAS = (0.9, 0.98)     # AdamW's (β1, β2)
EPS = 1e-8              # AdamW's ε
MAX_NORM = 1.0          # gradients are clipped to this global norm
OPTIMIZERS = ("adamw", "sgd")


@dataclass
class OptState:
    """The optimizer's state: per trainable parameter (``named_parameters`` order) its value θ,
    AdamW's moments m and v (zeros for SGD) and the updates it has had."""
    theta: list[torch.Tensor]
    m: list[torch.Tensor]
    v: list[torch.Tensor]
    steps: list[int]

    @classmethod
    def start(cls, theta: Sequence[torch.Tensor]) -> "OptState":
        """Before the first step: moments zero."""
        zeros = [torch.zeros_like(t) for t in theta]
        return cls(list(theta), zeros, [z.clone() for z in zeros], [0] * len(theta))

    def to(self, device: torch.device | str, requires_grad: bool = False) -> "OptState":
        """A detached copy on ``device`` (a checkpoint; with ``requires_grad``: leaves)."""
        def copy(ts: list[torch.Tensor]) -> list[torch.Tensor]:
            return [t.detach().to(device, copy=True).requires_grad_(requires_grad) for t in ts]
        return OptState(copy(self.theta), copy(self.m), copy(self.v), list(self.steps))

    @property
    def tensors(self) -> list[torch.Tensor]:
        """θ, m and v in one list (what a step maps to the next)."""
        return self.theta + self.m + self.v


@dataclass
class TrainRecord:
    """A run of :func:`train` as :func:`~influence_nb.validate.replay.replay_influence` replays
    it: per step the batch's corpus ids and its learning rate, and the optimizer's state before
    every ``every``-th step and after the last, on the CPU (each 3 × the parameters).

        run = TrainRecord(every=20)
        train(model, corpus, cfg, record=run)
    """
    every: int = 20
    cfg: TrainConfig | None = None
    optimizer: str = "adamw"
    weights: np.ndarray | None = None                             # (N,) or None: all 1
    batches: list[np.ndarray] = field(default_factory=list)       # per step: (B,) sorted ids
    lrs: list[float] = field(default_factory=list)                # per step
    checkpoints: dict[int, OptState] = field(default_factory=dict)  # step -> state before it

    MINIMUM: ClassVar[dict[str, float]] = {"every": 1}

    def __post_init__(self) -> None:
        check_args(self)

    def begin(self, cfg: TrainConfig, optimizer: str, weights: np.ndarray | None) -> None:
        """Start recording a run (what an earlier one left is dropped)."""
        self.cfg, self.optimizer, self.weights = cfg, optimizer, weights
        self.batches, self.lrs, self.checkpoints = [], [], {}

    def keep(self, step: int, ids: np.ndarray, lr: float, state: OptState) -> None:
        """Note step ``step``'s batch and learning rate (and the state before it when due)."""
        self.batches.append(ids)
        self.lrs.append(lr)
        if step % self.every == 0:
            self.checkpoints[step] = state.to("cpu")


def learning_rate(cfg: TrainConfig, step: int, steps: int) -> float:
    """The recipe's learning rate at ``step`` of ``steps``: linear warm-up, then cosine decay
    to 10 % of ``cfg.lr``."""
    return cfg.lr * (min(1, (step + 1) / cfg.warmup_steps)
                     * (0.1 + 0.45 * (1 + math.cos(math.pi * step / steps))))


def batch_plan(corpus: Corpus, cfg: TrainConfig, ids: np.ndarray) -> list[np.ndarray]:
    """Per step the sorted corpus ids of its batch: ``ids`` bucketed by length into batches of
    ``cfg.batch_size``, every epoch visited in a random order seeded by ``cfg.seed``."""
    rng = np.random.default_rng(cfg.seed)
    order = ids[np.argsort(corpus.df["n_tokens"].to_numpy()[ids], kind="stable")]
    buckets = [order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
    return [np.sort(buckets[k]) for _ in range(cfg.epochs) for k in rng.permutation(len(buckets))]


def batch_loss(logits: torch.Tensor, batch: Any, label_smoothing: float,
               w: torch.Tensor | None = None) -> torch.Tensor:
    """Mean label-smoothed next-token loss over the batch's trained tokens (logits (B, T, V)).

    w: (B,) sequence weights: Σ_b w_b · s_b / n, with s_b sequence b's summed token loss and n
    the batch's trained tokens (at w = 1 the mean, up to rounding)."""
    targets = batch.input_ids if batch.labels is None else batch.labels   # -100: skip
    labels = targets.masked_fill(batch.attention_mask == 0, -100)[:, 1:].flatten()
    logits = rearrange(logits[:, :-1], "b t v -> (b t) v")
    if w is None:
        return F.cross_entropy(logits, labels, ignore_index=-100, label_smoothing=label_smoothing)
    s = rearrange(F.cross_entropy(logits, labels, ignore_index=-100, reduction="none",
                                  label_smoothing=label_smoothing), "(b t) -> b t", b=len(w))
    return (w.to(s.dtype) * s.sum(dim=1)).sum() / (labels != -100).sum()


def adamw(theta: torch.Tensor, m: torch.Tensor, v: torch.Tensor, g: torch.Tensor, lr: float,
          k: int, weight_decay: float, floor: float = 0.0
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AdamW's k-th update of one parameter, out of place and differentiable: torch.optim.AdamW's
    arithmetic, op for op (so the same floats). √v is taken as 0 with zero derivative where
    v = 0: m = 0 there, so v's O(ε²) change does not move θ. ``floor``: coordinates whose √v̂
    is below it are held constant in a graph (the same values; see :func:`update`)."""
    b1, b2 = BETAS
    theta = theta * (1 - lr * weight_decay)
    m = m.lerp(g, 1 - b1)
    v = (v * b2).addcmul(g, g, value=1 - b2)
    root = torch.where(v > 0, torch.where(v > 0, v, 1).sqrt(), 0)
    denom = root / (1 - b2 ** k) ** 0.5 + EPS
    if floor > 0:
        flat = denom < floor + EPS
        m, denom = torch.where(flat, m.detach(), m), torch.where(flat, denom.detach(), denom)
    return theta.addcdiv(m, denom, value=-lr / (1 - b1 ** k)), m, v


def sgd(theta: torch.Tensor, m: torch.Tensor, v: torch.Tensor, g: torch.Tensor, lr: float,
        k: int, weight_decay: float, floor: float = 0.0
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain SGD with decoupled weight decay (m, v and floor unused: SGD's step is linear in
    the gradient): for checks of the replay."""
    return theta * (1 - lr * weight_decay) - lr * g, m, v


def update(model: nn.Module, state: OptState, batch: Any, lr: float, cfg: TrainConfig,
           w: torch.Tensor | None = None, optimizer: str = "adamw", create_graph: bool = False,
           floor: float = 0.0) -> tuple[OptState, torch.Tensor]:
    """One training step from ``state`` on ``batch``: the loss at θ (:func:`batch_loss`), its
    gradient clipped to global norm :data:`MAX_NORM` (torch's clip_grad_norm_, op for op), and
    the optimizer's update at learning rate ``lr``. -> (state after, loss). With
    ``create_graph`` the new state is a differentiable function of ``state`` and ``w``.

    floor: with ``create_graph``, AdamW's update of a coordinate whose √v̂ is below ``floor`` ×
    the step's RMS gradient entry is held constant in the graph (same values): there Adam's
    denominator is near 0 or ε, and its slope, up to lr/ε, holds only for changes of the
    gradient far smaller than reweighting a sequence makes (see
    :func:`~influence_nb.validate.replay.replay_influence`)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    logits = torch.func.functional_call(model, dict(zip(names, state.theta)), (), dict(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask)).logits
    loss = batch_loss(logits, batch, cfg.label_smoothing, w)
    grads = torch.autograd.grad(loss, state.theta, create_graph=create_graph, allow_unused=True)
    rule = adamw if optimizer == "adamw" else sgd
    after = OptState([], [], [], [])
    with torch.set_grad_enabled(create_graph):
        norm = torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(g, 2.0) for g in grads if g is not None]), 2.0)
        clip = torch.clamp(MAX_NORM / (norm + 1e-6), max=1.0)
        flat = 0.0        # floor × the RMS entry of the clipped gradient, when differentiated
        if create_graph and floor:
            flat = floor * float((norm * clip).detach()) / sum(
                g.numel() for g in grads if g is not None) ** 0.5
        for theta, m, v, k, g in zip(state.theta, state.m, state.v, state.steps, grads):
            if g is not None:      # a parameter without a gradient keeps its state (as torch's)
                theta, m, v = rule(theta, m, v, g * clip, lr, k + 1, cfg.weight_decay, flat)
                k += 1
            after.theta.append(theta)
            after.m.append(m)
            after.v.append(v)
            after.steps.append(k)
    return after, loss


@checked(choices={"optimizer": OPTIMIZERS})
def train(model: nn.Module, corpus: Corpus, cfg: TrainConfig, ids: Sequence[int] | None = None,
          progress: bool = True, weights: np.ndarray | None = None,
          record: TrainRecord | None = None, optimizer: str = "adamw") -> list[float]:
    """Train ``model`` in place on the corpus rows ``ids`` (default: all); returns the loss
    curve (one mean token loss per step). Leaves the model in eval mode.

    weights: (len(corpus),) per-sequence loss weights (default: all 1; :func:`batch_loss`).
    record: a :class:`TrainRecord` to fill (batches, learning rates, checkpoints) for replay;
        recording does not change the run.
    optimizer: "adamw" (the recipe) or "sgd" (plain SGD, for checks of the replay).
    """
    ids = as_ids(ids, len(corpus))      # a negative id would wrap around, silently
    if len(ids) == 0:
        raise ValueError("no training sequences: pass a non-empty ids")
    if weights is not None and np.shape(weights) != (len(corpus),):
        raise ValueError(f"weights has shape {np.shape(weights)}; give one weight per corpus "
                         f"sequence, ({len(corpus)},)")
    plan = batch_plan(corpus, cfg, ids)
    params = [p for p in model.parameters() if p.requires_grad]
    state = OptState.start(params)
    if record is not None:
        record.begin(cfg, optimizer, weights)
    model.train()
    losses = []
    bar = tqdm(total=len(plan), desc="training", unit="step", disable=not progress)
    for step, batch_ids in enumerate(plan):
        lr = learning_rate(cfg, step, len(plan))
        if record is not None:
            record.keep(step, batch_ids, lr, state)
        batch = next(corpus.batches(len(batch_ids), ids=batch_ids)).to(params[0].device)
        w = None if weights is None else torch.as_tensor(weights[batch_ids])
        state, loss = update(model, state, batch, lr, cfg, w, optimizer)
        with torch.no_grad():
            for p, theta in zip(params, state.theta):
                p.copy_(theta)
        state.theta = params
        losses.append(loss.item())
        bar.update()
        if len(losses) % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
    bar.close()
    if record is not None:
        record.checkpoints[len(plan)] = state.to("cpu")
    model.eval()
    return losses


@checked(minimum={"seed": 0})
def fresh_model(config: Any, seed: int) -> nn.Module:
    """A randomly initialised causal LM of a Hugging Face ``config``, seeded."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


class Retrainer:
    """``retrain(ids, seed) -> model``: a fresh model trained from scratch on the corpus rows
    ``ids`` with the recipe; ``seed`` seeds both the initialisation and the batch order, so
    two subsets retrained with one seed differ only by their data.

    config: a Hugging Face config (``model.config``) or any ``seed -> nn.Module`` factory.
    """

    @checked()
    def __init__(self, config: Any | Callable[[int], nn.Module], corpus: Corpus,
                 recipe: TrainConfig, progress: bool = False):
        self.config = config
        self.make = config if callable(config) else (lambda seed: fresh_model(config, seed))
        self.corpus, self.recipe, self.progress = corpus, recipe, progress

    @property
    def fingerprint(self) -> str:
        """What a retrain depends on besides (ids, seed): corpus, recipe and model config (a
        factory's :func:`code_fingerprint`)."""
        config = (self.config.to_json_string() if hasattr(self.config, "to_json_string")
                  else code_fingerprint(self.config, "the Retrainer's config"))
        key = json.dumps([self.corpus.fingerprint, asdict(self.recipe), config], default=str)
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    @checked(minimum={"seed": 0})
    def __call__(self, ids: Sequence[int], seed: int = 0) -> nn.Module:
        model = self.make(seed)
        train(model, self.corpus, replace(self.recipe, seed=seed), ids, self.progress)
        return model


def code_fingerprint(fn: Callable, what: str = "retrain") -> str:
    """What keys a store of ``fn``'s results from run to run: its ``fingerprint`` attribute (a
    string: :class:`Retrainer`'s, or one set by hand, ``fn.fingerprint = "recipe v2"``), else,
    for a function defined with ``def``, its module, qualified name and a hash of its code —
    never a memory address. What the code reads from outside (globals, a closure) is not in
    it: set a fingerprint when that changes. A lambda, a ``functools.partial`` or an object
    without a fingerprint is a one-line ValueError."""
    own = getattr(fn, "fingerprint", None)
    if isinstance(own, str) and own:
        return own
    function = getattr(fn, "__func__", fn)   # a bound method: its function
    if not isinstance(function, types.FunctionType) or function.__name__ == "<lambda>":
        raise ValueError(f"{what} {fn!r} has no name and code that stay the same from run to "
                         f"run; define it with def, or name its recipe: "
                         f"{what.split()[-1]}.fingerprint = 'a name for this recipe'")
    return f"{function.__module__}.{function.__qualname__}:{_code_hash(function.__code__)}"


def _code_hash(code: types.CodeType) -> str:
    """16 hex of a code object's bytecode, names and constants (nested code included)."""
    h = hashlib.sha256(code.co_code + repr(code.co_names).encode())
    for c in code.co_consts:
        h.update((_code_hash(c) if isinstance(c, types.CodeType) else repr(c)).encode())
    return h.hexdigest()[:16]
