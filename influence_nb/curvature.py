"""Curvature: K-FAC / EK-FAC factors of the Fisher and damped inverse-Fisher-vector products.

Per tracked layer ℓ with input activations ā (in + bias) and output pseudo-gradients δ (out),
tokens treated as independent (paper §3.1, eq. 20)::

    A = E_tokens[ā āᵀ]                   (in+1, in+1)    mean over scored tokens
    S = Σ_tokens δ δᵀ / n_sequences      (out, out)      so that S ⊗ A ≈ E_seq[vec DW vec DWᵀ]
    A = Q_A diag(λ_A) Q_Aᵀ,  S = Q_S diag(λ_S) Q_Sᵀ      (float64 eigendecomposition)
    K-FAC:   Λ = λ_S λ_Aᵀ                                (out, in+1)
    EK-FAC:  Λ_ij = E_seq[(Q_Sᵀ DW Q_A)_ij²],  DW = Σ_t δ_t ā_tᵀ per sequence
    (G + λI)⁻¹ V = Q_S [(Q_Sᵀ V Q_A) ⊘ (Λ + λ)] Q_Aᵀ,    λ = 0.1 · mean(Λ) by default

The δ are gradients of the Fisher pseudo-loss (labels sampled from the model, see
:mod:`influence_nb.task`), so G is the true Fisher of the summed per-sequence loss. A fit
costs a covariance pass and, for EK-FAC, an eigenvalue-correction pass over the corpus, each
about one forward + backward (no parameter gradients are formed).
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from einops import einsum
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import distributed
from .hooks import Capture, TrackedLayer, context_length, eval_mode, find_layers, stat_dtype
from .task import Task, get, query_batch, token_rows

STRATEGIES = ("identity", "kfac", "ekfac")
FORMAT = "influence_nb.factors/1"


@dataclass
class FactorArgs:
    """How to fit the curvature.

    strategy:       "ekfac" (default), "kfac", or "identity" (no curvature: gradient dot product)
    layers:         "mlp" (paper), "attn", "all", or module names / fnmatch globs
    batch_size:     sequences per batch when fitting from a Corpus (``corpus.batches(n)``)
    max_examples:   stop after this many training sequences (None: the whole corpus)
    blocks:         split A and S into this many diagonal blocks (memory bound for wide layers)
    damping:        absolute λ for every layer; None: ``damping_factor`` · mean(Λ_ℓ) per layer
    damping_factor: relative damping (paper: 0.1)
    seed:           seed of the Fisher label sampling: batch k draws from a generator seeded with
                    (seed, k), so both passes, and any number of ranks, draw the same labels
    progress:       show tqdm progress bars
    """
    strategy: str = "ekfac"
    layers: str | Sequence[str] = "mlp"
    batch_size: int = 8
    max_examples: int | None = None
    blocks: int = 1
    damping: float | None = None
    damping_factor: float = 0.1
    seed: int = 0
    progress: bool = True


@dataclass
class LayerFactors:
    """One layer's eigenbases (a block-diagonal matrix is a list of blocks) and eigenvalues."""
    Q_A: list[Tensor]       # blocks of the (in+1, in+1) eigenvector matrix of A
    lambda_A: Tensor        # (in+1,)
    Q_S: list[Tensor]       # blocks of the (out, out) eigenvector matrix of S
    lambda_S: Tensor        # (out,)
    Lambda: Tensor | None   # (out, in+1) EK-FAC eigenvalues; None for a K-FAC fit

    def eigenvalues(self, strategy: str) -> Tensor:
        """Λ (out, in+1) of the strategy: EK-FAC's corrected ones or K-FAC's λ_S λ_Aᵀ."""
        if strategy == "kfac":
            return torch.outer(self.lambda_S, self.lambda_A)
        if self.Lambda is None:
            raise ValueError("these factors were fitted with strategy='kfac'; refit with "
                             "strategy='ekfac' to precondition with EK-FAC")
        return self.Lambda


