"""A world of short memorised facts, built apart from the demo generator and the Markov world:
where an LLM's facts live (short statements learned to near-certainty), and where a single
Fisher draw per token and per-query work weigh most.

400 invented people, each with three of eight relations (home town, trade, pet, ...) drawn from
small invented answer sets; every fact is stated in one to three sentences of different
templates (the first always among them; the subject first, its object last), some sentences state two facts of one person,
and a quarter are fillers that state none. 3,150 sentences of 6–19 BPE tokens (a byte-level BPE
of 1,200 tokens trained on them), a 2-layer GPT-NeoX (d 128) trained from scratch *without*
label smoothing until its facts are near-certain (the query completions' mean log p is printed
by ``python benchmarks/memorized_world.py``). Queries: a fact's first template up to its
object, completion the object; ``states[q]`` marks the sentences that state query q's fact.

The trained model is cached under ``cache_dir()`` keyed by the recipe.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from transformers import GPTNeoXConfig

from influence_nb.data import Corpus
from influence_nb.store import cache_dir
from influence_nb.training import Retrainer, TrainConfig

SYLLABLES = ("ka ro mi tel van zu dor ple sho gri nax ul bre fen lio mor qua sti tam ve "
             "hul rik osk pan dre win yel cas jor neb").split()
# relation: (templates with {s} subject and {o} object, object first-letter seed, answers)
RELATIONS = {
    "home": ("{s} lives in {o}.", "{s} makes a home in {o}.", "The town of {s} is {o}."),
    "trade": ("{s} works as a {o}.", "By trade {s} is a {o}.", "{s} earns a living as a {o}."),
    "pet": ("{s} keeps a {o}.", "At home {s} feeds a {o}.", "The pet of {s} is a {o}."),
    "food": ("{s} loves eating {o}.", "Each morning {s} eats {o}.", "The meal {s} likes is {o}."),
    "tool": ("{s} always carries a {o}.", "In the bag of {s} is a {o}.", "{s} owns a {o}."),
    "song": ("{s} sings the song {o}.", "The song {s} hums is {o}.", "{s} often whistles {o}."),
    "color": ("{s} wears {o} clothes.", "The coat of {s} is {o}.", "{s} paints doors {o}."),
    "river": ("{s} swims in the {o} river.", "{s} fishes the {o} river.",
              "Near {s} flows the {o} river."),
}
FILLERS = ("{s} said hello to {t} yesterday.", "{s} and {t} walked along the road.",
           "Nobody knows where {s} went.", "{s} waited a long time for {t}.",
           "It rained while {s} slept.", "{s} wrote a letter to {t}.")
PEOPLE, ANSWERS, PER_PERSON = 400, 24, 3


@dataclass
class MemorizedWorld:
    tokenizer: Any
    corpus: Corpus
    retrain: Retrainer
    model: Any
    pairs: list[tuple[str, str]]          # (prompt, completion) per query
    states: list[np.ndarray]              # (N,) bool per query: the sentences stating its fact
    train_seconds: float


def word(rng: np.random.Generator, k: int) -> str:
    return "".join(rng.choice(SYLLABLES, k))


def sentences(rng: np.random.Generator, n: int) -> tuple[list[str], list[list[int]],
                                                          list[tuple[str, str, str, int]]]:
    """n sentences, the facts each states (indices into ``facts``) and the facts
    (relation, subject, object, how many sentences state it)."""
    names = list(dict.fromkeys(word(rng, 2).capitalize() for _ in range(4 * PEOPLE)))[:PEOPLE]
    answers = {r: list(dict.fromkeys(word(rng, int(rng.integers(1, 3)))
                                     for _ in range(4 * ANSWERS)))[:ANSWERS] for r in RELATIONS}
    facts = [(r, s, answers[r][int(rng.integers(ANSWERS))])
             for s in names for r in rng.choice(list(RELATIONS), PER_PERSON, replace=False)]
    texts, states = [], []
    for i, (r, s, o) in enumerate(facts):   # 1-3 statements of every fact, the first template's
        extra = rng.choice([1, 2], int(rng.choice(3, p=[0.5, 0.35, 0.15])), replace=False)
        for t in [0, *extra]:
            texts.append(RELATIONS[r][t].format(s=s, o=o))
            states.append([i])
    by_person = {s: [i for i, f in enumerate(facts) if f[1] == s] for s in names}
    while len(texts) < n * 3 // 4:                            # two facts of one person
        i, j = rng.choice(by_person[names[int(rng.integers(PEOPLE))]], 2, replace=False)
        (r, s, o), (r2, _, o2) = facts[i], facts[j]
        tail = RELATIONS[r2][0].format(s="", o=o2).strip()
        texts.append(RELATIONS[r][0].format(s=s, o=o)[:-1] + " and " + tail)
        states.append([i, j])
    while len(texts) < n:                                     # fillers: no fact
        s, t = rng.choice(names, 2, replace=False)
        texts.append(FILLERS[int(rng.integers(len(FILLERS)))].format(s=s, t=t))
        states.append([])
    order = rng.permutation(len(texts))[:n]
    counts = np.bincount([i for k in order for i in states[k]], minlength=len(facts))
    return ([texts[k] for k in order], [states[k] for k in order],
            [(r, s, o, int(c)) for (r, s, o), c in zip(facts, counts)])


def bpe(texts: list[str], vocab: int = 1200) -> Any:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(texts, vocab_size=vocab, min_frequency=2,
                            special_tokens=["<|endoftext|>", "<|pad|>"], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", pad_token="<|pad|>")


RECIPE = TrainConfig(epochs=80, batch_size=32, lr=4e-3, warmup_steps=100, label_smoothing=0.0)


def build(n: int = 3150, queries: int = 200, seed: int = 5, width: int = 128,
          train: bool = True, cache: bool = True) -> MemorizedWorld:
    """The world's corpus and queries, its model (d = ``width``, MLP 4·width) trained from
    scratch (seed 0; cached under ``cache_dir()`` unless ``cache=False``; ``train=False``:
    untrained)."""
    rng = np.random.default_rng(seed)
    texts, stated, facts = sentences(rng, n)
    tokenizer = bpe(texts)
    corpus = Corpus.from_texts(texts, tokenizer, 32)
    config = GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=width, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=4 * width,
                           max_position_embeddings=32, rotary_pct=0.5,
                           bos_token_id=0, eos_token_id=0, pad_token_id=1,
                           tie_word_embeddings=False)
    retrain = Retrainer(config, corpus, RECIPE)
    stated_facts = [i for i, f in enumerate(facts) if f[3] > 0]
    picked = np.random.default_rng(seed + 1).choice(stated_facts, queries, replace=False)
    pairs, states = [], []
    for i in picked:
        r, s, o, _ = facts[i]
        head, tail = RELATIONS[r][0].split("{o}")
        pairs.append((head.format(s=s).rstrip(), " " + o + tail))
        states.append(np.array([i in st for st in stated]))
    key = hashlib.sha256(json.dumps([retrain.fingerprint, asdict(RECIPE)]).encode())
    path = cache_dir() / f"world-memorized-{key.hexdigest()[:12]}" / "model.pt"
    t0 = time.time()
    if not train:
        model = retrain.make(0)
    elif cache and path.exists():
        model = retrain.make(0)
        model.load_state_dict(torch.load(path))
    else:
        model = retrain(np.arange(len(corpus)), seed=0)
        if cache:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), path)
    return MemorizedWorld(tokenizer, corpus, retrain, model.eval(), pairs, states,
                          time.time() - t0)


def main() -> None:
    from common import report, set_threads
    set_threads(1)
    w = build()
    n_tokens = w.corpus.df["n_tokens"].to_numpy()
    report(dict(sequences=len(w.corpus), tokens_mean=round(float(n_tokens.mean()), 2),
                tokens_max=int(n_tokens.max()), vocab=len(w.tokenizer),
                parameters=sum(p.numel() for p in w.model.parameters()),
                train_seconds=round(w.train_seconds, 1), queries=len(w.pairs),
                statements_per_query=float(np.mean([s.sum() for s in w.states])),
                query_logp=round(float(np.mean(completion_logp(w))), 3)))


@torch.no_grad()
def completion_logp(w: MemorizedWorld) -> np.ndarray:
    """(Q,) log p of each query's completion given its prompt, nats."""
    out = []
    for prompt, completion in w.pairs:
        p = w.tokenizer(prompt)["input_ids"]
        c = w.tokenizer(completion, add_special_tokens=False)["input_ids"]
        logits = w.model(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1:-1]
        out.append(float(logits.log_softmax(-1)[torch.arange(len(c)), c].sum()))
    return np.array(out)


if __name__ == "__main__":
    main()
