"""Search without the model: BM25 candidate filtering, the power-law estimate of how many
sequences must be scanned, and recall of a search against an exhaustive scan.

- :class:`BM25`, the paper's TF-IDF candidate filter (§3.2.1);
- :class:`PowerLawTail` and :func:`search_size`, the paper's estimate of how many sequences
  must be scanned to find the influential ones (§5.2.2);
- :func:`recall_at_k`, the share of an exhaustive scan's top-k that a search found;
- :class:`NoiseModel` and :func:`misses`, what a recall-targeted search bounds: the chance that
  a sequence it did not rescore beats the k-th best exact score it found.

The search that combines sketches, the index and BM25 with exact rescoring of the candidates
is :class:`~influence_nb.retriever.Retriever`.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp
from sklearn.feature_extraction.text import CountVectorizer

if TYPE_CHECKING:  # annotations only
    from .results import InfluenceResult


class BM25:
    """The paper's TF-IDF filter (§3.2.1): Okapi BM25 with binary term presence, k1 = 1.5.

    score(q, d) = Σ_{t ∈ q ∩ d} idf(t) · (k1 + 1) / (1 + k1 · (1 − b + b · |d| / avg|d|)),
    idf(t) = log(1 + (N − n_t + 0.5) / (n_t + 0.5)). Terms: scikit-learn's word tokens.
    """

    def __init__(self, texts: Sequence[str], k1: float = 1.5, b: float = 0.75):
        self.vectorizer = CountVectorizer(binary=True)
        X = self.vectorizer.fit_transform(texts).tocsr().astype(np.float32)   # (N, V) presence
        n_t = np.asarray(X.sum(0)).ravel()
        idf = np.log1p((X.shape[0] - n_t + 0.5) / (n_t + 0.5))
        length = np.asarray(X.sum(1)).ravel()                 # distinct terms per document
        norm = (k1 + 1) / (1 + k1 * (1 - b + b * length / length.mean()))
        self.weights = (sp.diags(norm.astype(np.float32)) @ X @ sp.diags(idf.astype(np.float32))
                        ).tocsc()                              # (N, V) BM25 term weights

    def scores(self, texts: Sequence[str]) -> np.ndarray:
        """(Q, N) BM25 scores of every document for each query text."""
        q = self.vectorizer.transform(texts).astype(np.float32)          # (Q, V) presence
        return (q @ self.weights.T).toarray()

    def top(self, texts: Sequence[str], k: int) -> list[np.ndarray]:
        """Per query text the ids (rows) of the k best-scoring documents."""
        return [np.argsort(-s, kind="stable")[:k] for s in self.scores(texts)]


@dataclass
class PowerLawTail:
    """P(score > x) ≈ p_tail · (x / x_min)^(−alpha) for x ≥ x_min (Hill estimate of alpha)."""
    alpha: float
    x_min: float
    p_tail: float

    @classmethod
    def fit(cls, scores: np.ndarray, tail: float = 0.05) -> "PowerLawTail":
        """Fit to the largest ``tail`` fraction of the positive scores of a scanned sample."""
        x = np.sort(np.asarray(scores, np.float64))[::-1]
        n = max(2, int(len(x) * tail))
        top = x[:n]
        if len(x) < n or top[0] == top[-1]:   # alpha would be 1/0, p_tail above 1
            raise ValueError(f"a sample of {len(x)} scores is too small to fit a tail; scan "
                             f"more sequences (the tail needs {n} distinct scores)")
        if top[-1] <= 0:
            raise ValueError(f"the top {tail:.0%} of the sample holds non-positive scores; "
                             "scan a larger sample or fit a smaller tail fraction")
        alpha = (n - 1) / np.log(top / top[-1]).sum()
        return cls(float(alpha), float(top[-1]), n / len(x))

    def survival(self, x: float) -> float:
        """P(score > x)."""
        return self.p_tail * (x / self.x_min) ** -self.alpha if x > self.x_min else float("nan")


def search_size(sample_scores: np.ndarray, target_scores: np.ndarray, tail: float = 0.05
                ) -> dict:
    """How many sequences must be scanned to find as many sequences at least as influential as
    ``target_scores`` (e.g. the exact scores of the TF-IDF top-10), from the power-law tail of
    a random sample's scores (paper §5.2.2): n = len(target) / P(score ≥ min(target))."""
    law = PowerLawTail.fit(sample_scores, tail)
    threshold = float(np.min(target_scores))
    p = law.survival(threshold)
    return dict(alpha=law.alpha, x_min=law.x_min, p_tail=law.p_tail, threshold=threshold,
                n_sequences=len(target_scores) / p if p == p else None)


