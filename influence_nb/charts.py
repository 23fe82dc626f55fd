"""Altair charts of influence results that render offline in JupyterLab 4.

Altair's default renderer loads Vega from a CDN; :func:`offline` switches Altair to our
renderer, which draws the chart in the kernel with vl-convert (no network, plain SVG output
that passes notebook validation, and a PNG for untrusted notebooks). :func:`save_png` writes a
PNG for docs.

    charts.offline()
    charts.distribution(result, q=0)     # log–log tail of the influence scores, power-law fit
    charts.layer_profile(result, q=0)    # influence per layer
    charts.layer_heatmap(result)         # queries × layers, each row's share
    charts.variants(lab.table)           # a bar per synthetic sequence (mean and points)
    charts.lds_scatter(validate.lds(...)) # predicted vs retrained, per strategy
    charts.source_split(result)          # a scan over several corpora: each source's share
"""
from __future__ import annotations

import json
import os

import altair as alt
import numpy as np
import pandas as pd

from . import style
from .checks import checked, whole
from .results import UNIT, InfluenceResult
from .widgets import short_layer_names

__all__ = ["distribution", "layer_heatmap", "layer_profile", "lds_scatter", "offline", "save_png",
           "source_split", "svg_and_png", "theme", "variants"]

# the widgets' colours (orange raises, blue lowers log p), the sources' in a scan over several
POS, NEG = style.hex_colour(style.POS), style.hex_colour(style.NEG)
SOURCE_COLOURS = style.SOURCE_COLOURS


GREY = "#7a808a"   # chart text and lines: readable on the light and the dark JupyterLab theme
# a share of 0 in the heatmap: faint grey, not white — white glares on the dark theme
ZERO = "rgba(122, 128, 138, 0.12)"
# the unit (results.UNIT) as a chart's last subtitle lines
UNIT_LINES = [UNIT[:UNIT.index(" (first order)") + 14] + ";", UNIT[UNIT.index("one added"):]]


@alt.theme.register("influence_nb", enable=False)
def theme() -> alt.theme.ThemeConfig:
    """Transparent background, grey text and lines: an SVG drawn in the kernel cannot read the
    notebook's theme, so it is made to sit on either."""
    text = {"labelColor": GREY, "titleColor": GREY, "labelFontSize": 12, "titleFontSize": 13}
    lines = {"domainColor": GREY, "tickColor": GREY, "gridColor": GREY, "gridOpacity": 0.25,
             "labelOverlap": "greedy", "labelSeparation": 8, "labelFlush": True}
    return {"config": {"background": "transparent", "view": {"stroke": GREY, "strokeOpacity": 0.4},
                       "axis": {**text, **lines}, "legend": text,
                       "header": {**text, "labelFontSize": 13},
                       "title": {"color": GREY, "subtitleColor": GREY, "fontSize": 15,
                                 "subtitleFontSize": 12, "anchor": "start"},
                       "text": {"color": GREY, "fontSize": 12}}}


def svg_and_png(spec: dict, **metadata: object) -> tuple[dict, dict]:
    """A chart's output: SVG, and a PNG beside it. JupyterLab draws the SVG, except in an
    untrusted notebook (one from someone else), where it draws no SVG and shows the PNG."""
    from altair.utils.mimebundle import spec_to_mimebundle
    versions = dict(mode="vega-lite", vega_version=alt.VEGA_VERSION,
                    vegaembed_version=alt.VEGAEMBED_VERSION, vegalite_version=alt.VEGALITE_VERSION)
    png, meta = spec_to_mimebundle(spec, format="png", **versions, **metadata)
    return spec_to_mimebundle(spec, format="svg", **versions, **metadata) | png, meta


alt.renderers.register("influence_nb", svg_and_png)


def offline() -> None:
    """Render Altair charts in the kernel (vl-convert) as SVG with a PNG beside it
    (:func:`svg_and_png`): no CDN, valid notebooks; in the package's theme (transparent, grey
    text), which suits light and dark notebooks."""
    alt.renderers.enable("influence_nb")
    alt.theme.enable("influence_nb")


