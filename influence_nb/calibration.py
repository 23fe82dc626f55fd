"""What a sketch search can promise: its recall of the exhaustive top-10, estimated once per
sketch store from a calibration sample scanned exactly.

A random ``sample`` of the sketched sequences is scanned exactly on ``queries`` calibration
queries (other corpus sequences, each split in half: the first half the prompt, the second
the completion), once, and kept beside the sketches (``calibration.json``, tied to the
store's fingerprint). In the sample, a corpus of N sequences' top-10 corresponds to the top
t = max(1, round(10 · sample / N)); for each of those the calibration keeps the fraction of
the sample whose sketch inner product ranks above it (positive side: largest first; negative:
most negative first). A search that takes the k best sketch candidates of one sign out of N
finds such a sequence when its rank fraction is below k / N, so the estimated recall is the
share of kept fractions below k / N (:meth:`Calibration.recall`).

What it cannot say: calibration queries are in-distribution text, and BM25 candidates are not
counted (the estimate is the sketch's share alone, a lower bound of a hybrid search's).

The same scan measures the sketch's error in units of its scale H (``z``, the
:class:`~influence_nb.search.NoiseModel` a search with a recall target bounds its misses with;
stores of format 1, without norms, have none). Where the store keeps exact token factors,
the ranks are those of their scores (:meth:`Sketches.exact_scores`, which a fixed budget's
candidates come from), z still the sketch's (a search with a recall target hunts with it).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from . import store
from .checks import check_args
from .search import NoiseModel
from .sketch import FORMAT_1, SketchError, Sketches

if TYPE_CHECKING:  # annotations only
    from .session import Influence

FILE = "calibration.json"
FORMAT = "influence_nb.calibration/2"
FORMAT_1_CALIBRATION = '"influence_nb.calibration/1"'   # before z: calibrated again


@dataclass
class CalibrationArgs:
    """How to calibrate a sketch store.

    sample:     sketched sequences scanned exactly (at most all of them)
    queries:    calibration queries (other sketched sequences, cut in half)
    completion: tokens of each calibration query's completion, after the first half (None:
                the whole second half)
    seed:       seed of the sample and the queries
    """
    sample: int = 1000
    queries: int = 16
    completion: int | None = None
    seed: int = 0

    MINIMUM: ClassVar[dict[str, float]] = {"sample": 2, "queries": 1, "completion": 1}

    def __post_init__(self) -> None:
        check_args(self)


@dataclass
class Calibration:
    """Rank fractions, per calibration query, of the sample's exact top-t (each sign) in the
    sketch's order over the sample.

    fingerprint: the sketch store's (a store that changes is recalibrated)
    n_corpus, n_sample, top_t: sizes; positive, negative: (queries, t) rank fractions
    z:           sorted (score − sketch estimate) / H (:meth:`Sketches.noise_scale`) over the sample and
                 the calibration queries (4 significant digits; empty for a store of format 1)
    """
    fingerprint: str
    n_corpus: int
    n_sample: int
    top_t: int
    positive: list[list[float]]
    negative: list[list[float]]
    args: dict
    z: list[float] = field(default_factory=list)

    @property
    def noise(self) -> NoiseModel:
        """The sketch's error model (SketchError: a store without norms)."""
        if not self.z:
            raise SketchError("this sketch store's calibration has no error model (a store of "
                              "format 1, without norms); rebuild the store with "
                              "build_sketches(...) in a new directory")
        return NoiseModel(np.asarray(self.z, np.float64))

    def recall(self, k_positive: int, k_negative: int, n: int | None = None) -> dict:
        """Estimated recall@10 when the k_positive largest and k_negative most negative
        sketch inner products of n sequences (default: the calibrated corpus) are rescored."""
        n = n or self.n_corpus
        est = {sign: float(np.mean(np.asarray(fr) < k / n))
               for sign, fr, k in (("positive", self.positive, k_positive),
                                   ("negative", self.negative, k_negative))}
        return dict(est, calibration_queries=len(self.positive), calibration_sample=self.n_sample)


def rank_fractions(exact: np.ndarray, approx: np.ndarray, t: int) -> tuple[np.ndarray,
                                                                            np.ndarray]:
    """exact, approx (Q, n) scores -> (Q, t) fractions of the n that the sketch ranks above
    each of the exact top-t, for the positive side and the negative side."""
    out = []
    for sign in (1, -1):
        order = np.argsort(-sign * approx, 1, kind="stable")
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.arange(approx.shape[1])[None], 1)
        top = np.argsort(-sign * exact, 1, kind="stable")[:, :t]
        out.append(np.take_along_axis(rank, top, 1) / approx.shape[1])
    return out[0], out[1]


def calibrate(inf: Influence, sketches: Sketches, args: CalibrationArgs | None = None
              ) -> Calibration:
    """The store's calibration: read from ``sketches.path / calibration.json`` when it was made
    for these sketches with these args, else computed (one exact scan of the sample) and
    saved there."""
    args = args or CalibrationArgs()
    path = sketches.path / FILE
    if path.exists() and FORMAT_1_CALIBRATION not in path.read_text():  # format 1: anew
        names = tuple(f.name for f in fields(Calibration))
        saved = store.read_manifest(path, FORMAT, SketchError, f"delete {path} to calibrate "
                                    "the store again", names)
        saved = Calibration(**{k: saved[k] for k in names})
        if saved.fingerprint == sketches.fingerprint and saved.args == asdict(args):
            return saved
    corpus = inf.fitted()[0]
    rng = np.random.default_rng(args.seed)
    n = len(sketches)
    order = rng.permutation(n)
    rows = np.sort(order[:min(args.sample, n)])
    others = order[min(args.sample, n):] if n > args.sample else order
    pairs = []
    for r in others[:args.queries]:
        tokens = corpus.token_ids(int(sketches.ids[r]))
        half = max(1, len(tokens) // 2)
        end = len(tokens) if args.completion is None else half + args.completion
        pairs.append((inf.tokenizer.decode(tokens[:half]),
                      inf.tokenizer.decode(tokens[half:end])))
    queries = inf.queries(pairs)
    exact = inf.scan(queries, ids=sketches.ids[rows]).scores
    if sketches.manifest["format"] == FORMAT_1:
        x = sketches.query_sketches(inf.model, inf.factors, queries)
        approx, z = x @ np.asarray(sketches.data[rows], np.float32).T, []
    else:
        approx, H = sketches.estimates(inf.model, inf.factors, queries, rows)
        z = np.sort(((exact - approx) / np.maximum(H, 1e-30)).ravel())
    if sketches.exact is not None:        # a fixed budget's candidates come from these
        approx = sketches.exact_scores(inf.model, inf.factors, queries, rows)[0]
    t = max(1, round(10 * len(rows) / n))
    pos, neg = rank_fractions(exact, approx, t)
    cal = Calibration(sketches.fingerprint, n, len(rows), t, pos.tolist(), neg.tolist(),
                      asdict(args), [float(f"{v:.4g}") for v in z])
    store.write_manifest(path, dict(format=FORMAT) | asdict(cal))
    return cal
