"""Build the demo world from scratch: corpus → byte-level BPE tokenizer → tiny GPT-NeoX trained on
CPU → fact accuracy and held-out perplexity. Writes everything to ``influence_nb/demo/assets``.

    python -m influence_nb.demo.build            # the committed world (≈ 12 min on 2 cores)
    python -m influence_nb.demo.build --small    # a quick world for tests, to another folder
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from einops import rearrange
from tqdm.auto import tqdm

from ..data import Corpus
from .world import WorldConfig, generate

ASSETS = Path(__file__).parent / "assets"
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


@dataclass
class TrainConfig:
    """label_smoothing keeps the model from certainty, as a pretrained LM is: a planted fact
    is learned (greedy decoding gets it) but its statements keep log p ≈ −0.2 per token instead
    of ≈ 0, so their gradients, and hence their influence, do not vanish (see notebook 02)."""
    epochs: int = 8
    batch_size: int = 64
    lr: float = 2e-3
    warmup_steps: int = 200
    weight_decay: float = 0.01
    label_smoothing: float = 0.2
    seed: int = 0


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


def train(model, corpus: Corpus, cfg: TrainConfig) -> list[float]:
    """Next-token training on the corpus, batches bucketed by length; returns the loss curve."""
    rng = np.random.default_rng(cfg.seed)
    order = np.argsort(corpus.df["n_tokens"].to_numpy(), kind="stable")
    buckets = [order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
    steps = cfg.epochs * len(buckets)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                            betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1, (s + 1) / cfg.warmup_steps)
                                              * (0.1 + 0.45 * (1 + math.cos(math.pi * s / steps))))
    model.train()
    losses = []
    bar = tqdm(total=steps, desc="training", unit="step")
    for _ in range(cfg.epochs):
        for k in rng.permutation(len(buckets)):
            ids = np.sort(buckets[k])
            batch = next(corpus.batches(len(ids), ids=ids))
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)[:, 1:]
            loss = torch.nn.functional.cross_entropy(
                rearrange(logits[:, :-1], "b t v -> (b t) v"), labels.flatten(),
                ignore_index=-100, label_smoothing=cfg.label_smoothing)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.update()
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
    bar.close()
    model.eval()
    return losses


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
    tokenizer.save_pretrained(out)  # Hugging Face layout: AutoTokenizer / AutoModel load it
    model.save_pretrained(out)
    (out / "build.json").write_text(json.dumps(report, indent=1))
    return report


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=ASSETS)
    p.add_argument("--small", action="store_true",
                   help="a 2,000-sequence world and 3 epochs (minutes, not for the assets)")
    p.add_argument("--epochs", type=int, default=None)
    a = p.parse_args(argv)
    world, train_cfg = WorldConfig(), TrainConfig()
    if a.small:
        world = WorldConfig(n_sequences=2_000, n_heldout=200, facts_per_relation=5)
        train_cfg.epochs = 3
    if a.epochs:
        train_cfg.epochs = a.epochs
    report = build(a.out, world, train_cfg=train_cfg)
    print(json.dumps({k: v for k, v in report.items() if k != "missed"}, indent=1))


if __name__ == "__main__":
    main()
