"""Hugging Face Trainer: the callback's factors equal a separate fit on the same data and
collator; tokenized datasets (labels included) are corpora; a session opens on the Trainer."""
import datasets
import numpy as np
import pytest
import torch
from transformers import (AutoModelForCausalLM, DataCollatorForLanguageModeling, Trainer,
                          TrainingArguments)

from influence_nb.curvature import FactorArgs, Factors, fit_factors
from influence_nb.layers import find_layers
from influence_nb.queries import sequence_gradients
from influence_nb.data import Corpus
from influence_nb.session import Influence
from influence_nb.task import Task
from influence_nb.trainer import CollatedDataset, InfluenceCallback, describe, factors_path

from test_scoring import TEXTS, tiny_model

ARGS = FactorArgs(batch_size=5, progress=False)


def identical(a: Factors, b: Factors) -> None:
    assert a.shapes == b.shapes and (a.n_examples, a.n_tokens) == (b.n_examples, b.n_tokens)
    assert a.model_fingerprint == b.model_fingerprint
    for name in a.shapes:
        fa, fb = a.layers[name], b.layers[name]
        for x, y in zip([*fa.Q_A, *fa.Q_S, fa.lambda_A, fa.lambda_S, fa.Lambda],
                        [*fb.Q_A, *fb.Q_S, fb.lambda_A, fb.lambda_S, fb.Lambda]):
            assert torch.equal(x, y)


@pytest.fixture(scope="module")
def trained(tokenizer, tmp_path_factory):
    """A tiny GPT-NeoX trained 4 steps by the Trainer, with the callback at step 2 and at the
    end; rows of varying length (the collator pads them and masks the padding in labels)."""
    out = tmp_path_factory.mktemp("trainer")
    ds = datasets.Dataset.from_dict({"input_ids": [tokenizer(t)["input_ids"] for t in TEXTS],
                                     "topic": [t.split()[0] for t in TEXTS]})
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    callback = InfluenceCallback(ARGS, steps=[2])
    trainer = _trainer(tokenizer, out, ds, collator, callback)
    trainer.train()
    return trainer, callback, ds, collator


def _trainer(tokenizer, out, ds, collator, callback):
    """4 steps of 4 rows, a checkpoint every 2 steps."""
    return Trainer(tiny_model(len(tokenizer), torch.float32), TrainingArguments(
        output_dir=str(out), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
        save_strategy="steps", save_steps=2, report_to=[], use_cpu=True, seed=0,
        disable_tqdm=True, logging_strategy="no", remove_unused_columns=True),
        train_dataset=ds, data_collator=collator, processing_class=tokenizer,
        callbacks=[callback])


def test_a_collator_that_rewrites_the_rows_and_steps_between_saves(trained, tmp_path):
    """The callback's factors of truncated rows never pair with the untruncated corpus; a
    step between two saves still gets its checkpoint and factors; a step past the end is
    refused before training."""
    trainer, _, ds, collator = trained
    tokenizer = trainer.processing_class

    def truncating(rows):
        return collator([{"input_ids": r["input_ids"][:4]} for r in rows])

    callback = InfluenceCallback(ARGS, steps=[3])
    cut = _trainer(tokenizer, tmp_path / "a", ds, truncating, callback)
    cut.train()
    assert sorted(callback.saved) == [3, 4]
    with pytest.raises(ValueError, match="the Trainer's collator hands the model other tokens "
                                         "than its train_dataset holds"):
        Influence.from_trainer(cut)
    with pytest.raises(ValueError, match="asks for step 9, but the training ends at step 4"):
        _trainer(tokenizer, tmp_path / "b", ds, collator, InfluenceCallback(ARGS, steps=[9]),
                 ).train()
    note = factors_path(trainer) / "callback.json"
    good = note.read_text()
    note.write_text(good.replace('"global_step": 4', '"global_step": 3'))
    with pytest.raises(ValueError, match="callback.json fails its seal"):
        describe(factors_path(trainer))
    note.write_text(good)


def test_callback_factors_equal_a_separate_fit(trained):
    trainer, callback, ds, collator = trained
    assert sorted(callback.saved) == [2, 4]
    end = Factors.load(factors_path(trainer), trainer.model)
    assert describe(factors_path(trainer))["global_step"] == 4
    # the Trainer removed the unused "topic" column; the collator pads and labels
    separate = fit_factors(trainer.model, CollatedDataset(ds.remove_columns("topic"), collator),
                           ARGS)
    identical(end, separate)
    assert end.n_examples == len(TEXTS)
    # the step-2 checkpoint's factors are those of the checkpoint's weights
    ckpt = AutoModelForCausalLM.from_pretrained(factors_path(trainer, 2).parent).eval()
    at_2 = Factors.load(factors_path(trainer, 2), ckpt)
    identical(at_2, fit_factors(ckpt, CollatedDataset(ds.remove_columns("topic"), collator),
                                ARGS))
    assert at_2.model_fingerprint != end.model_fingerprint
    with pytest.raises(ValueError, match="different model"):
        Factors.load(factors_path(trainer, 2), trainer.model)


