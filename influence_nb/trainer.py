"""Hugging Face Trainer integration: fit the curvature where the Trainer trains, on its data.

    trainer = Trainer(model, args, train_dataset=ds, data_collator=collator,
                      processing_class=tokenizer,
                      callbacks=[InfluenceCallback(FactorArgs(batch_size=16), steps=[500])])
    trainer.train()   # -> output_dir/influence_factors and checkpoint-500/influence_factors
    inf = Influence.from_trainer(trainer)     # model, tokenizer, corpus, the factors above

The callback fits on the Trainer's own training rows (after its column removal), in dataset
order, collated by the Trainer's collator — so the training loss it differentiates is the one
the Trainer optimised, with the collator's ``labels`` (-100: not trained on) honoured by
:class:`~influence_nb.task.Task`. The model is read as the Trainer holds it (a PEFT model
included: the default layer preset then tracks the adapters); nothing is wrapped.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback

from . import store
from .checks import checked
from .curvature import FactorArgs, Factors, fit_factors
from .progress import tqdm
from .task import Task

FACTORS_DIR = "influence_factors"  # beside a checkpoint's weights, or in output_dir
CALLBACK_FORMAT = "influence_nb.callback/1"  # callback.json, the callback's note beside them


class CollatedDataset:
    """A dataset and a collator seen as a corpus by :func:`~influence_nb.batching.source`:
    batches of rows in dataset order (no length bucketing), collated exactly as the Trainer
    collates them. A batch without ``attention_mask`` gets one of ones.

    dataset:    rows indexable by position (``datasets.Dataset``, a list of dicts, ...)
    collate_fn: list of rows -> {input_ids (B, T), attention_mask (B, T)[, labels (B, T)]}
    """

    def __init__(self, dataset: Any, collate_fn: Callable[[list], Any]) -> None:
        if collate_fn is None:
            raise ValueError("no collator: pass the Trainer's data_collator (or "
                             "transformers.default_data_collator)")
        self.dataset, self.collate_fn = dataset, collate_fn

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def fingerprint(self) -> str:
        """A hash of the rows (``datasets``' own fingerprint when there is one) and the
        collator's type: what the factors' manifest records as their corpus."""
        h = hashlib.sha256(type(self.collate_fn).__qualname__.encode())
        own = getattr(self.dataset, "_fingerprint", None)
        if own is not None:
            h.update(f"{own}:{len(self.dataset)}".encode())
        else:
            for row in self.dataset:
                h.update(np.asarray(row["input_ids"], np.int64).tobytes() + b"|")
        return h.hexdigest()[:16]

    def batches(self, batch_size: int = 8, ids: Sequence[int] | None = None,
                progress: bool = False) -> Iterator[dict]:
        """Collated batches of ``ids`` (default: all rows, in order)."""
        ids = np.arange(len(self)) if ids is None else np.asarray(ids, np.int64)
        for s in tqdm(range(0, len(ids), batch_size), desc="batches", disable=not progress):
            batch = dict(self.collate_fn([self.dataset[int(i)] for i in ids[s:s + batch_size]]))
            if "input_ids" not in batch:
                raise ValueError(f"the collator returned no input_ids (keys: {', '.join(batch)});"
                                 " influence needs token ids of a causal LM")
            if batch.get("attention_mask") is None:
                batch["attention_mask"] = torch.ones_like(batch["input_ids"])
            yield batch

    def token_rows(self, batch_size: int = 64) -> Iterator[np.ndarray]:
        """Each row's token ids as the collator hands them to the model, padding dropped."""
        for batch in self.batches(batch_size):
            mask = torch.as_tensor(batch["attention_mask"]).bool()
            for ids, keep in zip(torch.as_tensor(batch["input_ids"]), mask):
                yield ids[keep].numpy()


def tokens_fingerprint(rows: Iterable[np.ndarray]) -> str:
    """16 hex of the rows' token ids, in order, empty rows left out (as a corpus leaves them
    out): the callback's collated rows and the corpus a session scores must agree."""
    h = hashlib.sha256()
    for row in rows:
        if len(row):
            h.update(len(row).to_bytes(8, "little") + np.asarray(row, np.int64).tobytes())
    return h.hexdigest()[:16]


def fit_on_dataloader(model: torch.nn.Module, dataloader: Any, args: FactorArgs | None = None,
                      task: Task | None = None) -> Factors:
    """Factors of ``model`` on a DataLoader's dataset, in order, with its ``collate_fn`` (the
    Trainer's train dataloader: its rows after column removal, its collator)."""
    if dataloader is None or not hasattr(dataloader, "dataset"):
        raise ValueError("no training dataloader: the Trainer has no train_dataset; pass "
                         "train_dataset=... to the Trainer")
    return fit_factors(model, CollatedDataset(dataloader.dataset, dataloader.collate_fn),
                       args or FactorArgs(), task)


class InfluenceCallback(TrainerCallback):
    """Fits EK-FAC factors on the Trainer's training data at the end of training (``at_end``)
    and at the checkpoint saves of the given global ``steps``; saves them (tensors + manifest
    with the model and data fingerprints, see :meth:`Factors.save`) in
    ``output_dir/influence_factors`` and ``output_dir/checkpoint-<step>/influence_factors``,
    beside a ``callback.json`` naming the step and fingerprinting the collated rows' tokens
    (:func:`check_corpus`). ``self.saved`` maps each step to its path.

    args: how to fit (:class:`FactorArgs`; its ``layers`` preset picks a PEFT model's adapters)
    steps: global steps to fit at: the callback has the Trainer save a checkpoint there (a
           step beyond the training's last is refused when training begins)
    """

    @checked(minimum={"steps": 1}, distinct=("steps",))
    def __init__(self, args: FactorArgs | None = None, steps: Sequence[int] = (),
                 at_end: bool = True, task: Task | None = None) -> None:
        self.args, self.steps, self.at_end = args or FactorArgs(), set(steps), at_end
        self.task = task or Task()
        self.saved: dict[int, Path] = {}

    def _fit(self, path: Path, state: Any, model: Any, train_dataloader: Any) -> None:
        factors = fit_on_dataloader(model, train_dataloader, self.args, self.task)
        if state.is_world_process_zero:
            factors.save(path)
            rows = CollatedDataset(train_dataloader.dataset, train_dataloader.collate_fn)
            store.write_manifest(path / "callback.json",
                                 dict(format=CALLBACK_FORMAT, global_step=state.global_step,
                                      collator=type(train_dataloader.collate_fn).__qualname__,
                                      n_rows=len(train_dataloader.dataset),
                                      tokens=tokens_fingerprint(rows.token_rows())))
        self.saved[state.global_step] = path

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        late = sorted(s for s in self.steps if s > state.max_steps)
        if late:
            raise ValueError(f"InfluenceCallback(steps=...) asks for step {late[0]}, but the "
                             f"training ends at step {state.max_steps}; ask for steps up to "
                             "that, or train longer")

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step in self.steps:   # a checkpoint here, whatever save_steps says
            control.should_save = True

    def on_save(self, args: Any, state: Any, control: Any, model: Any = None,
                train_dataloader: Any = None, **kwargs: Any) -> None:
        if state.global_step in self.steps:
            self._fit(Path(args.output_dir) / f"checkpoint-{state.global_step}" / FACTORS_DIR,
                      state, model, train_dataloader)

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None,
                     train_dataloader: Any = None, **kwargs: Any) -> None:
        if self.at_end:
            self._fit(Path(args.output_dir) / FACTORS_DIR, state, model, train_dataloader)


