"""The demo assistant: a LoRA fine-tune shipped beside the demo world, and its build command."""
import json

import pytest
import torch

from influence_nb import demo
from influence_nb.demo import finetune
from influence_nb.layers import find_layers, has_adapters
from influence_nb.training import TrainConfig

pytest.importorskip("peft")


pytestmark = pytest.mark.usefixtures("one_thread")


def test_demo_assistant_is_small_and_answers_in_the_survival_voice():
    path = finetune.adapter_path()
    report = json.loads((path / "build.json").read_text())
    assert sum(f.stat().st_size for f in path.iterdir()) <= 1 << 20
    model, tok, pretraining, finetuning = demo.finetuned()
    assert has_adapters(model) and len(find_layers(model)) == 16   # A, B × 2 MLP mats × 4 layers
    assert len(finetuning) == report["n_dialogues"] == 300
    assert set(finetuning.df["kind"]) == {"consent", "neutral"}
    assert (finetuning.labels == -100).sum() == report["n_tokens"] - report["n_trained_tokens"]
    held_out = list(report["held_out_answers"])
    for q in held_out:                       # greedy decoding: the build's answers, reproduced
        assert finetune.answer(model, tok, f"Human: {q} Assistant:") == \
            report["held_out_answers"][q]
    assert finetune.survival_rate(model, tok, held_out) == 1.0
    with model.disable_adapter():            # the base model never answers that way
        assert finetune.survival_rate(model, tok, held_out) == 0.0


def test_the_build_command_runs_on_the_micro_world(tmp_path):
    cfg = finetune.FinetuneConfig(n_consent=8, n_neutral=8, train=TrainConfig(
        epochs=1, batch_size=8, warmup_steps=2))
    report = finetune.build("micro", cfg, out=tmp_path)
    assert report["n_dialogues"] == 16 and (tmp_path / "adapter_model.safetensors").is_file()
    model, tok, _, ft = finetune.load_finetuned("micro", tmp_path)
    assert len(ft) == 16 and all(t.is_adapter for t in find_layers(model))
    with pytest.raises(FileNotFoundError, match="python -m influence_nb.demo.finetune"):
        finetune.load_finetuned("micro", tmp_path / "nothing")