def test_session_from_trainer(trained):
    trainer, *_ = trained
    inf = Influence.from_trainer(trainer)
    assert inf.factors is not None and len(inf.corpus) == len(TEXTS)
    assert inf.corpus.df["topic"].tolist() == [t.split()[0] for t in TEXTS]
    res = inf.scan([("alpha number", " 0 is even.")])
    assert res.top(0, 3)["text"].str.contains("number").all()
    with pytest.raises(FileNotFoundError, match=r"InfluenceCallback\(steps=\[3\]\)"):
        Influence.from_trainer(trainer, step=3)


def test_tokenized_corpus_trains_on_the_labels(tokenizer):
    """A tokenized dataset with masked prompts (labels -100) is a corpus whose training loss is
    the Trainer's: Σ over labelled tokens = HF's mean loss × their number."""
    model = tiny_model(len(tokenizer))
    rows = []
    for text in TEXTS[:6]:
        ids = tokenizer(text)["input_ids"]
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids),
                     "labels": [-100] * 3 + ids[3:]})
    corpus = Corpus.from_tokenized(datasets.Dataset.from_list(rows), tokenizer)
    assert corpus.labels is not None and corpus.text(0) == tokenizer.decode(rows[0]["input_ids"])
    batch = next(corpus.batches(6))
    with torch.no_grad():
        ours = Task().training_loss(model(input_ids=batch.input_ids,
                                          attention_mask=batch.attention_mask).logits, batch)
        for b, row in enumerate(rows):
            ids = torch.tensor([row["input_ids"]])
            hf = model(input_ids=ids, labels=torch.tensor([row["labels"]])).loss  # float32 sum
            n = len(row["input_ids"]) - 3                 # labelled tokens that are predicted
            np.testing.assert_allclose(float(ours[b]), float(hf) * n, rtol=1e-6)
        all_tokens = Task().training_loss(model(input_ids=batch.input_ids).logits,
                                          {"input_ids": batch.input_ids,
                                           "attention_mask": batch.attention_mask})
    assert (all_tokens > ours + 1).all()                  # the masked prompt is left out
    # the captured per-sequence gradients are autograd's, prompt positions included: their
    # labels are -100 but the answer attends to them
    layers = find_layers(model, "all")
    DW, _ = sequence_gradients(model, batch, layers, "loglik")
    params = [p for layer in layers for p in layer.parameters()]
    for b in range(len(rows)):
        loglik = -Task().training_loss(model(input_ids=batch.input_ids,
                                             attention_mask=batch.attention_mask).logits, batch)
        grads = iter(torch.autograd.grad(loglik[b], params))
        for layer in layers:
            expected = layer.as_matrix([next(grads) for _ in layer.parameters()])
            torch.testing.assert_close(DW[layer.name][b], expected, rtol=1e-9, atol=1e-12)
    plain = Corpus.from_tokenized([{"input_ids": r["input_ids"]} for r in rows], tokenizer)
    assert plain.labels is None and plain.fingerprint != corpus.fingerprint
    assert corpus.subset([1, 2]).token_labels(0).tolist() == rows[1]["labels"]
    with pytest.raises(ValueError, match="no input_ids column.*from_dataset"):
        Corpus.from_tokenized(datasets.Dataset.from_dict({"text": ["a b"]}), tokenizer)


def test_callback_on_a_lora_model_fits_the_adapters(tokenizer, tmp_path):
    """The usual fine-tune: a peft LoRA model under the Trainer. The callback's default preset
    tracks the adapters, and its factors equal a separate fit on the same rows and collator."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_model(len(tokenizer), torch.float32), peft.LoraConfig(
        r=4, target_modules=["dense_h_to_4h", "dense_4h_to_h"], lora_dropout=0.1))
    ds = datasets.Dataset.from_dict({"input_ids": [tokenizer(t)["input_ids"] for t in TEXTS]})
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    trainer = Trainer(model, TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=8, learning_rate=1e-2,
        save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
        logging_strategy="no"), train_dataset=ds, data_collator=collator,
        processing_class=tokenizer, callbacks=[InfluenceCallback(ARGS)])
    trainer.train()
    factors = Factors.load(factors_path(trainer), trainer.model)
    assert len(factors.shapes) == 8 and all(".lora_" in n for n in factors.shapes)
    identical(factors, fit_factors(trainer.model, CollatedDataset(ds, collator), ARGS))
    inf = Influence.from_trainer(trainer)
    assert np.isfinite(inf.scan([("alpha number", " 0 is even.")]).scores).all()
