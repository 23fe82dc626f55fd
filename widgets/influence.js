// influence_nb widgets: token highlighting, layer bars, the explorer and the synthetic lab.
// Plain DOM, no dependencies. Every piece of text from Python is set with textContent.
// Colour convention: orange = positive (the training sequence raises log p(completion | prompt)),
// blue = negative, transparent = 0, on a symmetric scale ±domain. The unit, influence_nb.results
// .UNIT, comes from Python as the trait "unit" (Δ log p per copy = score / N). The static snapshot of each view (influence_nb.snapshot) mirrors
// what is drawn here.
// RULES, the number format and the colours, is influence_nb.style.RULES: influence_nb.widgets
// writes it as a constant above this file (fmt, colour and domainOf below follow the same steps
// as influence_nb.style's fmt, colour and domain).
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

/** rgba() of v on the diverging scale: transparent at 0 (the theme shows through), orange at
 * +d, blue at -d; the opacity grows with sqrt(|v| / d) so that small scores beside one large one
 * stay visible. */
function colour(v, d) {
  const t = Math.max(-1, Math.min(1, v / d));
  const [r, g, b] = t >= 0 ? RULES.positive : RULES.negative;
  return `rgba(${r}, ${g}, ${b}, ${Math.sqrt(Math.abs(t)).toFixed(3)})`;
}

/** White text on a strong colour, the theme's own text colour otherwise. */
const textColour = (v, d) => (Math.abs(v / d) > RULES.strong ? "#fff" : "");

/** RULES.digits significant digits; 9.77e+4 style when |v| rounds to hi or more or is below lo
 * (RULES.plain = [lo, hi]). */
function fmt(v) {
  const a = Math.abs(v);
  const [lo, hi] = RULES.plain;
  if (a === 0) return "0";
  if (!Number.isFinite(v)) return String(v);
  const r = Number(v.toPrecision(RULES.digits));   // the form is chosen on the rounded value
  if (Math.abs(r) >= hi || a < lo) return v.toExponential(RULES.digits - 1);
  return String(r);
}

/** score / N: the first-order change in log p (nats) for one added copy of the sequence. */
const perCopy = (v, n) => (n > 0 ? (v > 0 ? "+" : "") + fmt(v / n) : "");

/** A score with its unit, for tooltips and titles. */
const scoreText = (v, n) => `score ${fmt(v)}` + (n > 0 ? ` · Δ log p per copy ${perCopy(v, n)}` : "");


/** A token as displayed: a newline shows as ↵ and still breaks the line, so indentation after
 * it is kept (the token view is white-space: pre-wrap). */
const shown = (token) => token.replace(/\r?\n/g, "↵\n");

