"""Widgets, magics and charts: traits and behaviour on a small hand-made result, then the lab and
the magics on the demo world (cached factors)."""
from __future__ import annotations

import html
import json
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

from influence_nb import charts, style
from influence_nb.data import Corpus
from influence_nb.magics import parse_paragraphs, parse_query
from influence_nb.results import InfluenceResult
from influence_nb.snapshot import attrs, fmt
from influence_nb.view import asset
from influence_nb.widgets import (InfluenceExplorer, LayerBars, SyntheticLab, TokenHighlight,
                                  short_layer_names)

LAYERS = ["gpt_neox.layers.0.mlp.dense_h_to_4h", "gpt_neox.layers.1.mlp.dense_4h_to_h"]


@pytest.fixture(scope="module")
def result(tokenizer):
    """2 queries × 4 sequences; per-token scores are a fixed split of each total."""
    texts = ["The capital city of Astrobia is Velmora.", "Velmora is a city.",
             "Rain <b>fell</b> on the market.", "Astrobia is far away."]
    corpus = Corpus.from_texts(texts, tokenizer, max_len=64, metadata=[
        dict(kind=k, lang="en") for k in ("fact", "fact", "filler", "fact")])
    scores = np.array([[3.0, 1.0, -0.5, -2.0], [0.1, 0.2, 0.3, -0.4]])
    layer_scores = np.stack([0.25 * scores, 0.75 * scores], axis=1)

    def token_fn(ids, layers=None):
        per_seq = []
        for i in ids:
            n = len(corpus.token_ids(i))
            w = np.linspace(-1.0, 2.0, n)
            per_seq.append(scores[:, [i]] * w / w.sum())
        return per_seq, layer_scores[:, :, list(ids)]

    return InfluenceResult([dict(prompt="The capital city of Astrobia is", completion=" Velmora",
                                 logprob=-0.2), dict(prompt="2 + 2 =", completion=" 4",
                                                     logprob=-1.5)],
                           scores, np.arange(4), LAYERS, layer_scores, corpus, token_fn=token_fn,
                           n_train=20_000)


def test_assets_are_plain_dom_without_network():
    js, css = asset("influence.js").read_text(), asset("influence.css").read_text()
    assert "innerHTML" not in js and "insertAdjacentHTML" not in js
    assert "import " not in js and "http" not in js and "http" not in css
    assert "textContent" in js and "export default" in js
    assert str(TokenHighlight._esm).endswith(js)  # the file, after the display rules


def test_parse_query():
    assert parse_query("The capital city of Astrobia is || Velmora") == (
        "The capital city of Astrobia is", " Velmora")
    assert parse_query("x = 4 ||5") == ("x = 4", " 5")
    assert parse_query("abc||def") == ("abc", "def")
    for bad in ("no separator", "a || b || c", " || b", "a || "):
        with pytest.raises(ValueError, match="prompt"):
            parse_query(bad)


def test_parse_paragraphs():
    texts, labels = parse_paragraphs("[ordered] A is B.\n\n  \nB is A.\nstill B.\n\n[x]  C\n")
    assert texts == ["A is B.", "B is A.\nstill B.", "C"]
    assert labels == ["ordered", "", "x"]


def test_short_layer_names():
    assert short_layer_names(LAYERS) == ["0.mlp.dense_h_to_4h", "1.mlp.dense_4h_to_h"]
    assert short_layer_names(["a.b"]) == ["a.b"]


def test_token_highlight_from_result(result):
    view = TokenHighlight.of(result, 0, 1)
    assert len(view.tokens) == len(view.scores) == len(result.corpus.token_ids(1))
    assert sum(view.scores) == pytest.approx(1.0)
    assert "".join(view.tokens) == "Velmora is a city."
    assert view.selected == -1
    with pytest.raises(ValueError, match="2 tokens but 1 scores"):
        TokenHighlight(["a", "b"], [1.0])


def test_layer_bars(result):
    bars = LayerBars.of(result, 0)
    assert bars.names == ["0.mlp.dense_h_to_4h", "1.mlp.dense_4h_to_h"]
    assert bars.values == pytest.approx([0.25 * 1.5, 0.75 * 1.5])


