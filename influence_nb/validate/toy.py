"""The tiny problem every exact check runs on: a small GPT-2 and a Markov-chain corpus, small
enough for dense P × P matrices and many L-BFGS solves."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..checks import checked


@checked(minimum={"n_sequences": 16, "train_steps": 0, "seed": 0, "n_queries": 1})
def toy_problem(n_sequences: int = 2048, train_steps: int = 0, seed: int = 0,
                dtype: torch.dtype = torch.float64, n_queries: int = 12
                ) -> tuple[nn.Module, list[dict], list[list[int]], list[list[int]]]:
    """A tiny GPT-2 (d=8, 2 layers, ~1.3k parameters in its MLPs) and a Markov-chain corpus.

    -> (model, batches of 16 right-padded sequences of 6-12 tokens, prompts, completions);
    ``train_steps`` of Adam on the chain first (0: random initialisation). For validation.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    V, T = 24, 12
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=16, n_embd=8, n_inner=16,
                                       n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    transition = torch.softmax(3 * torch.randn(V, V), dim=-1)     # (V, V) peaked next-token law
    gen = torch.Generator().manual_seed(seed + 1)

    def chain(n: int, t: int) -> Tensor:                             # (n, t) token ids
        x = torch.zeros(n, t, dtype=torch.long)
        x[:, 0] = torch.randint(V, (n,), generator=gen)
        for k in range(1, t):
            x[:, k] = torch.multinomial(transition[x[:, k - 1]], 1, generator=gen)[:, 0]
        return x

    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(train_steps):
        x = chain(32, T)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    model = model.to(dtype).eval()
    batches = []
    for _ in range(n_sequences // 16):
        x = chain(16, T)
        lengths = torch.randint(T // 2, T + 1, (16, 1), generator=gen)
        mask = (torch.arange(T) < lengths).long()
        batches.append({"input_ids": x * mask, "attention_mask": mask})
    q = chain(n_queries, 8)
    return model, batches, q[:, :5].tolist(), q[:, 5:].tolist()
