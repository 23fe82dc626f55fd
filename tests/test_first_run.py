"""A newcomer's first minutes: `influence-nb demo` computes what it prints in about a minute and
says how (sample fit, BM25 candidates); the demo corpus is tokenized once; with progress=False
nothing draws a progress bar."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from influence_nb import demo

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_demo_corpus_is_tokenized_once(tmp_path, monkeypatch):
    monkeypatch.setenv("INFLUENCE_NB_CACHE", str(tmp_path))
    first = demo.load()[2]
    cached = list(tmp_path.glob("corpus-*.npz"))
    assert len(cached) == 1
    again = demo.load()[2]
    assert again.fingerprint == first.fingerprint
    pd.testing.assert_frame_equal(again.df, first.df)
    cached[0].write_bytes(b"torn")                       # an unreadable entry is rebuilt
    assert demo.load()[2].fingerprint == first.fingerprint
    assert cached[0].stat().st_size > 1_000_000


def test_the_demo_job_says_how_it_computed_what_it_prints(capsys):
    from influence_nb.cli import main
    main(["demo", "--fit-sample", "64", "--candidates", "20", "--heldout", "50",
          "--facts", "0", "45"])
    out = capsys.readouterr().out
    assert "EK-FAC factors fitted on 64 of 20,000 (a random sample) sequences" in out
    assert "the 20 best BM25 matches of each query's prompt + completion" in out
    assert "perplexity" in out and "on 50 of 1,000 (a random sample) held-out" in out
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["fit_sequences"] == 64 and summary["fact_accuracy"] >= 0.9
    assert 20 <= summary["scored_sequences"] <= 40
    ranked = [line for line in out.splitlines() if line.startswith("  1.")]
    assert len(ranked) == 2 and all(line.startswith("  1.*") for line in ranked)  # the fact


def test_progress_false_draws_no_bar(capfd):
    from influence_nb.curvature import FactorArgs
    from influence_nb.scoring import ScoreArgs
    from influence_nb.session import Influence
    capfd.readouterr()
    model, tokenizer, corpus = demo.load()
    inf = Influence(model, tokenizer, corpus.subset(np.arange(40)),
                    score_args=ScoreArgs(batch_size=8, progress=False))
    inf.fit(FactorArgs(batch_size=8, progress=False))
    fact = demo.facts()[0]
    res = inf.scan((fact.prompt(), fact.completion))
    res.tokens(0, int(res.ids[0]))
    inf.score_texts([fact.statement(0)], res)
    out = capfd.readouterr()
    assert out.err == "" and out.out == ""
