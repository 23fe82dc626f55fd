"""Curvature: K-FAC / EK-FAC factors of the Fisher and damped inverse-Fisher-vector products.

In the eigenbases of a layer's Kronecker factors A = Q_A diag(λ_A) Q_Aᵀ and S = Q_S diag(λ_S) Q_Sᵀ
(:mod:`influence_nb.statistics`)::

    K-FAC:   Λ = λ_S λ_Aᵀ                                (out, in+1)
    EK-FAC:  Λ_ij = E_seq[(Q_Sᵀ DW Q_A)_ij²],  DW = Σ_t δ_t ā_tᵀ per sequence
    (G + λI)⁻¹ V = Q_S [(Q_Sᵀ V Q_A) ⊘ (Λ + λ)] Q_Aᵀ,    λ = 0.1 · mean(Λ) by default

The δ are gradients of the Fisher pseudo-loss (labels sampled from the model, see
:mod:`influence_nb.task`), so G is the true Fisher of the summed per-sequence loss. A fit
costs a covariance pass and, for EK-FAC, an eigenvalue-correction pass over the corpus, each
about one forward + backward (no parameter gradients are formed); when the first pass's ā and δ
fit in :data:`~influence_nb.passes.RECORD_BYTES`, the second replays them instead.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import ClassVar

import safetensors.torch
import torch
from torch import Tensor, nn

from . import distributed, store
from .batching import source
from .checks import check_args
from .layers import TrackedLayer, find_layers, stat_dtype
from .passes import Recording, corpus_pass
from .statistics import Covariance, EigenvalueCorrection, LayerFactors, rotate, rotated_gradients
from .task import Task

# the curvature a fit or a preconditioning uses; the default first, then less and less of it
STRATEGIES = ("ekfac", "kfac", "identity")
FORMAT = "influence_nb.factors/2"


@dataclass
class FactorArgs:
    """How to fit the curvature.

    strategy:       "ekfac" (default), "kfac", or "identity" (no curvature: gradient dot product)
    layers:         "mlp" (paper), "attn", "all", or module names / fnmatch globs
    batch_size:     sequences per batch when fitting from a Corpus; None: as many as fit in
                    ``batch_tokens`` (length-bucketed, see :func:`~influence_nb.passes.source`)
    batch_tokens:   padded tokens per batch when ``batch_size`` is None
    max_examples:   stop after this many training sequences (None: the whole corpus)
    blocks:         split A and S into this many diagonal blocks (memory bound for wide layers)
    eigh_precision: "float64" (default) or "float32": the eigendecompositions of A and S, the
                    fit's fixed cost (float32: ≈ 2× faster; scores agree to Spearman ≥ 0.999,
                    tests/test_real_size.py)
    damping:        absolute λ for every layer; None: ``damping_factor`` · mean(Λ_ℓ) per layer
    damping_factor: relative damping (paper: 0.1)
    seed:           seed of the Fisher draws: batch k draws from a generator seeded with
                    (seed, k, draw), so both passes, and any number of ranks, draw the same ones
    draws:          Fisher draws per sequence in S (independent output gradients of the
                    pseudo-loss, see :class:`~influence_nb.task.FisherProbe`; one forward, a
                    backward each); Λ takes the first. None (default): as many as S needs to be
                    worth ``statistics.DRAW_TARGET`` equally weighted positions per row
                    (:meth:`Covariance.draws_needed`), measured in the first draw — one draw
                    unless most positions are near-certain (short memorised facts), at most
                    ``statistics.MAX_DRAWS``; one for a one-shot iterator of batches (a single pass);
                    the number drawn is recorded in the fitted factors' args
    progress:       show tqdm progress bars
    """
    strategy: str = "ekfac"
    layers: str | Sequence[str] = "mlp"
    batch_size: int | None = None
    batch_tokens: int = 1024
    max_examples: int | None = None
    blocks: int = 1
    eigh_precision: str = "float64"
    damping: float | None = None
    damping_factor: float = 0.1
    seed: int = 0
    draws: int | None = None
    progress: bool = True

    MINIMUM: ClassVar[dict[str, float]] = {"batch_size": 1, "batch_tokens": 1,
                                           "max_examples": 1, "blocks": 1,
                                           "draws": 1, "damping": 0.0, "damping_factor": 0.0}
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"strategy": STRATEGIES,
                                                     "eigh_precision": ("float64", "float32")}

    def __post_init__(self) -> None:
        check_args(self)


def hash_eigenvalues(h: "hashlib._Hash", t: Tensor) -> None:
    """Feed eigenvalues ``t`` into the hash ``h``, rounded to bfloat16 as
    :meth:`Factors.factors_id` defines it. That hashes every Λ once per :class:`Factors`: a cost
    of its first query, which :func:`influence_nb.plan.plan` times with this function."""
    h.update(t.to(torch.bfloat16).float().cpu().numpy().tobytes())


@dataclass
class Factors:
    """Fitted curvature of the tracked layers; :meth:`precondition` applies (G + λI)⁻¹."""
    args: FactorArgs
    shapes: dict[str, tuple[int, int]]   # tracked layer -> (out, in + bias), in module order
    layers: dict[str, LayerFactors]      # empty for strategy "identity"
    n_examples: int
    n_tokens: int
    model_fingerprint: str
    corpus_fingerprint: str | None = None
    empirical_fisher: bool = False
    fisher_probe: str | None = None      # the true Fisher's draw (Task.fisher_probe); None: the
    #                                      empirical Fisher, no Fisher (identity), or unrecorded
    # seconds of each stage of the fit that made them ("covariance", "draws": the extra Fisher
    # draws of a small corpus, "eigendecomposition", "eigenvalues"); empty for loaded factors
    # (they describe a run, not the curvature)
    timings: dict[str, float] = field(default_factory=dict, repr=False, compare=False)
    # λ_ℓ per (layer, strategy, settings), read from the device once, not per batch
    _damping: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _id: list = field(default_factory=list, init=False, repr=False, compare=False)

    @property
    def layer_names(self) -> list[str]:
        return list(self.shapes)

    def factors_id(self) -> str:
        """A hash of the fitted eigenvalues (rounded to bfloat16) and damping settings: equal
        for the same fit, saved and reloaded or not; what queries and sketches are tied to.
        Kept while the settings and eigenvalue tensors stay the same objects: hashing every Λ
        took 0.29 s of each query preparation on Pythia-160m's MLPs."""
        meta = json.dumps([self.model_fingerprint, self.n_examples, asdict(self.args)],
                          default=str)
        tensors = [t for f in self.layers.values() for t in (f.lambda_A, f.lambda_S, f.Lambda)
                   if t is not None]
        key = (meta, tuple(map(id, tensors)))
        if self._id[:1] != [key]:
            h = hashlib.sha256(meta.encode())
            for t in tensors:
                hash_eigenvalues(h, t)
            self._id[:] = [key, h.hexdigest()[:16], tensors]   # the tensors: ids stay unique
        return self._id[1]

    def damping(self, name: str, strategy: str | None = None) -> float:
        """λ_ℓ: the absolute override, or damping_factor · mean(Λ_ℓ)."""
        if self.args.damping is not None:
            return float(self.args.damping)
        key = (name, strategy or self.args.strategy, self.args.damping_factor)
        if key not in self._damping:
            Lambda = self.layers[name].eigenvalues(key[1])
            lam = self.args.damping_factor * Lambda.mean().item()
            if not lam > 0 or not math.isfinite(lam):   # a zero Fisher would divide by zero
                raise ValueError(f"the Fisher of layer {name!r} has mean eigenvalue "
                                 f"{Lambda.mean().item():.3g} (zero curvature: its gradient "
                                 "vanishes on every training sequence — an untrained adapter, "
                                 "a LoRA lora_A whose lora_B is still zero? or nothing left to "
                                 "learn there); train it, leave the layer out, or set an "
                                 "absolute FactorArgs(damping=...)")
            self._damping[key] = lam
        return self._damping[key]

    def resolve_strategy(self, strategy: str | None) -> str:
        strategy = strategy or self.args.strategy
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; use one of {STRATEGIES}")
        if strategy != "identity" and not self.layers:
            raise ValueError("these factors were fitted with strategy='identity'; refit with "
                             "strategy='ekfac' or 'kfac'")
        return strategy

    def precondition_layer(self, name: str, V: Tensor, strategy: str | None = None) -> Tensor:
        """(G_ℓ + λ_ℓ I)⁻¹ V for one layer: (..., out, in+1) -> same shape, on the factors'
        device and in their dtype (``strategy`` as in :meth:`precondition`)."""
        strategy = self.resolve_strategy(strategy)
        if strategy == "identity":
            return V
        f = self.layers[name]
        V = V.to(f.lambda_A.device, f.lambda_A.dtype)
        return self.from_eigenbasis(name, self.scale_rotated(
            name, rotate(rotate(V, f.Q_A).mT, f.Q_S).mT, strategy))

    def scale_rotated(self, name: str, Vr: Tensor, strategy: str | None = None) -> Tensor:
        """X = Vr / (Λ + λ): the preconditioned V in the eigenbasis, from Vr = Q_Sᵀ V Q_A (e.g.
        :func:`rotated_gradients`, cheaper for short sequences), (..., out, in+1). Not for
        strategy "identity" (no eigenbasis)."""
        strategy = self.resolve_strategy(strategy)
        return Vr / (self.layers[name].eigenvalues(strategy) + self.damping(name, strategy))

    def precondition_tokens(self, name: str, a: Tensor, delta: Tensor, tokens: Tensor,
                            strategy: str | None = None) -> Tensor:
        """X = (Q_Sᵀ DW Q_A) ⊘ (Λ + λ) per sequence, DW = Σ_t δ_t ā_tᵀ over the counted
        ``tokens`` (:func:`rotated_gradients`): a layer's ā (B, T, in+1) and δ (B, T, out) ->
        (B, out, in+1) in the eigenbasis, on the factors' device and in their dtype. Not for
        strategy "identity"."""
        f = self.layers[name]
        cast = dict(device=f.lambda_A.device, dtype=f.lambda_A.dtype)
        Vr = rotated_gradients(a.to(**cast), delta.to(**cast), tokens.to(cast["device"]), f)
        return self.scale_rotated(name, Vr, strategy)

    def from_eigenbasis(self, name: str, X: Tensor) -> Tensor:
        """Q_S X Q_Aᵀ: (..., out, in+1) back from the eigenbasis to the weights'."""
        f = self.layers[name]
        return rotate(rotate(X, f.Q_A, True).mT, f.Q_S, True).mT

    def columns_from_eigenbasis(self, name: str, U: Tensor, V: Tensor) -> tuple[Tensor, Tensor]:
        """(Q_S U, Q_A V) for U (..., out, r), V (..., in+1, r): the factors of a low-rank
        X = U Vᵀ in the eigenbasis, back in the weights' basis, Q_S X Q_Aᵀ = (Q_S U)(Q_A V)ᵀ
        — out²·r + in²·r instead of out·in·(out + in) for the whole matrix."""
        f = self.layers[name]
        return rotate(U.mT, f.Q_S, True).mT, rotate(V.mT, f.Q_A, True).mT

    def precondition(self, grads: Mapping[str, Tensor],
                     strategy: str | None = None) -> dict[str, Tensor]:
        """(G_ℓ + λ_ℓ I)⁻¹ V_ℓ for each layer: {name: (..., out, in+1)} -> same shapes, on the
        factors' device and in their dtype (float32, or float64 for a float64 model).

        ``strategy`` overrides the fitted one ("kfac" on an EK-FAC fit, or "identity").
        """
        strategy = self.resolve_strategy(strategy)
        missing = [n for n in self.shapes if n not in grads]
        if missing:
            raise KeyError(f"no gradient for tracked layer {missing[0]!r}; compute gradients on "
                           "factors.layer_names")
        return {name: self.precondition_layer(name, grads[name], strategy) for name in self.shapes}

    def manifest(self) -> dict:
        """The JSON manifest written beside the tensors."""
        return {"format": FORMAT, "package_version": _version(),
                "args": asdict(self.args), "layers": {n: list(s) for n, s in self.shapes.items()},
                "n_examples": self.n_examples, "n_tokens": self.n_tokens,
                "model_fingerprint": self.model_fingerprint,
                "corpus_fingerprint": self.corpus_fingerprint,
                "fisher": "empirical" if self.empirical_fisher else "true",
                "fisher_probe": self.fisher_probe}

    def save(self, path: str | os.PathLike, eigenvectors: torch.dtype | None = None) -> Path:
        """Write the tensors to ``factors-<sha256>.safetensors``, then ``manifest.json`` naming
        that file, into directory ``path``, under a lock. The manifest is the commit: a save
        killed at any moment leaves the previous factors loadable (an orphan tensor file or a
        temporary one at worst, removed by the next save); the manifest is sealed (:func:`store.write_manifest`)
        and records the tensors' SHA-256, so an edited field or flipped bytes are refused on
        load. ``eigenvectors``: store Q_A and Q_S in this dtype (e.g. float16: half the bytes,
        each entry to 2⁻¹¹ relative; the demo's shipped factors), read back in the eigenvalues'
        dtype."""
        path = Path(path)
        tensors = {}
        cast = (lambda q: q.contiguous()) if eigenvectors is None else (  # noqa: E731
            lambda q: q.to(eigenvectors).contiguous())
        for name, f in self.layers.items():
            tensors |= {f"{name}/Q_A/{k}": cast(q) for k, q in enumerate(f.Q_A)}
            tensors |= {f"{name}/Q_S/{k}": cast(q) for k, q in enumerate(f.Q_S)}
            tensors |= {f"{name}/lambda_A": f.lambda_A, f"{name}/lambda_S": f.lambda_S}
            if f.Lambda is not None:
                tensors[f"{name}/Lambda"] = f.Lambda
        with store.lock(path, ValueError, wait=True):
            # written from the tensors straight to the file, then hashed from it: the file's
            # bytes are never held in memory too (Llama-0.5b's factors: 2 GB, held twice)
            tmp = store.temporary(path / "factors.safetensors")
            safetensors.torch.save_file({k: v.cpu() for k, v in tensors.items()}, tmp)
            sha = store.sha256_file(tmp)
            file = f"factors-{sha[:16]}.safetensors"
            store.publish(tmp, path / file)
            store.write_manifest(path / "manifest.json",
                                 self.manifest() | {"tensors": file, "sha256": sha})
            # a save killed before its rename left a temporary copy (".factors-….tmp"); under
            # the lock no other save is writing one, so every one here is stale
            for old in [*path.glob("factors*.safetensors"), *path.glob(".factors*.tmp")]:
                if old.name != file:
                    old.unlink()
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module | None = None,
             device: torch.device | str = "cpu") -> "Factors":
        """Read factors saved by :meth:`save`; with ``model``, refuse factors fitted on another."""
        path = Path(path)
        fix = "refit them with fit_factors(...).save(path)"
        if not (path / "manifest.json").exists():
            raise FileNotFoundError(f"no fitted factors in {path} (no manifest.json); {fix}")
        m = store.read_manifest(path / "manifest.json", FORMAT, ValueError, fix,
                                keys=("args", "layers", "n_examples", "n_tokens", "tensors",
                                      "sha256", "model_fingerprint", "corpus_fingerprint",
                                      "fisher"))
        file = store.member(path, m["tensors"], ValueError, fix)
        t = store.read_safetensors(file, m["sha256"])
        if t is None:
            raise ValueError(f"factors in {path} are corrupt or incomplete ({file.name} fails the "
                             f"manifest's SHA-256); {fix}")
        shapes = {n: tuple(s) for n, s in m["layers"].items()}
        if model is not None:
            fp = fingerprint_of(model, list(shapes))
            if fp != m["model_fingerprint"]:
                raise ValueError(f"factors in {path} were fitted for a different model "
                                 f"(fingerprint {m['model_fingerprint']} ≠ {fp}); load them with the "
                                 "model they were fitted on, or refit with fit_factors(model, ...)")
        t = {k: v.to(device) for k, v in t.items()}
        args = FactorArgs(**m["args"])
        layers = {}
        if args.strategy != "identity":
            for name, (d_out, d_in) in shapes.items():
                need = [f"{name}/{k}" for k in ("Q_A/0", "Q_S/0", "lambda_A", "lambda_S")]
                need += [f"{name}/Lambda"] if args.strategy == "ekfac" else []
                missing = [k for k in need if k not in t]
                if missing:
                    raise ValueError(f"factors in {path} lack tensor {missing[0]!r} of a "
                                     f"strategy={args.strategy!r} fit; {fix}")
                dtype = t[f"{name}/lambda_A"].dtype   # Q may be stored narrower (save)
                blocks = {key: [t[f"{name}/{key}/{k}"].to(dtype) for k in range(
                    sum(x.startswith(f"{name}/{key}/") for x in t))] for key in ("Q_A", "Q_S")}
                f = LayerFactors(blocks["Q_A"], t[f"{name}/lambda_A"], blocks["Q_S"],
                                 t[f"{name}/lambda_S"], t.get(f"{name}/Lambda"))
                if (f.lambda_A.shape != (d_in,) or f.lambda_S.shape != (d_out,) or (
                        f.Lambda is not None and f.Lambda.shape != (d_out, d_in))):
                    raise ValueError(f"factors in {path} have tensors of other shapes than layer "
                                     f"{name!r} ({d_out} × {d_in}); {fix}")
                layers[name] = f
        return cls(args, shapes, layers, m["n_examples"], m["n_tokens"], m["model_fingerprint"],
                   m["corpus_fingerprint"], m["fisher"] == "empirical", m.get("fisher_probe"))