@checked(minimum={"step": 0})
def factors_path(trainer: Any, step: int | None = None) -> Path:
    """Where :class:`InfluenceCallback` saved the factors of ``trainer`` (end of training, or
    the checkpoint of ``step``)."""
    out = Path(trainer.args.output_dir)
    return out / (FACTORS_DIR if step is None else f"checkpoint-{step}/{FACTORS_DIR}")


def describe(path: str | Path) -> dict:
    """The callback's note beside saved factors: global_step, collator, n_rows, tokens."""
    return store.read_manifest(Path(path) / "callback.json", CALLBACK_FORMAT, ValueError,
                               "train again with the InfluenceCallback to rewrite it",
                               ("global_step", "collator", "n_rows", "tokens"))


def check_corpus(path: str | Path, corpus: Any) -> None:
    """Refuse a corpus whose sequences are not the collated rows the callback fitted the
    factors in ``path`` on: a collator that truncates, prepends or rewrites tokens trains on
    other sequences than the dataset's, and the scores would name the wrong ones."""
    if describe(path)["tokens"] != tokens_fingerprint(corpus.token_ids(k)
                                                      for k in range(len(corpus))):
        raise ValueError(f"the Trainer's collator hands the model other tokens than its "
                         f"train_dataset holds (it truncates, prepends or rewrites them), so the "
                         f"factors in {path} were fitted on other sequences than the corpus a "
                         "session scores; tokenize the dataset as the collator would (leaving "
                         "it only padding), or make the session yourself, Influence(trainer.model, "
                         "tokenizer, Corpus.from_tokenized(trainer.train_dataset, tokenizer)), "
                         "and fit it with inf.fit()")