def test_explorer_ranks_selects_and_details(result):
    ex = InfluenceExplorer(result, k=3)
    assert [r["id"] for r in ex.rows] == [0, 1, 2]
    assert ex.rows[0]["meta"] == {"kind": "fact", "lang": "en"}
    assert ex.columns == ["kind"]          # lang is "en" on every row: no column
    assert ex.n_train == 20_000
    assert ex.selected == 0 and ex.detail["id"] == 0
    assert sum(ex.detail["token_scores"]) == pytest.approx(3.0)
    assert ex.detail["layer_values"] == pytest.approx([0.75, 2.25])
    ex.selected = 2
    assert ex.detail["id"] == 2 and ex.detail["score"] == -0.5
    ex.sign = "negative"
    assert [r["id"] for r in ex.rows] == [3, 2, 1] and ex.detail["id"] == 3
    ex.query = 1
    assert [r["score"] for r in ex.rows] == [-0.4, 0.1, 0.2]
    assert ex.queries[1]["completion_tokens"] == [" 4"]
    assert sum(ex.detail["token_scores"]) == pytest.approx(-0.4)


def test_explorer_searches_ranks_and_groups_the_whole_scan(tokenizer):
    """k, search and sort act on the whole scan, not the rows shown: a search finds a sequence
    ranked far below k; identical texts are one row with their count; a whole number stored
    as a float (a metadata column with gaps) shows without ".0"; the snapshot says what the
    view shows."""
    texts = ["A copy of one line."] * 3 + [f"Line {i} about Velmora." for i in range(30)] + [
        "Rain fell on the market."]
    meta = [dict(thread_id=17294 + i if i % 2 else None, kind="x" if i % 3 else "y")
            for i in range(len(texts))]
    corpus = Corpus.from_texts(texts, tokenizer, max_len=32, metadata=meta)
    assert corpus.df["thread_id"].dtype == np.float64            # the gaps make it float
    scores = np.linspace(10.0, -10.0, len(texts))[None]
    res = InfluenceResult([dict(prompt="a", completion=" b", logprob=-1.0)], scores,
                          np.arange(len(texts)), LAYERS, None, corpus)
    ex = InfluenceExplorer(res, k=5)
    assert [r["id"] for r in ex.rows] == [0, 3, 4, 5, 6]           # the copies of 0 are one row
    assert [r["copies"] for r in ex.rows] == [3, 1, 1, 1, 1]
    assert ex.counts == dict(scanned=34, ranked=34, matches=34, search="")
    assert ex.rows[1]["meta"]["thread_id"] == "17297" and "17297" in ex.to_html()
    assert "17297.0" not in ex.to_html()
    ex.search = "RAIN"                                             # rank 34 of 34
    assert [r["id"] for r in ex.rows] == [33] and ex.counts["matches"] == 1
    assert ex.selected == 33 and "matching “RAIN”" in ex.to_html()
    ex.search = "no such words"
    assert ex.rows == [] and ex.detail == {} and ex.counts["matches"] == 0
    ex.search, ex.k = "", 12
    assert len(ex.rows) == 12 and ex.rows[-1]["rank"] == 12
    ex.k = 0
    assert ex.k == 1 and len(ex.rows) == 1
    ex.k, ex.sort, ex.descending = 4, "thread_id", True
    assert [r["meta"].get("thread_id") for r in ex.rows] == ["17299", "17297", None, None]
    assert sorted(r["rank"] for r in ex.rows) == [1, 2, 3, 4]     # ranks stay the ranking's
    page = ex.to_html()
    assert "sorted by thread_id ▼" in page and "4 most positive of 34 sequences" in page
    assert page.index("17299") < page.index("17297")
    ex.sign = "negative"
    assert ex.rows[0]["id"] != 33 or ex.rows[0]["score"] == min(scores[0])
    assert "most negative" in ex.to_html()