def save_png(chart: alt.TopLevelMixin, path: str | os.PathLike, scale: float = 2.0) -> None:
    """Write ``chart`` as a PNG (vl-convert, offline) at ``scale`` × its pixel size."""
    chart.save(str(path), format="png", scale_factor=scale)


def _sign_colour(field: str) -> dict:
    return alt.condition(f"datum.{field} >= 0", alt.value(POS), alt.value(NEG))


@checked(within={"tail": "(0, 1)", "points": "[1, 100000]"})
def distribution(result: "InfluenceResult", q: int = 0, tail: float = 0.05,
                 points: int = 400) -> alt.LayerChart:
    """Log–log plot of the positive scores of query ``q``: for each score x, how many sequences
    score at least x, with the power-law tail fitted to the top ``tail`` fraction
    (:class:`~influence_nb.search.PowerLawTail`) as a dashed line (paper §5: heavy tails)."""
    from .search import PowerLawTail
    s = result.scores[result.query_index(q)]
    law = PowerLawTail.fit(s, tail)
    x = np.sort(s[s > 0])[::-1]
    ranks = np.unique(np.geomspace(1, len(x), points).astype(int))
    emp = pd.DataFrame(dict(score=x[ranks - 1], count=ranks))
    grid = np.geomspace(law.x_min * (1 + 1e-9), x[0], 50)
    line = pd.DataFrame(dict(score=grid, count=[len(s) * law.survival(g) for g in grid]))
    # log axes: one label per decade, in plain digits, so labels never run together
    log = dict(type="log")
    xs = alt.X("score:Q", scale=alt.Scale(**log), title="influence score x (positive)",
               axis=alt.Axis(format="~g", values=_decades(x)))
    ys = alt.Y("count:Q", scale=alt.Scale(**log), title="sequences scoring ≥ x",
               axis=alt.Axis(format="~g", values=_decades(np.array([1, len(x)]))))
    dots = alt.Chart(emp).mark_circle(size=22, color=POS, opacity=0.75).encode(
        xs, ys, tooltip=[alt.Tooltip("score:Q", format=".3g"), "count:Q"])
    fitted = alt.Chart(line).mark_line(color=GREY, strokeWidth=2, strokeDash=[6, 3]).encode(xs, ys)
    title = alt.TitleParams(
        f"Influence distribution, query {q}",
        subtitle=[f"dashed: power-law tail P(score > x) ∝ x^−{law.alpha:.2f}, fitted to the top "
                  f"{law.p_tail:.0%} of {len(s):,} sequences (x ≥ {style.fmt(law.x_min)})",
                  *UNIT_LINES])
    return (dots + fitted).properties(width=460, height=280, title=title)


def _decades(x: np.ndarray) -> list[float]:
    """The powers of ten (and 2×, 5× when there are few decades) within [min x, max x]."""
    lo, hi = float(np.min(x)), float(np.max(x))
    decades = range(int(np.floor(np.log10(lo))), int(np.ceil(np.log10(hi))) + 1)
    steps = (1, 2, 5) if len(decades) <= 3 else (1,)
    return [m * 10.0 ** e for e in decades for m in steps if lo <= m * 10.0 ** e <= hi] or [lo, hi]


def layer_profile(result: "InfluenceResult", q: int = 0, k: int | None = None) -> alt.Chart:
    """Influence per layer of query ``q``, summed over the top-k positive (or all) sequences."""
    prof = result.layer_profile(q, k)
    df = pd.DataFrame(dict(layer=short_layer_names(list(prof.index)), score=prof.to_numpy()))
    what = f"top {k}" if k else "all sequences"
    return alt.Chart(df).mark_bar().encode(
        alt.Y("layer:N", sort=None, title=None),
        alt.X("score:Q", title="influence (score)", axis=alt.Axis(tickCount=5)),
        color=_sign_colour("score"), tooltip=["layer:N", alt.Tooltip("score:Q", format=".4g")],
    ).properties(width=380, height=alt.Step(18), title=alt.TitleParams(
        f"Influence per layer, query {q} ({what})", subtitle=UNIT_LINES))


