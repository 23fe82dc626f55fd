"""Corpus: building from every source, chunking, batching, and clear errors."""
import json

import numpy as np
import pandas as pd
import pytest

from influence_nb.data import Corpus, CorpusError


def test_tokenizer_round_trip(world):
    _, tok, corpus = world
    for i in range(0, len(corpus), 997):
        text = corpus.text(i)
        assert tok.decode(tok(text)["input_ids"]) == text
        assert tok(text)["input_ids"] == corpus.token_ids(i).tolist()


def test_metadata_round_trip(world):
    _, _, corpus = world
    src = pd.read_parquet(__import__("influence_nb.demo", fromlist=["ASSETS"]).ASSETS
                          / "corpus.parquet")
    assert len(corpus) == len(src)
    for i in (0, 123, len(src) - 1):
        for col in ("kind", "theme", "lang"):
            assert corpus.df.at[i, col] == src.at[i, col]
        assert list(corpus.df.at[i, "fact_ids"]) == list(src.at[i, "fact_ids"])
        assert corpus.text(i) == src.at[i, "text"]


def test_long_document_is_chunked_with_ids_and_offsets(tokenizer):
    long = " ".join(f"word{i} is here." for i in range(200))
    corpus = Corpus.from_texts(["short one.", long, "another."], tokenizer, max_len=32,
                               metadata=[{"src": "a"}, {"src": "b"}, {"src": "c"}])
    ids = tokenizer(long)["input_ids"]
    chunks = corpus.df[corpus.df["doc"] == 1]
    assert len(chunks) == -(-len(ids) // 32)
    assert list(chunks["offset"]) == list(range(0, len(ids), 32))
    assert (chunks["src"] == "b").all()
    rebuilt = np.concatenate([corpus.token_ids(i) for i in chunks.index])
    assert rebuilt.tolist() == ids
    assert "".join(corpus.text(i) for i in chunks.index) == long
    assert list(corpus.df.index) == list(range(len(corpus)))  # stable ids: the rows
    assert corpus.df.loc[len(corpus) - 1, "doc"] == 2


def test_jsonl_larger_than_a_batch_streams_every_sequence_once(tmp_path, tokenizer):
    texts = [f"Line {i}: " + "ab " * (i % 13) for i in range(150)]
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps({"body": t, "n": i}) for i, t in enumerate(texts)))
    corpus = Corpus.from_file(path, tokenizer, max_len=64, text_field="body")
    seen = []
    for b in corpus.batches(batch_size=16):
        assert b.input_ids.shape == b.attention_mask.shape and b.input_ids.shape[0] <= 16
        for row, i in enumerate(b.ids):
            n = int(b.attention_mask[row].sum())
            assert b.attention_mask[row, :n].all() and not b.attention_mask[row, n:].any()
            assert b.input_ids[row, :n].tolist() == tokenizer(texts[i])["input_ids"]
        seen.extend(b.ids.tolist())
    assert seen == list(range(150))
    assert corpus.df["n"].tolist() == list(range(150))


def test_txt_parquet_dataset_and_list_agree(tmp_path, tokenizer):
    texts = ["alpha beta.", "gamma delta epsilon.", "zeta."]
    (tmp_path / "c.txt").write_text("\n".join(texts) + "\n\n")
    pd.DataFrame({"text": texts}).to_parquet(tmp_path / "c.parquet")
    import datasets
    ds = datasets.Dataset.from_dict({"text": texts})
    fps = {Corpus.from_texts(texts, tokenizer).fingerprint,
           Corpus.from_file(tmp_path / "c.txt", tokenizer).fingerprint,
           Corpus.from_file(tmp_path / "c.parquet", tokenizer).fingerprint,
           Corpus.from_dataset(ds, tokenizer).fingerprint}
    assert len(fps) == 1
    assert Corpus.from_texts(texts[:2], tokenizer).fingerprint not in fps


@pytest.mark.parametrize("make, message", [
    (lambda tok, p: Corpus.from_file(p / "nope.jsonl", tok), "not found"),
    (lambda tok, p: Corpus.from_texts([], tok), "empty"),
    (lambda tok, p: Corpus.from_texts(["  ", ""], tok), "empty"),
    (lambda tok, p: Corpus.from_texts(["a b"], tok, max_len=1), "max_len"),
    (lambda tok, p: Corpus.from_file(p / "x.jsonl", tok, text_field="txt"), "no field 'txt'"),
    (lambda tok, p: Corpus.from_file(p / "bad.jsonl", tok), "not valid JSON"),
    (lambda tok, p: Corpus.from_file(p / "x.csv", tok), "unsupported"),
])
def test_bad_input_gets_one_clear_line(tmp_path, tokenizer, make, message):
    (tmp_path / "x.jsonl").write_text('{"text": "hello there"}\n')
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{oops\n')
    (tmp_path / "x.csv").write_text("text\nhello\n")
    with pytest.raises(ValueError, match=message) as e:     # CorpusError, or the argument's
        make(tokenizer, tmp_path)
    assert "\n" not in str(e.value)


def test_by_length_is_a_windowed_permutation_that_cuts_padding(world):
    _, _, corpus = world
    ids = np.arange(4096)
    perm = corpus.by_length(ids, 1024)
    assert sorted(perm.tolist()) == list(range(4096))
    assert all(set(perm[s:s + 1024]) == set(range(s, s + 1024)) for s in range(0, 4096, 1024))
    padded = lambda order: sum(b.input_ids.numel() for b in corpus.batches(32, ids=order))
    assert padded(ids[perm]) < 0.7 * padded(ids)
