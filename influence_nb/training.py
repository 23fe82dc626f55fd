"""Training a causal LM on a corpus — from scratch, on any subset, with a fixed recipe.

Counterfactual checks (:mod:`influence_nb.validate`: LDS, leave-k-out) need the one thing an
influence estimate predicts: the model that training *would* have produced on other data. A
:class:`Retrainer` is that function for a Hugging Face causal LM and a :class:`TrainConfig`
recipe; any callable ``(ids, seed) -> model`` can stand in for it. What keys a store of its
retrains is its :func:`code_fingerprint`.

    retrain = Retrainer(model.config, corpus, TrainConfig(epochs=14))
    model_without = retrain(np.setdiff1d(np.arange(len(corpus)), removed), seed=0)
"""
from __future__ import annotations

import hashlib
import json
import math
import types
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, ClassVar

import numpy as np
import torch
from einops import rearrange
from torch import nn
from tqdm.auto import tqdm

from .checks import as_ids, check_args, checked
from .data import Corpus


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


@checked()
def train(model: nn.Module, corpus: Corpus, cfg: TrainConfig, ids: Sequence[int] | None = None,
          progress: bool = True) -> list[float]:
    """Train ``model`` in place on the corpus rows ``ids`` (default: all); returns the loss
    curve (one mean token loss per step). Leaves the model in eval mode."""
    ids = as_ids(ids, len(corpus))      # a negative id would wrap around, silently
    if len(ids) == 0:
        raise ValueError("no training sequences: pass a non-empty ids")
    rng = np.random.default_rng(cfg.seed)
    order = ids[np.argsort(corpus.df["n_tokens"].to_numpy()[ids], kind="stable")]
    buckets = [order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
    steps = cfg.epochs * len(buckets)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                            betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1, (s + 1) / cfg.warmup_steps)
                                              * (0.1 + 0.45 * (1 + math.cos(math.pi * s / steps))))
    model.train()
    losses = []
    bar = tqdm(total=steps, desc="training", unit="step", disable=not progress)
    for _ in range(cfg.epochs):
        for k in rng.permutation(len(buckets)):
            batch = next(corpus.batches(len(buckets[k]), ids=np.sort(buckets[k])))
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            targets = batch.input_ids if batch.labels is None else batch.labels  # -100: skip
            labels = targets.masked_fill(batch.attention_mask == 0, -100)[:, 1:]
            loss = torch.nn.functional.cross_entropy(
                rearrange(logits[:, :-1], "b t v -> (b t) v"), labels.flatten(),
                ignore_index=-100, label_smoothing=cfg.label_smoothing)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.update()
            if len(losses) % 20 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
    bar.close()
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
