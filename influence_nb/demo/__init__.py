"""The embedded demo world: a generated corpus with planted facts, its BPE tokenizer and a tiny
GPT-NeoX trained on it (built by :mod:`influence_nb.demo.build`, committed under ``assets/``).

    model, tokenizer, corpus = demo.load()
    facts = demo.facts()          # the planted facts, with prompts, completions, flipped probes
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..data import Corpus
from .world import Fact, WorldConfig, generate, translate

ASSETS = Path(__file__).parent / "assets"

__all__ = ["ASSETS", "Fact", "WorldConfig", "facts", "generate", "heldout", "load",
           "spread_facts", "translate"]


def _check(assets: Path) -> Path:
    if not (assets / "model.safetensors").is_file():
        raise FileNotFoundError(f"demo world not found in {assets}; build it with "
                                "`python -m influence_nb.demo.build --out {assets}`")
    return assets


def load(assets: Path = ASSETS, dtype: Any = None) -> tuple[Any, Any, Corpus]:
    """The demo model (eval mode, float32 unless ``dtype`` says otherwise), its tokenizer and
    the training corpus as a :class:`~influence_nb.data.Corpus` (ids are the corpus rows)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    assets = _check(Path(assets))
    tokenizer = AutoTokenizer.from_pretrained(assets)
    model = AutoModelForCausalLM.from_pretrained(assets, dtype=dtype).eval()
    records = pd.read_parquet(assets / "corpus.parquet").drop(columns="id").to_dict("records")
    corpus = Corpus.from_records(records, tokenizer, model.config.max_position_embeddings,
                                 source="demo corpus")
    return model, tokenizer, corpus


def facts(assets: Path = ASSETS) -> list[Fact]:
    """The planted facts of the demo world."""
    return [Fact(**f) for f in json.loads((_check(Path(assets)) / "facts.json").read_text())]


def spread_facts(n: int, assets: Path = ASSETS) -> list[Fact]:
    """``n`` planted facts spread evenly over the list (so over every relation)."""
    all_facts = facts(assets)
    return [all_facts[i] for i in np.linspace(0, len(all_facts) - 1, n).astype(int)]


def heldout(tokenizer: Any, assets: Path = ASSETS) -> Corpus:
    """Sequences of the same distribution that the model never trained on (no fact statements)."""
    records = pd.read_parquet(_check(Path(assets)) / "heldout.parquet").to_dict("records")
    return Corpus.from_records(records, tokenizer, 128, source="demo heldout")
