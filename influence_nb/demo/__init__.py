"""The embedded demo world: a generated corpus with planted facts, its BPE tokenizer and a tiny
GPT-NeoX trained on it (built by :mod:`influence_nb.demo.build`, committed under ``assets/``).

    model, tokenizer, corpus = demo.load()
    facts = demo.facts()          # the planted facts, with prompts, completions, flipped probes

Every function takes ``world``: the committed assets (default), a folder written by
``build``, or the name of a preset ("validation", "micro"), built into the cache on first use.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..data import Corpus
from ..quiet import loading_quietly
from ..store import atomic_write, cache_dir
from ..training import TrainConfig
from .world import Fact, WorldConfig, generate, translate

ASSETS = Path(__file__).parent / "assets"

__all__ = ["ASSETS", "Fact", "WorldConfig", "facts", "finetuned", "first_token", "generate",
           "heldout", "load", "query_set", "recipe", "spread_facts", "translate", "word_order",
           "world_path"]

World = str | os.PathLike


def world_path(name: str) -> Path:
    """The cache folder of the preset ``name`` (see :data:`~influence_nb.demo.build.PRESETS`),
    built there on first use (written aside, then renamed into place: a killed or concurrent
    build never leaves a partial world)."""
    from .build import PRESETS, build
    if name not in PRESETS:
        raise ValueError(f"no demo world preset {name!r}; choose one of {sorted(PRESETS)} or "
                         "pass a folder")
    key = json.dumps([asdict(c) for c in PRESETS[name]], sort_keys=True)
    path = cache_dir() / f"world-{name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if not (path / "build.json").is_file():
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        build(tmp, *PRESETS[name])
        try:
            os.replace(tmp, path)
        except OSError:                     # another process finished first: keep its world
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def _check(world: World) -> Path:
    if world == "demo":                     # the committed build of the "demo" preset
        return ASSETS
    if isinstance(world, str) and os.sep not in world and not Path(world).exists():
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
    assets = _check(world)
    with loading_quietly():                 # a tiny model: no "Loading weights" bar
        tokenizer = AutoTokenizer.from_pretrained(assets)
        model = AutoModelForCausalLM.from_pretrained(assets, dtype=dtype).eval()
    return model, tokenizer, _corpus(assets, tokenizer, model.config.max_position_embeddings)


def _corpus(assets: Path, tokenizer: Any, max_len: int) -> Corpus:
    """The world's training corpus, tokenized once and then read from the cache (keyed by the
    corpus file's bytes, the tokenizer and ``max_len``; an unreadable entry is rebuilt)."""
    from ..data import tokenizer_fingerprint
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


def finetuned(world: World = ASSETS, path: str | os.PathLike | None = None
              ) -> tuple[Any, Any, Corpus, Corpus]:
    """The demo assistant (:mod:`~influence_nb.demo.finetune`): (the demo model with its LoRA
    adapter, unmerged; tokenizer; the pretraining corpus; the fine-tuning dialogues, labels on
    the answers only)."""
    from .finetune import load_finetuned
    return load_finetuned(world, path)


def facts(world: World = ASSETS) -> list[Fact]:
    """The planted facts of the demo world."""
    return [Fact(**f) for f in json.loads((_check(world) / "facts.json").read_text())]


def recipe(world: World = ASSETS) -> TrainConfig:
    """The training recipe the world's model was built with (to retrain it on other data)."""
    return TrainConfig(**json.loads((_check(world) / "build.json").read_text())["train"])


def query_set(world: World = ASSETS, tokenizer: Any = None) -> tuple[list[tuple[str, str]],
                                                                    list[str]]:
    """(prompt, completion) pairs of four kinds, and each pair's kind: planted facts (every
    other fact, canonical prompt), paraphrased prompts, facts asked in Velnish, and held-out
    arithmetic and code (the model never trained on them) — for checks across query kinds."""
    from transformers import AutoTokenizer
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(_check(world))
    all_facts = facts(world)
    pairs = [(f.prompt(), f.completion) for f in all_facts[::2]]
    kinds = ["fact"] * len(pairs)
    for f in all_facts[1::6]:
        pairs.append((f.prompt(3), f.completion))
        kinds.append("fact, paraphrase")
    for f in all_facts[1::8]:
        text = translate(f.statement(0), frozenset((f.subject + " " + f.obj).split()))
        pairs.append((text[:text.index(f.obj)].rstrip(), " " + f.obj))
        kinds.append("fact, Velnish")
    held = heldout(tokenizer, world).df
    for text in held.loc[(held["kind"] == "arithmetic") & (held["lang"] == "en"), "text"][:3]:
        cut = text.index("Answer:") + len("Answer:")
        pairs.append((text[:cut], text[cut:]))
        kinds.append("arithmetic")
    code = held.loc[(held["theme"] == "binary_search") & held["text"].str.contains("return")]
    for text in code["text"][:2]:
        cut = text.index("return") + len("return")
        pairs.append((text[:cut], text[cut:].rstrip("\n")))
        kinds.append("code")
    return pairs, kinds


def spread_facts(n: int, world: World = ASSETS) -> list[Fact]:
    """``n`` planted facts spread evenly over the list (so over every relation)."""
    all_facts = facts(world)
    return [all_facts[i] for i in np.linspace(0, len(all_facts) - 1, n).astype(int)]


def first_token(fact: Fact, tokenizer: Any, paraphrase: int = 0) -> tuple[str, str]:
    """The fact's query measured on the object's first token only: (prompt, that token)."""
    return fact.prompt(paraphrase), tokenizer.decode(tokenizer(fact.completion)["input_ids"][:1])


def word_order(session: Any, facts: list[Fact]) -> dict:
    """Paper §5.3.4 on planted facts: each fact's ordered statement and its flipped statement
    (object → subject) scored against the fact's own query, measured on the whole object and on
    the object's first token. Per measurement: the mean ordered and flipped scores, their ratio
    ``flipped_over_ordered`` and the median of the per-fact ratios; ``session`` is an
    :class:`~influence_nb.session.Influence` on the world the facts belong to."""
    tok, n = session.tokenizer, len(facts)
    queries = {"whole object": [(f.prompt(), f.completion) for f in facts],
               "first token": [first_token(f, tok) for f in facts]}
    texts = [t for f in facts for t in (f.statement(0), f.flipped())]
    claim: dict = {"n_facts": n}
    for name, qs in queries.items():
        S = session.score_texts(texts, qs).scores.reshape(n, n, 2)[np.arange(n), np.arange(n)]
        claim[name] = {"ordered": round(float(S[:, 0].mean()), 2),
                       "flipped": round(float(S[:, 1].mean()), 2),
                       "flipped_over_ordered": round(float(S[:, 1].mean() / S[:, 0].mean()), 4),
                       "median_per_fact": round(float(np.median(S[:, 1] / S[:, 0])), 4)}
    return claim


def heldout(tokenizer: Any, world: World = ASSETS) -> Corpus:
    """Sequences of the same distribution that the model never trained on (no fact statements)."""
    records = pd.read_parquet(_check(world) / "heldout.parquet").to_dict("records")
    return Corpus.from_records(records, tokenizer, 128, source="demo heldout")
