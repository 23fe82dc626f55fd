"""Influence: model + tokenizer + corpus + factors in one object, for the notebook loop.

    inf = Influence(model, tokenizer, corpus)
    inf.fit()                                          # EK-FAC over the corpus (or .load_factors)
    res = inf.scan([("The capital city of Astrobia is", " Velmora")])
    res.top(0, k=10)                                   # DataFrame: rank, id, score, text, ...
    inf.score_texts(["Velmora is the capital city of Astrobia."], res)   # synthetic sequences

Nothing here is global: two sessions (two models) live side by side in one kernel.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, replace
from typing import Any

import numpy as np
from torch import nn

from . import store
from .checks import as_ids, checked
from .curvature import (STRATEGIES, FactorArgs, Factors, fingerprint_of, fit_factors,
                        model_fingerprint, weights_fingerprint)
from .data import Corpus, tokenizer_fingerprint
from .layers import context_length, find_layers
from .plan import Plan, plan
from .projection import SketchArgs
from .queries import Queries, make_queries, strategy_queries
from .results import InfluenceResult
from .scoring import ScoreArgs, scan, score_dtype, self_influence, token_scores
from .task import Task

# the demo world's default fit: a tiny model (larger batches), on a random sample (the corpus is
# in no particular order, so its first 4,096 sequences are one)
DEMO_FIT = FactorArgs(batch_size=32, max_examples=4096)
# DEMO_FIT's factors, in the demo assets' folder of this name (``make demo-factors`` writes them)
DEMO_FACTORS = "factors"

QueryLike = tuple[str, str] | Sequence[tuple[str, str]] | Queries | InfluenceResult


class Influence:
    """One analysis: a causal LM, its tokenizer, a training corpus and fitted curvature.

    score_args: defaults for scans (rank 32, batch size, per-layer scores)
    task:       how to run the model and what its loss is (default: HF causal LM)
    """

    @checked()
    def __init__(self, model: nn.Module, tokenizer: Any, corpus: Corpus | None = None,
                 factors: Factors | None = None, score_args: ScoreArgs | None = None,
                 task: Task | None = None):
        self.model, self.tokenizer, self.task = model, tokenizer, task or Task()
        self.score_args = score_args or ScoreArgs()
        self.factors = factors
        self.tokenizer_fingerprint = tokenizer_fingerprint(tokenizer)
        self.corpus = self._check_corpus(corpus) if corpus is not None else None

    @classmethod
    @checked()
    def demo(cls, args: FactorArgs | None = None, score_args: ScoreArgs | None = None,
             task: Task | None = None) -> "Influence":
        """The embedded demo world with EK-FAC factors. By default :data:`DEMO_FIT`'s, on a
        random sample of 4,096 of its 20,000 sequences, shipped with the world (fitted when it
        was built: ``make demo-factors``), so a first notebook starts at once; other ``args``
        (the full fit: ``Influence.demo(FactorArgs(batch_size=32))``, five or more minutes on
        two cores) or a ``task`` are fitted once, then cached. Scores use every sequence."""
        from . import demo
        model, tokenizer, corpus = demo.load()
        inf = cls(model, tokenizer, corpus, score_args=score_args, task=task)
        shipped = demo.ASSETS / DEMO_FACTORS
        if args is None and task is None and (shipped / "manifest.json").is_file():
            factors = inf.load_factors(shipped)
            fitted = replace(factors.args, progress=DEMO_FIT.progress, draws=DEMO_FIT.draws)
            if fitted == DEMO_FIT and factors.corpus_fingerprint == corpus.fingerprint:
                return inf
            warnings.warn(f"the demo factors shipped in {shipped} are not DEMO_FIT's on this "
                          "corpus (rebuild them with `make demo-factors`); fitting instead",
                          stacklevel=2)
        inf.fit(args or DEMO_FIT, cache=True)
        return inf

    @classmethod
    @checked(minimum={"step": 0})
    def from_trainer(cls, trainer: Any, step: int | None = None, model: nn.Module | None = None,
                     **kw: Any) -> "Influence":
        """A session on a Hugging Face ``Trainer``: its model (or ``model``, e.g. the weights of
        checkpoint ``step``), its ``processing_class`` as the tokenizer, its ``train_dataset``
        as the corpus (:meth:`Corpus.from_tokenized`: one row one sequence, labels honoured),
        and the factors :class:`~influence_nb.trainer.InfluenceCallback` saved at the end of
        training (or at checkpoint ``step``) when they are there (else call :meth:`fit`) —
        refused when the Trainer's collator hands the model other tokens than the corpus holds
        (:func:`~influence_nb.trainer.check_corpus`)."""
        from .trainer import check_corpus, factors_path
        tokenizer = getattr(trainer, "processing_class", None)
        if tokenizer is None:
            raise ValueError("the Trainer has no tokenizer: pass processing_class=tokenizer to "
                             "Trainer(...)")
        if trainer.train_dataset is None:
            raise ValueError("the Trainer has no train_dataset to attribute to; pass "
                             "train_dataset=... to Trainer(...)")
        corpus = Corpus.from_tokenized(trainer.train_dataset, tokenizer, source="train_dataset")
        inf = cls(model if model is not None else trainer.model, tokenizer, corpus, **kw)
        path = factors_path(trainer, step)
        if (path / "manifest.json").exists():
            inf.load_factors(path)
            check_corpus(path, corpus)
        elif step is not None:
            raise FileNotFoundError(f"no factors in {path}: add InfluenceCallback(steps=[{step}])"
                                    " to the Trainer's callbacks, with a checkpoint save at that "
                                    "step")
        return inf

    def __repr__(self) -> str:
        f = self.factors
        fit = f"{f.args.strategy} on {f.n_examples} sequences" if f else "not fitted"
        return (f"Influence({type(self.model).__name__}, corpus={len(self.corpus or [])} "
                f"sequences, factors: {fit})")

    def _check_corpus(self, corpus: Corpus) -> Corpus:
        if corpus.tokenizer_fingerprint != self.tokenizer_fingerprint:
            raise ValueError("the corpus was tokenized with another tokenizer than this session's "
                             f"({corpus.tokenizer_fingerprint} ≠ {self.tokenizer_fingerprint}); "
                             "rebuild it with Corpus.from_...(..., tokenizer)")
        return corpus

    @property
    def factors(self) -> Factors | None:
        """The fitted curvature (None before :meth:`fit` or :meth:`load_factors`)."""
        return self._factors

    @factors.setter
    def factors(self, factors: Factors | None) -> None:
        """Refuse factors of another model; note the weights they now stand for."""
        if factors is not None:
            fp = fingerprint_of(self.model, factors.layer_names)
            if fp != factors.model_fingerprint:
                raise ValueError(f"the factors were fitted on another model (fingerprint "
                                 f"{factors.model_fingerprint} ≠ {fp}); pass the model they were "
                                 "fitted on, or refit with inf.fit()")
        self._factors = factors
        self._weights = weights_fingerprint(self.model) if factors is not None else None

    def keep_factors(self) -> None:
        """Score the model's weights as they are now with the factors fitted before they changed
        (a small fine-tuning step, say): an approximation the session otherwise refuses."""
        if self._factors is None:
            raise ValueError("no factors to keep: call inf.fit() or inf.load_factors(path) first")
        self._weights = weights_fingerprint(self.model)

    def fitted(self) -> tuple[Corpus, Factors]:
        """(corpus, factors), or a one-line error saying which is missing and how to get it,
        or that the model's weights changed in place since the factors were fitted."""
        if self.corpus is None:
            raise ValueError("no corpus: pass one to Influence(model, tokenizer, corpus)")
        if self._factors is None:
            raise ValueError("no factors yet: call inf.fit() or inf.load_factors(path) first")
        if weights_fingerprint(self.model) != self._weights:
            raise ValueError("the model's weights changed since the factors were fitted or "
                             "loaded (a training step, load_state_dict, a cast?); refit with "
                             "inf.fit(...), or call inf.keep_factors() to score the new "
                             "weights with the old curvature")
        return self.corpus, self._factors

    @property
    def n_train(self) -> int:
        """N of "Δ log p per copy = score / N": the training sequences the curvature stands
        for — the session's corpus when the factors were fitted on it (all of it, or a sample
        of it through ``max_examples``), else the sequences they were fitted on."""
        corpus, factors = self.fitted()
        return (len(corpus) if factors.corpus_fingerprint == corpus.fingerprint
                else factors.n_examples)

    # -- curvature ----------------------------------------------------------------------------

    @checked()
    def fit(self, args: FactorArgs | None = None, path: str | os.PathLike | None = None,
            cache: bool = False) -> Factors:
        """Fit the curvature on the corpus (see :class:`FactorArgs`); save to ``path``, or with
        ``cache`` reuse / store them under :func:`cache_dir` keyed by model, corpus and args."""
        args = args or FactorArgs()
        if self.corpus is None:
            raise ValueError("no corpus to fit on: pass one to Influence(model, tokenizer, corpus)")
        if not (cache and path is None):
            return self._fit(args, path)
        # progress bars change how the fit looks, not what it estimates; the batch size changes
        # the length buckets and each batch's seeded Fisher labels, so it counts, as does the
        # task (its Fisher estimator)
        key = json.dumps([model_fingerprint(self.model, find_layers(self.model, args.layers)),
                          self.corpus.fingerprint, asdict(replace(args, progress=True)),
                          repr(self.task)], default=str)
        path = store.cache_dir() / f"factors-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
        # one process fits, the others (two notebooks, test workers) wait and load its factors
        with store.lock(path, ValueError, wait=True, name=".fitting"):
            if (path / "manifest.json").exists():
                try:
                    self.factors = Factors.load(path, self.model)
                    return self.factors
                except ValueError as e:  # a torn or corrupt entry: refit and replace it
                    warnings.warn(f"the cached factors in {path} are unusable ({e}); refitting",
                                  stacklevel=2)
            return self._fit(args, path)

    def _fit(self, args: FactorArgs, path: str | os.PathLike | None) -> Factors:
        plan(self.model, self.corpus, args, measure=False).check("fit")
        self.factors = fit_factors(self.model, self.corpus, args, self.task)
        if path is not None:
            self.factors.save(path)
        return self.factors

    @checked()
    def plan(self, fit: FactorArgs | None = None, score: ScoreArgs | None = None,
             queries: int | Sequence[int] = 1, measure: bool = True,
             sketch: SketchArgs | None = None) -> Plan:
        """Memory and time of fitting ``fit`` and of scanning with ``score`` for each number of
        ``queries`` on this model, corpus and machine, from one batch (see
        :mod:`influence_nb.plan`); with ``sketch`` also of building that sketch store, and its
        size on disk; ``.check()`` refuses what would not fit in memory."""
        corpus = self.corpus if self.corpus is not None else self.fitted()[0]
        return plan(self.model, corpus, fit or (self.factors.args if self.factors else None),
                    score or self.score_args, queries, self.task, measure, sketch)

    def load_factors(self, path: str | os.PathLike) -> Factors:
        """Load factors saved by ``fit(path=...)`` (refused if fitted on another model)."""
        self.factors = Factors.load(path, self.model)
        return self.factors

    @checked(within={"lexical": "[0, 1]"})
    def retriever(self, path: str | os.PathLike, sketch_args: Any = None,
                  index_args: Any = None, lexical: float | None = None) -> Any:
        """Sketch and index the corpus into ``path`` once (resumable; reused when present), for
        fast candidate search: ``inf.retriever(path).search(pairs, recall=0.95)`` (or
        ``candidates=K``) returns the exactly rescored candidates as a result; ``lexical`` is
        the share of the positive candidates that BM25 proposes (None: only where the
        sketch's calibrated recall falls short). See :mod:`influence_nb.retriever`."""
        from .retriever import Retriever
        return Retriever.build(self, path, sketch_args, index_args, lexical)

    # -- queries and scores -------------------------------------------------------------------

    @checked(choices={"strategy": STRATEGIES, "precision": ("default", "float32", "bfloat16")})
    def queries(self, pairs: QueryLike, rank: int | None | str = "default",
                strategy: str | None = None, precision: str = "default") -> Queries:
        """Preconditioned query gradients of (prompt, completion) text pairs, factorised to
        ``rank`` (default: ``score_args.rank``; None = full rank) and stored at ``precision``
        (default: ``score_args.precision``; see :class:`ScoreArgs`). Queries already made are
        only stored at ``precision``."""
        precision = self.score_args.precision if precision == "default" else precision
        dtype = score_dtype(self.model, precision)
        if isinstance(pairs, Queries):
            return pairs.to(dtype)
        _, factors = self.fitted()
        rank = self.score_args.rank if rank == "default" else rank
        queries = make_queries(self.model, factors, *self._tokens(pairs), rank, strategy,
                               self.task, dtype)
        self._warn_if_certain(queries)
        return queries

    def _tokens(self, pairs: QueryLike) -> tuple[list[list[int]], list[list[int]]]:
        """(prompts, completions) token ids of the queries, however they were given."""
        if isinstance(pairs, Queries):
            return pairs.prompts, pairs.completions
        return self.encode(self._pairs(pairs))

    @staticmethod
    def _pairs(pairs: QueryLike) -> Sequence[tuple[str, str]]:
        """(prompt, completion) text pairs of a result's queries, one pair, or several."""
        if isinstance(pairs, InfluenceResult):
            return [(q["prompt"], q["completion"]) for q in pairs.queries]
        if isinstance(pairs, tuple) and len(pairs) == 2 and isinstance(pairs[0], str):
            pairs = [pairs]   # one pair; checked with the others below
        if not isinstance(pairs, Iterable):
            raise TypeError(f"queries={pairs!r}: pass a (prompt, completion) pair of strings or "
                            "a list of them")
        pairs = [] if isinstance(pairs, str) else list(pairs)
        if not pairs:
            raise ValueError("no queries: pass a (prompt, completion) pair of strings or a list "
                             "of them")
        for i, pair in enumerate(pairs):   # "ab" would unpack as prompt "a", completion "b"
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2
                    and all(isinstance(x, str) for x in pair)):
                raise TypeError(f"query {i} is {pair!r}, not a (prompt, completion) pair of "
                                "strings; pass [(prompt, completion), ...]")
        return pairs

    def encode(self, pairs: Sequence[tuple[str, str]]) -> tuple[list[list[int]], list[list[int]]]:
        """(prompts, completions) token ids of (prompt, completion) text pairs; the completion
        is tokenized without special tokens, as a continuation."""
        prompts, completions = [], []
        for prompt, completion in pairs:
            if not completion:
                raise ValueError(f"empty completion for prompt {prompt!r}: give the text whose "
                                 "log-probability is measured")
            prompts.append(self.tokenizer(prompt)["input_ids"])
            completions.append(self.tokenizer(completion, add_special_tokens=False)["input_ids"])
        return prompts, completions

    def _warn_if_certain(self, queries: Queries) -> None:
        """A log-probability measurement near 0 has a vanishing gradient (∂ log p / ∂ logits =
        onehot − p): every score of such a query is tiny and mostly noise. Say so once."""
        if type(self.task).measurement is not Task.measurement:
            return                                   # a user-defined measurement: not log p
        certain = np.flatnonzero(queries.f.double().cpu().numpy() > -1e-3)
        if len(certain):
            q = int(certain[0])
            warnings.warn(f"the model is certain of {len(certain)} of {len(queries)} queries' "
                          f"completions (e.g. {self.tokenizer.decode(queries.completions[q])!r}: "
                          f"log p = {float(queries.f[q]):.1e}); their gradients nearly vanish, "
                          "so influence scores are tiny and noisy — a model trained to "
                          "certainty on its data (docs/design.md)", stacklevel=3)

    def _describe(self, queries: Queries) -> list[dict]:
        return [dict(prompt=self.tokenizer.decode(p), completion=self.tokenizer.decode(c),
                     logprob=float(f))
                for p, c, f in zip(queries.prompts, queries.completions, queries.f)]

    @checked()
    def scan(self, queries: QueryLike, corpus: Corpus | dict[str, Corpus] | None = None,
             ids: Sequence[int] | None = None, out_dir: str | os.PathLike | None = None,
             args: ScoreArgs | None = None) -> InfluenceResult:
        """Score every sequence of the corpus (or ``ids``) on the queries, streaming; with
        ``out_dir`` the scan is resumable. Returns an :class:`InfluenceResult`.

        ``corpus`` may be several, ``{"pretraining": pre, "fine-tuning": ft}``: they are scored
        in one pass (:meth:`Corpus.concat`) and the result's rows carry a ``source`` column
        (:meth:`InfluenceResult.split` sums the influence per source)."""
        if isinstance(corpus, dict):
            corpus = Corpus.concat(corpus)
        corpus = self._check_corpus(corpus) if corpus is not None else self.fitted()[0]
        ids = None if ids is None else as_ids(ids, len(corpus))   # before any model work
        args = args or self.score_args
        if not isinstance(queries, Queries):   # refuse a scan that cannot fit, before preparing
            plan(self.model, corpus, self.fitted()[1].args, args, len(self._pairs(queries)),
                 measure=False).check("scan")
        queries = self.queries(queries, rank=args.rank, precision=args.precision)
        scores, layers, ids = scan(self.model, queries, corpus, args, out_dir, ids, self.task)

        def token_fn(seq_ids: Sequence[int], layers: Sequence[str] | None = None):
            part = queries.select(layers) if layers else queries
            return token_scores(self.model, part, corpus, seq_ids, args.batch_size, self.task,
                                args.batch_tokens)

        def token_query_fn(q: int, t: int, seq_ids: Sequence[int]) -> InfluenceResult:
            # completion token t of query q alone: log p(c_t | prompt + c_<t), on seq_ids
            p, c = list(queries.prompts[q]), list(queries.completions[q])
            part = make_queries(self.model, self.factors, [p + c[:t]], [c[t:t + 1]], args.rank,
                                None, self.task, score_dtype(self.model, args.precision))
            return self.scan(part, corpus, ids=seq_ids, args=replace(args, progress=False))

        return InfluenceResult(self._describe(queries), scores, ids, queries.layer_names,
                               layers, corpus, token_fn=token_fn,
                               n_train=self.n_train, token_query_fn=token_query_fn)

    @checked(nonempty=("texts",))
    def score_texts(self, texts: str | Sequence[str], queries: QueryLike,
                    metadata: Sequence[dict] | None = None) -> InfluenceResult:
        """Score synthetic training sequences (a list of strings) on the queries, no corpus
        file needed; ids are positions in ``texts``."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        lengths = [len(self.tokenizer(t)["input_ids"]) if t.strip() else 0 for t in texts]
        limit = context_length(self.model)
        for k, n in enumerate(lengths):  # each text must stay one sequence: ids are positions
            if n == 0:
                raise ValueError(f"text {k} is empty; give each synthetic sequence some text")
            if limit is not None and n > limit:
                raise ValueError(f"text {k} has {n} tokens, more than the model's context of "
                                 f"{limit}; shorten it or split it into several texts")
        corpus = Corpus.from_texts(texts, self.tokenizer, max([2, *lengths]), metadata)
        return self.scan(queries, corpus, args=replace(self.score_args, progress=False))

    @checked(minimum={"seed": 0})
    def strategy_scores(self, pairs: QueryLike, strategies: Sequence[str] = STRATEGIES,
                        baselines: bool = True, seed: int = 0) -> dict[str, np.ndarray]:
        """{name: (Q, N) scores of every corpus sequence}: each curvature strategy at full rank
        (one scan for all), and with ``baselines`` BM25 of prompt + completion and random
        normal scores — the contestants of :func:`~influence_nb.validate.lds`."""
        from .search import BM25
        corpus, factors = self.fitted()
        # the query gradients once, preconditioned by each strategy
        by_strategy = strategy_queries(self.model, factors, *self._tokens(pairs), strategies,
                                       None, self.task)
        parts = [by_strategy[factors.resolve_strategy(s)] for s in strategies]
        self._warn_if_certain(parts[0])
        Q = len(parts[0])
        S = self.scan(Queries.concat(parts), args=replace(self.score_args, rank=None,
                                                           per_layer=False)).scores
        out = {s: S[i * Q:(i + 1) * Q] for i, s in enumerate(strategies)}
        if baselines:
            texts = [self.tokenizer.decode(p + c) for p, c in zip(parts[0].prompts,
                                                                   parts[0].completions)]
            out["bm25"] = BM25(corpus.df["text"].tolist()).scores(texts)
            out["random"] = np.random.default_rng(seed).standard_normal((Q, len(corpus)))
        return out

    @checked()
    def self_influence(self, corpus: Corpus | None = None,
                       ids: Sequence[int] | None = None) -> np.ndarray:
        """(N,) ∇L(z)ᵀ (G + λI)⁻¹ ∇L(z) per sequence of the corpus (or ``ids``)."""
        corpus = self._check_corpus(corpus) if corpus is not None else self.fitted()[0]
        if ids is not None and len(ids) == 0:
            return np.zeros(0)
        return self_influence(self.model, self.fitted()[1], corpus,
                              self.score_args.batch_size, ids, self.task,
                              self.score_args.progress, self.score_args.batch_tokens)
