"""Static HTML snapshots of the widget views: what a saved notebook, nbconvert HTML or a rendered
.ipynb shows without a kernel, and what ``widget.save(path)`` writes.

A snapshot is self-contained — inline CSS (JupyterLab theme variables with light fallbacks),
inline SVG bars, no script, no network — and every text that comes from the model, the corpus or
the user (tokens, training text, labels, metadata) is escaped. The functions take the widgets'
synced traits (plain dicts and lists), so a snapshot shows exactly what the live view shows.

Numbers and colours follow :mod:`influence_nb.style`, the rules the live views follow too; the
unit is :data:`influence_nb.results.UNIT` (Δ log p per copy = score / N, :func:`per_copy`).
"""
from __future__ import annotations

import html
from collections.abc import Sequence

from .results import unit_note
from .style import RULES, colour, domain, fmt, per_copy, strong

NOTE = "A token's score belongs to the update at its position, which predicts the next token."

STYLE = """
.jp-OutputArea-child:has(.inb-static) + .jp-OutputArea-child:not(:has(.inb-root)) { display: none; }
.inb-static { font-family: var(--jp-ui-font-family, system-ui, sans-serif); font-size: 13px;
  color: var(--jp-content-font-color1, #1a1a1a); max-width: 1100px; padding: 4px 0; }
.inb-static .inb-s-note { font-size: 11px; color: var(--jp-content-font-color2, #666);
  font-style: italic; margin: 2px 0 6px; }
.inb-static .inb-s-title { font-weight: 600; margin: 6px 0 4px; }
.inb-static .inb-s-unit { font-size: 11.5px; color: var(--jp-content-font-color2, #555); margin: 2px 0 6px; }
.inb-static .inb-s-tokens { font-family: var(--jp-code-font-family, ui-monospace, monospace);
  line-height: 1.9; white-space: pre-wrap; overflow-wrap: break-word; }
.inb-static .inb-s-tok { border-radius: 3px; padding: 1px 0; margin-right: 1px; }
.inb-static .inb-s-marked { font-weight: 700; text-decoration: underline 2px #e66101; }
.inb-static .inb-s-picked { box-shadow: inset 0 0 0 2px currentColor; }
.inb-static table.inb-s-table { border-collapse: collapse; width: 100%; font-size: 12px; margin: 4px 0;
  table-layout: auto; }
.inb-static table.inb-s-table th { text-align: left; font-weight: 600; border: 0; border-bottom: 1px solid var(--jp-border-color1, #ccc);
  padding: 2px 6px; }
.inb-static table.inb-s-table td { text-align: left; border: 0; border-bottom: 1px solid var(--jp-border-color2, #e0e0e0);
  padding: 2px 6px; vertical-align: top; }
.inb-static table.inb-s-table tr, .inb-static table.inb-s-table tr:nth-child(odd),
.inb-static table.inb-s-table tr:hover { background: transparent; }
.inb-static table.inb-s-table td.inb-s-num { font-variant-numeric: tabular-nums; white-space: nowrap; width: 1%; }
.inb-static mark { background: transparent; color: inherit; font-weight: 600;
  text-decoration: underline 2px currentColor; }
.inb-static table.inb-s-table td.inb-s-text { white-space: pre-wrap; overflow-wrap: break-word; min-width: 14em; }
.inb-static .inb-s-chip { display: inline-block; font-size: 10.5px; white-space: nowrap; margin: 2px 4px 0 0;
  background: var(--jp-layout-color2, #eef0f3); color: var(--jp-content-font-color2, #444);
  border-radius: 9px; padding: 0 7px; }
.inb-static table.inb-s-table tr.inb-s-selected td { background: var(--jp-layout-color2, #f1f3f5); }
.inb-static .inb-s-stale { opacity: 0.45; }
.inb-static .inb-s-error { color: var(--jp-error-color1, #b3261e); }
.inb-static svg text { fill: currentColor; font-size: 11px; }
"""


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
        cls = ("inb-s-tok" + (" inb-s-marked" if i in marked else "")
               + (" inb-s-picked" if i == selected else ""))
        style = title = ""
        if scores is not None:
            v = scores[i]
            style = f' style="background:{colour(v, d)};color:{_text_colour(v, d)}"'
            title = f' title="score {fmt(v)}"'
        out.append(f'<span class="{cls}"{style}{title}>{html.escape(shown(tok))}</span>')
    return f'<div class="inb-s-tokens">{"".join(out)}</div>'


def legend(d: float, caption: str) -> str:
    stops = ", ".join(colour(t * d, d) for t in RULES["legend"])
    return (f'<div class="inb-s-unit">−{fmt(d)} <span style="display:inline-block;width:120px;'
            f'height:9px;vertical-align:middle;background:linear-gradient(to right, {stops})">'
            f'</span> +{fmt(d)} · {html.escape(caption)}</div>')


