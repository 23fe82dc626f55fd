"""Streaming influence scores of training sequences on queries, total, per layer and per token.

For a tracked layer ℓ, a training sequence's log-likelihood gradient is DW = Σ_t δ_t ā_tᵀ
(δ: gradient of Σ_t log p(z_t+1 | z_≤t) at the layer's output). With the preconditioned query
gradient R_ℓ = (G_ℓ + λ_ℓ I)⁻¹ ∇_ℓ f,

    layer score  s_ℓ = ⟨R_ℓ, DW_ℓ⟩ = Σ_t δ_tᵀ R_ℓ ā_t
    token score  s_t = Σ_ℓ δ_ℓ,tᵀ R_ℓ ā_ℓ,t          (paper eq. 31: the update at position t,
                                                     which predicts token t + 1)
    total        s   = Σ_ℓ s_ℓ = Σ_t s_t

Sign: **positive means adding the sequence to training raises log p(completion | prompt)**:
s is the first-order change of f when the sequence's log-likelihood is up-weighted by one unit
in the (mean) training objective.

Query batching (paper §3.2.2): R_ℓ is kept as a rank-r factorisation U Vᵀ (SVD), so that
δ_tᵀ R ā_t = (Uᵀ δ_t) · (Vᵀ ā_t) costs (out + in)·r per token and query instead of out·in.
For totals and per-layer scores without tokens, the per-sequence gradient DW is formed instead
whenever that is cheaper (a cost model per layer picks); both give the same numbers.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from einops import einsum
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import distributed
from .curvature import Factors, query_gradients, to_device
from .data import Corpus
from .hooks import Capture, TrackedLayer, context_length, eval_mode, find_layers
from .task import Task, token_rows


@dataclass
class ScoreArgs:
    """How to score.

    rank:       rank r of each preconditioned query gradient R_ℓ (paper: 32 ≈ full rank);
                None keeps full rank
    batch_size: training sequences per forward + backward
    per_layer:  keep per-layer scores (Q, L, N) as well as totals
    chunk_size: sequences per chunk file of a resumable scan (a multiple of batch_size)
    progress:   show a progress bar
    """
    rank: int | None = 32
    batch_size: int = 16
    per_layer: bool = True
    chunk_size: int = 2048
    progress: bool = True


@dataclass
class LowRank:
    """R ≈ U Vᵀ for Q queries: U (Q, out, r), V (Q, in+1, r); the singular values are in U."""
    U: Tensor
    V: Tensor

    @classmethod
    def of(cls, R: Tensor, rank: int | None) -> "LowRank":
        """Truncated SVD of R (Q, out, in+1); ``rank`` None or ≥ min(out, in+1) is exact."""
        U, s, Vh = torch.linalg.svd(R.double(), full_matrices=False)
        r = s.shape[-1] if rank is None else min(rank, s.shape[-1])
        return cls((U[..., :r] * s[..., None, :r]).to(R.dtype), Vh[..., :r, :].mT.to(R.dtype))

    def dense(self) -> Tensor:
        """(Q, out, in+1)"""
        return self.U @ self.V.mT


@dataclass
class Queries:
    """Preconditioned gradients of Q queries f_q = log p(completion_q | prompt_q).

    prompts, completions: the token ids; f: (Q,) the measurement in nats (log-probability)
    R: {layer: LowRank} the preconditioned gradients (G + λI)⁻¹ ∇f, factorised
    """
    prompts: list[list[int]]
    completions: list[list[int]]
    f: Tensor
    R: dict[str, LowRank]
    rank: int | None
    strategy: str
    factors_id: str  # identifies the curvature that preconditioned R

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def layer_names(self) -> list[str]:
        return list(self.R)

    @classmethod
    def concat(cls, parts: Sequence["Queries"]) -> "Queries":
        """One batch of the queries of ``parts`` (same layers), scored in a single pass. Ranks
        may differ: factors are zero-padded to the largest, which leaves every U Vᵀ unchanged."""
        r = max(p.R[n].U.shape[-1] for p in parts for n in p.R)
        pad = lambda x: torch.nn.functional.pad(x, (0, r - x.shape[-1]))
        R = {n: LowRank(torch.cat([pad(p.R[n].U) for p in parts]),
                        torch.cat([pad(p.R[n].V) for p in parts])) for n in parts[0].R}
        same = lambda key: getattr(parts[0], key) if all(
            getattr(p, key) == getattr(parts[0], key) for p in parts) else "mixed"
        return cls(sum((p.prompts for p in parts), []), sum((p.completions for p in parts), []),
                   torch.cat([p.f for p in parts]), R, same("rank"), same("strategy"),
                   "+".join(p.factors_id for p in parts))

    @property
    def fingerprint(self) -> str:
        """A hash of the token ids, layers, rank, strategy and factors."""
        return hashlib.sha256(json.dumps([self.prompts, self.completions, self.layer_names,
                                          self.rank, self.strategy, self.factors_id]).encode()
                              ).hexdigest()[:16]


def make_queries(model: nn.Module, factors: Factors, prompts: Sequence[Sequence[int]],
                 completions: Sequence[Sequence[int]], rank: int | None = 32,
                 strategy: str | None = None, task: Task | None = None) -> Queries:
    """Gradients of log p(completion | prompt) for each query, preconditioned with ``factors``
    (``strategy`` overrides the fitted one: "kfac" or "identity") and factorised to ``rank``."""
    g = query_gradients(model, prompts, completions, factors=None, layers=factors.layer_names,
                        task=task)
    R = factors.precondition(g.grads, strategy)
    return Queries(token_rows(prompts), token_rows(completions), g.f,
                   {n: LowRank.of(r, rank) for n, r in R.items()}, rank,
                   strategy or factors.args.strategy, factors_id(factors))


def factors_id(factors: Factors) -> str:
    """A hash of the fitted eigenvalues (rounded to bfloat16) and damping settings: equal for
    the same fit, saved and reloaded or not."""
    h = hashlib.sha256(json.dumps([factors.model_fingerprint, factors.n_examples,
                                   asdict(factors.args)], default=str).encode())
    for name, f in factors.layers.items():
        for t in (f.lambda_A, f.lambda_S, f.Lambda):
            if t is not None:
                h.update(t.to(torch.bfloat16).float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _use_dense(B: int, T: int, d_out: int, d_in: int, Q: int, r: int) -> bool:
    """Forming DW (B, out, in) and contracting it with dense R costs B·out·in·(T + Q) against
    Q·B·T·r·(out + in) for the factorised token path."""
    return d_out * d_in * (T + Q) < Q * T * r * (d_out + d_in)


class Scorer:
    """Scores batches of training sequences against fixed :class:`Queries`.

    Holds the hooks' layer list and, per layer, whichever form of R the cost model prefers.
    """

    def __init__(self, model: nn.Module, queries: Queries, task: Task | None = None):
        self.model, self.queries, self.task = model, queries, task or Task()
        self.layers: list[TrackedLayer] = find_layers(model, queries.layer_names)
        self.n_ctx = context_length(model)
        self._dense: dict[str, Tensor] = {}

    def _R_dense(self, name: str) -> Tensor:
        if name not in self._dense:
            self._dense[name] = self.queries.R[name].dense()
        return self._dense[name]

    def score_batch(self, batch: object, per_token: bool = False
                    ) -> tuple[Tensor, Tensor | None]:
        """One forward + backward over a batch of B training sequences.

        -> (layer scores (Q, L, B), token scores (Q, B, T) summed over layers, or None).
        Token t's score belongs to the update at position t, which predicts token t + 1.
        """
        T = batch.input_ids.shape[1]
        if self.n_ctx is not None and T > self.n_ctx:
            raise ValueError(f"training sequences of {T} tokens exceed the model's context of "
                             f"{self.n_ctx}; re-chunk the corpus with max_len ≤ {self.n_ctx}")
        device = next(self.model.parameters()).device
        batch = to_device(batch, device)
        Q, B = len(self.queries), batch.input_ids.shape[0]
        layer_scores = torch.zeros(Q, len(self.layers), B, dtype=torch.float64)
        tokens = torch.zeros(Q, B, T, dtype=torch.float64) if per_token else None
        with eval_mode(self.model), Capture(self.model, self.layers) as cap, \
                torch.enable_grad():
            cap.start(self.task.loss_mask(batch))
            logits = self.task.forward(self.model, batch)
            cap.backward(-self.task.training_loss(logits, batch))  # δ of the log-likelihood
            for l, layer in enumerate(self.layers):
                a, d, lr = cap.a[layer.name], cap.delta[layer.name], self.queries.R[layer.name]
                lr = LowRank(lr.U.to(a), lr.V.to(a))
                if per_token or not _use_dense(B, T, *layer.shape, Q, lr.U.shape[-1]):
                    # (Uᵀ δ_t) · (Vᵀ ā_t) per token: 'q b t r'
                    tok = (einsum(d, lr.U, "b t o, q o r -> q b t r")
                           * einsum(a, lr.V, "b t i, q i r -> q b t r")).sum(-1)
                    layer_scores[:, l] = tok.sum(-1).double().cpu()
                    if per_token:
                        tokens += tok.double().cpu()
                else:
                    DW = einsum(d, a, "b t o, b t i -> b o i")
                    layer_scores[:, l] = einsum(self._R_dense(layer.name).to(DW), DW,
                                                "q o i, b o i -> q b").double().cpu()
        return layer_scores, tokens


def scan(model: nn.Module, queries: Queries, corpus: Corpus, args: ScoreArgs | None = None,
         out_dir: str | os.PathLike | None = None, ids: Sequence[int] | None = None,
         task: Task | None = None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Score every sequence of ``corpus`` (or ``ids`` of it) against ``queries``.

    -> (scores (Q, N), per-layer scores (Q, L, N) or None, ids (N,)), float64.

    With ``out_dir`` the scan is resumable: chunks of ``args.chunk_size`` sequences are written
    atomically as they complete, and a restarted scan (same model, queries, corpus) skips them.
    Memory does not grow with N beyond the returned arrays.

    Under torch.distributed, chunk c is scored by rank c mod W; every rank returns all scores
    (read back from ``out_dir``, or all-reduced without one).
    """
    args = args or ScoreArgs()
    scorer = Scorer(model, queries, task)
    ids = np.arange(len(corpus)) if ids is None else np.asarray(ids, np.int64)
    if args.chunk_size % args.batch_size:
        raise ValueError(f"chunk_size ({args.chunk_size}) must be a multiple of batch_size "
                         f"({args.batch_size})")
    manifest = dict(queries=queries.fingerprint, corpus=corpus.fingerprint,
                    ids=hashlib.sha256(ids.tobytes()).hexdigest()[:16],
                    layers=queries.layer_names,
                    args={k: v for k, v in asdict(args).items() if k != "progress"})
    rank, world = distributed.rank_world()
    distributed.check_same(json.dumps(manifest, sort_keys=True), "what to scan")
    store = _ChunkStore(out_dir, manifest) if out_dir is not None else None
    Q, L = len(queries), len(scorer.layers)
    layer_scores = np.zeros((Q, L, len(ids)))
    starts = range(0, len(ids), args.chunk_size)
    mine = [s for c, s in enumerate(starts) if c % world == rank]
    with tqdm(total=sum(len(ids[s:s + args.chunk_size]) for s in mine), desc="scoring",
              unit="seq", disable=not args.progress) as bar:
        for start in mine:
            chunk = ids[start:start + args.chunk_size]
            done = store.read(start, chunk) if store else None
            if done is None:
                perm, parts = corpus.by_length(chunk, len(chunk)), []
                for batch in corpus.batches(args.batch_size, ids=chunk[perm]):
                    parts.append(scorer.score_batch(batch)[0].numpy())
                    bar.update(len(batch))
                done = np.empty((Q, L, len(chunk)))
                done[..., perm] = np.concatenate(parts, axis=-1)
                if store:
                    store.write(start, chunk, done)
            else:
                bar.update(len(chunk))
            layer_scores[..., start:start + len(chunk)] = done
    if world > 1 and store:  # the other ranks' chunks, from the shared directory
        distributed.barrier()
        for start in sorted(set(starts) - set(mine)):
            chunk = ids[start:start + args.chunk_size]
            done = store.read(start, chunk)
            if done is None:
                raise FileNotFoundError(f"chunk {start} of the scan is not in {store.root}: "
                                        "out_dir must be on a filesystem that every rank sees")
            layer_scores[..., start:start + len(chunk)] = done
    elif world > 1:  # zeros where another rank scored: the sum is exact
        distributed.all_reduce_([torch.from_numpy(layer_scores)])
    return layer_scores.sum(1), (layer_scores if args.per_layer else None), ids


