"""Static HTML snapshots of the widget views: what a saved notebook, nbconvert HTML or a rendered
.ipynb shows without a kernel, and what ``widget.save(path)`` writes.

A snapshot is self-contained — plain HTML with inline styles (bars too), no script, no network,
nothing that JupyterLab's sanitizer drops from an untrusted notebook (:data:`CSS`) — and every
text that comes from the model, the corpus or the user (tokens, training text, labels,
metadata) is escaped. The functions take the widgets' synced traits (plain dicts and lists), so
a snapshot shows exactly what the live view shows.

Numbers and colours follow :mod:`influence_nb.style`, the rules the live views follow too; the
unit is :data:`influence_nb.results.UNIT` (Δ log p per copy = score / N, :func:`per_copy`).
"""
from __future__ import annotations

import html
from collections.abc import Sequence

from .results import unit_note
from .style import POS, RULES, colour, domain, fmt, hex_colour, per_copy, strong

NOTE = "A token's score belongs to the update at its position, which predicts the next token."

# A notebook opened untrusted (anyone else's) passes its HTML through JupyterLab's sanitizer,
# which drops <style> elements, <svg> and any style value with var(): so each class's look is
# written inline, on plain HTML, in values the sanitizer keeps, and theme-neutral (inherited text
# colour, greys with alpha) so that one snapshot reads in the light and the dark theme. The
# classes stay, for tests and for users' own CSS.
GREY = "rgba(128, 128, 128, {})"
CSS = {
    "inb-static": "font-family: system-ui, sans-serif; font-size: 13px; max-width: 1100px; "
                  "padding: 4px 0; text-align: left",
    "inb-s-note": "font-size: 11px; opacity: 0.7; font-style: italic; margin: 2px 0 6px",
    "inb-s-title": "font-weight: 600; margin: 6px 0 4px",
    "inb-s-unit": "font-size: 11.5px; opacity: 0.8; margin: 2px 0 6px",
    "inb-s-tokens": "font-family: monospace; line-height: 1.9; white-space: pre-wrap; "
                    "overflow-wrap: break-word",
    "inb-s-tok": "border-radius: 3px; padding: 1px 0; margin-right: 1px",
    "inb-s-marked": f"font-weight: 700; border-bottom: 2px solid {hex_colour(POS)}",
    "inb-s-picked": "outline: 2px solid",
    "inb-s-table": "border-collapse: collapse; width: 100%; font-size: 12px; margin: 4px 0; "
                   "table-layout: auto",
    "inb-s-th": f"text-align: left; font-weight: 600; white-space: nowrap; border: 0; "
                f"border-bottom: 1px solid {GREY.format(0.6)}; padding: 2px 6px; "
                "background: transparent",
    "inb-s-num": f"text-align: left; border: 0; border-bottom: 1px solid {GREY.format(0.3)}; "
                 "padding: 2px 6px; vertical-align: top; white-space: nowrap; width: 1%",
    "inb-s-text": f"text-align: left; border: 0; border-bottom: 1px solid {GREY.format(0.3)}; "
                  "padding: 2px 6px; vertical-align: top; white-space: pre-wrap; "
                  "overflow-wrap: break-word; min-width: 14em",
    "inb-s-row": "background: transparent",
    "inb-s-selected": f"background: {GREY.format(0.16)}",
    "inb-s-span": "background: transparent; color: inherit; font-weight: 600; "
                  "text-decoration: underline",
    "inb-s-chip": f"display: inline-block; font-size: 10.5px; white-space: nowrap; "
                  f"margin: 2px 4px 0 0; background: {GREY.format(0.15)}; border-radius: 9px; "
                  "padding: 0 7px",
    "inb-s-stale": "opacity: 0.45",
    "inb-s-error": "color: #d32f2f",
    "inb-s-bars": "max-width: 640px; font-size: 11px; margin: 2px 0",
    "inb-s-bar-row": "white-space: nowrap; height: 18px; line-height: 18px",
    "inb-s-bar-label": "display: inline-block; width: 230px; padding-right: 8px; "
                       "box-sizing: border-box; text-align: right; overflow: hidden; "
                       "vertical-align: middle",
    "inb-s-bar-half": "display: inline-block; width: 166px; height: 12px; vertical-align: middle",
    "inb-s-bar-axis": f"display: inline-block; width: 1px; height: 18px; "
                      f"background: {GREY.format(0.6)}; vertical-align: middle",
    "inb-s-bar-value": "display: inline-block; padding-left: 6px; vertical-align: middle",
}
# Only what inline styles cannot say: hide the view's output after a snapshot where the view is
# not drawn (JupyterLab's "Error displaying widget" line in a notebook saved without widget
# state); an untrusted notebook drops it, as it drops the views.
STYLE = """
.jp-OutputArea-child:has(.inb-static) + .jp-OutputArea-child:not(:has(.inb-root)) { display: none; }
"""