def _version() -> str:
    try:
        return importlib.metadata.version("influence_nb")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


_VOLATILE_CONFIG = {"torch_dtype", "dtype", "transformers_version", "_name_or_path",
                    "_attn_implementation", "_attn_implementation_autoset", "use_cache"}


def fingerprint_of(model: nn.Module, layer_names: Sequence[str]) -> str:
    """:func:`model_fingerprint` over the named layers, or "missing layers" when the model
    lacks one of them (so comparing with a saved fingerprint simply fails)."""
    try:
        return model_fingerprint(model, find_layers(model, layer_names))
    except ValueError:
        return "missing layers"


def model_fingerprint(model: nn.Module, layers: Sequence[TrackedLayer]) -> str:
    """A 16-hex hash of the model config, the tracked layers' names and shapes, and a strided
    sample (≤ 4,096 values) of every parameter of the model — tracked or not, so factors or
    scores never pair with a model whose embeddings, attention or adapted base weights
    differ — rounded to bfloat16 (so float32 and bfloat16 copies agree)."""
    h = hashlib.sha256(type(model).__name__.encode())
    config = getattr(model, "config", None)
    if hasattr(config, "to_dict"):
        items = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG}
        h.update(json.dumps(items, sort_keys=True, default=str).encode())
    for layer in layers:
        h.update(f"{layer.name}{layer.shape}".encode())
    for name, _, sample in weight_samples(model):
        h.update(name.encode())
        h.update(sample.to(torch.bfloat16).float().numpy().tobytes())
    return h.hexdigest()[:16]


