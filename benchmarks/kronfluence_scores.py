"""Reference EK-FAC influence scores from kronfluence 1.0.1, in influence_nb's conventions.

:class:`KronfluenceEKFAC` (and :func:`kronfluence_ekfac`) fits kronfluence's EK-FAC factors on
a :class:`influence_nb.data.Corpus` and returns the pairwise influence of every training
sequence on every (prompt, completion) query, as a (Q, N) float64 array in corpus row order. It is an independent implementation to
check influence_nb's own EK-FAC scores against.

Conventions, matched to influence_nb's as far as kronfluence allows:

- tracked layers: the ``nn.Linear`` modules whose names contain ``".mlp."``;
- training loss of a sequence: the **sum** over its scored positions (token t and t + 1 both
  real) of next-token cross-entropy, no label smoothing; the Fisher is the true Fisher, with
  labels sampled from the model's predictive distribution (a seeded generator, so repeated
  calls give the same scores);
- the activation covariance counts the same scored positions (kronfluence's "attention mask"
  is only used for that count, never passed to the model);
- damping: ``ScoreArguments(damping_factor=None)``, kronfluence's heuristic of 0.1 × the mean
  EK-FAC eigenvalue of each module, as influence_nb's default (kronfluence's own default is
  an absolute 1e-8);
- sign: the measurement is the query's completion **loss**, −Σ log p(completion | prompt), so
  that kronfluence's score (how much up-weighting the training sequence lowers the
  measurement) is positive when the sequence **raises** log p(completion | prompt), as
  influence_nb's.

Differences that remain: kronfluence normalises the gradient covariance S by tokens, not
sequences (a scale that cancels: only S's eigenvectors enter EK-FAC), and its sampled Fisher
labels differ from influence_nb's draw.

The model is deep-copied before kronfluence wraps its modules, so the caller's model keeps its
weights, its modules and ``requires_grad`` flags; it is left in eval mode.

Install kronfluence without letting pip touch torch / torchvision::

    .venv/bin/pip install --no-deps kronfluence==1.0.1
    .venv/bin/pip install --no-deps accelerate opt_einsum einconv

(its other requirements, einops, safetensors, tqdm and torch, are influence_nb's already;
torchvision is declared but not imported for Linear layers.)
"""
from __future__ import annotations

import copy
import logging
import tempfile
import warnings
from collections.abc import Sequence
from typing import Any

import kronfluence  # noqa: F401 (the caller's ImportError probe)
import numpy as np
import torch
import torch.nn.functional as F
from kronfluence.analyzer import Analyzer, prepare_model
from kronfluence.arguments import FactorArguments, ScoreArguments
from kronfluence.task import Task
from kronfluence.utils.dataset import DataLoaderKwargs
from torch import nn
from torch.utils.data import Dataset

__all__ = ["KronfluenceEKFAC", "kronfluence_ekfac"]