class _ChunkStore:
    """Chunk files ``chunk_{start}.npz`` (ids, layer scores) under a manifest of what is being
    scanned; a manifest that differs means another scan, which is refused."""

    def __init__(self, root: str | os.PathLike, manifest: dict):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / "scan.json"
        if path.exists():
            old = json.loads(path.read_text())
            if old != json.loads(json.dumps(manifest)):
                diff = [k for k in manifest if old.get(k) != json.loads(json.dumps(manifest))[k]]
                raise ValueError(f"{self.root} holds a scan of other {', '.join(diff)}; resume "
                                 "with the same inputs or use a new out_dir")
        else:
            _atomic_write(path, json.dumps(manifest, indent=1).encode())

    def read(self, start: int, ids: np.ndarray) -> np.ndarray | None:
        path = self.root / f"chunk_{start:010d}.npz"
        if not path.exists():
            return None
        with np.load(path) as z:
            if not np.array_equal(z["ids"], ids):
                raise ValueError(f"{path} holds other sequences than this scan; use a new out_dir")
            return z["layer_scores"]

    def write(self, start: int, ids: np.ndarray, layer_scores: np.ndarray) -> None:
        import io
        buf = io.BytesIO()
        np.savez(buf, ids=ids, layer_scores=layer_scores)
        _atomic_write(self.root / f"chunk_{start:010d}.npz", buf.getvalue())


