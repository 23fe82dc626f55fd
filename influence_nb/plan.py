"""What a fit and a scan will cost — memory and time, for this model, corpus and machine —
before they run, from one batch of the corpus.

Memory (bytes; each run's peak is the sum of its column):

    fit:   model + A, S accumulators and the factors (float32) + eigh's float64 copies of the
           widest block + the recording of ā, δ for EK-FAC's second pass (when it fits in
           RECORD_BYTES; one that outgrows it is dropped during the first pass, beside A's and
           S's sums) + Λ accumulators + one batch's activations (measured)
    scan:  model + factors + Q·Σ_ℓ (out + in+1)·r·4 (the queries' rank-r factors; beyond
           SPILL_BYTES on a CPU they live in a file, and one layer's, Q·max_ℓ (out + in+1)·r·4,
           are in memory at a time) + SCORE_BYTES (dense R and DW blocks) + one batch's activations (measured)
           + the scores, Q·(L + 1)·N·8, and while queries are prepared, QUERY_BYTES
    sketch build (with ``sketch``): model + factors + the projection's rows (measured on
           stand-in factors) + 1/(Λ+λ) per layer (eigen) + one chunk's token factors (up to
           sketch.CHUNK_BYTES, when the store keeps them) + one batch at its token budget;
           on disk: the store, N·(16 + 2·D + 4·L) + the exact token factors when within
           ``exact_bytes`` (:func:`influence_nb.sketch.exact_need`)

Time (seconds): one batch at the token budget runs the fit's pass (forward + backward with
the Fisher pseudo-loss) with every consumer timed apart, and the scan's (the log-likelihood's,
no labels drawn) alone; the recorded ā and δ are replayed to
the eigenvalue correction and to a scorer of Q random rank-r queries; per padded token, times
the corpus's padded tokens. The eigendecompositions are timed on one matrix and scaled by n³.
One query is prepared against identity bases of the fitted sizes, plus the one-time hash of
the fitted eigenvalues that ties queries to their factors (timed on a sample); each further
one is its pass and its products at the rate of a large product. A sketch build is the scan's
pass with the sketcher and token factors replayed on the recording, the sketcher's rows drawn
from stand-in factors of the fitted sizes with power-law eigenvalues; "auto", which chooses
after the fit, is timed both ways (eigen also rotates each sequence's gradient for its
whitened norm) and its memory counted as eigen's, the larger.
"""
from __future__ import annotations

import ctypes
import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from . import checks, passes, queries, scoring, sketch as sketches
from .batching import source, token_batches
from .curvature import FactorArgs, Factors, hash_eigenvalues
from .data import Corpus
from .layers import TrackedLayer, find_layers, stat_dtype
from .passes import Consumer, PassBatch, Recording, available_memory, corpus_pass
from .projection import Projection, SketchArgs, Sketcher
from .queries import Queries
from .spill import SPILL_BYTES
from .scoring import Scorer, ScoreArgs
from .statistics import Covariance, EigenvalueCorrection, LayerFactors, block_sizes
from .task import Task
from .tokens import TokenFactors

GB = 2 ** 30


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:
            Path("/proc/self/clear_refs").write_text("5")   # VmHWM back to VmRSS (Linux)
        except OSError:
            pass


def _give_back_freed(device: torch.device) -> None:
    """Return the heap that the measurement freed to the OS (glibc's ``malloc_trim``): its
    full-size consumers take as much as the fit's statistics, and glibc keeps freed heap pages,
    which would raise the peak of the run being planned. Elsewhere (not glibc) a no-op."""
    if device.type == "cpu":
        try:
            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):
            pass


def _resident(device: torch.device, key: str) -> int:
    """Allocated (VmRSS / allocated) or peak (VmHWM / max allocated) bytes of this process."""
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated(device) if key == "VmHWM"
                else torch.cuda.memory_allocated(device))
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class _Timed(Consumer):
    """Delegates to ``inner`` and adds up the seconds spent in it; ``finish`` is not passed on
    (a covariance's finish would run the eigendecompositions the plan estimates instead)."""

    def __init__(self, inner: Consumer) -> None:
        self.inner, self.seconds = inner, 0.0

    def update_layer(self, layer: TrackedLayer, a: Tensor, delta: Tensor,
                     batch: PassBatch) -> None:
        start = time.perf_counter()
        self.inner.update_layer(layer, a, delta, batch)
        self.seconds += time.perf_counter() - start

    def update(self, batch: PassBatch) -> None:
        start = time.perf_counter()
        self.inner.update(batch)
        self.seconds += time.perf_counter() - start


