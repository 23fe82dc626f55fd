"""Exact influence by replay (influence_nb.validate.replay) on a tiny GPT-NeoX (≈ 7k parameters)
trained for a few steps in float64: recording leaves training as it was, and the replayed
d f / d w_i equal central finite differences of retraining with sequence i reweighted."""
import copy
import math

import numpy as np
import pytest
import torch

from influence_nb import demo
from influence_nb.demo.build import ModelConfig, make_model
from influence_nb.task import measure
from influence_nb.training import TrainConfig, TrainRecord, batch_plan, train
from influence_nb.validate.replay import replay_influence

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = TrainConfig(epochs=2, batch_size=6, lr=2e-2, warmup_steps=2)   # 4 batches, 8 steps


@pytest.fixture(scope="module")
def tiny():
    """(fresh float64 model, corpus of 24 short sequences, prompts, completions)."""
    _, tokenizer, corpus = demo.load("micro")
    short = np.argsort(corpus.df["n_tokens"].to_numpy(), kind="stable")[:24]
    corpus = corpus.subset(short)
    model = make_model(ModelConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=16, vocab_size=len(tokenizer),
                                   max_position_embeddings=64)).double()
    rows = [corpus.token_ids(i).tolist() for i in (3, 17)]
    return model, corpus, [r[:4] for r in rows], [r[4:7] for r in rows]


def trained(tiny, optimizer="adamw", weights=None, record=None):
    model, corpus, prompts, completions = tiny
    model = copy.deepcopy(model)
    losses = train(model, corpus, CFG, progress=False, weights=weights, record=record,
                   optimizer=optimizer)
    return model, losses


def test_recording_leaves_training_bit_identical(tiny):
    model, losses = trained(tiny)
    run = TrainRecord(every=3)
    recorded, recorded_losses = trained(tiny, record=run)
    assert recorded_losses == losses
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), recorded.parameters()))
    assert sorted(run.checkpoints) == [0, 3, 6, 8] and len(run.batches) == len(run.lrs) == 8
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), run.checkpoints[8].theta))
    weighted, weighted_losses = trained(tiny, weights=np.ones(24))     # the same, up to rounding
    np.testing.assert_allclose(weighted_losses, losses, rtol=1e-12)


def torch_optim_loop(model, corpus, cfg):
    """The loop ``train`` replaced: torch.optim.AdamW, clip_grad_norm_ and LambdaLR."""
    plan = batch_plan(corpus, cfg, np.arange(len(corpus)))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                            betas=(0.9, 0.98))
    steps = len(plan)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1, (s + 1) / cfg.warmup_steps)
                                              * (0.1 + 0.45 * (1 + math.cos(math.pi * s / steps))))
    model.train()
    losses = []
    for ids in plan:
        batch = next(corpus.batches(len(ids), ids=ids))
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)[:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100,
            label_smoothing=cfg.label_smoothing)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_train_is_the_torch_optim_loop_bit_for_bit(tiny):
    """float32, as the worlds train: the out-of-place step repeats torch.optim's arithmetic."""
    model, corpus, _, _ = tiny
    ours, theirs = copy.deepcopy(model).float(), copy.deepcopy(model).float()
    assert train(ours, corpus, CFG, progress=False) == torch_optim_loop(theirs, corpus, CFG)
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), theirs.parameters()))


def finite_differences(tiny, optimizer, ids, eps=1e-6):
    """(Q, len(ids)) (f(w_i = 1 + ε) − f(w_i = 1 − ε)) / 2ε by retraining."""
    _, _, prompts, completions = tiny
    out = []
    for i in ids:
        f = []
        for sign in (1, -1):
            w = np.ones(24)
            w[i] += sign * eps
            f.append(measure(trained(tiny, optimizer, w)[0], prompts, completions))
        out.append((f[0] - f[1]) / (2 * eps))
    return np.stack(out, axis=1)


@pytest.mark.parametrize("optimizer, tolerance", [("sgd", 1e-3), ("adamw", 1e-2)])
def test_replay_equals_finite_differences(tiny, optimizer, tolerance):
    _, corpus, prompts, completions = tiny
    run = TrainRecord(every=3)
    model, _ = trained(tiny, optimizer, record=run)
    scores = replay_influence(model, corpus, run, prompts, completions, progress=False,
                              floor=0.0)
    ids = [0, 3, 11, 17, 23]
    fd = finite_differences(tiny, optimizer, ids)
    error = np.linalg.norm(scores[:, ids] - fd) / np.linalg.norm(fd)
    assert error <= tolerance, (error, scores[:, ids], fd)


def test_the_floor_predicts_a_removal_where_the_exact_derivative_does_not(tiny):
    """Adam's step g/(√v̂ + ε) is steep where √v̂ is near 0: the exact derivative follows that
    slope, which holds for changes of g far below ε only; held constant (the default floor),
    the replay predicts what dropping a sequence does."""
    model, corpus, prompts, completions = tiny
    run = TrainRecord(every=3)
    trained_model, _ = trained(tiny, record=run)
    ids = [0, 3, 11, 17, 23]
    f = measure(trained_model, prompts, completions)
    removal = []
    for i in ids:
        w = np.ones(24)
        w[i] = 0.0
        removal.append(f - measure(trained(tiny, weights=w)[0], prompts, completions))
    removal = np.stack(removal, axis=1)
    error = {floor: np.linalg.norm(replay_influence(trained_model, corpus, run, prompts,
                                                    completions, progress=False,
                                                    floor=floor)[:, ids] - removal)
             / np.linalg.norm(removal) for floor in (0.0, 1e-5)}
    assert error[1e-5] < 0.5 < 1.5 < error[0.0], error


def test_the_checkpoint_interval_does_not_change_the_result(tiny):
    _, corpus, prompts, completions = tiny
    results = []
    for every in (1, 3, 8):
        run = TrainRecord(every=every)
        model, _ = trained(tiny, record=run)
        results.append(replay_influence(model, corpus, run, prompts, completions,
                                        progress=False))
    assert np.abs(results[0]).max() > 0
    for r in results[1:]:
        np.testing.assert_allclose(r, results[0], rtol=1e-10, atol=1e-14)


def test_replay_refuses_another_model_and_an_unfinished_record(tiny):
    _, corpus, prompts, completions = tiny
    run = TrainRecord(every=4)
    model, _ = trained(tiny, record=run)
    with pytest.raises(ValueError, match="not at the record's final state"):
        replay_influence(copy.deepcopy(tiny[0]), corpus, run, prompts, completions,
                         progress=False)
    with pytest.raises(ValueError, match="no finished run"):
        replay_influence(model, corpus, TrainRecord(), prompts, completions, progress=False)
    with pytest.raises(ValueError, match="floor"):
        replay_influence(model, corpus, run, prompts, completions, progress=False, floor=-1e-5)