def _labelled(result: "InfluenceResult", queries: list[int] | None,
              labels: list[str] | None) -> dict[int, str]:
    """{query row: its label}: ``labels`` (one per query), else "q: completion"."""
    rows = (list(range(result.n_queries)) if queries is None else
            [result.query_index(q) for q in queries])
    if labels is not None and len(labels) != len(rows):
        raise ValueError(f"labels: {len(labels)} for {len(rows)} queries; give one per query")
    return {q: labels[i] if labels else f"{q}: {result.queries[q]['completion'].strip()}"
            for i, q in enumerate(rows)}


@checked(minimum={"k": 1}, distinct=("queries",), nonempty=("queries",))
def layer_heatmap(result: "InfluenceResult", queries: list[int] | None = None,
                  k: int | None = 10, labels: list[str] | None = None) -> alt.Chart:
    """Queries × layers: each query's per-layer influence (top-k) as a share of Σ|layers|."""
    names = short_layer_names(result.layer_names)
    rows = []
    for q, label in _labelled(result, queries, labels).items():
        prof = result.layer_profile(q, k).to_numpy()
        share = prof / max(np.abs(prof).sum(), 1e-30)
        rows += [dict(query=label, layer=n, share=float(v)) for n, v in zip(names, share)]
    return alt.Chart(pd.DataFrame(rows)).mark_rect().encode(
        alt.X("layer:N", sort=None, title=None, axis=alt.Axis(labelAngle=-40)),
        alt.Y("query:N", sort=None, title=None),
        alt.Color("share:Q", scale=_share_scale([r["share"] for r in rows]), title="share",
                  legend=alt.Legend(format=".0%")),
        tooltip=["query:N", "layer:N", alt.Tooltip("share:Q", format=".3f")],
    ).properties(width=alt.Step(34), height=alt.Step(22),
                 title="Where the influence sits: share of each layer (top sequences)")


def _share_scale(values: list[float]) -> alt.Scale:
    """The heatmap's colours over the data's own range: faint grey (:data:`ZERO`, on either
    theme) to orange when every share is positive, blue to grey when every one is negative,
    blue–grey–orange about 0 otherwise."""
    lo, hi = min(values), max(values)
    if lo >= 0:
        return alt.Scale(domain=[0, hi or 1], range=[ZERO, POS], interpolate="rgb")
    if hi <= 0:
        return alt.Scale(domain=[lo, 0], range=[NEG, ZERO], interpolate="rgb")
    m = max(-lo, hi)
    return alt.Scale(domain=[-m, 0, m], range=[NEG, ZERO, POS], interpolate="rgb")


@checked(distinct=("queries",), nonempty=("queries",))
def source_split(result: "InfluenceResult", queries: list[int] | None = None,
                 labels: list[str] | None = None) -> alt.Chart:
    """How each query's influence splits between the corpora of a scan over several: a bar
    per query, one segment per source, its share of Σ|score| (tooltips: sums of positive and
    negative scores, sequences, mean |score| per sequence; :meth:`InfluenceResult.split`)."""
    split = result.split().reset_index()
    names = _labelled(result, queries, labels)
    queries = list(names)
    df = split[split["query"].isin(queries)].assign(label=lambda d: d["query"].map(names))
    sources = result.sources
    return alt.Chart(df).mark_bar().encode(
        alt.Y("label:N", sort=[names[q] for q in queries], title=None),
        alt.X("abs_share:Q", title="share of total |influence|", stack="zero",
              scale=alt.Scale(domain=[0, 1]), axis=alt.Axis(format="%")),
        alt.Color("source:N", sort=sources, title="source",
                  scale=alt.Scale(domain=sources,
                                  range=SOURCE_COLOURS[:len(sources)])),
        order=alt.Order("order:Q"),
        tooltip=["label:N", "source:N", alt.Tooltip("abs_share:Q", format=".1%"),
                 alt.Tooltip("positive:Q", format=".4g"), alt.Tooltip("negative:Q", format=".4g"),
                 "sequences:Q", alt.Tooltip("mean_abs:Q", format=".3g", title="mean |score|")],
    ).transform_calculate(order=f"indexof({json.dumps(sources)}, datum.source)").properties(
        width=380, height=alt.Step(24), title="How the influence splits between the corpora")