def attrs(*classes: str, extra: str = "") -> str:
    """``class="…" style="…"`` for ``classes`` (keys of :data:`CSS`), then ``extra`` rules."""
    rules = "; ".join([CSS[c] for c in classes] + ([extra] if extra else []))
    return f'class="{" ".join(classes)}" style="{rules}"'


def _text_colour(v: float, d: float) -> str:
    return "#fff" if strong(v, d) else "inherit"


def shown(token: str) -> str:
    """A token as displayed: a newline shows as ↵ and still breaks the line (indentation after
    it is kept)."""
    return token.replace("\r\n", "\n").replace("\n", "↵\n")


def tokens(toks: Sequence[str], scores: Sequence[float] | None = None, d: float = 0.0,
           marked: Sequence[int] = (), selected: int = -1) -> str:
    """Tokens as escaped spans, coloured by score on ±d (d = 0: max |score|); ``marked``
    indices are underlined (the measured completion of a query), ``selected`` is boxed."""
    d = domain(scores or [], d)
    out = []
    for i, tok in enumerate(toks):
        cls = ["inb-s-tok"] + ["inb-s-marked"] * (i in marked) + ["inb-s-picked"] * (i == selected)
        extra = title = ""
        if scores is not None:
            v = scores[i]
            extra = f"background: {colour(v, d)}; color: {_text_colour(v, d)}"
            title = f' title="score {fmt(v)}"'
        out.append(f'<span {attrs(*cls, extra=extra)}{title}>{html.escape(shown(tok))}</span>')
    return f'<div {attrs("inb-s-tokens")}>{"".join(out)}</div>'


def legend(d: float, caption: str) -> str:
    stops = "".join(f'<span style="display: inline-block; width: 13px; height: 9px; '
                    f'background: {colour(t * d, d)}"></span>' for t in RULES["legend"])
    return (f'<div {attrs("inb-s-unit")}>−{fmt(d)} <span style="display: inline-block; '
            f'vertical-align: middle; border: 1px solid {GREY.format(0.3)}">{stops}</span> '
            f'+{fmt(d)} · {html.escape(caption)}</div>')


def bars(labels: Sequence[str], values: Sequence[float], title: str = "") -> str:
    """Diverging horizontal bars in plain HTML (an untrusted notebook drops SVG): per row the
    label, the bar left (negative) or right (positive) of a zero axis, the value."""
    d, half = domain(values), 166   # px, each side of the axis (CSS["inb-s-bar-half"])
    rows = []
    for label, v in zip(labels, values):
        bar = (f'<span style="display: inline-block; width: {half * abs(v) / d:.1f}px; '
               f'height: 12px; border-radius: 2px; background: {colour(d if v >= 0 else -d, d)}">'
               "</span>")
        short = label if len(label) <= 36 else label[:35] + "…"
        rows.append(f'<div {attrs("inb-s-bar-row")} title="{html.escape(label)}: {fmt(v)}">'
                    f'<span {attrs("inb-s-bar-label")}>{html.escape(short)}</span>'
                    f'<span {attrs("inb-s-bar-half", extra="text-align: right")}>'
                    f'{bar if v < 0 else ""}</span><span {attrs("inb-s-bar-axis")}></span>'
                    f'<span {attrs("inb-s-bar-half")}>{bar if v >= 0 else ""}</span>'
                    f'<span {attrs("inb-s-bar-value")}>{fmt(v)}</span></div>')
    head = f'<div {attrs("inb-s-title")}>{html.escape(title)}</div>' if title else ""
    return f'{head}<div {attrs("inb-s-bars")} role="img">{"".join(rows)}</div>'