def _factor_numbers(shapes: Sequence[tuple[int, int]], blocks: int, ekfac: bool) -> int:
    """Numbers stored by the factors: eigenbasis blocks of A and S, their eigenvalues, and
    EK-FAC's Λ (out, in+1) per layer."""
    n = 0
    for o, i in shapes:
        n += sum(k * k for k in block_sizes(i, blocks)) + sum(k * k for k in block_sizes(o, blocks))
        n += o + i + (o * i if ekfac else 0)
    return n


@dataclass
class Plan:
    """Predicted peak memory (bytes) and time (seconds) of a fit and of scans; see the module
    docstring for what each term holds. :meth:`check` refuses what would not fit."""
    memory: dict[str, int]              # the terms, bytes
    resident: int                       # bytes the process holds now (model included)
    fit_peak: int                       # bytes above what the process holds now
    scan_peak: dict[int, int]           # queries -> bytes above what the process holds now
    available: int                      # bytes the machine can still give
    seconds: dict[str, float]           # fit stages and "scan Q" / "prepare Q" per query count
    n_sequences: int
    padded_tokens: int
    notes: list[str] = field(default_factory=list)
    sketch_peak: int | None = None      # bytes above what the process holds now (with ``sketch``)
    store_bytes: int | None = None      # the sketch store on disk
    keeps_exact: bool | None = None     # whether the store keeps exact token factors

    def summary(self) -> dict:
        """JSON-ready: GB and seconds, rounded."""
        return {"memory_gb": {k: round(v / GB, 3) for k, v in self.memory.items()},
                "resident_gb": round(self.resident / GB, 3),
                "fit_peak_gb": round(self.fit_peak / GB, 3),
                "scan_peak_gb": {q: round(v / GB, 3) for q, v in self.scan_peak.items()},
                "available_gb": round(self.available / GB, 3),
                "seconds": {k: round(v, 2) for k, v in self.seconds.items()},
                "sequences": self.n_sequences, "padded_tokens": self.padded_tokens,
                **({} if self.sketch_peak is None else
                   {"sketch_peak_gb": round(self.sketch_peak / GB, 3),
                    "store_gb": round(self.store_bytes / GB, 3),
                    "exact_token_factors": self.keeps_exact})}

    def __repr__(self) -> str:
        return str(self)

    def __str__(self) -> str:
        s = self.summary()
        lines = [f"plan for {self.n_sequences:,} sequences ({self.padded_tokens:,} padded tokens):"
                 f" {s['resident_gb']} GB held now, {s['available_gb']} GB more available",
                 f"  fit:  +{s['fit_peak_gb']} GB, "
                 + ", ".join(f"{k} {v:,.1f} s" for k, v in s["seconds"].items()
                             if not k.startswith(("scan", "prepare", "sketch")))]
        for q, peak in s["scan_peak_gb"].items():
            lines.append(f"  scan of {q} queries: +{peak} GB, "
                         f"prepare {s['seconds'][f'prepare {q}']:,.1f} s,"
                         f" scan {s['seconds'][f'scan {q}']:,.1f} s")
        if self.sketch_peak is not None:
            build = ", ".join(f"{k.split()[1]} {v:,.1f} s" for k, v in s["seconds"].items()
                              if k.startswith("sketch "))
            lines.append(f"  sketch store: {s['store_gb']} GB on disk "
                         + ("with" if self.keeps_exact else "without")
                         + f" exact token factors, build +{s['sketch_peak_gb']} GB"
                         + (f", {build}" if build else ""))
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])

    def check(self, stage: str = "all") -> "Plan":
        """Raise MemoryError (one line, naming what to change) when the fit, a scan or the
        sketch build would need more memory than is available; ``stage``: "fit", "scan",
        "sketch" or "all"."""
        if stage in ("fit", "all") and self.fit_peak > self.available:
            big = max(("factors", "eigh", "recording", "batch"), key=lambda k: self.memory[k])
            fix = {"factors": "track fewer layers (layers=...) or split wide layers with "
                              "FactorArgs(blocks=4)",
                   "eigh": "split wide layers with FactorArgs(blocks=4) or "
                           "eigh_precision='float32'",
                   "recording": "lower passes.RECORD_BYTES",
                   "batch": "lower FactorArgs(batch_tokens=...)"}[big]
            raise MemoryError(f"the fit needs ≈ {self.fit_peak / GB:.1f} GB more but "
                              f"{self.available / GB:.1f} GB are available (mostly {big}); {fix}")
        if stage in ("scan", "all"):
            for q, peak in self.scan_peak.items():
                if peak > self.available:
                    raise MemoryError(
                        f"a scan of {q} queries needs ≈ {peak / GB:.1f} GB more but "
                        f"{self.available / GB:.1f} GB are available; score fewer queries per "
                        "pass (ScoreArgs(query_block=...)), keep no per-layer scores "
                        "(per_layer=False), a lower rank, fewer layers, or a smaller "
                        "ScoreArgs(batch_tokens=...)")
        if stage in ("sketch", "all") and (self.sketch_peak or 0) > self.available:
            big = max(("projection", "whitening", "sketch_chunk", "sketch_batch"),
                      key=lambda k: self.memory[k])
            fix = {"projection": "fewer sketch coordinates (SketchArgs(m=...)) or "
                                 "variant='whitened'",
                   "whitening": "variant='whitened' (no whitened norms) or fewer layers",
                   "sketch_chunk": "lower sketch.CHUNK_BYTES or SketchArgs(exact_bytes=0)",
                   "sketch_batch": "a smaller SketchArgs(batch_tokens=...)"}[big]
            raise MemoryError(f"the sketch build needs ≈ {self.sketch_peak / GB:.1f} GB more but "
                              f"{self.available / GB:.1f} GB are available (mostly {big}); {fix}")
        return self


