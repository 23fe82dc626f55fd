"""Ensembles of influence scores (influence_nb.validate.ensemble) on a tiny GPT-NeoX trained a few
steps: an ensemble of one is its member's scores, the average is linear in the members' scores,
and a trajectory's members are the recorded run's checkpoints (the last the trained model)."""
import copy

import numpy as np
import pytest
import torch

from influence_nb import demo
from influence_nb.curvature import FactorArgs
from influence_nb.demo.build import ModelConfig, make_model
from influence_nb.scoring import ScoreArgs
from influence_nb.session import Influence
from influence_nb.training import TrainConfig, TrainRecord, train
from influence_nb.validate import checkpoint_models, ensemble_scores

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world():
    """(model trained 9 steps, its TrainRecord every 4 steps, tokenizer, 30-sequence corpus)."""
    _, tokenizer, corpus = demo.load("micro")
    corpus = corpus.subset(np.arange(30))
    model = make_model(ModelConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=32, vocab_size=len(tokenizer),
                                   max_position_embeddings=128))
    run = TrainRecord(every=4)
    train(model, corpus, TrainConfig(epochs=3, batch_size=10, lr=1e-2, warmup_steps=2),
          progress=False, record=run)
    return model, run, tokenizer, corpus


def scorer(world):
    _, _, tokenizer, corpus = world
    pairs = [("The capital of", " Velnor"), ("2 + 2 =", " 4")]

    def score(member):
        inf = Influence(member, tokenizer, corpus, score_args=ScoreArgs(progress=False))
        inf.fit(FactorArgs(progress=False))
        return inf.strategy_scores(pairs, baselines=False)
    return score


def test_trajectory_members_are_the_recorded_checkpoints(world):
    model, run, _, _ = world
    assert sorted(run.checkpoints) == [0, 4, 8, 9]
    members = checkpoint_models(model, run, 2)            # fractions 1/2 and 1: steps 4 and 9
    assert [m.step for m in members] == [4, 9]
    for member, step in zip(members, (4, 9)):
        assert all(torch.equal(p, t) for p, t in zip(member.parameters(),
                                                      run.checkpoints[step].theta))
    assert all(torch.equal(p, q) for p, q in zip(members[-1].parameters(), model.parameters()))
    assert [m.step for m in checkpoint_models(model, run, 9)] == [0, 4, 8, 9]   # each once
    with pytest.raises(ValueError, match="no finished run"):
        checkpoint_models(model, TrainRecord(), 2)


def test_an_ensemble_of_one_is_its_member_and_the_mean_is_linear(world):
    model, run, _, _ = world
    score = scorer(world)
    single = score(model)
    np.testing.assert_array_equal(ensemble_scores([model], score)["ekfac"], single["ekfac"])
    early = checkpoint_models(model, run, 2)[0]
    pair = ensemble_scores([early, model], score)
    for name in ("ekfac", "kfac", "identity"):
        np.testing.assert_allclose(pair[name], (score(early)[name] + single[name]) / 2,
                                   rtol=1e-12, atol=0)
    twice = ensemble_scores([model, copy.deepcopy(model)], score)   # same weights: same mean
    np.testing.assert_allclose(twice["ekfac"], single["ekfac"], rtol=1e-12)
    with pytest.raises(ValueError, match="no members"):
        ensemble_scores([], score)