def query(q: dict, token: int = -1) -> str:
    """The query header: prompt and (underlined) completion tokens, log p; completion token
    ``token`` (the one the explorer ranks by alone) boxed."""
    toks = list(q["prompt_tokens"]) + list(q["completion_tokens"])
    n = len(q["prompt_tokens"])
    return (f'<div {attrs("inb-s-title")}>query <span {attrs("inb-s-unit")}>log p = '
            f'{fmt(q["logprob"])}</span></div>'
            + tokens(toks, marked=range(n, len(toks)), selected=n + token if token >= 0 else -1))


def wrap(body: str, note: str) -> str:
    """A snapshot fragment: the style, what it is, the body."""
    return (f'<div {attrs("inb-static")}><style>{STYLE}</style>'
            f'<div {attrs("inb-s-note")}>{html.escape(note)}</div>{body}</div>')


SNAPSHOT = "Static snapshot: run the cell with a kernel to interact."


def token_highlight(state: dict) -> str:
    """TokenHighlight: its title, tokens and legend."""
    d = domain(state["scores"], state["domain"])
    title = (f'<div {attrs("inb-s-title")}>{html.escape(state["title"])}</div>'
             if state["title"] else "")
    return wrap(title + tokens(state["tokens"], state["scores"], d)
                + legend(d, "influence per token · " + NOTE), SNAPSHOT)


def layer_bars(state: dict) -> str:
    """LayerBars: one bar per layer."""
    return wrap(bars(state["names"], state["values"], state["title"] or "influence per layer"),
                SNAPSHOT)


def snippet(row: dict) -> str:
    """A row's text: around its most influential span (marked) when the row has one."""
    if not row.get("snippet"):
        return html.escape(row["text"])
    before, span, after = (html.escape(x) for x in row["snippet"])
    lead, trail = ("…" if cut else "" for cut in row["snippet_cut"])
    return f'{lead}{before}<mark {attrs("inb-s-span")}>{span}</mark>{after}{trail}'


def chips(meta: dict) -> str:
    """Metadata as escaped chips, ``key: value``."""
    return "".join(f'<span {attrs("inb-s-chip")}>{html.escape(k)}: '
                   f'{html.escape(", ".join(v) if isinstance(v, list) else str(v))}</span>'
                   for k, v in meta.items() if v not in ("", [], None))


def view_state(state: dict) -> str:
    """What the explorer was showing, in words: the sign, k, the source, the search, the
    ranking (the whole completion or one completion token alone, over how many sequences),
    the rows' order and the layer the detail tokens are coloured by."""
    q = state["queries"][state["query"]]
    counts = state.get("counts") or {}
    sign = "most negative" if state["sign"] == "negative" else "most positive"
    parts = [f'{len(state["rows"])} {sign} of {counts.get("matches", len(state["rows"])):,} '
             f'sequences' + (f' from {state["source"]}' if state.get("source") else "")
             + (f' matching “{state["search"]}”' if state.get("search") else "")]
    t = state.get("query_token", -1)
    if 0 <= t < len(q["completion_tokens"]):
        over = counts.get("ranked", 0)
        parts.append(f"ranked by the completion token {q['completion_tokens'][t]!r} alone"
                     + (f" over {over:,} of {counts.get('scanned', over):,} scanned" if over
                        else ""))
    else:
        parts.append("ranked by the whole completion")
    if state.get("sort", "rank") != "rank" or state.get("descending"):
        parts.append(f"sorted by {state['sort']} {'▼' if state.get('descending') else '▲'}")
    det = state.get("detail") or {}
    layer = state.get("layer", -1)
    if det.get("layer_names") and 0 <= layer < len(det["layer_names"]):
        parts.append(f"detail tokens by layer {det['layer_names'][layer]} alone")
    return " · ".join(parts)


