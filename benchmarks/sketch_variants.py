"""Sketch variants that benchmarks/retrieval.py still compares but the package no longer draws.

The package (influence_nb/projection.py) keeps what "auto" selects: the eigen sketch and the
whitened Kronecker sketch. Measured against them and dropped (issue #27):

- **Khatri-Rao** (the default before #15, m = 256): whitened like the package's random sketch,
  but m independent Gaussian pairs (p_j, q_j) per layer instead of all k² pairs of k = √m
  shared rows; coordinate j = (u_j · δ)(v_j · ā), cost m · (out + in) per token and layer
  against √m · (out + in) + m. At equal bytes it finds what the Kronecker sketch finds (demo,
  K = 2 %, m = 256: 0.65 / 0.23 against 0.63 / 0.19; m = 1,024: both 0.84 / 0.32 — projection
  seeds move these by ≈ 0.05), while the Kronecker sketch can be far larger for the same time
  (docs/results.md, "Retrieval on two worlds").
- **plain** (B = I, s = 1: all of the preconditioning on the query side) was never measured
  better and is not compared here; it lived in influence_nb/sketch.py up to commit cac198d. On
  identity factors the package's whitened sketch is exactly it.

Khatri-Rao sketches are drawn from the package's pieces (:func:`whitened_rows`, one
:class:`Projection` of paired coordinates, the :class:`Sketcher` consumer of one corpus pass)
and cached as a plain (N, D) float16 array, not a sketch store.
"""
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from influence_nb.curvature import Factors
from influence_nb.layers import find_layers
from influence_nb.batching import source
from influence_nb.passes import corpus_pass
from influence_nb.projection import Projection, Sketcher, Whitening, whitened_rows
from influence_nb.queries import Queries
from influence_nb.session import Influence


@dataclass(frozen=True)
class KhatriRao:
    """The whitened Khatri-Rao sketch: m Gaussian pairs per layer, drawn from ``seed``."""
    m: int = 256
    seed: int = 0

    @property
    def name(self) -> str:
        return f"whitened-khatri-rao-m{self.m}"

    def projection(self, factors: Factors) -> Projection:
        """Per layer m pairs of whitened rows, coordinate j pairing row j with row j."""
        g = torch.Generator().manual_seed(self.seed)
        pairs, layers = torch.arange(self.m), {}
        for name, (d_out, d_in) in factors.shapes.items():
            # coordinate j is (p_j·X_q·q_j)(p_j·X_m·q_j) with E = ⟨X_q, X_m⟩: rows scale by
            # m^(-1/4) so that the m coordinates sum to the score
            p = torch.randn(self.m, d_out, generator=g, dtype=torch.float64) / self.m ** .25
            q = torch.randn(self.m, d_in, generator=g, dtype=torch.float64) / self.m ** .25
            layers[name] = replace(whitened_rows(factors, name, p, q), iu=pairs, iv=pairs)
        return Projection(layers, "whitened", Whitening(factors))

    def sketch(self, inf: Influence, path: Path, batch_size: int = 32
               ) -> tuple[np.ndarray, float | None]:
        """(N, D) float16 sketches of the session's corpus, row = id, cached at ``path`` (.npy);
        -> (sketches, build seconds when built now, else None)."""
        if path.exists():
            return np.load(path, mmap_mode="r"), None
        t0 = time.perf_counter()
        proj = self.projection(inf.factors)
        data = corpus_pass(inf.model, find_layers(inf.model, inf.factors.layer_names),
                           source(inf.corpus, batch_size), [Sketcher(proj, len(inf.corpus))],
                           task=inf.task, progress=False)[0][0]
        np.save(path, data)
        return data, time.perf_counter() - t0

    def query_sketches(self, inf: Influence, queries: Queries) -> np.ndarray:
        """(Q, D) float32 sketches of preconditioned query gradients, drawn alike."""
        return self.projection(inf.factors).sketch_queries(queries).numpy()