def rotate(X: Tensor, Q: Sequence[Tensor], transpose: bool = False) -> Tensor:
    """X @ blockdiag(Q) (or X @ blockdiag(Q)ᵀ) along X's last dimension."""
    if len(Q) == 1:
        return X @ (Q[0].T if transpose else Q[0])
    parts = X.split([q.shape[0] for q in Q], dim=-1)
    return torch.cat([x @ (q.T if transpose else q) for x, q in zip(parts, Q)], dim=-1)


def _block_sizes(n: int, blocks: int) -> list[int]:
    return [len(c) for c in torch.arange(n).tensor_split(min(blocks, n))]


def _eigh(blocks: list[Tensor], dtype: torch.dtype) -> tuple[list[Tensor], Tensor]:
    """Eigendecomposition in float64 of symmetric blocks -> (eigenvector blocks, eigenvalues ≥ 0)."""
    pairs = [torch.linalg.eigh(b.double()) for b in blocks]
    return ([Q.to(dtype).contiguous() for _, Q in pairs],
            torch.cat([lam for lam, _ in pairs]).clamp_min(0.0).to(dtype))


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

    @property
    def layer_names(self) -> list[str]:
        return list(self.shapes)

    def damping(self, name: str, strategy: str | None = None) -> float:
        """λ_ℓ: the absolute override, or damping_factor · mean(Λ_ℓ)."""
        if self.args.damping is not None:
            return float(self.args.damping)
        Lambda = self.layers[name].eigenvalues(strategy or self.args.strategy)
        return self.args.damping_factor * Lambda.mean().item()

    def precondition(self, grads: Mapping[str, Tensor],
                     strategy: str | None = None) -> dict[str, Tensor]:
        """(G_ℓ + λ_ℓ I)⁻¹ V_ℓ for each layer: {name: (..., out, in+1)} -> same shapes, on the
        factors' device and in their dtype (float32, or float64 for a float64 model).

        ``strategy`` overrides the fitted one ("kfac" on an EK-FAC fit, or "identity").
        """
        strategy = strategy or self.args.strategy
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; use one of {STRATEGIES}")
        missing = [n for n in self.shapes if n not in grads]
        if missing:
            raise KeyError(f"no gradient for tracked layer {missing[0]!r}; compute gradients on "
                           "factors.layer_names")
        if strategy == "identity":
            return {name: grads[name] for name in self.shapes}
        if not self.layers:
            raise ValueError("these factors were fitted with strategy='identity'; refit with "
                             "strategy='ekfac' or 'kfac'")
        out = {}
        for name, f in self.layers.items():
            V = grads[name].to(f.lambda_A.device, f.lambda_A.dtype)
            Lambda, lam = f.eigenvalues(strategy), self.damping(name, strategy)
            Vr = rotate(rotate(V, f.Q_A).mT, f.Q_S).mT          # Q_Sᵀ V Q_A
            Vr = Vr / (Lambda + lam)
            out[name] = rotate(rotate(Vr, f.Q_A, True).mT, f.Q_S, True).mT  # Q_S Vr Q_Aᵀ
        return out

    def manifest(self) -> dict:
        """The JSON manifest written beside the tensors."""
        package = importlib.import_module(__package__)
        return {"format": FORMAT, "package_version": getattr(package, "__version__", "unknown"),
                "args": asdict(self.args), "layers": {n: list(s) for n, s in self.shapes.items()},
                "n_examples": self.n_examples, "n_tokens": self.n_tokens,
                "model_fingerprint": self.model_fingerprint,
                "corpus_fingerprint": self.corpus_fingerprint,
                "fisher": "empirical" if self.empirical_fisher else "true"}

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``factors.safetensors`` then ``manifest.json`` (last) into directory ``path``.

        Each file is written to a temporary name and moved into place; both carry the same
        fit id, so an interrupted save never pairs a manifest with the wrong tensors.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        fit_id = uuid.uuid4().hex
        tensors = {}
        for name, f in self.layers.items():
            tensors |= {f"{name}/Q_A/{k}": q.contiguous() for k, q in enumerate(f.Q_A)}
            tensors |= {f"{name}/Q_S/{k}": q.contiguous() for k, q in enumerate(f.Q_S)}
            tensors |= {f"{name}/lambda_A": f.lambda_A, f"{name}/lambda_S": f.lambda_S}
            if f.Lambda is not None:
                tensors[f"{name}/Lambda"] = f.Lambda
        tmp = path / f".factors.{fit_id}.tmp"
        save_file({k: v.cpu() for k, v in tensors.items()}, tmp, metadata={"fit_id": fit_id})
        _fsync(tmp)
        os.replace(tmp, path / "factors.safetensors")
        tmp = path / f".manifest.{fit_id}.tmp"
        tmp.write_text(json.dumps(self.manifest() | {"fit_id": fit_id}, indent=1))
        _fsync(tmp)
        os.replace(tmp, path / "manifest.json")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module | None = None,
             device: torch.device | str = "cpu") -> "Factors":
        """Read factors saved by :meth:`save`; with ``model``, refuse factors fitted on another."""
        path = Path(path)
        if not (path / "manifest.json").exists() or not (path / "factors.safetensors").exists():
            raise FileNotFoundError(f"no fitted factors in {path} (need manifest.json and "
                                    "factors.safetensors); fit them with fit_factors(...).save(path)")
        m = json.loads((path / "manifest.json").read_text())
        if m.get("format") != FORMAT:
            raise ValueError(f"{path} holds factors in format {m.get('format')!r}, not {FORMAT!r}; "
                             "refit them with this version")
        with safe_open(path / "factors.safetensors", "pt", device=str(device)) as fh:
            if fh.metadata().get("fit_id") != m["fit_id"]:
                raise ValueError(f"factors in {path} are incomplete (interrupted save: tensors and "
                                 "manifest differ); refit and save again")
            t = {k: fh.get_tensor(k).clone() for k in fh.keys()}  # clone: aligned memory
        shapes = {n: tuple(s) for n, s in m["layers"].items()}
        if model is not None:
            fp = fingerprint_of(model, list(shapes))
            if fp != m["model_fingerprint"]:
                raise ValueError(f"factors in {path} were fitted for a different model "
                                 f"(fingerprint {m['model_fingerprint']} ≠ {fp}); load them with the "
                                 "model they were fitted on, or refit with fit_factors(model, ...)")
        args = FactorArgs(**m["args"])
        layers = {}
        if args.strategy != "identity":
            for name in shapes:
                blocks = {key: [t[f"{name}/{key}/{k}"] for k in range(
                    sum(x.startswith(f"{name}/{key}/") for x in t))] for key in ("Q_A", "Q_S")}
                layers[name] = LayerFactors(blocks["Q_A"], t[f"{name}/lambda_A"], blocks["Q_S"],
                                            t[f"{name}/lambda_S"], t.get(f"{name}/Lambda"))
        return cls(args, shapes, layers, m["n_examples"], m["n_tokens"], m["model_fingerprint"],
                   m["corpus_fingerprint"], m["fisher"] == "empirical")