def bars(labels: Sequence[str], values: Sequence[float], title: str = "") -> str:
    """Diverging horizontal bars as inline SVG: label, bar about a zero axis, value."""
    d = domain(values)
    row, width, lab_w, val_w = 18, 640, 230, 70
    mid = lab_w + (width - lab_w - val_w) / 2
    half = (width - lab_w - val_w) / 2 - 4
    parts = []
    for i, (label, v) in enumerate(zip(labels, values)):
        y = i * row
        w = half * abs(v) / d
        x = mid if v >= 0 else mid - w
        short = label if len(label) <= 36 else label[:35] + "…"
        parts.append(
            f'<g><title>{html.escape(label)}: {fmt(v)}</title>'
            f'<text x="{lab_w - 8}" y="{y + 13}" text-anchor="end">{html.escape(short)}</text>'
            f'<rect x="{x:.1f}" y="{y + 3}" width="{w:.1f}" height="{row - 6}" rx="2" '
            f'fill="{colour(d if v >= 0 else -d, d)}"/>'
            f'<text x="{width - val_w + 6}" y="{y + 13}">{fmt(v)}</text></g>')
    height = max(1, len(parts)) * row
    axis = (f'<line x1="{mid}" x2="{mid}" y1="0" y2="{height}" stroke="currentColor" '
            'stroke-opacity="0.4"/>')
    head = f'<div class="inb-s-title">{html.escape(title)}</div>' if title else ""
    return (f'{head}<svg class="inb-s-bars" viewBox="0 0 {width} {height}" width="100%" '
            f'style="max-width:{width}px" role="img">'
            f'{axis}{"".join(parts)}</svg>')


def query(q: dict, token: int = -1) -> str:
    """The query header: prompt and (underlined) completion tokens, log p; completion token
    ``token`` (the one the explorer ranks by alone) boxed."""
    toks = list(q["prompt_tokens"]) + list(q["completion_tokens"])
    n = len(q["prompt_tokens"])
    return (f'<div class="inb-s-title">query <span class="inb-s-unit">log p = '
            f'{fmt(q["logprob"])}</span></div>'
            + tokens(toks, marked=range(n, len(toks)), selected=n + token if token >= 0 else -1))


def wrap(body: str, note: str) -> str:
    """A snapshot fragment: the style, what it is, the body."""
    return (f'<div class="inb-static"><style>{STYLE}</style>'
            f'<div class="inb-s-note">{html.escape(note)}</div>{body}</div>')


SNAPSHOT = "Static snapshot: run the cell with a kernel to interact."


def token_highlight(state: dict) -> str:
    """TokenHighlight: its title, tokens and legend."""
    d = domain(state["scores"], state["domain"])
    title = f'<div class="inb-s-title">{html.escape(state["title"])}</div>' if state["title"] else ""
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
    return f"{lead}{before}<mark>{span}</mark>{after}{trail}"


def chips(meta: dict) -> str:
    """Metadata as escaped chips, ``key: value``."""
    return "".join(f'<span class="inb-s-chip">{html.escape(k)}: '
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
        sel = ' class="inb-s-selected"' if r["id"] == state["selected"] else ""
        cells = [str(r["rank"]), str(r["id"]), fmt(r["score"])
                 + (f" ×{r['copies']}" if r.get("copies", 1) > 1 else "")] + (
            [per_copy(r["score"], n)] if n > 0 else [])
        meta = {c: r["meta"][c] for c in cols if c in r["meta"]}
        rows.append(f"<tr{sel}>" + "".join(f'<td class="inb-s-num">{c}</td>' for c in cells)
                    + f'<td class="inb-s-text">{snippet(r)}'
                    + (f"<div>{chips(meta)}</div>" if meta else "") + "</td></tr>")
    table = ('<table class="inb-s-table"><thead><tr>'
             + "".join(f"<th>{html.escape(h)}</th>" for h in head)
             + f"</tr></thead><tbody>{''.join(rows)}</tbody></table>")
    body = [query(q, state.get("query_token", -1)),
            f'<div class="inb-s-title">{html.escape(view_state(state))}</div>',
            f'<div class="inb-s-unit">{html.escape(unit_note(n))}</div>', table]
    det = state.get("detail") or {}
    if state.get("error"):
        body.append(f'<div class="inb-s-error">{html.escape(state["error"])}</div>')
    if det.get("tokens"):
        d = det.get("domain", 0.0)
        layer = state.get("layer", -1)
        by = (f" · tokens by layer {det['layer_names'][layer]} alone"
              if det.get("layer_names") and 0 <= layer < len(det["layer_names"]) else "")
        body += [f'<div class="inb-s-title">sequence {det["id"]} · score '
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
        body.append(f'<div class="inb-s-error">{html.escape(state["error"])}</div>')
    scores = state["scores"]
    if scores:
        names = [lab or f"#{i + 1}" for i, lab in enumerate(state["scored_labels"])]
        stale = (state["texts"], state["labels"]) != (state["scored_texts"],
                                                      state["scored_labels"])
        out = [bars(names, scores, "influence of each sequence on the query"),
               f'<div class="inb-s-unit">{html.escape(unit_note(state.get("n_train", 0)))}</div>']
        d = domain([v for s in state["token_scores"] for v in s])
        for name, toks, ts in zip(names, state["tokens"], state["token_scores"]):
            out.append(f'<div class="inb-s-title">{html.escape(name)}</div>' + tokens(toks, ts, d))
        out.append(legend(d, "per token, one scale for all sequences"))
        if stale:
            body.append('<div class="inb-s-error">edited since the last score: these results '
                        'belong to the texts shown here, not to the edited ones</div>')
        body.append(f'<div class="{"inb-s-stale" if stale else ""}">{"".join(out)}</div>')
    else:
        body.append('<div class="inb-s-note">not scored yet</div>')
    return wrap("".join(body), SNAPSHOT)


def document(fragment: str, title: str) -> str:
    """A standalone HTML page around a snapshot fragment (what ``save`` writes)."""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<title>{html.escape(title)}</title></head><body>{fragment}</body></html>\n')