function legend(d, caption) {
  const box = h("div", "inb-legend");
  box.append(h("span", "inb-legend-end", "−" + fmt(d)));
  const bar = h("span", "inb-legend-bar");
  const stops = RULES.legend.map((t) => colour(t * d, d));
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
 * onSelect(i), tip (a tooltip), marked (a Set of indices drawn as the measured completion),
 * n (N for Δ log p per copy), note(i) (an extra tooltip line).
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
    if (opts.onSelect && (!opts.marked || opts.marked.has(i))) s.classList.add("inb-clickable");
    if (i === opts.selected) { s.classList.add("inb-selected"); s.setAttribute("aria-selected", "true"); }
    const info = () => {
      if (!tip) return;
      const lines = [["inb-tip-token", JSON.stringify(tok) + `  · position ${i}`]];
      if (scores) {
        lines.push(["inb-tip-value", scoreText(scores[i], opts.n)]);
        const next = tokens[i + 1];
        lines.push(["inb-tip-note", NOTE + (next === undefined ? " (last token: none)"
          : ` Next token: ${JSON.stringify(next)}.`)]);
      } else if (opts.marked) {
        lines.push(["inb-tip-note", opts.marked.has(i) ? "completion: measured by the query"
          : "prompt: conditioned on, not measured"]);
      }
      if (opts.note) lines.push(...opts.note(i));
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
  box.append(...spans);
  return { el: box, domain: d };
}

/** Horizontal diverging bars: one row per label, zero in the middle, value on hover. */
function barView({ labels, values, tip, title, onSelect, selected, n }) {
  const d = domainOf(values, 0);
  const box = h("div", "inb-bars");
  if (title) box.append(h("div", "inb-subtitle", title));
  labels.forEach((label, i) => {
    const v = values[i];
    const row = h("div", "inb-bar-row");
    row.tabIndex = 0;
    row.dataset.value = String(v);
    row.dataset.id = `bar${i}`;
    if (i === selected) row.classList.add("inb-selected");
    const track = h("div", "inb-bar-track");
    const bar = h("div", "inb-bar " + (v >= 0 ? "inb-pos" : "inb-neg"));
    bar.style.width = `${(50 * Math.abs(v)) / d}%`;
    bar.style.background = colour(v >= 0 ? d : -d, d);
    track.append(h("div", "inb-bar-axis"), bar);
    row.append(h("div", "inb-bar-label", label), track, h("div", "inb-bar-value", fmt(v)));
    const lines = [["inb-tip-token", label], ["inb-tip-value", scoreText(v, n)]];
    if (onSelect) lines.push(["inb-tip-note", i === selected ? "click again: all layers" : "click: colour the tokens by this layer alone"]);
    const info = () => tip && tip.show(row, lines);
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

/** The selected sequence's metadata (all of it, whether or not it varies between rows). */
function chips(meta) {
  const box = h("span", "inb-chips");
  for (const [k, v] of Object.entries(meta || {})) {
    if (v === null || v === undefined || v === "" || (Array.isArray(v) && !v.length)) continue;
    box.append(h("span", "inb-chip", `${k}: ${Array.isArray(v) ? v.join(", ") : v}`));
  }
  return box;
}

// ---------------------------------------------------------------------------------------------
// views: each builds its DOM from the model and rebuilds on change. ctx: model, tip, set(key,
// value) and send(message), which do nothing in a view without a kernel (conn.live === false),
// and ui, the view's own state that survives a rebuild: the search box's text while it is
// typed, the page, the divider's position.

function tokensWidget(ctx, root) {
  const { model, tip } = ctx;
  const tv = tokenView({
    tokens: model.get("tokens"), scores: model.get("scores"), domain: model.get("domain"),
    selected: model.get("selected"), tip, n: model.get("n_train"),
    onSelect: (i) => ctx.set("selected", i),
  });
  const title = model.get("title");
  if (title) root.append(h("div", "inb-title", title));
  root.append(tv.el, legend(tv.domain, "influence per token · orange raises, blue lowers log p(completion | prompt)"));
  return ["tokens", "scores", "domain", "selected", "title", "n_train"];
}

function layersWidget(ctx, root) {
  const { model, tip } = ctx;
  root.append(barView({ labels: model.get("names"), values: model.get("values"), tip,
    n: model.get("n_train"), title: model.get("title") || "influence per layer" }));
  return ["names", "values", "title", "n_train"];
}

/** The query's prompt and completion tokens; onToken(j) for a click on completion token j. */
function queryHeader(q, tip, onToken, selected) {
  const box = h("div", "inb-query");
  const toks = q.prompt_tokens.concat(q.completion_tokens);
  const n = q.prompt_tokens.length;
  const marked = new Set(q.completion_tokens.map((_, j) => n + j));
  const note = onToken ? (i) => (marked.has(i) ? [["inb-tip-note", i - n === selected
    ? "click again: rank by the whole completion" : "click: rank by this completion token alone"]] : []) : null;
  box.append(h("span", "inb-query-label", "query"),
    tokenView({ tokens: toks, tip, marked, selected: selected >= 0 ? n + selected : -1, key: "q", note,
      onSelect: onToken ? (i) => { if (marked.has(i)) onToken(i - n); } : null }).el,
    h("span", "inb-query-logprob", `log p = ${fmt(q.logprob)}`));
  return box;
}

/** The ranked sequence's text around its most influential span (underlined), else all of it. */
function snippet(r) {
  const box = h("span", "inb-snippet");
  if (!r.snippet) { box.textContent = r.text; return box; }
  const [before, span, after] = r.snippet;
  box.append((r.snippet_cut[0] ? "…" : "") + before, h("mark", "inb-span", span),
    after + (r.snippet_cut[1] ? "…" : ""));
  box.title = "the most influential span of the sequence, centred";
  return box;
}

/** The table's bar: search (the kernel searches the whole scan), k, sort, the count, pages. */
function tableBar(ctx, columns, counts) {
  const { model, ui } = ctx;
  const bar = h("div", "inb-table-bar");
  const search = h("input", "inb-search");
  search.type = "search";
  search.dataset.id = "search";
  search.placeholder = "search the whole scan";
  search.title = "search the text, id and metadata of every scanned sequence (not only the rows shown)";
  search.setAttribute("aria-label", "search the scan");
  search.value = ui.search;
  let timer = null;
  search.addEventListener("input", () => {
    ui.search = search.value;
    clearTimeout(timer);
    timer = setTimeout(() => ctx.set("search", ui.search), 300);
  });
  search.addEventListener("keydown", (e) => {
    if (e.key === "Enter") { clearTimeout(timer); ctx.set("search", ui.search); }
  });
  const k = h("input", "inb-k");
  k.type = "number"; k.min = "1"; k.max = "500"; k.value = String(model.get("k"));
  k.dataset.id = "k";
  k.setAttribute("aria-label", "rows shown (k)");
  const setK = () => {
    const v = Math.max(1, Math.round(Number(k.value) || 1));
    if (v !== model.get("k")) ctx.set("k", v);
  };
  k.addEventListener("change", setK);
  k.addEventListener("keydown", (e) => { if (e.key === "Enter") setK(); });
  const kLabel = h("label", "inb-check", "k ");
  kLabel.append(k);
  kLabel.title = "rows shown: the k best-ranked distinct texts of the whole scan";
  const sort = h("select", "inb-select inb-sort");
  sort.dataset.id = "sort";
  sort.setAttribute("aria-label", "sort the rows");
  for (const key of ["rank", "score", "id", ...columns]) {
    const o = h("option", null, `sort: ${key}`);
    o.value = key;
    sort.append(o);
  }
  sort.value = model.get("sort");
  sort.addEventListener("change", () => ctx.set("sort", sort.value));
  const dir = h("button", "inb-icon inb-sort-dir", model.get("descending") ? "▼" : "▲");
  dir.setAttribute("aria-label", model.get("descending") ? "descending: click for ascending" : "ascending: click for descending");
  dir.addEventListener("click", () => ctx.set("descending", !model.get("descending")));
  const rows = model.get("rows").length;
  const count = h("span", "inb-count", `${rows} of ${(counts.matches ?? rows).toLocaleString("en")} `
    + (counts.search ? `matching “${counts.search}”` : "ranked")
    + (counts.scanned && counts.matches !== counts.scanned ? ` · ${counts.scanned.toLocaleString("en")} scanned` : ""));
  bar.append(search, kLabel, sort, dir, count);
  return bar;
}

function explorerTable(ctx, rows, columns) {
  const { model, ui } = ctx;
  const n = model.get("n_train");
  const wrap = h("div", "inb-table-wrap");
  const pager = h("div", "inb-pager");
  const table = h("table", "inb-table");
  const head = h("tr");
  const sortKey = model.get("sort"), desc = model.get("descending");
  for (const [key, label] of [["rank", "#"], ["id", "id"], ["score", "score"], ["text", "text"]]) {
    const th = h("th", "inb-col-" + key, label);
    if (key === "score") th.title = model.get("unit");
    if (key !== "text") {
      th.classList.add("inb-sortable");
      th.tabIndex = 0;
      if (sortKey === key) th.dataset.dir = desc ? "▼" : "▲";
      const sortBy = () => ctx.set(sortKey === key ? "descending" : "sort", sortKey === key ? !desc : key);
      th.addEventListener("click", sortBy);
      th.addEventListener("keydown", (e) => { if (e.key === "Enter") sortBy(); });
    }
    head.append(th);
  }
  table.append(h("thead"));
  table.firstChild.append(head);
  const body = h("tbody");
  table.append(body);
  const d = domainOf(rows.map((r) => r.score), 0);
  const sources = model.get("sources") || [];
  const fill = () => {
    const pages = Math.max(1, Math.ceil(rows.length / ui.size));
    ui.page = Math.min(ui.page, pages - 1);
    const page = rows.slice(ui.page * ui.size, (ui.page + 1) * ui.size);
    pager.replaceChildren();
    if (pages > 1) {
      const prev = h("button", "inb-icon inb-local", "‹"), next = h("button", "inb-icon inb-local", "›");
      prev.disabled = ui.page === 0; next.disabled = ui.page === pages - 1;
      prev.setAttribute("aria-label", "previous page"); next.setAttribute("aria-label", "next page");
      prev.addEventListener("click", () => { ui.page--; fill(); });
      next.addEventListener("click", () => { ui.page++; fill(); });
      pager.append(prev, h("span", null, `page ${ui.page + 1} / ${pages}`), next);
    }
    body.replaceChildren(...page.map((r) => {
      const tr = h("tr", "inb-row" + (r.id === model.get("selected") ? " inb-selected" : ""));
      tr.tabIndex = 0;
      tr.dataset.id = String(r.id);
      if (sources.length > 1 && r.source) {   // a stripe in the source's colour
        tr.dataset.source = r.source;
        tr.style.borderLeft = `4px solid ${RULES.sources[sources.indexOf(r.source) % RULES.sources.length]}`;
      }
      const score = h("span", "inb-score", fmt(r.score));
      score.style.background = colour(r.score, d);
      score.style.color = textColour(r.score, d);
      score.title = scoreText(r.score, n);
      const cells = [h("td", "inb-rank", String(r.rank)), h("td", "inb-id", String(r.id)), h("td", "inb-col-score")];
      cells[2].append(score);
      if (r.copies > 1) {
        const c = h("span", "inb-copies", `×${r.copies}`);
        c.title = `${r.copies} scanned sequences have this exact text (one row; the score is this copy's)`;
        cells[2].append(c);
      }
      const text = h("td", "inb-text");
      const meta = Object.fromEntries(columns.filter((c) => c in r.meta).map((c) => [c, r.meta[c]]));
      text.append(snippet(r), chips(meta));
      cells.push(text);
      tr.append(...cells);
      const pick = () => ctx.set("selected", r.id);
      tr.addEventListener("click", pick);
      tr.addEventListener("keydown", (e) => { if (e.key === "Enter") pick(); });
      return tr;
    }));
  };
  fill();
  wrap.append(tableBar(ctx, columns, model.get("counts") || {}), table, pager);
  return wrap;
}

/** A draggable divider between the table and the detail: the table keeps at least MIN_LEFT px
 * (its text column readable), the detail MIN_RIGHT px; arrows move it by 24 px, a double click
 * restores the default split. */
const MIN_LEFT = 400, MIN_RIGHT = 260;
function splitter(ctx, body) {
  const bar = h("div", "inb-split");
  bar.tabIndex = 0;
  bar.dataset.id = "split";
  bar.setAttribute("role", "separator");
  bar.setAttribute("aria-label", "resize the table and the detail");
  const apply = (left) => {
    const total = body.clientWidth;
    if (!total) return;
    ctx.ui.split = Math.max(MIN_LEFT, Math.min(total - MIN_RIGHT - 8, left));
    body.style.setProperty("--inb-left", `${ctx.ui.split}px`);
  };
  bar.addEventListener("pointerdown", (e) => {
    e.preventDefault();
    e.stopPropagation();   // not a drag of the notebook cell
    const x0 = e.clientX, w0 = body.firstChild.getBoundingClientRect().width;
    // on the window, in the capture phase: the pointer leaves the 8 px bar, and JupyterLab's
    // own handlers never see these first
    const move = (m) => { m.preventDefault(); apply(w0 + m.clientX - x0); };
    const up = (u) => {   // the last position too: Chromium coalesces pointermoves into frames
      apply(w0 + u.clientX - x0);
      window.removeEventListener("pointermove", move, true);
      window.removeEventListener("pointerup", up, true);
    };
    window.addEventListener("pointermove", move, true);
    window.addEventListener("pointerup", up, true);
  });
  bar.addEventListener("dblclick", () => {   // back to the default split
    ctx.ui.split = 0;
    body.style.removeProperty("--inb-left");
  });
  bar.addEventListener("keydown", (e) => {
    const step = { ArrowLeft: -24, ArrowRight: 24 }[e.key];
    if (step) { apply(body.firstChild.getBoundingClientRect().width + step); e.preventDefault(); }
  });
  if (ctx.ui.split) body.style.setProperty("--inb-left", `${ctx.ui.split}px`);
  return bar;
}

function explorerWidget(ctx, root) {
  const { model, tip } = ctx;
  const queries = model.get("queries");
  const qi = model.get("query");
  const n = model.get("n_train");
  const head = h("div", "inb-head");
  if (queries.length > 1) {
    const sel = h("select", "inb-select");
    sel.setAttribute("aria-label", "query");
    queries.forEach((q, i) => {
      const o = h("option", null, `${i}: ${q.prompt} ‖${q.completion}`);
      o.value = String(i);
      sel.append(o);
    });
    sel.value = String(qi);
    sel.addEventListener("change", () => ctx.set("query", Number(sel.value)));
    head.append(sel);
  }
  const qt = model.get("query_token");
  head.append(queryHeader(queries[qi], tip, (j) => ctx.set("query_token", j === qt ? -1 : j), qt));
  if (qt >= 0) {
    const q = queries[qi], c = model.get("counts") || {};
    const over = c.ranked === c.scanned ? `all ${(c.scanned || 0).toLocaleString("en")} scanned sequences`
      : `the ${(c.ranked || 0).toLocaleString("en")} of ${(c.scanned || 0).toLocaleString("en")} scanned sequences with the largest |score| on the whole completion`;
    head.append(h("div", "inb-note inb-token-query",
      `ranked by the completion token ${JSON.stringify(q.completion_tokens[qt])} alone, over ${over}: `
      + `log p(${JSON.stringify(q.completion_tokens[qt])} | prompt + ${JSON.stringify(q.completion_tokens.slice(0, qt).join(""))})`));
  }
  root.append(head);

  const body = h("div", "inb-explorer");
  const left = h("div", "inb-ranked");
  const tabs = h("div", "inb-tabs");
  tabs.setAttribute("role", "tablist");
  for (const [sign, label] of [["positive", "▲ most positive"], ["negative", "▼ most negative"]]) {
    const active = model.get("sign") === sign;
    const b = h("button", "inb-tab" + (active ? " inb-active" : ""), label);
    b.setAttribute("role", "tab");
    b.setAttribute("aria-selected", String(active));
    b.addEventListener("click", () => ctx.set("sign", sign));
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
    sel.addEventListener("change", () => ctx.set("source", sel.value));
    tabs.append(sel);
  }
  const shared = h("label", "inb-check");
  const box = h("input");
  box.type = "checkbox";
  box.checked = model.get("shared_scale");
  box.addEventListener("change", () => ctx.set("shared_scale", box.checked));
  shared.append(box, " one colour scale for all rows");
  shared.title = "colour every sequence's tokens on one scale (the largest |token score| of the rows), so colours compare across sequences";
  tabs.append(shared);
  left.append(tabs, h("div", "inb-unit", model.get("unit")),
    explorerTable(ctx, model.get("rows"), model.get("columns") || []));

  const right = h("div", "inb-detail");
  const det = model.get("detail");
  if (model.get("error")) right.append(h("div", "inb-error", model.get("error")));
  if (det && det.tokens) {
    const layer = model.get("layer");
    const by = layer >= 0 && det.layer_names ? ` · tokens by layer ${det.layer_names[layer]} alone` : "";
    right.append(h("div", "inb-title", `sequence ${det.id} · ${scoreText(det.score, n)}${by}`), chips(det.meta));
    const tv = tokenView({ tokens: det.tokens, scores: det.token_scores, tip, key: "d", n,
      domain: det.domain || 0, selected: model.get("token"),
      onSelect: (i) => ctx.set("token", i) });
    right.append(tv.el, legend(tv.domain, det.domain ? "per token, one scale for all rows" : "per token"));
  }
  if (det && det.layer_names && det.layer_names.length)
    right.append(barView({ labels: det.layer_names, values: det.layer_values, tip, n,
      title: "influence per layer", selected: model.get("layer"),
      onSelect: (i) => ctx.set("layer", model.get("layer") === i ? -1 : i) }));
  if (!det || (!det.tokens && !model.get("error"))) {
    right.append(h("div", "inb-hint", "Select a sequence to see its tokens and layers."));
  }
  body.append(left, splitter(ctx, body), right);
  root.append(body);
  return ["queries", "query", "query_token", "sign", "sources", "source", "rows", "columns", "selected",
    "detail", "token", "layer", "shared_scale", "error", "busy", "n_train", "k", "search", "sort",
    "descending", "counts", "unit"];
}

function labWidget(ctx, root) {
  const { model, tip } = ctx;
  const q = model.get("query");
  root.append(h("div", "inb-head"));
  root.lastChild.append(queryHeader(q, tip));
  const texts = model.get("texts").slice();
  const labels = model.get("labels").slice();
  const scoredTexts = model.get("scored_texts");
  const scoredLabels = model.get("scored_labels");
  const same = (a, b) => a.length === b.length && a.every((x, i) => x === b[i]);
  const stale = !same(texts, scoredTexts) || !same(texts.map((_, i) => labels[i] || ""), scoredLabels);

  const editor = h("div", "inb-lab-editor");
  const push = () => {
    model.set("labels", texts.map((_, i) => labels[i] || ""));
    ctx.set("texts", texts.slice());
  };
  texts.forEach((t, i) => {
    const row = h("div", "inb-lab-row");
    const ta = h("textarea", "inb-lab-text");
    ta.value = t;
    ta.rows = Math.min(4, 1 + Math.floor(t.length / 90));
    ta.setAttribute("aria-label", `synthetic sequence ${i + 1}`);
    ta.dataset.id = `lab-text-${i}`;
    ta.addEventListener("change", () => { texts[i] = ta.value; push(); });
    const del = h("button", "inb-icon", "×");
    del.title = "remove this sequence";
    del.setAttribute("aria-label", `remove sequence ${labels[i] || i + 1}`);
    del.addEventListener("click", () => { texts.splice(i, 1); labels.splice(i, 1); push(); });
    row.append(h("span", "inb-lab-label", labels[i] || `#${i + 1}`), ta, del);
    editor.append(row);
  });
  const actions = h("div", "inb-lab-actions");
  const add = h("button", "inb-button", "+ sequence");
  add.addEventListener("click", () => { texts.push(""); push(); });
  const go = h("button", "inb-button inb-primary", model.get("busy") ? "scoring…" : "Score");
  go.disabled = model.get("busy");
  go.addEventListener("click", () => ctx.send({ type: "score" }));
  actions.append(add, go);
  if (stale && scoredTexts.length) actions.append(h("span", "inb-stale-note", "edited since the last score: the results below belong to the texts they show; press Score"));
  editor.append(actions);
  root.append(editor);
  if (model.get("error")) root.append(h("div", "inb-error", model.get("error")));

  const scores = model.get("scores");
  if (scores.length) {
    const n = model.get("n_train");
    const names = scoredLabels.map((l, i) => l || `#${i + 1}`);
    const out = h("div", "inb-lab-out" + (stale ? " inb-stale" : ""));
    out.append(barView({ labels: names, values: scores, tip, n, title: "influence of each sequence on the query" }),
      h("div", "inb-unit", model.get("unit")));
    const toks = model.get("tokens"), ts = model.get("token_scores");
    const d = domainOf(ts.flat(), 0);
    ts.forEach((s, i) => {
      const row = h("div", "inb-lab-tokens");
      row.append(h("span", "inb-lab-label", names[i]), tokenView({ tokens: toks[i], scores: s, domain: d, tip, n, selected: -1, key: `s${i}-` }).el);
      out.append(row);
    });
    out.append(legend(d, "per token, one scale for all sequences"));
    root.append(out);
  }
  return ["query", "texts", "labels", "scored_texts", "scored_labels", "scores", "tokens", "token_scores", "busy", "error", "n_train", "unit"];
}

const VIEWS = { tokens: tokensWidget, layers: layersWidget, explorer: explorerWidget, lab: labWidget };

/**
 * Whether this view's model reaches a kernel: a ping on render, a pong from Python. A view
 * restored from saved widget state (no kernel, or a new kernel that never made this widget)
 * gets no pong: after the kernel has been idle twice in a row without one, it is offline. A
 * live view goes offline when its kernel goes (shut down, dead, restarting: the manager then
 * marks the model's comm dead). onChange() runs when that is known (a late pong still turns a
 * view that never was live live).
 */
function connection(model, onChange) {
  const state = { live: null };
  const manager = model.widget_manager || {};
  // null: none; undefined: a manager that does not say (then only the pong decides)
  const kernel = () => manager.kernel;
  const gone = () => {
    const k = kernel();
    return k === null || (!!k && (k.isDisposed || ["dead", "restarting", "autorestarting"].includes(k.status)));
  };
  const offline = () => { if (state.live !== false) { state.live = false; onChange(); } };
  const pong = (msg) => {
    if (msg && msg.type === "pong" && state.live !== true && !gone()) { state.live = true; onChange(); }
  };
  const comm = offline;   // the manager marks a model's comm dead (never live again) on a restart
  model.on("msg:custom", pong);
  model.on("comm_live_update", comm);
  let idle = 0;
  const check = () => {
    if (gone()) { offline(); return; }
    if (state.live !== null) return;
    const k = kernel();
    idle = k && k.status !== "idle" ? 0 : idle + 1;
    if (idle >= (k ? 2 : 8)) offline();
  };
  const timer = setInterval(check, 1500);   // cheap: reads the kernel's status, sends nothing
  if (kernel() === null) state.live = false; else model.send({ type: "ping" });
  state.dispose = () => { clearInterval(timer); model.off("msg:custom", pong); model.off("comm_live_update", comm); };
  return state;
}

/** Focus (and the caret of a text box) kept across a rebuild, by data-id. */
function keepFocus(root) {
  const e = root.contains(document.activeElement) ? document.activeElement : null;
  const id = e && e.dataset ? e.dataset.id : null;
  if (!id) return () => {};
  const caret = "selectionStart" in e ? [e.selectionStart, e.selectionEnd] : null;
  return () => {
    const again = root.querySelector(`[data-id="${CSS.escape(id)}"]`);
    if (!again) return;
    again.focus();
    if (caret && caret[0] !== null) try { again.setSelectionRange(...caret); } catch { /* number inputs */ }
  };
}

function render({ model, el }) {
  const root = h("div", "inb-root");
  root.dataset.view = model.get("_view");
  el.append(root);
  const tip = tooltip();
  let keys = [];
  const conn = connection(model, () => draw());
  const ctx = {
    model, tip, ui: { search: model.get("search") || "", page: 0, size: 10, split: 0 },
    set(key, value) { if (conn.live === false) return; model.set(key, value); model.save_changes(); },
    send(msg) { if (conn.live !== false) model.send(msg); },
  };
  // A rebuild under a pressed button would swallow its click (a text box's change on blur sets
  // the model while the button is down): rebuilds wait until the click is over.
  let pressed = false, waiting = false, late = null;
  const flush = () => { pressed = false; clearTimeout(late); if (waiting) { waiting = false; draw(); } };
  root.addEventListener("pointerdown", () => { pressed = true; }, true);
  const clicked = () => { if (pressed) setTimeout(flush, 0); };
  const released = () => { if (pressed) late = setTimeout(flush, 300); };   // a press without a click
  window.addEventListener("click", clicked);
  window.addEventListener("pointerup", released, true);
  const draw = () => {
    if (pressed) { waiting = true; return; }
    const refocus = keepFocus(root);
    tip.hide();
    root.replaceChildren();
    root.classList.toggle("inb-offline", conn.live === false);
    keys = VIEWS[model.get("_view")](ctx, root);
    if (conn.live === false) {
      root.prepend(h("div", "inb-offline-note", "No kernel behind this view (shut down, restarted or never started): "
        + "what shows is its last state. Run the cell again to interact."));
      for (const e of root.querySelectorAll("button, select, textarea, input")) {
        if (!e.classList.contains("inb-local")) e.disabled = true;   // only the pages stay
      }
    }
    refocus();
  };
  draw();
  const events = keys.map((k) => `change:${k}`).join(" ");
  const searched = () => { ctx.ui.search = model.get("search") || ""; };
  if (keys.includes("search")) model.on("change:search", searched);
  model.on(events, draw);
  return () => {
    model.off(events, draw); model.off("change:search", searched); conn.dispose(); tip.remove();
    window.removeEventListener("click", clicked); window.removeEventListener("pointerup", released, true);
  };
}

export default { render };
