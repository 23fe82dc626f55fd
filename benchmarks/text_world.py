"""A real-text evaluation world: English prose from the docstrings of Python's own standard
library (the interpreter running this, e.g. CPython 3.11; Python Software Foundation License),
read at build time with :func:`inspect.getdoc` — nothing downloaded. A byte-level BPE of
1,024 tokens trained on it, and a 2-layer GPT-2 (dropout 0, so a run can be replayed) trained
from scratch with its own recipe.

Sequences: docstring paragraphs of 80–400 characters, prose only (no ``>>>`` examples, no
tables), deduplicated, shuffled with a seed. Queries, three kinds (``kinds``):

- seen:     a training paragraph's first 8 words, completion its next 4 (memorised source);
- heldout:  the same from a paragraph kept out of training;
- rephrased: a held-out paragraph's words 2 … 9 as prompt (a shifted start), next 4 words.

Held-out and rephrased queries come from disjoint halves of the 100 held-out paragraphs (at most
50 of each kind), so that no two queries read the same paragraph: the LDS intervals bootstrap
over queries as if they were independent.
"""
import inspect
import sys
import time
from dataclasses import dataclass
from importlib import import_module
from typing import Any

import numpy as np
from transformers import GPT2Config

from influence_nb.data import Corpus
from influence_nb.training import Retrainer, TrainConfig

MODULES = ("argparse", "ast", "asyncio", "bisect", "calendar", "codecs", "collections",
           "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal",
           "difflib", "email.message", "enum", "fractions", "functools", "gettext", "glob",
           "gzip", "hashlib", "heapq", "html.parser", "http.client", "http.server", "inspect",
           "io", "ipaddress", "itertools", "json", "locale", "logging", "mailbox", "math",
           "mimetypes", "operator", "optparse", "os", "pathlib", "pdb", "pickle", "pprint",
           "queue", "random", "re", "sched", "secrets", "selectors", "shlex", "shutil",
           "smtplib", "socket", "socketserver", "sqlite3", "statistics", "string", "subprocess",
           "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize", "traceback",
           "turtle", "typing", "unittest", "urllib.parse", "urllib.request", "uuid", "warnings",
           "weakref", "xml.dom.minidom", "zipfile")
SOURCE = (f"docstrings of the Python {sys.version.split()[0]} standard library "
          "(Python Software Foundation License)")


@dataclass
class TextWorld:
    tokenizer: Any
    corpus: Corpus
    retrain: Retrainer
    model: Any
    pairs: list[tuple[str, str]]
    kinds: list[str]
    train_seconds: float
    source: str


def paragraphs() -> list[str]:
    """Every prose paragraph of 80–400 characters in the docstrings of :data:`MODULES` and
    their public classes and functions, whitespace collapsed, first occurrence kept (a sorted
    walk)."""
    seen: dict[str, None] = {}
    for name in MODULES:
        try:
            module = import_module(name)
        except ImportError:         # e.g. turtle without tkinter
            continue
        objects = [module] + [getattr(module, k) for k in sorted(vars(module))
                              if not k.startswith("_")]
        for obj in objects:
            doc = inspect.getdoc(obj) if obj is module or inspect.isclass(obj) or \
                inspect.isroutine(obj) else None     # not submodules: other imports add them
            for para in (doc or "").split("\n\n"):
                text = " ".join(para.split())
                if 80 <= len(text) <= 400 and ">>>" not in text and "|" not in text \
                        and text[0].isupper() and text.endswith("."):
                    seen.setdefault(text)
    return list(seen)


def bpe_tokenizer(texts: list[str], vocab: int = 1024) -> Any:
    """A byte-level BPE of ``vocab`` tokens trained on ``texts`` (eos/pad: token 0/1)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<eos>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


def queries(train: list[str], held: list[str], per_kind: int, rng: np.random.Generator
            ) -> tuple[list[tuple[str, str]], list[str]]:
    """(pairs, kinds): ``per_kind`` queries of each kind (see the module's docstring)."""
    pairs, kinds = [], []
    half = len(held) // 2
    for kind, texts, start in (("seen", train, 0), ("heldout", held[:half], 0),
                               ("rephrased", held[half:], 1)):
        for k in rng.choice(len(texts), per_kind, replace=False):
            w = texts[k].split()
            pairs.append((" ".join(w[start:start + 8]), " " + " ".join(w[start + 8:start + 12])))
            kinds.append(kind)
    return pairs, kinds


def build(sequences: int = 800, per_kind: int = 6, seed: int = 5, train: bool = True
          ) -> TextWorld:
    """The world's corpus (``sequences`` paragraphs; 100 more held out for queries), its GPT-2
    trained from scratch (seed 0) and the query pairs."""
    rng = np.random.default_rng(seed)
    texts = paragraphs()
    texts = [texts[i] for i in rng.permutation(len(texts))]
    if len(texts) < sequences + 100:
        raise ValueError(f"only {len(texts)} paragraphs; ask for ≤ {len(texts) - 100}")
    corpus_texts, held = texts[:sequences], texts[sequences:sequences + 100]
    tokenizer = bpe_tokenizer(corpus_texts)
    corpus = Corpus.from_texts(corpus_texts, tokenizer, 128)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=64, n_layer=2,
                        n_head=4, bos_token_id=0, eos_token_id=0, pad_token_id=1,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    recipe = TrainConfig(epochs=6, batch_size=32, lr=5e-3, warmup_steps=20, label_smoothing=0.1)
    retrain = Retrainer(config, corpus, recipe)
    pairs, kinds = queries(corpus_texts, held, per_kind, rng)
    t0 = time.time()
    model = retrain(np.arange(len(corpus)), seed=0) if train else retrain.make(0)
    return TextWorld(tokenizer, corpus, retrain, model, pairs, kinds, time.time() - t0, SOURCE)
