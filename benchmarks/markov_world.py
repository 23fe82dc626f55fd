"""An evaluation world built independently of the demo generator, shared by the benchmarks.

A second-order Markov chain over 96 invented words (peaked transition laws, so contexts
matter), sequences of 12–40 words, a word-level tokenizer and a 2-layer GPT-2 (not the demo's
GPT-NeoX) trained from scratch with its own recipe. Queries: a chain prefix of 8 words and the
next two words; :func:`query_kinds` adds other kinds of queries for retrieval.
"""
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from transformers import GPT2Config

from influence_nb.data import Corpus
from influence_nb.training import Retrainer, TrainConfig

V = 96


@dataclass
class MarkovWorld:
    tokenizer: Any
    corpus: Corpus
    retrain: Retrainer
    model: Any
    pairs: list[tuple[str, str]]
    train_seconds: float
    law: np.ndarray       # (V, V, V) p(x_t | x_t-2, x_t-1)
    popular: np.ndarray   # (V,) start-word probabilities
    texts: list[str]


def word_tokenizer(words: list[str]) -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<eos>": 0, "<pad>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


def chain(rng: np.random.Generator, law: np.ndarray, popular: np.ndarray, n: int) -> list[int]:
    """n words of the chain, started from two words drawn from ``popular``."""
    x = list(rng.choice(V, 2, p=popular))
    while len(x) < n:
        x.append(int(rng.choice(V, p=law[x[-2], x[-1]])))
    return x


def spell(x: list[int]) -> str:
    return " ".join(f"w{i:02d}" for i in x)


def build(sequences: int = 1000, queries: int = 20, seed: int = 7, train: bool = True
          ) -> MarkovWorld:
    """The world's corpus, its model trained from scratch (seed 0; ``train=False``: untrained,
    e.g. to load cached weights into) and the query pairs."""
    rng = np.random.default_rng(seed)
    words = [f"w{i:02d}" for i in range(V)]
    law = np.exp(2.5 * rng.standard_normal((V, V, V)))       # p(x_t | x_t-2, x_t-1), peaked
    law /= law.sum(-1, keepdims=True)
    popular = np.exp(rng.standard_normal(V))                  # start words: frequent and rare
    popular /= popular.sum()
    texts = [spell(chain(rng, law, popular, int(rng.integers(12, 41))))
             for _ in range(sequences)]
    pairs = []
    for _ in range(queries):
        x = chain(rng, law, popular, 10)
        pairs.append((spell(x[:8]), " " + spell(x[8:])))
    tokenizer = word_tokenizer(words)
    corpus = Corpus.from_texts(texts, tokenizer, 64)
    config = GPT2Config(vocab_size=V + 2, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                        bos_token_id=0, eos_token_id=0, pad_token_id=1)
    recipe = TrainConfig(epochs=8, batch_size=32, lr=5e-3, warmup_steps=20, label_smoothing=0.1)
    retrain = Retrainer(config, corpus, recipe)
    t0 = time.time()
    model = retrain(np.arange(len(corpus)), seed=0) if train else retrain.make(0)
    return MarkovWorld(tokenizer, corpus, retrain, model, pairs, time.time() - t0, law, popular,
                       texts)


def query_kinds(world: MarkovWorld, per_kind: int = 8, seed: int = 11
                ) -> list[tuple[str, str, str]]:
    """(kind, prompt, completion) queries of four kinds, ``per_kind`` each:

    fresh:    a new chain's first 8 words, completion its next 2 (the world's default query)
    seen:     a training sequence's first 8 words and its next 2, verbatim (memorised source)
    long:     a new chain's first 4 words, completion its next 8
    unlikely: a new chain's first 8 words, completion 2 words the chain makes improbable
    """
    rng = np.random.default_rng(seed)
    law, popular = world.law, world.popular
    out = []
    for _ in range(per_kind):
        x = chain(rng, law, popular, 10)
        out.append(("fresh", spell(x[:8]), " " + spell(x[8:])))
    long_enough = [t.split() for t in world.texts if len(t.split()) >= 10]
    for k in rng.choice(len(long_enough), per_kind, replace=False):
        w = long_enough[k]
        out.append(("seen", " ".join(w[:8]), " " + " ".join(w[8:10])))
    for _ in range(per_kind):
        x = chain(rng, law, popular, 12)
        out.append(("long", spell(x[:4]), " " + spell(x[4:])))
    for _ in range(per_kind):
        x = chain(rng, law, popular, 8)
        y = [int(np.argmin(law[x[-2], x[-1]]))]
        y.append(int(np.argmin(law[x[-1], y[0]])))
        out.append(("unlikely", spell(x), " " + spell(y)))
    return out


def with_lora(world: MarkovWorld, r: int = 8, seed: int = 0) -> Any:
    """The world's trained GPT-2 with a LoRA adapter of rank r on both MLP Conv1Ds, random A
    and B (a timing world: the adapter is not trained), in eval mode."""
    import torch
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(seed)
    return get_peft_model(world.model, LoraConfig(r=r, target_modules=["c_fc", "c_proj"],
                                                  fan_in_fan_out=True,
                                                  init_lora_weights=False)).eval()