def _scored(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: position t predicts a real token t + 1 (influence_nb's loss mask)."""
    mask = attention_mask.bool()
    nxt = torch.zeros_like(mask)
    nxt[:, :-1] = mask[:, 1:]
    return mask & nxt


def _next_token_logp(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B, T) log p(targets[b, t] | position t) in float32; targets are the shifted tokens."""
    B, T, V = logits.shape
    return -F.cross_entropy(logits.float().reshape(B * T, V), targets.reshape(B * T),
                            reduction="none").reshape(B, T)


def _shift(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x[:, 1:], torch.zeros_like(x[:, :1])], dim=1)


class _LMTask(Task):
    """Summed next-token loss (true-Fisher sampling), completion-loss measurement, MLP layers."""

    def __init__(self, modules: list[str], seed: int = 0) -> None:
        self.modules = modules
        self.seed = seed
        self.generator: torch.Generator | None = None

    def _logits(self, batch: dict, model: nn.Module) -> torch.Tensor:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> torch.Tensor:
        logits = self._logits(batch, model)
        mask = _scored(batch["attention_mask"])
        if sample:
            if self.generator is None or self.generator.device != logits.device:
                self.generator = torch.Generator(device=logits.device).manual_seed(self.seed)
            B, T, V = logits.shape
            with torch.no_grad():
                probs = logits.detach().float().reshape(B * T, V).softmax(dim=-1)
                labels = torch.multinomial(probs, 1, generator=self.generator).reshape(B, T)
        else:
            labels = _shift(batch["input_ids"])
        return -(_next_token_logp(logits, labels) * mask).sum()

    def compute_measurement(self, batch: Any, model: nn.Module) -> torch.Tensor:
        # the completion's loss −Σ log p: kronfluence scores how much a training sequence
        # lowers it, i.e. raises log p(completion | prompt)
        logits = self._logits(batch, model)
        mask = _scored(batch["attention_mask"]) & _shift(batch["completion_mask"]).bool()
        return -(_next_token_logp(logits, _shift(batch["input_ids"])) * mask).sum()

    def get_influence_tracked_modules(self) -> list[str]:
        return self.modules

    def get_attention_mask(self, batch: Any) -> torch.Tensor:
        # only used for the activation covariance: count the positions whose prediction is scored
        return _scored(batch["attention_mask"]).to(batch["attention_mask"].dtype)


class _Rows(Dataset):
    def __init__(self, rows: list[dict]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


def _collate(pad_id: int):
    def collate(rows: list[dict]) -> dict:
        T = max(len(r["input_ids"]) for r in rows)
        out = {k: torch.zeros(len(rows), T, dtype=torch.long)
               for k in ("input_ids", "attention_mask", "completion_mask")}
        out["input_ids"].fill_(pad_id)
        for b, r in enumerate(rows):
            n = len(r["input_ids"])
            out["input_ids"][b, :n] = torch.as_tensor(r["input_ids"], dtype=torch.long)
            out["attention_mask"][b, :n] = 1
            out["completion_mask"][b, r["prompt_len"]:n] = 1
        return out
    return collate


class KronfluenceEKFAC:
    """kronfluence's EK-FAC on a corpus, in two timed steps: :meth:`fit`, then :meth:`scores`
    for any number of query sets (the factors are fitted once). Use as a context manager: the
    factors live in a temporary directory, and the model copy kronfluence wraps is dropped.

    empirical_fisher: real next tokens as Fisher labels on kronfluence's side (deterministic,
    for matched-convention comparisons); otherwise labels sampled with ``seed``.
    modules: the tracked nn.Linear modules' names (default: those named ``*.mlp.*``).
    """

    def __init__(self, model: nn.Module, tokenizer: Any, corpus: Any, batch_size: int = 32,
                 seed: int = 0, empirical_fisher: bool = False,
                 modules: Sequence[str] | None = None) -> None:
        self.model, self.tokenizer, self.corpus = model, tokenizer, corpus
        self.batch_size, self.empirical_fisher = batch_size, empirical_fisher
        if modules is None:
            modules = [n for n, m in model.named_modules()
                       if ".mlp." in n and isinstance(m, nn.Linear)]
        modules = list(modules)
        if not modules or not all(isinstance(model.get_submodule(n), nn.Linear)
                                  for n in modules):
            raise ValueError("kronfluence tracks nn.Linear modules: give their names (default: "
                             "every nn.Linear whose name contains '.mlp.')")
        self.train = _Rows([{"input_ids": corpus.token_ids(i).astype(np.int64), "prompt_len": 0}
                            for i in range(len(corpus))])
        self.task = _LMTask(modules, seed=seed)

    def __enter__(self) -> "KronfluenceEKFAC":
        self._dir = tempfile.TemporaryDirectory(prefix="kronfluence_")
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        # kronfluence 1.0.1 builds a torch.cuda.amp.GradScaler, deprecated in newer torch
        warnings.filterwarnings("ignore", category=FutureWarning, module="kronfluence")
        # kronfluence swaps tracked modules for wrappers and freezes parameters: work on a copy
        self._work = prepare_model(copy.deepcopy(self.model), self.task)
        device = next(self.model.parameters()).device
        self.analyzer = Analyzer(analysis_name="influence_nb", model=self._work, task=self.task,
                                 cpu=device.type == "cpu", disable_tqdm=True,
                                 log_level=logging.WARNING, output_dir=self._dir.name)
        self.analyzer.set_dataloader_kwargs(
            DataLoaderKwargs(collate_fn=_collate(self.corpus.pad_id)))
        return self

    def __exit__(self, *exc: Any) -> None:
        del self._work, self.analyzer
        self._warnings.__exit__(*exc)
        self._dir.cleanup()
        self.model.eval()

    def fit(self) -> None:
        """Covariances, eigendecompositions and the eigenvalue correction, on every sequence."""
        factor_args = FactorArguments(strategy="ekfac",
                                      use_empirical_fisher=self.empirical_fisher,
                                      covariance_max_examples=None, lambda_max_examples=None)
        self.analyzer.fit_all_factors(factors_name="ekfac", dataset=self.train,
                                      per_device_batch_size=self.batch_size,
                                      factor_args=factor_args, overwrite_output_dir=True)

    def scores(self, pairs: Sequence[tuple[str, str]],
               query_batch_size: int | None = None) -> np.ndarray:
        """(Q, N) float64 pairwise scores; > 0 means up-weighting training sequence i raises
        log p(completion_q | prompt_q). ``query_batch_size`` None: all queries in one batch
        (one pass over the corpus: kronfluence's fastest setting)."""
        queries = []
        for prompt, completion in pairs:
            p = list(self.tokenizer(prompt)["input_ids"])
            c = list(self.tokenizer(completion, add_special_tokens=False)["input_ids"])
            queries.append({"input_ids": np.asarray(p + c, np.int64), "prompt_len": len(p)})
        self.analyzer.compute_pairwise_scores(
            scores_name="pairwise", factors_name="ekfac", query_dataset=_Rows(queries),
            train_dataset=self.train, per_device_query_batch_size=query_batch_size or len(queries),
            per_device_train_batch_size=self.batch_size,
            score_args=ScoreArguments(damping_factor=None), overwrite_output_dir=True)
        scores = self.analyzer.load_pairwise_scores("pairwise")["all_modules"]
        scores = scores.detach().to(torch.float64).cpu().numpy()
        if scores.shape != (len(queries), len(self.corpus)):
            raise RuntimeError(f"kronfluence returned scores of shape {scores.shape}, expected "
                               f"{(len(queries), len(self.corpus))}")
        return scores


def kronfluence_ekfac(model: nn.Module, tokenizer: Any, corpus: Any,
                      pairs: Sequence[tuple[str, str]], batch_size: int = 32,
                      seed: int = 0) -> np.ndarray:
    """(Q, N) float64 kronfluence EK-FAC scores of the corpus's sequences on the queries
    (true Fisher, labels sampled with ``seed``; queries in batches of up to 16).

    Score [q, i] > 0 means up-weighting training sequence i raises
    log p(completion_q | prompt_q). See the module docstring for the conventions.
    """
    with KronfluenceEKFAC(model, tokenizer, corpus, batch_size, seed) as kron:
        kron.fit()
        return kron.scores(pairs, query_batch_size=max(1, min(len(pairs), 16)))