def weight_samples(model: nn.Module) -> Iterator[tuple[str, nn.Parameter, Tensor]]:
    """(name, parameter, strided sample of ≤ 4,096 of its values on the CPU, in its dtype) of
    every parameter of ``model``: what the fingerprints hash."""
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        yield name, p, flat[::max(1, flat.numel() // 4096)][:4096].cpu().contiguous()


def weights_fingerprint(model: nn.Module) -> str:
    """A 16-hex hash of every parameter's name, shape, dtype and strided sample, exact (not
    rounded like :func:`model_fingerprint`'s): taken when a session gets its factors and again
    before it uses them, it tells weights changed in place since (a training step,
    ``load_state_dict``, a cast) from weights merely moved to another device. About 2 ms for
    the demo model's 52 tensors; a change confined to values outside every sample (a few
    embedding rows of a large vocabulary) can pass unseen."""
    h = hashlib.sha256()
    for name, p, sample in weight_samples(model):
        h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
        h.update(sample.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def fit_factors(model: nn.Module, data: object, args: FactorArgs | None = None,
                task: Task | None = None) -> Factors:
    """Fit the curvature of ``model`` on ``data``: a Corpus, a zero-argument callable returning
    batches, or a list of batches (see :func:`~influence_nb.passes.source`).

    A batch is a Mapping or object with ``input_ids`` (B, T) int64, right-padded, and
    ``attention_mask`` (B, T) (1 real, 0 pad). Statistics accumulate in float32 (float64 for a
    float64 model) whatever the model's dtype; eigendecompositions run in float64.

    Under torch.distributed the batches are sharded over the ranks and the statistics
    all-reduced (see :mod:`influence_nb.distributed`): every rank returns the same factors.
    """
    args, task = args or FactorArgs(), task or Task()   # FactorArgs checked its fields
    tracked = find_layers(model, args.layers)
    shapes = {t.name: t.shape for t in tracked}
    passes = {"identity": 0, "kfac": 1, "ekfac": 2}[args.strategy]
    src = source(data, args.batch_size, max_examples=args.max_examples, passes=passes,
                 tokens=args.batch_tokens)
    fp = model_fingerprint(model, tracked)
    distributed.check_same(json.dumps([fp, src.fingerprint, asdict(replace(args, progress=True))],
                                      default=str), "the model, corpus and FactorArgs of the fit")
    if passes == 0:
        return Factors(args, shapes, {}, 0, 0, fp, src.fingerprint, task.empirical_fisher)

    if (args.draws or 1) > 1 and task.empirical_fisher:
        raise ValueError(f"draws={args.draws} repeats the true Fisher's random draw, but the task "
                         "uses the empirical Fisher (nothing random); leave draws at None or 1")
    dtype, device = stat_dtype(model), next(model.parameters()).device
    run = lambda consumers, desc, draws, first=0: corpus_pass(  # noqa: E731
        model, tracked, src, consumers, "fisher", task, args.seed, args.max_examples,
        shard=True, progress=args.progress, desc=desc, draws=draws, first_draw=first)
    # EK-FAC's second pass needs the first's ā and δ again (its first draw): kept when they fit
    recording = Recording() if args.strategy == "ekfac" else None
    covariance = Covariance(tracked, args.blocks, dtype, device, args.progress,
                            getattr(torch, args.eigh_precision))
    start = time.perf_counter()
    draws = args.draws or 1
    run([covariance] + ([recording] if recording is not None else []), "covariance", draws)
    timings = {"covariance": time.perf_counter() - start}
    if args.draws is None and src.repeatable and not task.empirical_fisher:
        draws = covariance.draws_needed()
        if draws > 1:   # a small corpus's S topped up: bounded, whatever the corpus's size
            start = time.perf_counter()
            run([covariance], f"covariance, draws 2-{draws}", draws - 1, first=1)
            timings["draws"] = time.perf_counter() - start
    layers, n_seq, n_tok = covariance.factors()
    n_seq, n_tok = n_seq // draws, n_tok // draws
    timings["eigendecomposition"] = covariance.eigh_seconds
    args = replace(args, draws=draws)
    if recording is not None:
        # Λ from one draw: the seed-to-seed noise of a fit is S's, not Λ's (docs/results.md)
        correction, start = EigenvalueCorrection(layers, shapes, dtype), time.perf_counter()
        Lambda, seen = (recording.replay([correction]) if recording.complete
                        else run([correction], "eigenvalues", 1))[0]
        timings["eigenvalues"] = time.perf_counter() - start
        if seen != n_seq:
            raise ValueError(f"the batches changed between passes ({n_seq} then {seen} "
                             "sequences); fit on a source that yields the same batches each time")
        for n, f in layers.items():
            f.Lambda = Lambda[n] / n_seq
    return Factors(args, shapes, layers, n_seq, n_tok, fp,
                   src.fingerprint, task.empirical_fisher,
                   None if task.empirical_fisher else task.fisher_probe, timings)
