"""A built demo world, read back: where it is (:func:`locate`), its model, tokenizer and
training corpus (:func:`load`), its planted facts, training recipe and held-out sequences.

A ``world`` is the committed assets (the default, or "demo"), a folder written by
:func:`~influence_nb.demo.build.build`, or the name of a preset ("validation", "micro"), built
into the cache on first use.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..checks import checked
from ..data import Corpus, tokenizer_fingerprint
from ..quiet import loading_quietly
from ..store import atomic_write, cache_dir
from ..training import TrainConfig
from .world import ASSETS, Fact

World = str | os.PathLike


@checked()
def locate(world: World = ASSETS) -> Path:
    """The folder of ``world``: the committed assets for "demo", the cache folder of a preset
    name (built on first use), else the folder itself, which must hold a built world."""
    if world == "demo":                     # the committed build of the "demo" preset
        return ASSETS
    if isinstance(world, str) and os.sep not in world and not Path(world).exists():
        from .build import world_path       # on call: see the note in the package's facade
        return world_path(world)
    assets = Path(world)
    if not (assets / "model.safetensors").is_file():
        raise FileNotFoundError(f"demo world not found in {assets}; build it with "
                                f"`python -m influence_nb.demo.build --out {assets}`")
    return assets


def load(world: World = ASSETS, dtype: Any = None) -> tuple[Any, Any, Corpus]:
    """The demo model (eval mode, float32 unless ``dtype`` says otherwise), its tokenizer and
    the training corpus as a :class:`~influence_nb.data.Corpus` (ids are the corpus rows;
    tokenized on the first load, then read from the cache)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    assets = locate(world)
    with loading_quietly():                 # a tiny model: no "Loading weights" bar
        tokenizer = AutoTokenizer.from_pretrained(assets)
        model = AutoModelForCausalLM.from_pretrained(assets, dtype=dtype).eval()
    return model, tokenizer, _corpus(assets, tokenizer, model.config.max_position_embeddings)


def _corpus(assets: Path, tokenizer: Any, max_len: int) -> Corpus:
    """The world's training corpus, tokenized once and then read from the cache (keyed by the
    corpus file's bytes, the tokenizer and ``max_len``; an unreadable entry is rebuilt)."""
    raw = (assets / "corpus.parquet").read_bytes()
    key = hashlib.sha256(raw + f"{tokenizer_fingerprint(tokenizer)} {max_len}".encode())
    path = cache_dir() / f"corpus-{key.hexdigest()[:16]}.npz"
    try:
        with np.load(path) as z:
            table = pd.read_parquet(io.BytesIO(z["table"].tobytes()))
            return Corpus(z["tokens"], z["offsets"], table, tokenizer, max_len, "demo corpus")
    except (OSError, ValueError, KeyError):          # not cached yet, or torn: tokenize
        pass
    records = pd.read_parquet(io.BytesIO(raw)).drop(columns="id").to_dict("records")
    corpus = Corpus.from_records(records, tokenizer, max_len, source="demo corpus")
    table = io.BytesIO()
    corpus.df.to_parquet(table)
    data = io.BytesIO()
    np.savez(data, tokens=corpus.tokens, offsets=corpus.offsets,
             table=np.frombuffer(table.getvalue(), np.uint8))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data.getvalue())
    return corpus


def facts(world: World = ASSETS) -> list[Fact]:
    """The planted facts of the demo world."""
    return [Fact(**f) for f in json.loads((locate(world) / "facts.json").read_text())]


def recipe(world: World = ASSETS) -> TrainConfig:
    """The training recipe the world's model was built with (to retrain it on other data)."""
    return TrainConfig(**json.loads((locate(world) / "build.json").read_text())["train"])


def heldout(tokenizer: Any, world: World = ASSETS) -> Corpus:
    """Sequences of the same distribution that the model never trained on (no fact statements)."""
    records = pd.read_parquet(locate(world) / "heldout.parquet").to_dict("records")
    return Corpus.from_records(records, tokenizer, 128, source="demo heldout")