def explorer(state: dict) -> str:
    """The explorer: query, the view state in words, ranked rows (rank, id, score, Δ log p per
    copy, text with the metadata that varies as chips) and the selected sequence's tokens and
    layer bars."""
    q = state["queries"][state["query"]]
    n = state.get("n_train", 0)
    cols = state.get("columns", [])
    head = ["rank", "id", "score"] + (["Δ log p per copy"] if n > 0 else []) + ["text"]
    rows = []
    for r in state["rows"]:
        sel = attrs("inb-s-selected" if r["id"] == state["selected"] else "inb-s-row")
        cells = [str(r["rank"]), str(r["id"]), fmt(r["score"])
                 + (f" ×{r['copies']}" if r.get("copies", 1) > 1 else "")] + (
            [per_copy(r["score"], n)] if n > 0 else [])
        meta = {c: r["meta"][c] for c in cols if c in r["meta"]}
        rows.append(f"<tr {sel}>" + "".join(f'<td {attrs("inb-s-num")}>{c}</td>' for c in cells)
                    + f'<td {attrs("inb-s-text")}>{snippet(r)}'
                    + (f"<div>{chips(meta)}</div>" if meta else "") + "</td></tr>")
    table = (f'<table {attrs("inb-s-table")}><thead><tr {attrs("inb-s-row")}>'
             + "".join(f'<th {attrs("inb-s-th")}>{html.escape(h)}</th>' for h in head)
             + f"</tr></thead><tbody>{''.join(rows)}</tbody></table>")
    body = [query(q, state.get("query_token", -1)),
            f'<div {attrs("inb-s-title")}>{html.escape(view_state(state))}</div>',
            f'<div {attrs("inb-s-unit")}>{html.escape(unit_note(n))}</div>', table]
    det = state.get("detail") or {}
    if state.get("error"):
        body.append(f'<div {attrs("inb-s-error")}>{html.escape(state["error"])}</div>')
    if det.get("tokens"):
        d = det.get("domain", 0.0)
        layer = state.get("layer", -1)
        by = (f" · tokens by layer {det['layer_names'][layer]} alone"
              if det.get("layer_names") and 0 <= layer < len(det["layer_names"]) else "")
        body += [f'<div {attrs("inb-s-title")}>sequence {det["id"]} · score '
                 f'{fmt(det["score"])}{html.escape(by)}</div>',
                 f'<div>{chips(det.get("meta") or {})}</div>',
                 tokens(det["tokens"], det["token_scores"], d),
                 legend(domain(det["token_scores"], d), "per token · " + NOTE)]
    if det.get("layer_names"):
        body.append(bars(det["layer_names"], det["layer_values"], "influence per layer"))
    return wrap("".join(body), SNAPSHOT)


def lab(state: dict) -> str:
    """The lab: query, each scored sequence's bar and tokens on one scale; greyed with a note
    when the texts or labels were edited after the last score."""
    body = [query(state["query"])]
    if state.get("error"):
        body.append(f'<div {attrs("inb-s-error")}>{html.escape(state["error"])}</div>')
    scores = state["scores"]
    if scores:
        names = [lab or f"#{i + 1}" for i, lab in enumerate(state["scored_labels"])]
        stale = (state["texts"], state["labels"]) != (state["scored_texts"],
                                                      state["scored_labels"])
        out = [bars(names, scores, "influence of each sequence on the query"),
               f'<div {attrs("inb-s-unit")}>{html.escape(unit_note(state.get("n_train", 0)))}</div>']
        d = domain([v for s in state["token_scores"] for v in s])
        for name, toks, ts in zip(names, state["tokens"], state["token_scores"]):
            out.append(f'<div {attrs("inb-s-title")}>{html.escape(name)}</div>' + tokens(toks, ts, d))
        out.append(legend(d, "per token, one scale for all sequences"))
        if stale:
            body.append(f'<div {attrs("inb-s-error")}>edited since the last score: these results '
                        'belong to the texts shown here, not to the edited ones</div>')
        body.append(f'<div {attrs("inb-s-stale") if stale else ""}>{"".join(out)}</div>')
    else:
        body.append(f'<div {attrs("inb-s-note")}>not scored yet</div>')
    return wrap("".join(body), SNAPSHOT)


def document(fragment: str, title: str) -> str:
    """A standalone HTML page around a snapshot fragment (what ``save`` writes)."""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<title>{html.escape(title)}</title></head><body>{fragment}</body></html>\n')