@checked()
def variants(table: pd.DataFrame, title: str = "Synthetic sequences") -> alt.LayerChart:
    """A bar per label (the mean score) with each sequence as a dot; ``table`` has columns
    ``label`` and ``score`` (e.g. ``SyntheticLab.table``), several rows per label allowed."""
    if not {"label", "score"} <= set(table.columns) or not np.isfinite(table["score"]).all():
        raise ValueError(f"table needs columns 'label' and 'score' (finite numbers), got "
                         f"{list(table.columns)}")
    order = list(dict.fromkeys(table["label"]))
    mean = table.groupby("label", sort=False)["score"].mean().reset_index()
    y = alt.Y("label:N", sort=order, title=None)
    bars = alt.Chart(mean).mark_bar(opacity=0.85).encode(
        y, alt.X("score:Q", title="influence on the query (mean score)",
                 axis=alt.Axis(tickCount=5)), color=_sign_colour("score"),
        tooltip=["label:N", alt.Tooltip("score:Q", format=".4g", title="mean")])
    layers = [bars]
    if len(table) > len(mean):
        layers.append(alt.Chart(table[["label", "score"]]).mark_circle(
            size=26, color=GREY, opacity=0.8).encode(y, x="score:Q"))
    return alt.layer(*layers).properties(width=380, height=alt.Step(26), title=alt.TitleParams(
        title, subtitle=UNIT_LINES))


@checked(nonempty=("strategies",))
def lds_scatter(table: pd.DataFrame, q: int = 0, strategies: list[str] | None = None,
                query: str = "") -> alt.FacetChart:
    """Predicted group effect Σ_{i∈S} τ_q(z_i) against the query's measured log p after
    retraining on each subset S, one panel per strategy (the data of one query's LDS);
    ``table`` is what :func:`~influence_nb.validate.lds` returns; ``query``: its text, for the
    title."""
    if "predicted" not in table.attrs:
        raise ValueError("need the table returned by influence_nb.validate.lds")
    known = list(table.attrs["predicted"])
    if not set(strategies or known) <= set(known):
        raise ValueError(f"strategies={strategies!r}: this table has {known}")
    strategies = strategies or known
    n = len(table.attrs["per_query"])
    q = whole(q, f"query (this table has {n})", -n, n) % n
    rho = table.attrs["per_query"].iloc[q]
    frame = pd.concat([pd.DataFrame({
        "strategy": f"{s} (ρ = {rho[s]:.2f})", "predicted": table.attrs["predicted"][s][:, q],
        "measured": table.attrs["measured"][:, q]}) for s in strategies])
    return alt.Chart(frame).mark_circle(size=40, opacity=0.7, color=POS).encode(
        alt.X("predicted:Q", title="predicted Σ score", scale=alt.Scale(zero=False),
              axis=alt.Axis(tickCount=4)),
        alt.Y("measured:Q", title="log p after retraining (nats)", scale=alt.Scale(zero=False),
              axis=alt.Axis(tickCount=5)),
        tooltip=[alt.Tooltip("predicted:Q", format=".4g"), alt.Tooltip("measured:Q",
                                                                       format=".4g")],
    ).properties(width=200, height=170).facet(
        facet=alt.Facet("strategy:N", title=None, sort=[f"{s} (ρ = {rho[s]:.2f})"
                                                        for s in strategies]),
        columns=min(len(strategies), 3)).resolve_scale(x="independent").properties(
        title=alt.TitleParams(f"LDS of query {q}" + (f": {query}" if query else ""),
                              subtitle="each dot a retrained subset S: its predicted group "
                                       "effect Σ_{i∈S} score against the query's log p"))