def plan(model: nn.Module, corpus: Corpus, fit: FactorArgs | None = None,
         score: ScoreArgs | None = None, queries: int | Sequence[int] = 1,
         task: Task | None = None, measure: bool = True, sketch: SketchArgs | None = None
         ) -> Plan:
    """Predict the memory and time of fitting ``fit`` on ``corpus`` and of scanning it with
    ``score`` for each number of ``queries``, on this machine; with ``sketch`` also of building
    its sketch store (memory, time, and its size on disk with or without exact token factors).

    ``measure``: run one batch (the corpus's longest at the token budget) to time the passes
    and measure its activations; False gives the memory terms that need no run (activations
    then estimated as 3 float32 vocabulary-wide buffers per token), and no times.
    """
    fit, score, task = fit or FactorArgs(progress=False), score or ScoreArgs(), task or Task()
    counts = checks.counts(queries, "plan(queries=...), each number of queries,")
    layers = find_layers(model, fit.layers)
    shapes = [t.shape for t in layers]
    device = next(model.parameters()).device
    # what the process holds and the machine can give before the measured batch: memory that
    # batch frees stays with the allocator, and would be counted twice (held, then predicted)
    resident, available = _resident(device, "VmRSS"), available_memory(device)
    size = torch.finfo(stat_dtype(model)).bits // 8
    ids = np.arange(len(corpus))[:fit.max_examples]
    lengths = np.diff(corpus.offsets)[ids]
    padded = int(lengths.sum())   # a lower bound, exact enough for the memory terms; a
    if measure:                   # measured plan times the padded tokens of length buckets
        ordered = np.sort(lengths)
        bounds = token_batches(ordered, fit.batch_tokens, fit.batch_size)
        padded = int(sum((e - s) * ordered[e - 1] for s, e in zip(bounds[:-1], bounds[1:])))
    memory = _memory(model, shapes, fit, score, padded, size)
    seconds: dict[str, float] = {}
    notes = []
    named = {t.name: t.shape for t in layers}
    projs, keeps = [], None
    if sketch is not None:   # "auto" chooses after the fit: both variants, eigen first
        projs = [_stand_in_projection(named, fit, sketch, v) for v in
                 (("eigen", "whitened") if sketch.variant == "auto" else (sketch.variant,))]
        keeps = sketches.keeps_tokens(named, corpus, sketch)
        memory.update(_sketch_memory(corpus, named, sketch, projs[0], size, keeps))
    if measure:
        memory["batch"], seconds = _measure(model, corpus, layers, fit, score, task, counts,
                                            padded, device, projs, keeps)
        seconds["eigendecomposition"] = _eigh_seconds(
            shapes, fit.blocks, getattr(torch, fit.eigh_precision)) if fit.strategy != "identity" \
            else 0.0
        _give_back_freed(device)
    fit_peak = memory["factors"] + memory["accumulators"] + memory["eigh"] + memory["batch"]
    if memory["recording"] < passes.RECORD_BYTES:   # kept until the eigenvalue pass replays it
        fit_peak += memory["recording"]
    else:   # outgrown during the covariance pass and dropped there, beside A's and S's sums
        fit_peak = max(fit_peak, memory["accumulators"] + memory["recording"] + memory["batch"])
    results = lambda q: q * (len(layers) * score.per_layer + 1) * len(corpus) * 8  # noqa: E731
    scan_peak, T = {}, max(1, int(lengths.max()))
    for q in counts:   # per pass: a block of queries, the scorer's bytes at the longest batch
        q_pass = min(q, score.query_block or q)
        fake = Queries.random(layers, q_pass, score.rank,
                              scoring.score_dtype(model, score.precision), "meta")
        tokens = scoring.scan_tokens(model, layers, score.batch_tokens,
                                     scoring.kept_dense(fake, layers, scoring.SCORE_BYTES)[1])
        scorer = Scorer(fake, layers, 0).held_bytes(layers, max(1, tokens // T), T)
        held = q_pass * memory["query"]
        if held > SPILL_BYTES and score.rank is not None and device.type == "cpu":
            held = q_pass * memory["query_layer"]   # spilled: one layer's at a time
        scan_peak[q] = (memory["factors"] + held + results(q)
                        + max(memory["prepare"], scorer + memory["batch"] * tokens
                              // fit.batch_tokens))
    if memory["recording"] >= passes.RECORD_BYTES:
        notes.append("ā and δ exceed RECORD_BYTES: EK-FAC's eigenvalue pass runs the model again")
    peak = store = None
    if sketch is not None:
        memory["sketch_batch"] = memory["batch"] * sketch.batch_tokens // fit.batch_tokens \
            if sketch.batch_size is None else memory["batch"] * sketch.batch_size \
            * int(lengths.max()) // fit.batch_tokens
        store = memory["sketch_store"] + keeps * memory["exact"]
        peak = (memory["factors"] + memory["projection"] + memory["whitening"]
                + memory["sketch_chunk"] + memory["sketch_batch"])
        if not keeps and sketch.exact_bytes:
            notes.append(f"the exact token factors would take {memory['exact'] / GB:.2f} GB, "
                         "beyond SketchArgs.exact_bytes: the store keeps the sketch alone")
    return Plan(memory, resident, fit_peak, scan_peak, available, seconds, len(ids), padded, notes,
                peak, store, keeps)


def _stand_in_projection(shapes: dict[str, tuple[int, int]], fit: FactorArgs,
                         args: SketchArgs, variant: str) -> Projection:
    """The sketcher's rows for layers of these (out, in+1) ``shapes``, drawn from stand-in
    K-FAC factors: identity bases, eigenvalues 1/k a side (a power law, as fitted spectra
    fall), so the eigen variant's coordinates spread over rows as they do after a fit; damping
    1, so no weight passes 1 and no stand-in sketch of a long batch overflows float16."""
    eye = lambda n: _identity_blocks(n, fit.blocks)  # noqa: E731
    power = lambda n: 1 / torch.arange(1, n + 1, dtype=torch.float32)  # noqa: E731
    fake = Factors(FactorArgs(strategy="kfac", layers=fit.layers, blocks=fit.blocks,
                              damping=1.0, progress=False), shapes,
                   {n: LayerFactors(eye(i), power(i), eye(o), power(o), None)
                    for n, (o, i) in shapes.items()}, 1, 1, "plan")
    return Projection.draw(fake, SketchArgs(m=args.m, variant=variant, seed=args.seed))


def _identity_blocks(n: int, blocks: int, dtype: torch.dtype = torch.float32,
                     device: torch.device | str = "cpu") -> list[Tensor]:
    """An identity eigenbasis of an n × n factor split as a fit with ``blocks`` splits it."""
    return [torch.eye(k, dtype=dtype, device=device) for k in block_sizes(n, blocks)]


def _sketch_memory(corpus: Corpus, shapes: dict[str, tuple[int, int]], args: SketchArgs,
                   proj: Projection, size: int, keeps: bool) -> dict[str, int]:
    """The sketch build's memory terms (bytes, see the module docstring) with the sketcher
    ``proj`` (for "auto", the eigen variant's: the larger), a store that ``keeps`` exact token
    factors or not, and its size on disk, "sketch_store" without and "exact" for the exact
    token factors."""
    L, N = len(shapes), len(corpus)
    per_row = sketches.row_bytes(proj.dim, L)
    exact = sketches.exact_need(shapes, corpus)
    return {
        # float64 rows and their copies in the statistics' dtype
        "projection": sum((p.u.numel() + p.v.numel()) * (8 + size)
                          for p in proj.layers.values()),
        "whitening": sum(o * i for o, i in shapes.values()) * size
        if proj.variant == "eigen" else 0,
        "sketch_chunk": min(sketches.CHUNK_BYTES, exact) * keeps
        + min(args.chunk_size, N) * per_row,
        "sketch_store": N * per_row,
        "exact": exact,
    }


def _memory(model: nn.Module, shapes: Sequence[tuple[int, int]], fit: FactorArgs,
            score: ScoreArgs, padded: int, size: int) -> dict[str, int]:
    """The memory terms (bytes, see the module docstring) for the tracked layers' (out, in+1)
    ``shapes``, ``padded`` tokens and statistics of ``size`` bytes, before any run: "batch" is
    estimated as 3 float32 vocabulary-wide buffers per token."""
    ekfac = fit.strategy == "ekfac"
    ad_numbers = sum(i + o for o, i in shapes)   # ā and δ numbers per token
    widest = max(max(block_sizes(i, fit.blocks)[0], block_sizes(o, fit.blocks)[0])
                 for o, i in shapes)
    V = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() else 0
    factors = _factor_numbers(shapes, fit.blocks, ekfac) * size if fit.strategy != "identity" else 0
    return {
        "model": sum(p.numel() * p.element_size() for p in model.parameters()),
        "factors": factors,
        "accumulators": factors,            # A, S sums and Λ's, the same numbers as the result
        # the input, eigenvectors and workspace in the eigendecomposition's precision
        "eigh": 4 * widest * widest * getattr(torch, fit.eigh_precision).itemsize,
        "recording": min(passes.RECORD_BYTES, padded * ad_numbers * size) if ekfac else 0,
        "batch": 3 * fit.batch_tokens * V * 4,
        "scorer": scoring.SCORE_BYTES,
        "prepare": queries.QUERY_BYTES,
        "query": (sum(o + i for o, i in shapes) * (score.rank or 0)
                  + (sum(o * i for o, i in shapes) if score.rank is None else 0))
        * scoring.score_dtype(model, score.precision).itemsize,
        "query_layer": max(o + i for o, i in shapes) * (score.rank or 0)
        * scoring.score_dtype(model, score.precision).itemsize,
    }


def _eigh_seconds(shapes: Sequence[tuple[int, int]], blocks: int, precision: torch.dtype
                  ) -> float:
    """Eigendecompositions of every block of A and S, from one timed matrix (n³)."""
    sizes = [k for o, i in shapes for n in (i, o) for k in block_sizes(n, blocks)]
    n = min(1024, max(sizes))   # large enough for the blocked algorithm's rate
    x = torch.randn(n, 2 * n, dtype=precision)
    A = x @ x.T
    start = time.perf_counter()
    torch.linalg.eigh(A)
    rate = (time.perf_counter() - start) / n ** 3
    return rate * sum(k ** 3 for k in sizes)


def _measure(model: nn.Module, corpus: Corpus, layers: list[TrackedLayer], fit: FactorArgs,
             score: ScoreArgs, task: Task, counts: list[int], padded: int,
             device: torch.device, projs: Sequence[Projection] = (),
             keeps: bool | None = None) -> tuple[int, dict[str, float]]:
    """One batch (the longest at the token budget): (its activations' peak bytes, seconds of
    each stage for the whole corpus); the sketch build's with each sketcher of ``projs``
    ("sketch eigen", "sketch whitened"), with its token factors when the store ``keeps``
    them."""
    lengths = np.diff(corpus.offsets)
    order = np.argsort(lengths, kind="stable")[::-1]
    bounds = token_batches(lengths[order], fit.batch_tokens, fit.batch_size)
    ids = order[:bounds[1]]
    tokens = len(ids) * int(lengths[ids].max())
    per_token = padded / tokens                  # the corpus in units of this batch
    shapes = {t.name: t.shape for t in layers}
    dtype = stat_dtype(model)
    covariance = _Timed(Covariance(layers, fit.blocks, dtype, device))
    recording = Recording(budget=1 << 62)
    run = lambda consumers, draws=1, first=0, loss="fisher": corpus_pass(  # noqa: E731
        model, layers, source(corpus, len(ids), ids), consumers, loss, task, fit.seed,
        progress=False, draws=draws, first_draw=first)
    run([])                                   # a first batch pays for allocations and hooks
    # what that batch freed, back to the OS: else the measured batch reuses it unseen, in
    # neither ``resident`` (read before) nor its own peak above ``base``
    _give_back_freed(device)
    base = _resident(device, "VmRSS")
    _peak_reset(device)
    start = time.perf_counter()
    run([covariance, recording])
    total = time.perf_counter() - start
    batch_bytes = max(0, _resident(device, "VmHWM") - base
                      - sum(a.nbytes + d.nbytes for _, layer in recording.batches
                            for _, a, d in layer))
    fwd_bwd = total - covariance.seconds
    # a scan's pass differentiates the log-likelihood: no Fisher labels drawn over the
    # vocabulary (Pythia-160m at 128 tokens: the fit's pass made a 1-query scan 1.39× too long)
    start = time.perf_counter()
    run([], loss="loglik")
    scan_pass = time.perf_counter() - start
    draws = fit.draws or 1
    if fit.draws is None and not task.empirical_fisher:   # as the fit chooses them, from the
        draws = covariance.inner.draws_needed(per_token)   # corpus's worth of this batch
    seconds = {"covariance": total * per_token}
    if draws > 1:   # the fit's second covariance pass: a forward, draws - 1 backwards
        start = time.perf_counter()
        run([covariance], draws - 1, 1)
        seconds["draws"] = (time.perf_counter() - start) * per_token
    consumers: dict[str, _Timed] = {}
    # eigenbases of the right sizes: the cost of the products with them is the same
    eye = lambda n: _identity_blocks(n, fit.blocks, dtype, device)  # noqa: E731
    ones = lambda n: torch.ones(n, dtype=dtype, device=device)  # noqa: E731
    bases = {n: LayerFactors(eye(i), ones(i), eye(o), ones(o), None)
             for n, (o, i) in shapes.items()} if fit.strategy != "identity" else {}
    if fit.strategy == "ekfac":
        consumers["eigenvalues"] = _Timed(EigenvalueCorrection(bases, shapes, dtype))
    for q in counts:   # q random queries of the scan's rank (a block of them per pass)
        q = min(q, score.query_block or q)
        fake = Queries.random(layers, q, score.rank, scoring.score_dtype(model, score.precision))
        consumers[f"scan {q}"] = _Timed(Scorer(fake, layers, len(ids)))
    for proj in projs:
        consumers[f"sketch {proj.variant}"] = _Timed(Sketcher(proj, len(ids)))
    if projs and keeps:
        consumers["token factors"] = _Timed(TokenFactors(shapes, len(ids)))
    recording.replay(list(consumers.values()))
    if "eigenvalues" in consumers:   # a replay when every ā and δ fit RECORD_BYTES, else a pass
        replay = padded * sum(o + i for o, i in shapes.values()) * dtype.itemsize \
            <= passes.RECORD_BYTES
        seconds["eigenvalues"] = (consumers["eigenvalues"].seconds
                                  + (0 if replay else fwd_bwd)) * per_token
    for proj in projs:   # the scan's pass, the sketcher, the token factors
        seconds[f"sketch {proj.variant}"] = (
            scan_pass + consumers[f"sketch {proj.variant}"].seconds
            + (consumers["token factors"].seconds if keeps else 0)) * per_token
    rate = _product_rate(dtype)
    first = _one_query_seconds(model, corpus, fit, score, task, shapes, bases) \
        + _hash_seconds(shapes, fit.strategy)
    for q in counts:
        b = min(q, score.query_block or q)
        seconds[f"scan {q}"] = -(-q // b) * (scan_pass + consumers[f"scan {b}"].seconds) \
            * per_token
        # the first query as measured; each further one, in blocks: the forward + backward of
        # ≈ 24 tokens, then per layer its rotation from the tokens, the truncation and the
        # rotation of its columns back
        seconds[f"prepare {q}"] = first + (q - 1) * (
            scan_pass / tokens * 24 + _prepare_products(shapes, score.rank) / rate)
    return batch_bytes, seconds


def _one_query_seconds(model: nn.Module, corpus: Corpus, fit: FactorArgs, score: ScoreArgs,
                       task: Task, shapes: dict[str, tuple[int, int]],
                       bases: dict[str, LayerFactors]) -> float:
    """Seconds of preparing one query of ≈ 24 tokens (the corpus's first) against ``bases``
    of the fitted sizes. A query alone runs its pass and every layer's small products well
    below a large product's rate (GPT-2 small's widths: 1.4× the products' estimate), a fixed
    cost that blocks of queries share."""
    row = [int(t) for t in corpus.tokens[corpus.offsets[0]:corpus.offsets[1]][:24]]
    cut = max(1, len(row) - 4)
    strategy = "identity" if fit.strategy == "identity" else "kfac"   # kfac: no Λ to hold
    fake = Factors(FactorArgs(strategy=strategy, layers=fit.layers, blocks=fit.blocks,
                              progress=False), shapes, bases, 1, 1, "plan")
    dtype = scoring.score_dtype(model, score.precision)
    start = time.perf_counter()
    queries.make_queries(model, fake, [row[:cut]], [row[cut:] or row[:1]], score.rank,
                         task=task, dtype=dtype)
    return time.perf_counter() - start


def _hash_seconds(shapes: dict[str, tuple[int, int]], strategy: str) -> float:
    """Seconds of :meth:`Factors.factors_id`'s one hash of the fitted eigenvalues (Λ (out, in+1)
    for EK-FAC, λ_A and λ_S always), timed on 4 M numbers: 0.29 s of Pythia-160m's MLPs' first
    query, which a query prepared against the plan's identity bases does not pay."""
    n = sum(o + i + (o * i if strategy == "ekfac" else 0) for o, i in shapes.values())
    sample = torch.rand(1 << 22)
    start = time.perf_counter()
    hash_eigenvalues(hashlib.sha256(), sample)
    return (time.perf_counter() - start) * n / sample.numel()


def _product_rate(dtype: torch.dtype) -> float:
    """Multiply-adds per second of a large matrix product on this device (one timed product)."""
    a, b = torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
    a @ b
    start = time.perf_counter()
    a @ b
    return 1024 ** 3 / max(time.perf_counter() - start, 1e-9)


def _prepare_products(shapes: dict[str, tuple[int, int]], rank: int | None,
                      tokens: int = 24) -> float:
    """Multiply-adds of preparing one query beyond its pass (:class:`~influence_nb.scoring.
    QueryFactors`), weighted ×2 for the QR factorisations and batched products that run below
    a large product's rate: the rotation of its ``tokens`` into the eigenbasis, the
    truncation ((6k + r)·out·in for the randomized range finder, out·in·min + min³ for the
    Gram) and the rotation of r columns back."""
    n = 0.0
    for o, i in shapes.values():
        n += tokens * (o * o + i * i)
        if rank is None or rank >= min(o, i):
            continue
        k = rank + queries.OVERSAMPLE
        n += (6 * k + rank) * o * i if min(o, i) >= 4 * k else o * i * min(o, i) + min(o, i) ** 3
        n += rank * (o * o + i * i)
    return 2 * n
