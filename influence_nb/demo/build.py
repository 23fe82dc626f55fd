"""Build a demo world from scratch: corpus → byte-level BPE tokenizer → tiny GPT-NeoX trained on
CPU → fact accuracy and held-out perplexity. Three presets of one generator and one recipe:

- ``demo``        the committed world v2 in ``influence_nb/demo/assets`` (13.3 min on 2 idle
                  cores, 37 min at one thread beside other jobs);
- ``validation``  1,500 sequences and a 0.17M-parameter model that retrains from scratch in
                  ≈ 30 s on 2 cores: the world of the counterfactual checks (LDS, leave-k-out);
- ``micro``       a world of a few hundred sequences that trains in seconds, for tests.

    python -m influence_nb.demo.build                           # the committed world
    python -m influence_nb.demo.build --preset validation --out DIR

``demo.load("validation")`` builds a preset into the cache once and loads it.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..data import Corpus
from ..quiet import loading_quietly
from ..store import cache_dir, temporary
from ..training import TrainConfig, train
from .world import ASSETS, WorldConfig, generate

SPECIALS = ["<|endoftext|>", "<|pad|>"]


@dataclass
class ModelConfig:
    """The demo model: a GPT-NeoX small enough to train on two CPU cores."""
    hidden_size: int = 192
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 768
    vocab_size: int = 2048
    max_position_embeddings: int = 128


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer (GPT-2 style) trained on ``texts``, as a transformers fast
    tokenizer with ``<|endoftext|>`` as eos and ``<|pad|>`` as pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=SPECIALS[0],
                                   pad_token=SPECIALS[1])


def make_model(cfg: ModelConfig, seed: int = 0):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    torch.manual_seed(seed)
    config = GPTNeoXConfig(**asdict(cfg), rotary_pct=0.25, use_parallel_residual=True,
                           bos_token_id=0, eos_token_id=0, pad_token_id=1,
                           tie_word_embeddings=False)
    return GPTNeoXForCausalLM(config)


@torch.no_grad()
def fact_accuracy(model, tokenizer, facts, paraphrase: int = 0) -> tuple[float, list[dict]]:
    """Greedy-decode each fact's object after its prompt; exact match of the object's tokens."""
    rows = []
    for f in facts:
        prompt = tokenizer(f.prompt(paraphrase))["input_ids"]
        target = tokenizer(f.completion)["input_ids"]
        ids = torch.tensor([prompt])
        for _ in range(len(target)):
            nxt = model(input_ids=ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
        got = ids[0, len(prompt):].tolist()
        rows.append(dict(fact=f.id, relation=f.relation, prompt=f.prompt(paraphrase),
                         expected=f.obj, got=tokenizer.decode(got), correct=got == target))
    return float(np.mean([r["correct"] for r in rows])), rows


@torch.no_grad()
def perplexity(model, corpus: Corpus, batch_size: int = 64) -> float:
    """exp(mean next-token negative log-likelihood) over all real tokens of ``corpus``."""
    nll, n = 0.0, 0
    for b in corpus.batches(batch_size):
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[:, :-1]
        target, mask = b.input_ids[:, 1:], b.attention_mask[:, 1:].bool()
        lp = torch.log_softmax(logits.float(), -1).gather(-1, target[..., None])[..., 0]
        nll -= lp[mask].sum().item()
        n += int(mask.sum())
    return math.exp(nll / n)


def build(out: Path = ASSETS, world: WorldConfig = WorldConfig(),
          model_cfg: ModelConfig = ModelConfig(), train_cfg: TrainConfig = TrainConfig()) -> dict:
    """Build every artifact of the demo world into ``out``; returns the build report."""
    t0 = time.time()
    torch.manual_seed(train_cfg.seed)
    records, heldout, facts = generate(world)
    tokenizer = train_tokenizer([r["text"] for r in records], model_cfg.vocab_size)
    corpus = Corpus.from_records(records, tokenizer, model_cfg.max_position_embeddings)
    held = Corpus.from_records(heldout, tokenizer, model_cfg.max_position_embeddings)
    if len(corpus) != len(records):
        raise RuntimeError("a demo sequence is longer than the model's context; shorten it")
    model = make_model(model_cfg, train_cfg.seed)
    t_train = time.time()
    losses = train(model, corpus, train_cfg)
    t_train = time.time() - t_train
    acc, rows = fact_accuracy(model, tokenizer, facts)
    report = dict(
        fact_accuracy=acc, heldout_perplexity=perplexity(model, held),
        train_perplexity=perplexity(model, corpus.subset(range(0, len(corpus), 20))),
        final_loss=float(np.mean(losses[-50:])), n_sequences=len(corpus),
        n_tokens=int(len(corpus.tokens)), n_params=sum(p.numel() for p in model.parameters()),
        train_seconds=round(t_train, 1), build_seconds=round(time.time() - t0, 1),
        world=asdict(world), model=asdict(model_cfg), train=asdict(train_cfg),
        missed=[r for r in rows if not r["correct"]][:20])
    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(records).to_parquet(out / "corpus.parquet", index=False)
    pd.DataFrame(heldout).to_parquet(out / "heldout.parquet", index=False)
    (out / "facts.json").write_text(json.dumps([asdict(f) for f in facts], indent=0))
    with loading_quietly():         # no "Writing model shards" bar (in a notebook: a widget)
        tokenizer.save_pretrained(out)  # Hugging Face layout: AutoTokenizer / AutoModel load it
        model.save_pretrained(out)
    (out / "build.json").write_text(json.dumps(report, indent=1))
    return report


# fewer, shorter sequences (less code) and facts stated more often, so that a 2-layer
# d = 64 model learns them (≥ 0.9 greedy accuracy) within ≈ 30 s of training on 2 cores; names
# only in their facts' statements (no mentions: the v1 world, on which their figures were taken)
_SHORT_MIX = {"arithmetic": 0.3, "code": 0.1, "themed": 0.3, "filler": 0.3}
PRESETS: dict[str, tuple[WorldConfig, ModelConfig, TrainConfig]] = {
    "demo": (WorldConfig(), ModelConfig(), TrainConfig()),
    "validation": (
        WorldConfig(n_sequences=1_500, n_heldout=100, facts_per_relation=4,
                    statements_per_fact=20, mentions_per_name=0, mix=_SHORT_MIX),
        ModelConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=256, vocab_size=512, max_position_embeddings=256),
        TrainConfig(epochs=14, batch_size=32, lr=5e-3, warmup_steps=30)),
    "micro": (
        WorldConfig(n_sequences=240, n_heldout=30, facts_per_relation=2, statements_per_fact=12,
                    mentions_per_name=0, mix=_SHORT_MIX),
        ModelConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=64, vocab_size=384, max_position_embeddings=256),
        TrainConfig(epochs=40, batch_size=32, lr=1e-2, warmup_steps=10)),
}


def world_path(name: str) -> Path:
    """The cache folder of the preset ``name`` (see :data:`PRESETS`), built there on first use
    (written aside, then renamed into place: a killed or concurrent build never leaves a partial
    world)."""
    if name not in PRESETS:
        raise ValueError(f"no demo world preset {name!r}; choose one of {sorted(PRESETS)} or "
                         "pass a folder")
    key = json.dumps([asdict(c) for c in PRESETS[name]], sort_keys=True)
    path = cache_dir() / f"world-{name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if not (path / "build.json").is_file():
        tmp = temporary(path)
        shutil.rmtree(tmp, ignore_errors=True)
        build(tmp, *PRESETS[name])
        try:
            os.replace(tmp, path)
        except OSError:                     # another process finished first: keep its world
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    p.add_argument("--out", type=Path, default=None,
                   help="default: the package assets for 'demo', the cache for the others")
    p.add_argument("--epochs", type=int, default=None)
    a = p.parse_args(argv)
    world, model_cfg, train_cfg = PRESETS[a.preset]
    if a.epochs:
        train_cfg = replace(train_cfg, epochs=a.epochs)
    out = a.out or (ASSETS if a.preset == "demo" else None)
    if out is None and a.epochs:
        p.error("--epochs needs --out: a preset in the cache is built as defined")
    if out is None:
        print(f"built into {world_path(a.preset)}")
        report = json.loads((world_path(a.preset) / "build.json").read_text())
    else:
        report = build(out, world, model_cfg, train_cfg)
    print(json.dumps({k: v for k, v in report.items() if k != "missed"}, indent=1))


if __name__ == "__main__":
    main()