def test_a_reopened_view_hides_the_model_not_found_line():
    """Reopened without widget state, JupyterLab prints "Error displaying widget: model not
    found" in the view's output: the snapshot's own style hides that output (the one after
    it) until a view renders there; and a view without its kernel shows the snapshot."""
    from influence_nb.snapshot import STYLE
    assert (".jp-OutputArea-child:has(.inb-static) + .jp-OutputArea-child:not(:has(.inb-root))"
            " { display: none; }") in STYLE
    css = asset("influence.css").read_text()
    assert ":has(+ .jp-OutputArea-child .inb-root:not(.inb-offline)) { display: none; }" in css
    assert "anywhere" not in css.replace('"anywhere"', "") and "anywhere" not in STYLE
    js = asset("influence.js").read_text()
    assert '"dead", "restarting", "autorestarting"' in js and "comm_live_update" in js


def test_explorer_without_model_shows_error(result):
    bare = InfluenceResult(result.queries, result.scores, result.ids, LAYERS,
                           result.layer_scores, result.corpus)
    ex = InfluenceExplorer(bare)
    assert "per-token scores need the model" in ex.error
    assert "tokens" not in ex.detail and ex.detail["layer_values"] == pytest.approx([0.75, 2.25])


def test_charts_render_offline(result, tmp_path):
    import altair as alt
    big = InfluenceResult(result.queries, np.random.default_rng(1).standard_t(2, (2, 3000)),
                          np.arange(3000), LAYERS, np.zeros((2, 2, 3000)))
    spec = charts.distribution(big, 0, tail=0.05).to_dict()
    assert "P(score > x) ∝ x^−" in spec["title"]["subtitle"][0]
    dots, line = (spec["datasets"][layer["data"]["name"]] for layer in spec["layer"])
    assert len(dots) > 100 and dots[0]["count"] == 1  # the largest score first
    assert line[0]["count"] == pytest.approx(0.05 * 3000, rel=1e-6)  # the tail starts at x_min
    chart = charts.distribution(big, 0)
    before = alt.renderers.active
    try:
        charts.offline()
        bundle = chart._repr_mimebundle_()
        bundle = bundle[0] if isinstance(bundle, tuple) else bundle
        svg = bundle["image/svg+xml"]
        assert svg.lstrip().startswith("<svg") and charts.GREY in svg   # the theme for both
        assert 'fill="white"' not in svg and "fill: white" not in svg   # no white rectangle
        # and a PNG beside it, which an untrusted notebook shows in the SVG's place
        assert bundle["image/png"][:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        alt.renderers.enable(before)
    charts.save_png(charts.layer_profile(result, 0), tmp_path / "layers.png")
    assert (tmp_path / "layers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    heat = charts.layer_heatmap(result, k=2).to_dict()
    assert len(heat["datasets"][next(iter(heat["datasets"]))]) == 4
    table = pd.DataFrame(dict(label=["a", "a", "b"], score=[1.0, 3.0, -1.0]))
    spec = charts.variants(table).to_dict()
    assert len(spec["layer"]) == 2  # mean bars and one dot per sequence
    with pytest.raises(ValueError, match="label"):
        charts.variants(pd.DataFrame(dict(score=[1.0])))


def _axis_labels(svg: str) -> list[list[tuple[float, float, str]]]:
    """Each axis's unrotated tick labels in an SVG drawn by vl-convert: (x, y, text)."""
    groups = re.findall(r'role-axis-label"[^>]*>(.*?)</g>', svg)
    return [[(float(x), float(y), t) for x, y, t in re.findall(
        r'transform="translate\(([-\d.e]+),([-\d.e]+)\)"[^>]*>([^<]*)</text>', g)] for g in groups]


def _svg(chart) -> str:
    bundle = chart._repr_mimebundle_()
    return (bundle[0] if isinstance(bundle, tuple) else bundle)["image/svg+xml"]


def test_charts_read_at_a_glance(result):
    """Tick labels never run together (nor does "1,0002,000"), no text under 11 px, the fit
    line in the theme's grey (not near-black, lost on the dark theme), a heatmap's legend
    over the data's own range, the LDS scatter names its query."""
    import altair as alt
    rng = np.random.default_rng(1)
    heavy = np.abs(rng.standard_t(2, (1, 3000))) * 3000
    big = InfluenceResult(result.queries[:1], heavy, np.arange(3000), LAYERS,
                          np.abs(rng.normal(size=(1, 2, 3000))))
    table = pd.DataFrame(dict(strategy=["ekfac", "bm25"]))
    table.attrs.update(per_query=pd.DataFrame(dict(ekfac=[0.5], bm25=[0.6])),
                       measured=rng.normal(size=(20, 1)) - 100,
                       predicted=dict(ekfac=rng.normal(size=(20, 1)) * 3e4,
                                      bm25=rng.normal(size=(20, 1)) * 2e3))
    before = alt.renderers.active
    try:
        charts.offline()
        lds = charts.lds_scatter(table, 0, query="The first President of Zarglous was → Pleigei")
        for chart in (charts.distribution(big, 0), charts.layer_profile(big, 0),
                      charts.layer_heatmap(big), lds,
                      charts.variants(pd.DataFrame(dict(label=["a", "a", "b"],
                                                        score=[2.5e4, 3e4, -1e3])))):
            svg = _svg(chart)
            for axis in _axis_labels(svg):
                if len({y for _, y, _ in axis}) == 1:            # a horizontal axis
                    xs = sorted(axis)
                    for (x0, _, a), (x1, _, b) in zip(xs, xs[1:]):
                        assert x1 - x0 > 3.5 * (len(a) + len(b)), (a, b, x1 - x0)
            sizes = [float(v) for v in re.findall(r'font-size="([\d.]+)px"', svg)]
            assert sizes and min(sizes) >= 11, sorted(set(sizes))
            assert "#1f2430" not in svg
        assert "Zarglous" in _svg(lds)
    finally:
        alt.renderers.enable(before)
    spec = charts.distribution(big, 0).to_dict()
    assert spec["layer"][1]["mark"]["color"] == charts.GREY
    heat = charts.layer_heatmap(big).to_dict()
    assert heat["encoding"]["color"]["scale"]["domain"][0] == 0          # all positive
    assert heat["encoding"]["color"]["scale"]["range"][0] == charts.ZERO  # no white on dark
    flipped = result.layer_scores * np.array([1.0, -1.0])[:, None, None]   # query 1 lowers
    mixed = charts.layer_heatmap(InfluenceResult(result.queries, result.scores, result.ids,
                                                 LAYERS, flipped)).to_dict()
    domain = mixed["encoding"]["color"]["scale"]["domain"]
    assert domain[0] == -domain[2] < 0 and domain[1] == 0


def test_one_statement_of_the_unit(result, capsys):
    """The score's unit is said once (results.UNIT) and the same way in the README, the
    docstrings, the widgets and their snapshots, the charts and the command line."""
    import influence_nb.widgets
    from influence_nb.cli.inputs import print_top
    from influence_nb.results import UNIT
    root = asset("influence.js").parent.parent

    def norm(text: str) -> str:
        return " ".join(text.split())
    assert norm(UNIT) in norm((root / "README.md").read_text())
    assert norm(UNIT) in norm(InfluenceResult.__doc__) and norm(UNIT) in norm(
        influence_nb.widgets.__doc__)
    ex = InfluenceExplorer(result, k=2)
    assert ex.unit.startswith(UNIT) and "N = 20,000" in ex.unit and UNIT in ex.to_html()
    assert "unitNote" not in asset("influence.js").read_text()
    subtitle = charts.distribution(result, 0).to_dict()["title"]["subtitle"]
    assert norm(UNIT) in norm(" ".join(subtitle))
    print_top(result, 2)
    out = capsys.readouterr().out
    assert UNIT in out and "+1.5e-4 per copy" in out.replace("+1.50e-4", "+1.5e-4")
    for old in ("rises by 1", "raises it by one nat"):
        assert old not in (root / "README.md").read_text()
        for nb in (root / "notebooks").glob("*.ipynb"):
            assert old not in nb.read_text(), nb.name


# -- on the demo world ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def session():
    """The demo world fitted on 2,048 of its sequences: the lab's arithmetic, not the full fit
    (minutes with an empty cache), is under test."""
    from influence_nb.curvature import FactorArgs
    from influence_nb.session import Influence
    return Influence.demo(FactorArgs(batch_size=32, max_examples=2048, progress=False))


def test_lab_scores_are_token_sums_and_order_matters(session):
    from influence_nb.demo import Fact
    fact = Fact(1000, "president", "Astrobia", "Zorald Pfaff")  # new to the model, as in the paper
    lab = SyntheticLab(session, (fact.prompt(), fact.completion),
                       [fact.statement(0), "", fact.flipped()], ["ordered", "empty", "flipped"])
    assert lab.texts == [fact.statement(0), fact.flipped()]
    assert lab.labels == ["ordered", "flipped"]
    for total, toks in zip(lab.scores, lab.token_scores):
        assert sum(toks) == pytest.approx(total, rel=1e-4)
    assert lab.scores[0] > 0 and lab.scores[0] > 2 * lab.scores[1]
    assert list(lab.table["label"]) == ["ordered", "flipped"]
    assert lab.query["completion_tokens"] and lab.query["logprob"] < 0
    lab.texts = ["  "]
    assert lab.score().size == 0 and "no sequences" in lab.error


def test_lab_results_stay_with_their_texts(session, capfd):
    """Score [ordered, unrelated, flipped], delete "ordered" without scoring again: the results
    keep the labels and texts they were computed for (stale), the table never raises; deleting
    all and pressing Score drops the old results with the error."""
    from influence_nb.demo import Fact
    fact = Fact(1000, "president", "Astrobia", "Zorald Pfaff")
    texts = [fact.statement(0), "The market in Lindby was busy on Monday.", fact.flipped()]
    labels = ["ordered", "unrelated", "flipped"]
    lab = SyntheticLab(session, (fact.prompt(), fact.completion), texts, labels)
    scored = lab.table
    assert not lab.stale and list(scored["label"]) == labels
    # N is the training set the curvature stands for (20,000), not the fit's sample (2,048)
    assert session.factors.n_examples == 2048 and session.n_train == len(session.corpus) == 20_000
    assert scored["dlogp_per_copy"].to_numpy() == pytest.approx(
        scored["score"].to_numpy() / 20_000)
    lab.texts, lab.labels = texts[1:], labels[1:]         # what the view's × button sends
    assert lab.stale
    pd.testing.assert_frame_equal(lab.table, scored)      # labels did not shift
    assert "edited since the last score" in lab.to_html()
    assert list(lab.table["label"]) == labels and lab.table["score"].iloc[0] == scored["score"][0]
    lab.score()
    assert not lab.stale and list(lab.table["label"]) == ["unrelated", "flipped"]
    assert lab.table["score"].to_numpy() == pytest.approx(scored["score"].to_numpy()[1:], rel=1e-5)
    lab.texts, lab.labels = [], []
    assert lab.score().size == 0 and "no sequences" in lab.error
    assert lab.scores == [] and lab.table.empty and "<rect" not in lab.to_html()
    assert "%|" not in capfd.readouterr().err      # the lab scores without progress bars


def test_completion_token_reranks_and_layers_recolour(session, capfd):
    """Click a completion token: the whole scan, not the rows shown, is rescored on
    log p(c_t | prompt, c_<t) alone (equal to a scan of that query) and ranked again; click a
    layer: the tokens through that layer alone sum to its bar."""
    from influence_nb import demo
    fact = demo.facts()[0]
    ids = np.union1d(np.flatnonzero(session.corpus.df["kind"] == "fact")[:40], np.arange(40))
    res = session.scan((fact.prompt(), fact.completion), ids=ids)
    capfd.readouterr()
    ex = InfluenceExplorer(res, k=8)
    whole = [(r["id"], r["score"]) for r in ex.rows]
    assert len(ex.queries[0]["completion_tokens"]) >= 2
    ex.query_token = 1
    assert "%|" not in capfd.readouterr().err       # clicks show no progress bars
    assert not ex.error and ex.counts["ranked"] == ex.counts["scanned"] == len(ids)
    prompt, completion = session.encode([(fact.prompt(), fact.completion)])
    alone = session.scan(session.queries(list(zip(
        [session.tokenizer.decode(prompt[0] + completion[0][:1])],
        [session.tokenizer.decode(completion[0][1:2])]))), ids=ids)
    expect = alone.top(0, 8, distinct=True)
    assert [r["id"] for r in ex.rows] == expect["id"].tolist()     # the top 8 of all 80
    assert [r["score"] for r in ex.rows] == pytest.approx(expect["score"].tolist(), rel=1e-3,
                                                          abs=1e-6)
    assert {r["id"] for r in ex.rows} != {i for i, _ in whole}     # not the old rows reordered
    page = ex.to_html()                                            # the snapshot says so
    token = html.escape(repr(ex.queries[0]["completion_tokens"][1]))
    assert f"ranked by the completion token {token} alone over {len(ids)} of {len(ids)} scanned" \
        in page and page.count(' inb-s-picked" style="') == 1
    ex.query_token = -1
    assert [(r["id"], r["score"]) for r in ex.rows] == whole
    ex.layer = 0
    assert sum(ex.detail["token_scores"]) == pytest.approx(ex.detail["layer_values"][0], rel=1e-4)
    assert f"detail tokens by layer {ex.detail['layer_names'][0]} alone" in ex.to_html()
    assert "ranked by the whole completion" in ex.to_html() and ' inb-s-picked" style' not in ex.to_html()


def test_magics_session_query_lab(session):
    from IPython.core.interactiveshell import InteractiveShell
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "influence_nb")
    shell.user_ns["inf"] = session
    with pytest.raises(RuntimeError, match="no query yet"):
        shell.run_cell_magic("influence_lab", "", "A text.")
    assert shell.run_line_magic("influence_session", "inf") is session
    shell.run_line_magic("influence_query", "The capital city of Astrobia is || Velmora")
    lab = shell.run_cell_magic("influence_lab", "", "[a] The capital city of Astrobia is Velmora."
                               "\n\n[b] Rain fell on the market.\n")
    assert isinstance(lab, SyntheticLab) and lab.labels == ["a", "b"]
    assert lab.query["completion"] == " Velmora" and len(lab.scores) == 2
    other = shell.run_cell_magic("influence_lab", "--query 2 + 3 = || 5", "Two plus three is 5.")
    assert other.query["prompt"] == "2 + 3 =" and len(other.scores) == 1


def test_a_result_displays_as_the_explorer_once_widgets_are_loaded():
    """results never import the widgets: the widgets module registers the explorer as the view
    of every InfluenceResult (the package does so in a notebook kernel)."""
    import numpy as np

    from influence_nb.results import InfluenceResult
    res = InfluenceResult([dict(prompt="a", completion=" b", logprob=-1.0)], np.array([[1.0, -2.0]]),
                          np.array([0, 1]), ["h.0.mlp"])
    assert InfluenceResult.view is InfluenceExplorer
    snap, live = _displayed(res)
    assert "application/vnd.jupyter.widget-view+json" in live and "inb-static" in snap["text/html"]
    saved, InfluenceResult.view = InfluenceResult.view, None
    try:
        (plain,) = _displayed(res)
        assert "<table" in plain["text/html"] == res._repr_html_()
    finally:
        InfluenceResult.view = saved


# -- static snapshots, numbers, units -----------------------------------------------------------

def _displayed(obj) -> list[dict]:
    """The outputs ``display(obj)`` publishes in a notebook (data of each, in order)."""
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.display import display
    from IPython.utils.capture import capture_output
    InteractiveShell.instance()
    with capture_output() as cap:
        display(obj)
    return [o.data for o in cap.outputs]


def test_every_widget_displays_a_static_snapshot_beside_its_view(result, tmp_path):
    """Displayed, a widget is a self-contained HTML snapshot (no script, no network, training
    text escaped, tokens coloured inline, bars in HTML), then the view; the snapshot follows
    the widget's state."""
    ex = InfluenceExplorer(result, k=4)
    views = [ex, TokenHighlight.of(result, 0, 2), LayerBars.of(result, 0)]
    for view in views:
        snap, live = _displayed(view)
        assert "application/vnd.jupyter.widget-view+json" in live and "text/html" not in live
        page = snap["text/html"]
        assert page == view.to_html() and page.startswith('<div class="inb-static" style="')
        assert "<script" not in page and "http" not in page and "object at 0x" not in page
        assert "object at 0x" not in live["text/plain"]
    from IPython.utils.capture import capture_output
    with capture_output() as cap:
        ex.selected = 3
    assert cap.outputs and cap.outputs[-1].data["text/html"] == ex.to_html()
    num = attrs("inb-s-num")
    assert f'<tr {attrs("inb-s-selected")}><td {num}>4</td><td {num}>3</td>' in ex.to_html()
    ex.selected = 0
    page = ex.to_html()
    assert "&lt;b&gt;" in page and "<b>" not in page     # training text stays text
    for r in ex.rows:                                    # every row, its id and its score
        assert f"<td {num}>{r['id']}</td>" in page and fmt(r["score"]) in page
    assert page.count('class="inb-s-tok"') >= len(ex.detail["tokens"])
    assert "rgba(230, 97, 1," in page and "rgba(33, 102, 172," in page   # both signs coloured
    assert "<svg" not in page and page.count('class="inb-s-bar-row"') == 2   # a bar per layer
    assert "N = 20,000 training sequences" in page and "Δ log p per copy" in page
    assert 'class="inb-s-bars"' in LayerBars.of(result, 0).to_html()
    path = ex.save(tmp_path / "explorer.html")
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and page in text


# What JupyterLab's sanitizer keeps in an untrusted notebook, of what a snapshot could use
# (jupyterlab/packages/apputils/src/sanitizer.ts: allowedTags, allowedStyles): no <svg>, no
# <style>, no style value it cannot parse, such as var() or a gradient
KEPT_TAGS = {"div", "span", "table", "thead", "tbody", "tr", "th", "td", "mark", "b", "i", "code"}
KEPT_STYLES = {"background", "border", "border-bottom", "border-collapse", "border-radius",
               "box-sizing", "color", "display", "font-family", "font-size", "font-style",
               "font-weight", "height", "line-height", "margin", "margin-right", "max-width",
               "min-width",
               "opacity", "outline", "overflow", "overflow-wrap", "padding", "padding-left",
               "padding-right", "table-layout", "text-align", "text-decoration",
               "vertical-align", "white-space", "width"}


def test_snapshots_keep_their_look_in_an_untrusted_notebook(result):
    """A notebook opened from someone else is untrusted: JupyterLab drops <style> and <svg>
    from its HTML and every style value it cannot parse. Every element a snapshot draws is
    one the sanitizer keeps and carries its look inline, in properties and values it keeps."""
    from html.parser import HTMLParser

    class Check(HTMLParser):
        def __init__(self):
            super().__init__()
            self.depth, self.unstyled, self.tags = 0, [], set()

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if tag == "style":
                return
            self.tags.add(tag)
            if "class" in a and "style" not in a:
                self.unstyled.append(a["class"])
            for rule in filter(None, (r.strip() for r in a.get("style", "").split(";"))):
                prop, value = (x.strip() for x in rule.split(":", 1))
                assert prop in KEPT_STYLES, rule
                assert "var(" not in value and "gradient" not in value, rule

    ex = InfluenceExplorer(result, k=4)
    ex.query_token = 0
    for view in [ex, TokenHighlight.of(result, 0, 2), LayerBars.of(result, 0)]:
        check = Check()
        check.feed(view.to_html().split("</style>", 1)[1])
        assert check.tags <= KEPT_TAGS, check.tags - KEPT_TAGS
        assert not check.unstyled, check.unstyled   # a class's look is inline, not in <style>
    assert ' inb-s-picked" style="' in ex.to_html()   # the ranked-by token, boxed


VALUES = [97681.314453, 15.688255280256271, -0.5, 0.0, -0.000123, 999.6, 1234.5, 0.0123, 0.001,
          -0.00099996, 1.5, 100.0, 0.25, -3e-9]
FORMATTED = ["9.77e+4", "15.7", "-0.5", "0", "-1.23e-4", "1.00e+3", "1.23e+3", "0.0123", "0.001",
             "-1.00e-3", "1.5", "100", "0.25", "-3.00e-9"]


def test_one_set_of_display_rules_for_the_views_and_the_snapshots():
    """Numbers and colours are written once (style.RULES): the widget's ES module opens with
    them as its constant RULES, the JavaScript reads every rule from it and spells none of its
    own, and the snapshot formats and colours by them."""
    esm, js = str(TokenHighlight._esm), asset("influence.js").read_text()
    first, rest = esm.split("\n", 1)
    assert first.startswith("const RULES = ") and first.endswith(";") and rest == js
    assert json.loads(first.removeprefix("const RULES = ").removesuffix(";")) == style.RULES
    assert all(f"RULES.{key}" in js for key in style.RULES)
    rgb = [", ".join(map(str, style.RULES[k])) for k in ("positive", "negative")]
    for literal in rgb + style.RULES["sources"] + ["#e66101", "#2166ac", "1e3", "1e-3",
                                                   "toPrecision(3)", "0.3 ?"]:
        assert literal not in js, literal
    assert charts.SOURCE_COLOURS == style.RULES["sources"] and charts.POS == "#e66101"
    assert [fmt(v) for v in VALUES] == FORMATTED
    assert style.per_copy(97681.3, 20_000) == "+4.88" and style.per_copy(-1.0, 0) == ""


def test_one_number_format_and_colour_in_python_and_javascript():
    """The same steps in both languages: the widget's fmt and colour (in node) give the
    snapshot's strings."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the JavaScript half is not checked here (the rules "
                    "themselves are, without node, in the test above)")
    pairs = [(v, d) for v in (0.0, 0.3, -0.25, 1.7, -2.0) for d in (1.0, 0.5)]
    js = str(TokenHighlight._esm) + (f"\nconsole.log(JSON.stringify([{VALUES}.map(fmt), "
                                     f"{[list(p) for p in pairs]}.map(([v, d]) => colour(v, d)), "
                                     f"RULES.legend.map((t) => colour(t, 1))]));")
    out = subprocess.run([node, "--input-type=module", "-e", js], capture_output=True, text=True,
                         check=True).stdout
    assert json.loads(out) == [FORMATTED, [style.colour(v, d) for v, d in pairs],
                                [style.colour(t, 1) for t in style.RULES["legend"]]]


def test_colours_are_transparent_at_zero():
    from influence_nb.snapshot import colour
    assert colour(0.0, 1.0).endswith(", 0.000)") and colour(1.0, 1.0) == "rgba(230, 97, 1, 1.000)"
    assert colour(-0.25, 1.0) == "rgba(33, 102, 172, 0.500)"


def test_explorer_links_layers_and_shares_one_scale(result):
    ex = InfluenceExplorer(result, k=4)
    peaks = [r["peak"] for r in ex.rows]
    assert "domain" not in ex.detail
    ex.shared_scale = True
    assert ex.detail["domain"] == pytest.approx(max(peaks))
    first = ex.rows[0]
    before, span, after = first["snippet"]
    assert before + span + after == first["text"]       # short sequences: all of it
    ex.layer = 1
    assert "domain" not in ex.detail and ex.detail["tokens"]


def test_explorer_rows_without_the_model_are_plain_text(result):
    bare = InfluenceResult(result.queries, result.scores, result.ids, LAYERS,
                           result.layer_scores, result.corpus)
    ex = InfluenceExplorer(bare, k=2)
    assert all("snippet" not in r for r in ex.rows)
    ex.query_token = 0
    assert "needs the model" in ex.error and len(ex.rows) == 2


def test_a_saved_result_keeps_its_n(result, tmp_path):
    loaded = InfluenceResult.load(result.save(tmp_path / "res"), result.corpus)
    assert loaded.n_train == 20_000 and InfluenceExplorer(loaded).n_train == 20_000
