"""Two corpora, one question: a scan over several corpora equals a scan of each, its rows carry
their source, and the split, the explorer and the chart follow the sources."""
import numpy as np
import pytest
import torch

from influence_nb import charts
from influence_nb.curvature import FactorArgs
from influence_nb.data import Corpus, CorpusError
from influence_nb.scoring import ScoreArgs
from influence_nb.session import Influence
from influence_nb.widgets import InfluenceExplorer

from test_scoring import TEXTS, tiny_model

CHAT = [f"Human: is {w} odd? Assistant: {w} is {'odd' if i % 2 else 'even'}."
        for i, w in enumerate(["one", "two", "three", "four", "five", "six"])]
PAIRS = [("alpha number", " 0 is even."), ("Human: is seven odd? Assistant:", " seven is odd.")]


@pytest.fixture(scope="module")
def scanned(tokenizer):
    pre = Corpus.from_texts(TEXTS, tokenizer, max_len=64, metadata=[{"kind": "number"}] * 24)
    ft = Corpus.from_texts(CHAT, tokenizer, max_len=64)
    inf = Influence(tiny_model(len(tokenizer)), tokenizer, pre,
                    score_args=ScoreArgs(rank=None, batch_size=4, progress=False))
    inf.fit(FactorArgs(batch_size=6, progress=False))
    both = inf.scan(PAIRS, corpus={"pretraining": pre, "fine-tuning": ft})
    alone = {"pretraining": inf.scan(PAIRS, corpus=pre), "fine-tuning": inf.scan(PAIRS, corpus=ft)}
    return both, alone


def test_one_scan_over_two_corpora_equals_a_scan_of_each(scanned):
    both, alone = scanned
    assert both.sources == ["pretraining", "fine-tuning"] and len(both.ids) == 30
    df = both.corpus.df
    assert df["source"].tolist() == ["pretraining"] * 24 + ["fine-tuning"] * 6
    assert df["source_row"].tolist() == list(range(24)) + list(range(6))
    assert df["text"].tolist() == TEXTS + CHAT and df["kind"].isna().sum() == 6
    joined = np.concatenate([alone["pretraining"].scores, alone["fine-tuning"].scores], axis=1)
    np.testing.assert_allclose(both.scores, joined, rtol=1e-9, atol=1e-12)
    split = both.split(k=5)
    for (q, source), row in split.iterrows():
        s = alone[source].scores[q]
        assert row["total"] == pytest.approx(s.sum(), rel=1e-9)
        assert row["positive"] == pytest.approx(s[s > 0].sum(), rel=1e-9)
        assert row["sequences"] == len(s)
    assert np.allclose(split.groupby("query")["abs_share"].sum(), 1.0)
    assert (split.groupby("query")["in_top"].sum() == 5).all()
    top = both.top(1, k=3, source="fine-tuning")
    assert (top["source"] == "fine-tuning").all() and len(top) == 3
    assert top["score"].tolist() == sorted(alone["fine-tuning"].scores[1], reverse=True)[:3]
    with pytest.raises(ValueError, match="unknown source 'web'"):
        both.top(0, source="web")
    with pytest.raises(ValueError, match="scan several to split by source"):
        alone["pretraining"].split()


def test_explorer_filters_and_colours_by_source_and_the_chart_splits(scanned):
    both, _ = scanned
    ex = InfluenceExplorer(both, k=4)
    assert ex.sources == ["pretraining", "fine-tuning"] and ex.source == ""
    assert {r["source"] for r in ex.rows} <= set(ex.sources)
    ex.source = "fine-tuning"
    assert len(ex.rows) == 4 and all(r["source"] == "fine-tuning" for r in ex.rows)
    assert all(r["text"] in CHAT for r in ex.rows)        # text, as text
    spec = charts.source_split(both).to_dict()
    values = next(iter(spec["datasets"].values()))
    assert {v["source"] for v in values} == {"pretraining", "fine-tuning"}
    assert sum(v["abs_share"] for v in values) == pytest.approx(2.0)   # two queries


def test_concat_refuses_other_tokenizers_and_keeps_labels(tokenizer, scanned):
    both, _ = scanned
    labelled = Corpus.from_tokenized([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}],
                                     tokenizer)
    mixed = Corpus.concat({"a": labelled, "b": Corpus.from_texts(["x y"], tokenizer)})
    assert mixed.token_labels(0).tolist() == [-100, 6, 7]
    assert mixed.token_labels(1).tolist() == mixed.token_ids(1).tolist()
    with pytest.raises(TypeError, match=r"Corpus.concat\(parts=\[Corpus.*\): must be a dict"):
        Corpus.concat([labelled])
    with pytest.raises(CorpusError, match="non-empty dict"):
        Corpus.concat({})
    with pytest.raises(CorpusError, match="already has a column 'source'"):
        Corpus.concat({"x": both.corpus})