def _atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary name, fsync, rename: a reader never sees a partial file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def token_scores(model: nn.Module, queries: Queries, corpus: Corpus, ids: Sequence[int],
                 batch_size: int = 16, task: Task | None = None
                 ) -> tuple[list[np.ndarray], np.ndarray]:
    """Per-token scores of a few sequences (e.g. a top-k), recomputed with the factorised path.

    -> (for each id an array (Q, n_tokens) summed over layers, layer scores (Q, L, len(ids))).
    """
    scorer = Scorer(model, queries, task)
    per_seq, layers = [], []
    for batch in corpus.batches(batch_size, ids=np.asarray(ids, np.int64)):
        ls, tok = scorer.score_batch(batch, per_token=True)
        lengths = batch.attention_mask.sum(1).tolist()
        per_seq += [tok[:, b, :n].numpy() for b, n in enumerate(lengths)]
        layers.append(ls.numpy())
    return per_seq, np.concatenate(layers, axis=-1)


def self_influence(model: nn.Module, factors: Factors, corpus: Corpus,
                   batch_size: int = 16, ids: Sequence[int] | None = None,
                   task: Task | None = None, progress: bool = True) -> np.ndarray:
    """∇L(z)ᵀ (G + λI)⁻¹ ∇L(z) for each sequence z, (N,) float64: how much a sequence's own
    log-likelihood rises when it is up-weighted (large for memorised or atypical sequences)."""
    task = task or Task()
    layers = find_layers(model, factors.layer_names)
    ids = np.arange(len(corpus)) if ids is None else np.asarray(ids, np.int64)
    out = []
    device = next(model.parameters()).device
    perm = corpus.by_length(ids, 64 * batch_size)
    with eval_mode(model), Capture(model, layers) as cap:
        for batch in tqdm(corpus.batches(batch_size, ids=ids[perm]), desc="self-influence",
                          total=-(-len(ids) // batch_size), disable=not progress):
            batch = to_device(batch, device)
            cap.start(task.loss_mask(batch))
            with torch.enable_grad():
                cap.backward(-task.training_loss(task.forward(model, batch), batch))
            DW = cap.sequence_gradients()
            R = factors.precondition(DW)
            out.append(sum((R[n].to(DW[n]) * DW[n]).sum((-2, -1)) for n in DW).double().cpu())
    scores = np.empty(len(ids))
    scores[perm] = torch.cat(out).numpy()
    return scores