def _fsync(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


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
    sample of their weights rounded to bfloat16 (so float32 and bfloat16 copies agree)."""
    h = hashlib.sha256(type(model).__name__.encode())
    config = getattr(model, "config", None)
    if hasattr(config, "to_dict"):
        items = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG}
        h.update(json.dumps(items, sort_keys=True, default=str).encode())
    for layer in layers:
        h.update(f"{layer.name}{layer.shape}".encode())
        for p in layer.parameters():
            flat = p.detach().reshape(-1)
            sample = flat[::max(1, flat.numel() // 4096)][:4096]
            h.update(sample.to(torch.bfloat16).float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _take(batch: object, n: int) -> dict:
    """The first n rows of every tensor field of a batch, as a dict."""
    fields = batch if isinstance(batch, Mapping) else vars(batch)
    return {k: v[:n] if isinstance(v, (Tensor, np.ndarray)) else v for k, v in fields.items()}


def to_device(batch: object, device: torch.device) -> object:
    """A batch (Mapping or object with ``.to``) with its tensors on ``device``."""
    if isinstance(batch, Mapping):
        return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
    return batch.to(device) if hasattr(batch, "to") else batch


def batch_source(data: object, args: FactorArgs, passes: int
                 ) -> tuple[Callable[[], Iterable], int | None, str | None]:
    """-> (fresh iterable of batches per call, number of sequences if known, corpus fingerprint).

    ``data``: a Corpus (``.batches(n)``), a zero-argument callable returning batches, or a
    re-iterable of batches (a list); a one-shot iterator serves a single pass only.
    """
    if callable(getattr(data, "batches", None)):
        # the first max_examples ids (a corpus is in no particular order), then, for a Corpus,
        # batches of similar lengths: bucketing after the cut keeps the sample unbiased
        ids = np.arange(min(len(data), args.max_examples or len(data)))
        if callable(getattr(data, "by_length", None)):
            ids = ids[data.by_length(ids, 64 * args.batch_size)]
        return (lambda: data.batches(args.batch_size, ids=ids), len(data),
                getattr(data, "fingerprint", None))
    if callable(data):
        return data, None, None
    if not isinstance(data, Iterable):
        raise TypeError(f"cannot fit on a {type(data).__name__}; pass a Corpus, a list of "
                        "batches or a callable returning an iterable of batches")
    if iter(data) is data and passes > 1:
        raise ValueError(f"the batches are a one-shot iterator but the fit needs {passes} passes; "
                         "pass a list, the Corpus, or a callable: lambda: corpus.batches(16)")
    return (lambda: data), None, None


def prepared_batches(model: nn.Module, source: Callable[[], Iterable], total: int | None,
                     args: FactorArgs, desc: str, shard: tuple[int, int] = (0, 1)
                     ) -> Iterator[tuple[int, object]]:
    """One pass over the batches: at most ``args.max_examples`` sequences, checked against the
    model's context, moved to its device, with a progress bar; an empty pass is an error.

    Yields (global batch index k, batch); with ``shard`` = (rank, world) only the batches with
    k mod world = rank (``max_examples`` still counts all of them).
    """
    device = next(model.parameters()).device
    n_ctx, seen, limit = context_length(model), 0, args.max_examples
    rank, world = shard
    known = [x for x in (total, limit) if x is not None]
    with tqdm(total=-(-min(known) // world) if known else None, desc=desc, unit="seq",
              disable=not args.progress) as bar:
        for k, batch in enumerate(source()):
            if limit is not None and seen >= limit:
                break
            B, T = get(batch, "input_ids").shape
            if limit is not None and seen + B > limit:
                batch, B = _take(batch, limit - seen), limit - seen
            if n_ctx is not None and T > n_ctx:
                raise ValueError(f"a batch holds sequences of {T} tokens, longer than the model's "
                                 f"context of {n_ctx}; re-chunk the corpus with max_len ≤ {n_ctx}")
            seen += B
            if k % world == rank:
                bar.update(B)
                yield k, to_device(batch, device)
    if seen == 0:
        raise ValueError("no training sequences: the corpus (or iterable of batches) is empty; "
                         "fit on at least one non-empty batch")


def label_generator(seed: int, k: int, device: torch.device) -> torch.Generator:
    """The generator of batch k's Fisher labels, seeded from (seed, k): a batch draws the same
    labels in every pass and on whichever rank runs it."""
    hi, lo = np.random.SeedSequence([seed, k]).generate_state(2)
    return torch.Generator(device=device).manual_seed(int(hi) << 32 | int(lo))


def _fisher_pass(model: nn.Module, cap: Capture, batches: Iterable[tuple[int, object]],
                 task: Task, seed: int) -> Iterator[Tensor]:
    """Forward + Fisher-loss backward per (index, batch); yields the loss mask (B, T) with
    ``cap`` filled. Labels are drawn from :func:`label_generator`."""
    device = next(model.parameters()).device
    for k, batch in batches:
        mask = task.loss_mask(batch)
        cap.start(mask)
        with torch.enable_grad():
            logits = task.forward(model, batch)
            cap.backward(task.fisher_loss(logits, batch, label_generator(seed, k, device)))
        yield mask


def fit_factors(model: nn.Module, data: object, args: FactorArgs | None = None,
                task: Task | None = None) -> Factors:
    """Fit the curvature of ``model`` on ``data`` (see :func:`batch_source` for what it may be).

    A batch is a Mapping or object with ``input_ids`` (B, T) int64, right-padded, and
    ``attention_mask`` (B, T) (1 real, 0 pad). Statistics accumulate in float32 (float64 for a
    float64 model) whatever the model's dtype; eigendecompositions run in float64.

    Under torch.distributed the batches are sharded over the ranks and the statistics
    all-reduced (see :mod:`influence_nb.distributed`): every rank returns the same factors.
    """
    args, task = args or FactorArgs(), task or Task()
    if args.strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {args.strategy!r}; use one of {STRATEGIES}")
    if args.blocks < 1:
        raise ValueError(f"blocks must be ≥ 1, got {args.blocks}")
    tracked = find_layers(model, args.layers)
    shapes = {t.name: t.shape for t in tracked}
    passes = {"identity": 0, "kfac": 1, "ekfac": 2}[args.strategy]
    source, total, corpus_fp = batch_source(data, args, passes)
    fp = model_fingerprint(model, tracked)
    if passes == 0:
        return Factors(args, shapes, {}, 0, 0, fp, corpus_fp, task.empirical_fisher)

    dtype, shard = stat_dtype(model), distributed.rank_world()
    with eval_mode(model), Capture(model, tracked, dtype) as cap:
        # covariance pass: block sums of ā āᵀ and δ δᵀ
        split = {t.name: (_block_sizes(t.shape[1], args.blocks), _block_sizes(t.d_out, args.blocks))
                 for t in tracked}
        device = next(model.parameters()).device
        A = {n: [torch.zeros(k, k, dtype=dtype, device=device) for k in split[n][0]] for n in shapes}
        S = {n: [torch.zeros(k, k, dtype=dtype, device=device) for k in split[n][1]] for n in shapes}
        n_seq = n_tok = 0
        batches = prepared_batches(model, source, total, args, "covariance", shard)
        for mask in _fisher_pass(model, cap, batches, task, args.seed):
            n_seq, n_tok = n_seq + mask.shape[0], n_tok + int(mask.sum())
            for n in shapes:
                a = cap.a[n][mask].split(split[n][0], dim=1)      # (tokens, in+1), no padding
                d = cap.delta[n][mask].split(split[n][1], dim=1)  # (tokens, out)
                for acc, x in zip(A[n] + S[n], a + d):
                    acc.addmm_(x.T, x)                  # Σ ā āᵀ, Σ δ δᵀ per diagonal block
        distributed.all_reduce_([blk for n in shapes for blk in A[n] + S[n]])
        n_seq, n_tok = distributed.sum_counts(n_seq, n_tok)
        layers = {}
        for n in shapes:
            Q_A, lambda_A = _eigh([blk / n_tok for blk in A[n]], dtype)
            Q_S, lambda_S = _eigh([blk / n_seq for blk in S[n]], dtype)
            layers[n] = LayerFactors(Q_A, lambda_A, Q_S, lambda_S, None)
        del A, S
        distributed.broadcast_([t for f in layers.values()  # one eigenbasis for every rank
                                for t in [*f.Q_A, f.lambda_A, *f.Q_S, f.lambda_S]])

        if args.strategy == "ekfac":  # eigenvalue correction: Λ = E_seq[(Q_Sᵀ DW Q_A)²]
            Lambda = {n: torch.zeros(shapes[n], dtype=dtype, device=f.lambda_A.device)
                      for n, f in layers.items()}
            batches = prepared_batches(model, source, total, args, "eigenvalues", shard)
            seen = 0
            for mask in _fisher_pass(model, cap, batches, task, args.seed):
                seen += mask.shape[0]
                for n, f in layers.items():
                    Lambda[n] += (rotated_gradients(cap.a[n], cap.delta[n], mask, f) ** 2).sum(0)
            distributed.all_reduce_(list(Lambda.values()))
            seen, = distributed.sum_counts(seen)
            if seen != n_seq:
                raise ValueError(f"the batches changed between passes ({n_seq} then {seen} "
                                 "sequences); fit on a source that yields the same batches each time")
            for n, f in layers.items():
                f.Lambda = Lambda[n] / n_seq
    return Factors(args, shapes, layers, n_seq, n_tok, fp, corpus_fp, task.empirical_fisher)


def rotated_gradients(a: Tensor, delta: Tensor, mask: Tensor, f: LayerFactors) -> Tensor:
    """Per-sequence gradients in the Kronecker eigenbasis, Q_Sᵀ (Σ_t δ_t ā_tᵀ) Q_A.

    a: (B, T, in+1), delta: (B, T, out), mask: (B, T) the counted tokens -> (B, out, in+1).
    Rotates the counted tokens first when that is cheaper (tokens · (in² + out²) against
    B · out · in · (out + in)), else the summed gradient of each sequence.
    """
    B, i, o = a.shape[0], a.shape[-1], delta.shape[-1]
    if int(mask.sum()) * (i * i + o * o) < B * o * i * (o + i):
        a_rot, delta_rot = torch.zeros_like(a), torch.zeros_like(delta)
        a_rot[mask], delta_rot[mask] = rotate(a[mask], f.Q_A), rotate(delta[mask], f.Q_S)
        return einsum(delta_rot, a_rot, "b t o, b t i -> b o i")
    DW = einsum(delta, a, "b t o, b t i -> b o i")
    return rotate(rotate(DW, f.Q_A).mT, f.Q_S).mT


def sequence_gradients(model: nn.Module, batch: object, layers: Sequence[TrackedLayer],
                       loss: Callable[[Tensor, object], Tensor], task: Task | None = None
                       ) -> tuple[dict[str, Tensor], Tensor]:
    """Per-sequence gradients of ``loss(outputs, batch)`` (B,) for the tracked layers.

    -> ({name: (B, out, in+1)}, loss values (B,)), in float32 (float64 for a float64 model).
    """
    task = task or Task()
    device = next(model.parameters()).device
    batch = to_device(batch, device)
    with eval_mode(model), Capture(model, layers) as cap, torch.enable_grad():
        cap.start(task.loss_mask(batch))
        values = loss(task.forward(model, batch), batch)
        cap.backward(values)
        return cap.sequence_gradients(), values.detach()


@dataclass
class QueryGradients:
    """Gradients of f = log p(completion | prompt) for Q queries.

    f:              (Q,) the measurement, in nats
    grads:          {layer: (Q, out, in+1)} ∇f
    preconditioned: {layer: (Q, out, in+1)} (G + λI)⁻¹ ∇f, or None without factors
    """
    f: Tensor
    grads: dict[str, Tensor]
    preconditioned: dict[str, Tensor] | None


def query_gradients(model: nn.Module, prompts: Sequence[int] | Sequence[Sequence[int]],
                    completions: Sequence[int] | Sequence[Sequence[int]],
                    factors: Factors | None = None, layers: str | Sequence[str] = "mlp",
                    task: Task | None = None, pad_id: int = 0) -> QueryGradients:
    """∇ log p(completion | prompt) per query and tracked layer, preconditioned with ``factors``.

    ``prompts`` / ``completions``: token ids, one query (a list of ints) or several. With
    ``factors``, their tracked layers are used and ``layers`` is ignored.
    """
    task = task or Task()
    batch = query_batch(token_rows(prompts), token_rows(completions), context_length(model),
                        pad_id)
    tracked = find_layers(model, factors.layer_names if factors is not None else layers)
    grads, f = sequence_gradients(model, batch, tracked, task.measurement, task)
    return QueryGradients(f, grads, factors.precondition(grads) if factors is not None else None)
