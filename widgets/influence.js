// influence_nb widgets: token highlighting, layer bars, the explorer and the synthetic lab.
// Plain DOM, no dependencies. Every piece of text from Python is set with textContent.
// Colour convention: orange = positive (the training sequence raises log p(completion | prompt)),
// blue = negative, white = 0, on a symmetric scale ±domain.

const POS = [230, 97, 1];     // #e66101
const NEG = [33, 102, 172];   // #2166ac
// sources of a scan over several corpora (charts.SOURCE_COLOURS: the same order)
const SOURCE_COLOURS = ["#1b9e77", "#7570b3", "#d95f02", "#e7298a", "#66a61e", "#a6761d"];
const NOTE = "A token's score belongs to the update at this position, which predicts the next token.";

function h(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

/** Symmetric domain: an explicit positive value, else max |v| (1 when all are zero). */
function domainOf(values, explicit) {
  if (explicit > 0) return explicit;
  const m = Math.max(0, ...values.map(Math.abs));
  return m > 0 ? m : 1;
}

/** rgb() of v on the diverging scale: white at 0, full orange at +d, full blue at -d; the
 * intensity grows with sqrt(|v| / d) so that small scores beside one large one stay visible. */
function colour(v, d) {
  const t = Math.max(-1, Math.min(1, v / d));
  const end = t >= 0 ? POS : NEG;
  const a = Math.sqrt(Math.abs(t));
  const c = end.map((x) => Math.round(255 + (x - 255) * a));
  return `rgb(${c[0]}, ${c[1]}, ${c[2]})`;
}

const textColour = (v, d) => (Math.abs(v / d) > 0.3 ? "#fff" : "#1a1a1a");

function fmt(v) {
  const a = Math.abs(v);
  if (a === 0) return "0";
  if (a >= 1e4 || a < 1e-3) return v.toExponential(2);
  return v.toPrecision(3);
}

/** Visible whitespace: newline ↵, tab ⇥, a token made only of spaces shows one · per space. */
function shown(token) {
  let s = token.replace(/\t/g, "⇥").replace(/\r?\n/g, "↵");
  if (/^ +$/.test(s)) s = "·".repeat(s.length);
  return s;
}

function legend(d, caption) {
  const box = h("div", "inb-legend");
  box.append(h("span", "inb-legend-end", "−" + fmt(d)));
  const bar = h("span", "inb-legend-bar");
  const stops = [-1, -0.5, -0.2, -0.05, 0, 0.05, 0.2, 0.5, 1].map((t) => colour(t * d, d));
  bar.style.background = `linear-gradient(to right, ${stops.join(", ")})`;
  box.append(bar, h("span", "inb-legend-end", "+" + fmt(d)));
  if (caption) box.append(h("span", "inb-legend-caption", caption));
  return box;
}

/** One tooltip per rendered view, fixed to the viewport (output areas clip their content). */
function tooltip() {
  const tip = h("div", "inb-tip");
  tip.setAttribute("role", "tooltip");
  document.body.append(tip);
  return {
    show(target, lines) {
      tip.replaceChildren(...lines.map(([cls, text]) => h("div", cls, text)));
      tip.classList.add("inb-show");
      const r = target.getBoundingClientRect();
      const below = r.bottom + 6 + tip.offsetHeight < window.innerHeight;
      tip.style.left = `${Math.max(4, Math.min(r.left, window.innerWidth - tip.offsetWidth - 4))}px`;
      tip.style.top = `${below ? r.bottom + 6 : r.top - tip.offsetHeight - 6}px`;
    },
    hide() { tip.classList.remove("inb-show"); },
    remove() { tip.remove(); },
  };
}

/**
 * Tokens coloured by score. opts: tokens, scores, domain (0 = auto), selected (index or -1),
 * onSelect(i), tip (a tooltip), marked (a Set of indices drawn as the measured completion).
 * Keyboard: the view is one tab stop; arrows move, Enter / Space select.
 */
function tokenView(opts) {
  const { tokens, scores, tip } = opts;
  const d = domainOf(scores || [], opts.domain || 0);
  const box = h("div", "inb-tokens");
  box.setAttribute("role", "listbox");
  box.setAttribute("aria-label", "tokens coloured by influence");
  const spans = tokens.map((tok, i) => {
    const s = h("span", "inb-tok", shown(tok));
    s.dataset.id = `${opts.key || "t"}${i}`;
    s.setAttribute("role", "option");
    s.tabIndex = i === Math.max(0, opts.selected) ? 0 : -1;
    if (scores) {
      const v = scores[i];
      s.dataset.score = String(v);
      s.style.background = colour(v, d);
      s.style.color = textColour(v, d);
    }
    if (opts.marked && opts.marked.has(i)) s.classList.add("inb-marked");
    if (i === opts.selected) { s.classList.add("inb-selected"); s.setAttribute("aria-selected", "true"); }
    if (/\n/.test(tok)) s.classList.add("inb-newline");
    const info = () => {
      if (!tip) return;
      const lines = [["inb-tip-token", JSON.stringify(tok) + `  · position ${i}`]];
      if (scores) {
        lines.push(["inb-tip-value", `score ${scores[i]}`]);
        const next = tokens[i + 1];
        lines.push(["inb-tip-note", NOTE + (next === undefined ? " (last token: none)"
          : ` Next token: ${JSON.stringify(next)}.`)]);
      } else if (opts.marked) {
        lines.push(["inb-tip-note", opts.marked.has(i) ? "completion: measured by the query"
          : "prompt: conditioned on, not measured"]);
      }
      tip.show(s, lines);
    };
    s.addEventListener("mouseenter", info);
    s.addEventListener("focus", info);
    s.addEventListener("mouseleave", () => tip && tip.hide());
    s.addEventListener("blur", () => tip && tip.hide());
    s.addEventListener("click", () => opts.onSelect && opts.onSelect(i));
    return s;
  });
  box.addEventListener("keydown", (e) => {
    const i = spans.indexOf(document.activeElement);
    if (i < 0) return;
    const step = { ArrowRight: 1, ArrowDown: 1, ArrowLeft: -1, ArrowUp: -1 }[e.key];
    if (step) {
      const j = Math.max(0, Math.min(spans.length - 1, i + step));
      spans[i].tabIndex = -1; spans[j].tabIndex = 0; spans[j].focus();
      e.preventDefault();
    } else if ((e.key === "Enter" || e.key === " ") && opts.onSelect) {
      opts.onSelect(i); e.preventDefault();
    }
  });
  for (const s of spans) {
    box.append(s);
    if (s.classList.contains("inb-newline")) box.append(document.createElement("br"));
  }
  return { el: box, domain: d };
}

/** Horizontal diverging bars: one row per label, zero in the middle, value on hover. */
function barView({ labels, values, tip, title, onSelect, selected }) {
  const d = domainOf(values, 0);
  const box = h("div", "inb-bars");
  if (title) box.append(h("div", "inb-subtitle", title));
  labels.forEach((label, i) => {
    const v = values[i];
    const row = h("div", "inb-bar-row");
    row.tabIndex = 0;
    row.dataset.value = String(v);
    if (i === selected) row.classList.add("inb-selected");
    const track = h("div", "inb-bar-track");
    const bar = h("div", "inb-bar " + (v >= 0 ? "inb-pos" : "inb-neg"));
    bar.style.width = `${(50 * Math.abs(v)) / d}%`;
    bar.style.background = colour(v >= 0 ? d : -d, d);
    track.append(h("div", "inb-bar-axis"), bar);
    row.append(h("div", "inb-bar-label", label), track, h("div", "inb-bar-value", fmt(v)));
    const info = () => tip && tip.show(row, [["inb-tip-token", label], ["inb-tip-value", `score ${v}`]]);
    row.addEventListener("mouseenter", info);
    row.addEventListener("focus", info);
    row.addEventListener("mouseleave", () => tip && tip.hide());
    row.addEventListener("blur", () => tip && tip.hide());
    if (onSelect) {
      row.classList.add("inb-clickable");
      row.addEventListener("click", () => onSelect(i));
      row.addEventListener("keydown", (e) => { if (e.key === "Enter") onSelect(i); });
    }
    box.append(row);
  });
  return box;
}

function chips(meta) {
  const box = h("span", "inb-chips");
  for (const [k, v] of Object.entries(meta || {})) {
    if (v === null || v === undefined || v === "" || (Array.isArray(v) && !v.length)) continue;
    box.append(h("span", "inb-chip", `${k}: ${Array.isArray(v) ? v.join(", ") : v}`));
  }
  return box;
}

// ---------------------------------------------------------------------------------------------
// views: each builds its DOM from the model and rebuilds on change

function tokensWidget(model, root, tip) {
  const tv = tokenView({
    tokens: model.get("tokens"), scores: model.get("scores"), domain: model.get("domain"),
    selected: model.get("selected"), tip,
    onSelect: (i) => { model.set("selected", i); model.save_changes(); },
  });
  const title = model.get("title");
  if (title) root.append(h("div", "inb-title", title));
  root.append(tv.el, legend(tv.domain, "influence per token · orange raises, blue lowers log p(completion | prompt)"));
  return ["tokens", "scores", "domain", "selected", "title"];
}

function layersWidget(model, root, tip) {
  root.append(barView({ labels: model.get("names"), values: model.get("values"), tip,
    title: model.get("title") || "influence per layer" }));
  return ["names", "values", "title"];
}

function queryHeader(q, tip) {
  const box = h("div", "inb-query");
  const toks = q.prompt_tokens.concat(q.completion_tokens);
  const marked = new Set(q.completion_tokens.map((_, j) => q.prompt_tokens.length + j));
  box.append(h("span", "inb-query-label", "query"),
    tokenView({ tokens: toks, tip, marked, selected: -1, key: "q" }).el,
    h("span", "inb-query-logprob", `log p = ${fmt(q.logprob)}`));
  return box;
}

function explorerWidget(model, root, tip) {
  const queries = model.get("queries");
  const qi = model.get("query");
  const head = h("div", "inb-head");
  if (queries.length > 1) {
    const sel = h("select", "inb-select");
    queries.forEach((q, i) => {
      const o = h("option", null, `${i}: ${q.prompt} ‖${q.completion}`);
      o.value = String(i);
      sel.append(o);
    });
    sel.value = String(qi);
    sel.addEventListener("change", () => { model.set("query", Number(sel.value)); model.save_changes(); });
    head.append(sel);
  }
  head.append(queryHeader(queries[qi], tip));
  root.append(head);

  const body = h("div", "inb-explorer");
  const left = h("div", "inb-ranked");
  const tabs = h("div", "inb-tabs");
  for (const [sign, label] of [["positive", "▲ most positive"], ["negative", "▼ most negative"]]) {
    const b = h("button", "inb-tab" + (model.get("sign") === sign ? " inb-active" : ""), label);
    b.addEventListener("click", () => { model.set("sign", sign); model.save_changes(); });
    tabs.append(b);
  }
  const sources = model.get("sources") || [];
  if (sources.length > 1) {   // a scan over several corpora: filter by source
    const sel = h("select", "inb-select inb-source-select");
    sel.setAttribute("aria-label", "source");
    sel.append(h("option", null, "all sources"));
    sel.lastChild.value = "";
    for (const s of sources) {
      const o = h("option", null, s);
      o.value = s;
      sel.append(o);
    }
    sel.value = model.get("source");
    sel.addEventListener("change", () => { model.set("source", sel.value); model.save_changes(); });
    tabs.append(sel);
  }
  left.append(tabs);
  const rows = model.get("rows");
  const d = domainOf(rows.map((r) => r.score), 0);
  const list = h("ol", "inb-list");
  for (const r of rows) {
    const li = h("li", "inb-row" + (r.id === model.get("selected") ? " inb-selected" : ""));
    li.tabIndex = 0;
    li.dataset.id = String(r.id);
    if (sources.length > 1 && r.source) {   // a stripe in the source's colour
      li.dataset.source = r.source;
      li.style.borderLeft = `4px solid ${SOURCE_COLOURS[sources.indexOf(r.source) % SOURCE_COLOURS.length]}`;
    }
    const score = h("span", "inb-score", fmt(r.score));
    score.style.background = colour(r.score, d);
    score.style.color = textColour(r.score, d);
    li.append(h("span", "inb-rank", String(r.rank)), score, h("span", "inb-snippet", r.text),
      chips(r.meta));
    const pick = () => { model.set("selected", r.id); model.save_changes(); };
    li.addEventListener("click", pick);
    li.addEventListener("keydown", (e) => { if (e.key === "Enter") pick(); });
    list.append(li);
  }
  left.append(list);

  const right = h("div", "inb-detail");
  const det = model.get("detail");
  if (model.get("error")) right.append(h("div", "inb-error", model.get("error")));
  if (det && det.tokens) {
    right.append(h("div", "inb-title", `sequence ${det.id} · score ${fmt(det.score)}`), chips(det.meta));
    const tv = tokenView({ tokens: det.tokens, scores: det.token_scores, tip, key: "d",
      selected: model.get("token"),
      onSelect: (i) => { model.set("token", i); model.save_changes(); } });
    right.append(tv.el, legend(tv.domain, "per token"));
    if (det.layer_names && det.layer_names.length)
      right.append(barView({ labels: det.layer_names, values: det.layer_values, tip,
        title: "influence per layer" }));
  } else if (!model.get("error")) {
    right.append(h("div", "inb-hint", "Select a sequence to see its tokens and layers."));
  }
  body.append(left, right);
  root.append(body);
  return ["queries", "query", "sign", "sources", "source", "rows", "selected", "detail", "token", "error"];
}

function labWidget(model, root, tip) {
  const q = model.get("query");
  root.append(h("div", "inb-head"));
  root.lastChild.append(queryHeader(q, tip));
  const texts = model.get("texts").slice();
  const labels = model.get("labels").slice();
  const scored = model.get("scored_texts");
  const fresh = scored.length === texts.length && scored.every((t, i) => t === texts[i]);

  const editor = h("div", "inb-lab-editor");
  const push = () => {
    model.set("texts", texts.slice());
    model.set("labels", texts.map((_, i) => labels[i] || ""));
    model.save_changes();
  };
  texts.forEach((t, i) => {
    const row = h("div", "inb-lab-row");
    const ta = h("textarea", "inb-lab-text");
    ta.value = t;
    ta.rows = Math.min(4, 1 + Math.floor(t.length / 90));
    ta.setAttribute("aria-label", `synthetic sequence ${i + 1}`);
    ta.addEventListener("change", () => { texts[i] = ta.value; push(); });
    const del = h("button", "inb-icon", "×");
    del.title = "remove this sequence";
    del.addEventListener("click", () => { texts.splice(i, 1); labels.splice(i, 1); push(); });
    row.append(h("span", "inb-rank", labels[i] || `#${i + 1}`), ta, del);
    editor.append(row);
  });
  const actions = h("div", "inb-lab-actions");
  const add = h("button", "inb-button", "+ sequence");
  add.addEventListener("click", () => { texts.push(""); push(); });
  const go = h("button", "inb-button inb-primary", model.get("busy") ? "scoring…" : "Score");
  go.disabled = model.get("busy");
  go.addEventListener("click", () => model.send({ type: "score" }));
  actions.append(add, go);
  if (!fresh && scored.length) actions.append(h("span", "inb-hint", "edited since the last score"));
  editor.append(actions);
  root.append(editor);
  if (model.get("error")) root.append(h("div", "inb-error", model.get("error")));

  const scores = model.get("scores");
  if (scores.length) {
    const names = scored.map((t, i) => labels[i] || `#${i + 1}`);
    const out = h("div", "inb-lab-out");
    out.append(barView({ labels: names, values: scores, tip, title: "influence of each sequence on the query" }));
    const toks = model.get("tokens"), ts = model.get("token_scores");
    const d = domainOf(ts.flat(), 0);
    ts.forEach((s, i) => {
      const row = h("div", "inb-lab-tokens");
      row.append(h("span", "inb-rank", names[i]), tokenView({ tokens: toks[i], scores: s, domain: d, tip, selected: -1, key: `s${i}-` }).el);
      out.append(row);
    });
    out.append(legend(d, "per token, one scale for all sequences"));
    root.append(out);
  }
  return ["query", "texts", "labels", "scored_texts", "scores", "tokens", "token_scores", "busy", "error"];
}

const VIEWS = { tokens: tokensWidget, layers: layersWidget, explorer: explorerWidget, lab: labWidget };

function render({ model, el }) {
  const root = h("div", "inb-root");
  root.dataset.view = model.get("_view");
  el.append(root);
  const tip = tooltip();
  let keys = [];
  const draw = () => {
    const focused = root.contains(document.activeElement) ? document.activeElement : null;
    const path = focused && focused.dataset ? focused.dataset.id : null;
    tip.hide();
    root.replaceChildren();
    keys = VIEWS[model.get("_view")](model, root, tip);
    if (path) {
      const again = root.querySelector(`[data-id="${CSS.escape(path)}"]`);
      if (again) again.focus();
    }
  };
  draw();
  const events = keys.map((k) => `change:${k}`).join(" ");
  model.on(events, draw);
  return () => { model.off(events, draw); tip.remove(); };
}

export default { render };