def recall_at_k(found: InfluenceResult, exact: InfluenceResult, k: int = 10,
                sign: str = "positive") -> np.ndarray:
    """(Q,) fraction of each query's exact top-k (of ``exact``, e.g. an exhaustive scan) that
    ``found``'s top-k holds; ``sign`` "positive" or "negative".

    A search result (:class:`~influence_nb.retriever.SearchResult`) rescored the union of all
    its queries' candidates; query q is credited only with its own candidates, as if it had
    been searched alone — the union's recall is not a recall any single query gets."""
    own = getattr(found, "candidates", None) or None
    out = []
    for q in range(exact.n_queries):
        top = found.top(q, len(found.ids), sign)["id"].to_numpy()
        if own is not None:
            top = top[np.isin(top, own[q])]
        out.append(len(set(top[:k]) & set(exact.top(q, k, sign)["id"])) / k)
    return np.array(out)


@dataclass
class NoiseModel:
    """How far a sketch estimate ŝ is from the exact score s, in units of its Cauchy–Schwarz
    scale H = Σ_ℓ ‖query rest_ℓ‖ · ‖sequence rest_ℓ‖ (:meth:`Sketches.query_rest`, the stored
    norms): z = (s − ŝ) / H, measured on a calibration sample scanned exactly.

    z: sorted measured values (the calibration's, every query and sequence pooled)

    Within the largest ``TAIL`` share of either side the tail is an exponential fitted to that
    share (the mean excess over its threshold), not cut off at the largest value seen. (The
    eigen sketch's |z| is at most 1 by Cauchy–Schwarz, up to its float16 rounding, which
    dominates where the sketch holds nearly everything; no such cap is used.)
    """
    z: np.ndarray

    TAIL = 0.01

    def survival(self, t: np.ndarray, sign: int = 1) -> np.ndarray:
        """P(sign · z > t), elementwise."""
        z = self.z if sign > 0 else -self.z[::-1]            # ascending either way
        n = len(z)
        m = max(10, int(self.TAIL * n))
        u = z[n - m - 1]                                     # the tail's threshold
        beta = max(float(np.mean(z[n - m:] - u)), 1e-12)
        t = np.asarray(t, np.float64)
        body = (n - np.searchsorted(z, t, side="right")) / n
        tail = m / n * np.exp(-np.maximum(t - u, 0) / beta)      # used where t ≥ u only
        return np.where(t < u, body, tail)


def misses(estimate: np.ndarray, scale: np.ndarray, tau: float, sign: int,
           noise: NoiseModel) -> np.ndarray:
    """Per sequence, P(its exact score beats ``tau``): sign · s > sign · tau, with s = ŝ + H z
    (``estimate`` ŝ, ``scale`` H, both (n,)). Summed over the sequences a search did not
    rescore, with tau the k-th best exact score it found, this bounds the expected number of
    the exhaustive top-k it missed (each of them beats tau, since the true k-th best is at
    least as good)."""
    gap = sign * (tau - estimate)                              # how far ŝ must move
    with np.errstate(divide="ignore", invalid="ignore"):
        p = noise.survival(gap / scale, sign)
    return np.where(scale > 0, p, (gap < 0).astype(np.float64))


def to_rescore(p: np.ndarray, budget: float) -> np.ndarray:
    """The fewest positions of ``p`` (chances of a miss) to rescore so that the rest sum to at
    most ``budget``: the largest first -> their indices."""
    order = np.argsort(-p, kind="stable")
    rest = p.sum() - np.cumsum(p[order])                       # left after the first i + 1
    n = int(np.searchsorted(-rest, -budget, side="left")) + 1 if p.sum() > budget else 0
    return order[:n]
