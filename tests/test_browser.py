"""Notebook 01 in a real JupyterLab, driven in headless Chromium (Debian's package) by Playwright:
the widgets render token colours whose sign matches the scores, hovering shows the value,
clicking a token changes ``selected`` in the kernel, clicking a completion token re-ranks the
whole scan, search and k cover the whole scan, typing then one click scores, the lab keeps its
results with their texts; at 800 px the explorer does not scroll sideways, in the dark theme
zero is transparent; saved with its widget state and reopened without a kernel the notebook
still shows the explorer (and says it has no kernel), reopened without widget state it shows no
"model not found" line, and its nbconvert HTML holds the static snapshots; a dead kernel shows
(last). Screenshots go to ``artifacts/browser/``, the light
and dark explorer to ``docs/images/``."""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from influence_nb.snapshot import fmt

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "artifacts" / "browser"
NB09 = "09_pretraining_vs_finetuning.ipynb"
IMAGES = ROOT / "docs" / "images"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("browser")]  # one JupyterLab server


@pytest.fixture(autouse=True)
def chromium():
    """The browser tests are part of ``make test``: a missing browser fails them, never skips."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} not found: apt-get install -y chromium (make browser)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """JupyterLab on 127.0.0.1 with a token, serving a scratch copy of notebook 01."""
    work = tmp_path_factory.mktemp("lab")
    shutil.copy(ROOT / "notebooks" / "01_tour.ipynb", work)
    shutil.copy(ROOT / "notebooks" / NB09, work)
    settings = work / ".settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    widgets = work / ".settings" / "@jupyter-widgets" / "jupyterlab-manager"
    widgets.mkdir(parents=True)   # save the widget state into the notebook (off by default)
    (widgets / "plugin.jupyterlab-settings").write_text(json.dumps({"saveState": True}))
    port, token = _free_port(), secrets.token_hex(16)
    env = dict(os.environ, OMP_NUM_THREADS="1", JUPYTERLAB_SETTINGS_DIR=str(work / ".settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(work / ".workspaces"))
    log = open(work / "lab.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
         f"--ServerApp.port={port}", f"--IdentityProvider.token={token}",
         f"--ServerApp.root_dir={work}", "--LabApp.expose_app_in_browser=True",
         "--allow-root"],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=1)
                break
            except OSError:
                if proc.poll() is not None:
                    break
                time.sleep(0.5)
        else:
            raise RuntimeError(f"JupyterLab did not start: {(work / 'lab.log').read_text()[-2000:]}")
        yield dict(url=f"{url}/lab/tree/01_tour.ipynb?token={token}", root=url, token=token,
                   work=work)
    finally:
        proc.terminate()
        proc.wait(20)
        log.close()


@pytest.fixture(scope="module")
def page(lab):
    """Notebook 01 open in Chromium with every cell run."""
    from playwright.sync_api import sync_playwright
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        _run_all(page, lab["url"], "01")
        yield page
        browser.close()


def _run_all(page, url: str, name: str) -> None:
    """Open ``url`` (a notebook) and run every cell; no cell may raise."""
    page.goto(url)
    page.wait_for_function("window.jupyterapp && window.jupyterapp.shell.currentWidget "
                           "&& window.jupyterapp.shell.currentWidget.sessionContext", timeout=60_000)
    page.evaluate("""async () => {
        const nb = window.jupyterapp.shell.currentWidget;
        await nb.sessionContext.ready;
        await window.jupyterapp.commands.execute('notebook:run-all-cells');
    }""")
    page.wait_for_function("""() => {
        const nb = window.jupyterapp.shell.currentWidget;
        const k = nb.sessionContext.session && nb.sessionContext.session.kernel;
        return k && k.status === 'idle' && nb.content.widgets.every(
            c => c.model.type !== 'code' || (c.model.executionCount !== null
                 && !c.node.querySelector('.jp-InputPrompt').textContent.includes('*')));
    }""", timeout=400_000, polling=1000)
    errors = page.evaluate("""() => window.jupyterapp.shell.currentWidget.content.widgets
        .flatMap(c => c.model.type === 'code' ? c.model.outputs.toJSON() : [])
        .filter(o => o.output_type === 'error').map(o => o.ename + ': ' + o.evalue)""")
    assert not errors, f"notebook {name} raised in the browser: {errors}"


@pytest.fixture(scope="module")
def page09(page, lab):
    """Notebook 09 (a scan over two corpora, ten metadata columns) in a second tab of the same
    browser, in a workspace of its own, every cell run; its kernel shut down after."""
    other = page.context.browser.new_page(viewport={"width": 1400, "height": 1000})
    _run_all(other, f"{lab['root']}/lab/workspaces/nb09/tree/{NB09}?token={lab['token']}", "09")
    yield other
    other.evaluate("window.jupyterapp.shell.currentWidget.sessionContext.shutdown()")
    other.close()


def _kernel(page, code: str) -> str:
    """Run ``code`` in the notebook's kernel; its stdout."""
    return page.evaluate("""async (code) => {
        const k = window.jupyterapp.shell.currentWidget.sessionContext.session.kernel;
        const fut = k.requestExecute({ code });
        let out = '';
        fut.onIOPub = (msg) => { if (msg.header.msg_type === 'stream') out += msg.content.text; };
        await fut.done;
        return out;
    }""", code)


def _rgb(css: str) -> tuple[int, int, int]:
    return tuple(int(x) for x in re.findall(r"\d+", css)[:3])


def _alpha(css: str) -> float:
    """The opacity of a computed CSS colour: rgb() is 1, rgba(r, g, b, a) is a."""
    parts = re.findall(r"[\d.]+", css)
    return float(parts[3]) if len(parts) > 3 else 1.0


def _add_cell(page, code: str) -> None:
    """Insert ``code`` as a new last cell and run it."""
    page.evaluate("""async (code) => {
        const nb = window.jupyterapp.shell.currentWidget;
        nb.content.activeCellIndex = nb.content.widgets.length - 1;
        await window.jupyterapp.commands.execute('notebook:insert-cell-below');
        nb.content.activeCell.model.sharedModel.setSource(code);
        await window.jupyterapp.commands.execute('notebook:run-cell');
    }""", code)


def _wait_kernel(page, code: str, expected: str, timeout: float = 60) -> str:
    """Poll ``print(code)`` in the kernel until it prints ``expected`` (comm messages are
    asynchronous); the last output."""
    end = time.time() + timeout
    while True:
        out = _kernel(page, f"print({code})").strip()
        if out == expected or time.time() > end:
            return out
        page.wait_for_timeout(250)


def test_token_colours_match_score_signs(page):
    spans = page.locator(".inb-root[data-view='explorer'] .inb-detail .inb-tok")
    spans.first.wait_for(timeout=30_000)
    assert spans.count() >= 5
    data = page.locator(".inb-tok[data-score]").evaluate_all(
        "els => els.map(e => [Number(e.dataset.score), getComputedStyle(e).backgroundColor])")
    signs = {"pos": 0, "neg": 0}
    for v, bg in data:
        r, g, b = _rgb(bg)
        if _alpha(bg) < 0.02:  # |score| below one colour step of its view's scale: transparent
            continue
        if v > 0:
            assert r > b, f"positive score {v} drawn as {bg}"
            signs["pos"] += 1
        else:
            assert b > r, f"negative score {v} drawn as {bg}"
            signs["neg"] += 1
    assert signs["pos"] >= 5 and signs["neg"] >= 5, signs
    explorer = page.locator(".inb-root[data-view='explorer']").first
    explorer.scroll_into_view_if_needed()
    explorer.screenshot(path=str(IMAGES / "explorer.png"))


def test_hover_shows_exact_value(page):
    span = page.locator(".inb-root[data-view='tokens'] .inb-tok").nth(3)
    span.scroll_into_view_if_needed()
    span.hover()
    tip = page.locator(".inb-tip.inb-show")
    tip.wait_for(timeout=5_000)
    text = tip.inner_text()
    assert f"score {fmt(float(span.get_attribute('data-score')))}" in text   # one format
    assert "Δ log p per copy" in text
    assert "predicts the next token" in text
    box = page.locator(".inb-root[data-view='tokens']").bounding_box()
    tip_box = tip.bounding_box()
    assert tip_box["height"] > 40  # all lines shown, not clipped by the output area
    page.screenshot(path=str(ARTIFACTS / "tokens_hover.png"), clip=dict(
        x=box["x"], y=box["y"], width=box["width"],
        height=max(box["y"] + box["height"], tip_box["y"] + tip_box["height"]) - box["y"] + 8))


def test_click_syncs_selected_to_kernel(page):
    assert _kernel(page, "print(view.selected)").strip() == "-1"
    page.locator(".inb-root[data-view='tokens'] .inb-tok").nth(6).click()
    for _ in range(20):  # the comm message is asynchronous
        if _kernel(page, "print(view.selected)").strip() == "6":
            break
        page.wait_for_timeout(250)
    assert _kernel(page, "print(view.selected)").strip() == "6"
    assert page.locator(".inb-root[data-view='tokens'] .inb-tok.inb-selected").count() == 1
    page.screenshot(path=str(ARTIFACTS / "notebook01.png"), full_page=True)


def test_explorer_filters_and_stripes_rows_by_source(page):
    """A scan over two corpora: each row carries a stripe in its source's colour, the source
    menu filters the rows (through the kernel), and training text stays text (no HTML)."""
    code = ("from influence_nb.data import Corpus\n"
            "extra = Corpus.from_texts(['<b>not bold</b> The first President was Velmora.', "
            "'Rain fell on the market.'], inf.tokenizer)\n"
            "two = inf.scan(query, corpus={'demo': corpus.subset(range(60)), 'extra': extra})\n"
            "InfluenceExplorer(two, k=8)")
    _add_cell(page, code)
    menu = page.locator(".inb-root[data-view='explorer'] .inb-source-select")
    menu.wait_for(timeout=60_000)
    explorer = page.locator(".inb-root[data-view='explorer']").filter(
        has=page.locator(".inb-source-select"))
    rows = explorer.locator(".inb-row")
    # the menu can draw before the rows do: wait for them rather than count at once
    explorer.locator(".inb-row >> nth=7").wait_for(timeout=30_000)
    assert rows.count() == 8
    stripes = rows.evaluate_all(
        "els => els.map(e => [e.dataset.source, getComputedStyle(e).borderLeftColor])")
    colour = {"demo": (27, 158, 119), "extra": (117, 112, 179)}   # charts.SOURCE_COLOURS
    assert {s for s, _ in stripes} <= set(colour)
    for source, css in stripes:
        assert _rgb(css) == colour[source], (source, css)
    menu.select_option("extra")
    page.wait_for_function("""() => {
        const rows = [...document.querySelectorAll('.inb-source-select')].pop()
            .closest('.inb-root').querySelectorAll('.inb-row');
        return rows.length === 2 && [...rows].every(r => r.dataset.source === 'extra');
    }""", timeout=30_000)
    snippets = explorer.locator(".inb-row .inb-snippet")
    texts = snippets.all_inner_texts()
    assert any("<b>not bold</b>" in t for t in texts), texts
    assert explorer.locator(".inb-snippet b").count() == 0


def _explorer_ids(page) -> list[str]:
    """Row ids of notebook 01's explorer (the first one), in display order."""
    return page.locator(".inb-root[data-view='explorer']").first.locator(".inb-row").evaluate_all(
        "els => els.map(e => e.dataset.id)")


def test_clicking_a_completion_token_reranks(page):
    """The explorer's query header: a completion token is a query of its own (the kernel
    rescores the rows on log p(c_t | prompt, c_<t)); clicking it again restores the ranking."""
    explorer = page.locator(".inb-root[data-view='explorer']").first
    explorer.scroll_into_view_if_needed()
    before = _explorer_ids(page)
    marked = explorer.locator(".inb-query .inb-tok.inb-marked")
    assert marked.count() >= 2
    t0 = time.time()
    marked.nth(1).click()
    page.wait_for_function("""(before) => {
        const root = document.querySelector(".inb-root[data-view='explorer']");
        const ids = [...root.querySelectorAll('.inb-row')].map(e => e.dataset.id);
        return root.querySelector('.inb-token-query') && ids.join() !== before.join();
    }""", arg=before, timeout=60_000)
    print(f"\ncompletion-token re-rank: {time.time() - t0:.2f} s")
    after = _explorer_ids(page)
    assert len(after) == len(before) == 10 and after != before   # page 1 of 15 rows
    scanned = _kernel(page, "print(len(res.ids))").strip()
    note = explorer.locator(".inb-token-query").inner_text()
    assert f"over all {scanned} scanned sequences" in note, note
    explorer.get_by_role("button", name="next page").click()
    shown = after + _explorer_ids(page)                       # both pages: all 15 rows
    explorer.get_by_role("button", name="previous page").click()
    expect = _kernel(page, "print(res.token_query_fn(0, 1, res.ids.tolist())"
                           ".top(0, 15, distinct=True)['id'].tolist())")
    assert [int(i) for i in shown] == eval(expect)            # the whole scan, ranked again
    top15 = _kernel(page, "print(sorted(res.top(0, k=15)['id'].tolist()))")
    assert any(int(i) not in eval(top15) for i in shown)      # rows from beyond the 15 shown
    assert explorer.locator(".inb-query .inb-tok.inb-selected").count() == 1
    explorer.screenshot(path=str(ARTIFACTS / "explorer_token_query.png"))
    explorer.locator(".inb-query .inb-tok.inb-marked").nth(1).click()
    page.wait_for_function("""(before) => [...document.querySelector(
        ".inb-root[data-view='explorer']").querySelectorAll('.inb-row')]
        .map(e => e.dataset.id).join() === before.join()""", arg=before, timeout=60_000)


def test_lab_keeps_results_with_their_texts(page):
    """Score [ordered, unrelated, flipped], delete "ordered" in the view without scoring: the
    bars keep their labels, greyed as stale, and lab.table does not raise; delete all and
    press Score: the error shows and the old bars go."""
    _add_cell(page, "lab3 = SyntheticLab(inf, query, [fact.statement(0), "
                    "'The market in Lindby was busy on Monday.', fact.flipped()], "
                    "labels=['ordered', 'unrelated', 'flipped'])\nlab3")
    lab = page.locator(".inb-root[data-view='lab']").last
    lab.locator(".inb-lab-out .inb-bar-row").nth(2).wait_for(timeout=60_000)
    page.wait_for_function("""() => {
        const labs = document.querySelectorAll(".inb-root[data-view='lab']");
        return labs[labs.length - 1].querySelectorAll('.inb-lab-row').length === 3; }""")
    scored = _kernel(page, "print(lab3.table.to_json())")
    lab.locator(".inb-lab-row").first.locator("button").click()
    assert _wait_kernel(page, "len(lab3.texts)", "2") == "2"
    assert _kernel(page, "print(lab3.table.to_json())") == scored   # nothing shifted
    assert _kernel(page, "print(lab3.stale)").strip() == "True"
    lab.locator(".inb-lab-out.inb-stale").wait_for(timeout=10_000)
    labels = lab.locator(".inb-lab-out .inb-bar-label").all_inner_texts()
    assert labels == ["ordered", "unrelated", "flipped"], labels
    for _ in range(2):
        lab.locator(".inb-lab-row").first.locator("button").click()
        page.wait_for_timeout(300)
    assert _wait_kernel(page, "len(lab3.texts)", "0") == "0"
    lab.get_by_role("button", name="Score").click()
    lab.locator(".inb-error").wait_for(timeout=30_000)
    assert lab.locator(".inb-lab-out").count() == 0
    assert _kernel(page, "print(len(lab3.table), lab3.error)").startswith("0 no sequences")


def test_typing_then_one_click_scores(page):
    """In a text box, type, then click Score once (no blur first): the kernel scores the typed
    text; type again and click × once: that one click removes the sequence (a rebuild on the
    text box's change used to swallow the first click)."""
    _add_cell(page, "lab4 = SyntheticLab(inf, query, [fact.statement(0), 'Rain fell.'], "
                    "labels=['ordered', 'rain'])\nlab4")
    lab = page.locator(".inb-root[data-view='lab']").last
    lab.locator(".inb-lab-out .inb-bar-row").nth(1).wait_for(timeout=60_000)
    box = lab.locator("textarea").nth(1)
    box.click()
    page.keyboard.press("End")
    page.keyboard.type(" Then the sun came out.")
    lab.get_by_role("button", name="Score").click()          # one click, the box still focused
    assert _wait_kernel(page, "lab4.scored_texts[1]", "Rain fell. Then the sun came out.") \
        == "Rain fell. Then the sun came out."
    page.wait_for_function("""() => { const labs = document.querySelectorAll(
        ".inb-root[data-view='lab']"); const l = labs[labs.length - 1];
        return !l.querySelector('.inb-stale-note') && l.querySelectorAll('.inb-lab-row').length === 2; }""")
    box = lab.locator("textarea").first
    box.click()
    page.keyboard.type("Edited: ")
    lab.locator(".inb-lab-row").first.locator("button").click()   # × on the row being edited
    assert _wait_kernel(page, "lab4.texts", "['Rain fell. Then the sun came out.']") \
        == "['Rain fell. Then the sun came out.']"


def _explorer(page):
    return page.locator(".inb-root[data-view='explorer']").first


def test_search_and_k_cover_the_whole_scan(page):
    """The search box finds a sequence ranked far below the 15 rows shown (the kernel searches
    the whole scan); the k box changes how many rows are ranked and shown."""
    word = _kernel(page, """
import re
_shown = ' '.join(res.top(0, k=15, distinct=True)['text']).lower()
print(next(w for t in res.top(0, k=len(res.ids))['text'] for w in re.findall(r'[a-z]{6,}', t.lower())
           if w not in _shown))""").strip()
    expect = _kernel(page, f"print(res.matching(search={word!r}).sum())").strip()
    explorer = _explorer(page)
    explorer.scroll_into_view_if_needed()
    explorer.locator("input.inb-search").fill(word)
    page.wait_for_function("""(word) => document.querySelector(".inb-root[data-view='explorer'] "
        + ".inb-count").textContent.includes(word)""", arg=word, timeout=30_000)
    ids = [int(i) for i in _explorer_ids(page)]
    texts = _kernel(page, f"print(res.corpus.df.loc[{ids}, 'text'].str.lower().tolist())")
    assert ids and all(word in t for t in eval(texts)), (word, ids)   # none of them was shown
    assert f" of {expect} matching" in explorer.locator(".inb-count").inner_text()
    explorer.locator("input.inb-search").fill("")
    page.wait_for_function("""() => !document.querySelector(".inb-root[data-view='explorer'] "
        + ".inb-count").textContent.includes('matching')""", timeout=30_000)
    explorer.locator("input.inb-k").fill("4")
    explorer.locator("input.inb-k").press("Enter")
    page.wait_for_function("""() => document.querySelector(".inb-root[data-view='explorer']")
        .querySelectorAll('.inb-row').length === 4""", timeout=30_000)
    explorer.locator("input.inb-k").fill("15")
    explorer.locator("input.inb-k").press("Enter")
    page.wait_for_function("""() => document.querySelector(".inb-root[data-view='explorer']")
        .querySelectorAll('.inb-row').length === 10""", timeout=30_000)


@pytest.mark.parametrize("notebook", ["01", "09"])
@pytest.mark.parametrize("width", [800, 1280])
def test_no_overlap_with_the_file_browser_open(request, notebook, width):
    """The explorer sizes from its own width (container queries): with the file browser open,
    at 800 px it is one column and fits its output area; at 1,280 px the table, the divider
    and the detail sit side by side without overlap, the text column readable (≥ 150 px, so
    that no word breaks); the divider drags, and stops at the table's minimum width (400 px,
    where the table still fits its pane). Notebook 09's explorer has two sources and many
    metadata columns (chips, not columns)."""
    page = request.getfixturevalue("page" if notebook == "01" else "page09")
    page.set_viewport_size({"width": width, "height": 900})
    page.evaluate("window.jupyterapp.shell.expandLeft()")
    page.wait_for_timeout(800)
    explorer = _explorer(page)
    explorer.scroll_into_view_if_needed()
    measure = """el => {
        const out = el.closest('.jp-OutputArea-output');
        const box = (s) => { const e = el.querySelector(s); if (!e) return null;
                             const r = e.getBoundingClientRect(); return [r.left, r.right]; };
        const wrap = el.querySelector('.inb-table-wrap');
        return { root: [el.scrollWidth, el.clientWidth], out: [out.scrollWidth, out.clientWidth],
                 cols: getComputedStyle(el.querySelector('.inb-explorer')).gridTemplateColumns,
                 table: box('.inb-ranked'), detail: box('.inb-detail'), text: box('td.inb-text'),
                 scroll: [wrap.scrollWidth, wrap.clientWidth] };
    }"""
    sizes = explorer.evaluate(measure)
    print(f"\nnotebook {notebook}, {width} px: {sizes}")
    assert sizes["root"][0] <= sizes["root"][1] + 1 and sizes["out"][0] <= sizes["out"][1] + 1, sizes
    assert sizes["text"][1] - sizes["text"][0] >= 150, sizes
    assert sizes["scroll"][0] <= sizes["scroll"][1] + 1, sizes     # the table fits its pane
    if width == 800:
        assert len(sizes["cols"].split()) == 1   # one column in a narrow output
    elif notebook == "09":
        assert len(sizes["cols"].split()) == 3 and sizes["table"][1] <= sizes["detail"][0], sizes
    else:
        assert len(sizes["cols"].split()) == 3 and sizes["table"][1] <= sizes["detail"][0], sizes
        split = explorer.locator(".inb-split")

        def drag(dx: float) -> dict:
            split.hover(position={"x": 4, "y": 20})   # scrolled into view, stable
            page.wait_for_timeout(300)                 # a hand's pace throughout
            box = split.bounding_box()
            page.mouse.down()
            page.wait_for_timeout(100)
            page.mouse.move(box["x"] + 4 + dx, box["y"] + 20, steps=8)
            page.wait_for_timeout(150)
            page.mouse.up()
            page.wait_for_timeout(150)
            return explorer.evaluate(measure)
        wider = drag(80)
        width0 = sizes["table"][1] - sizes["table"][0]
        assert wider["table"][1] - wider["table"][0] > width0 + 40, (sizes, wider)
        narrow = drag(-800)                                       # stops at the minimum
        assert abs(narrow["table"][1] - narrow["table"][0] - 400) <= 2, narrow
        for s in (wider, narrow):
            assert s["table"][1] <= s["detail"][0] and s["scroll"][0] <= s["scroll"][1] + 1, s
        split.dblclick()                                          # the default split again
        assert explorer.evaluate(measure)["cols"] == sizes["cols"]
    explorer.screenshot(path=str(ARTIFACTS / f"explorer_{notebook}_{width}px.png"))
    page.evaluate("window.jupyterapp.shell.collapseLeft()")
    page.set_viewport_size({"width": 1400, "height": 1000})


def test_dark_theme(page):
    """In JupyterLab Dark: zero-influence tokens are transparent (no white chips), the selected
    row and the active tab stand out from the background."""
    page.evaluate("window.jupyterapp.commands.execute('apputils:change-theme', "
                  "{theme: 'JupyterLab Dark'})")
    page.wait_for_function("document.body.dataset.jpThemeLight === 'false'", timeout=30_000)
    page.wait_for_timeout(1000)
    explorer = page.locator(".inb-root[data-view='explorer']").first
    toks = explorer.locator(".inb-detail .inb-tok[data-score]").evaluate_all(
        "els => els.map(e => [Number(e.dataset.score), getComputedStyle(e).backgroundColor])")
    assert any(v == 0 for v, _ in toks), "no zero-influence token to check"
    for v, bg in toks:
        assert _rgb(bg) != (255, 255, 255) or _alpha(bg) < 0.02, (v, bg)
        if v == 0:
            assert _alpha(bg) == 0, (v, bg)
    colours = explorer.evaluate("""el => {
        const bg = (e) => getComputedStyle(e).backgroundColor;
        return { page: bg(el.closest('.jp-Notebook')), row: bg(el.querySelector('.inb-row.inb-selected')),
                 tab: bg(el.querySelector('.inb-tab.inb-active')), text: getComputedStyle(el).color };
    }""")
    assert colours["row"] != colours["page"] and _alpha(colours["row"]) > 0, colours
    assert colours["tab"] != colours["page"] and _alpha(colours["tab"]) > 0, colours
    assert sum(_rgb(colours["text"])) > 3 * 150, colours   # light text on the dark theme
    explorer.scroll_into_view_if_needed()
    explorer.screenshot(path=str(IMAGES / "explorer-dark.png"))
    page.evaluate("window.jupyterapp.commands.execute('apputils:change-theme', "
                  "{theme: 'JupyterLab Light'})")
    page.wait_for_function("document.body.dataset.jpThemeLight === 'true'", timeout=30_000)


@pytest.fixture(scope="module")
def saved(page, lab):
    """Notebook 01 as saved by JupyterLab with its widget state, every cell run."""
    page.evaluate("window.jupyterapp.commands.execute('docmanager:save')")
    path = lab["work"] / "01_tour.ipynb"
    for _ in range(60):
        nb = json.loads(path.read_text())
        if "widgets" in nb["metadata"]:
            return nb
        page.wait_for_timeout(500)
    raise AssertionError("JupyterLab saved no widget state")


def _reopen(page, lab, name: str, nb: dict, trusted: bool = True):
    """``nb`` written as ``name``, signed (trusted, as JupyterLab's own save is) unless not
    ``trusted`` (a notebook from someone else), and opened in a fresh workspace of a new
    browser page."""
    (lab["work"] / name).write_text(json.dumps(nb))
    if trusted:
        subprocess.run([sys.executable, "-m", "jupyter", "trust", str(lab["work"] / name)],
                       check=True, capture_output=True)
    other = page.context.browser.new_page(viewport={"width": 1400, "height": 1000})
    other.goto(f"{lab['root']}/lab/workspaces/{Path(name).stem}/tree/{name}?token={lab['token']}")
    return other


def test_saved_notebook_without_a_kernel_shows_the_snapshots(page, lab, saved):
    """Reopened without a kernel (its kernelspec matches none; JupyterLab then cannot restore
    widget state and shows "Loading widget…"), the notebook still shows the explorer's rows
    and coloured tokens: the static snapshot printed beside each view."""
    nb = dict(saved, metadata=dict(saved["metadata"], kernelspec=dict(
        name="no-such-kernel", display_name="none", language="none")))
    t0 = time.time()
    other = _reopen(page, lab, "no_kernel.ipynb", nb)
    explorer = other.locator(".inb-static").filter(has=other.locator("tr.inb-s-selected")).first
    explorer.wait_for(timeout=60_000)
    kernel = other.evaluate("""() => { const s = window.jupyterapp.shell.currentWidget
        .sessionContext.session; return s && s.kernel ? s.kernel.name : null; }""")
    assert other.locator(".inb-root").count() == 0, f"live views drawn (kernel {kernel})"
    print(f"\nsaved notebook, no kernel: snapshot shown in {time.time() - t0:.1f} s")
    assert explorer.is_visible() and explorer.locator("tbody tr").count() == 15
    bgs = explorer.locator(".inb-s-tok[style]").evaluate_all(
        "els => els.map(e => getComputedStyle(e).backgroundColor)")
    assert len(bgs) >= 5 and sum(_alpha(bg) > 0.1 for bg in bgs) >= 5, bgs
    assert other.locator(".inb-static .inb-s-bars").count() >= 3   # explorer, layers, labs
    # an artifact, not a check: JupyterLab may go on to start its default kernel for the
    # unknown kernelspec, whose live views then replace the snapshot (after the checks above)
    try:
        explorer.screenshot(path=str(ARTIFACTS / "explorer_no_kernel.png"), timeout=10_000)
    except Exception as e:  # playwright's Error / TimeoutError
        print(f"no screenshot of the kernel-less snapshot: {str(e).splitlines()[0]}")
    other.close()


def test_saved_notebook_with_a_new_kernel_says_the_views_are_offline(page, lab, saved):
    """Reopened with a kernel that never made its widgets: the views render from the saved
    state (their snapshots hidden), say that no kernel is behind them and disable their
    controls instead of offering dead buttons."""
    t0 = time.time()
    other = _reopen(page, lab, "new_kernel.ipynb", saved)
    explorer = other.locator(".inb-root[data-view='explorer']").first
    explorer.locator(".inb-offline-note").wait_for(timeout=90_000)
    print(f"\nsaved notebook, new kernel: offline view in {time.time() - t0:.1f} s")
    assert "No kernel" in explorer.locator(".inb-offline-note").inner_text()
    kernel_controls = "button:enabled:not(.inb-local), select:enabled, input:enabled"
    assert explorer.locator(kernel_controls).count() == 0
    assert explorer.locator(".inb-row").count() == 10 and not explorer.locator(".inb-row").first.is_visible()
    snap = other.locator(".inb-static").filter(has=other.locator("tr.inb-s-selected")).first
    assert snap.is_visible() and snap.locator("tbody tr").count() == 15   # in the view's place
    lab_view = other.locator(".inb-root[data-view='lab']").first
    lab_view.locator(".inb-offline-note").wait_for(timeout=30_000)
    assert lab_view.locator("button.inb-primary").is_disabled()   # hidden, and disabled
    other.close()


def test_reopened_without_widget_state_shows_no_error_line(page, lab, saved):
    """JupyterLab's default save keeps no widget state: reopened with a kernel, each view's
    output would say "Error displaying widget: model not found" under its snapshot; the
    snapshot's style hides that output, no other output says it (no progress bar was saved as
    a widget), and the snapshots show."""
    nb = dict(saved, metadata={k: v for k, v in saved["metadata"].items() if k != "widgets"})
    other = _reopen(page, lab, "no_state.ipynb", nb)
    other.wait_for_function("""() => { const nb = window.jupyterapp && window.jupyterapp.shell.currentWidget;
        const k = nb && nb.sessionContext.session && nb.sessionContext.session.kernel;
        return k && k.status === 'idle'; }""", timeout=90_000)
    other.wait_for_function("""() => [...document.querySelectorAll('.jp-OutputArea-output')]
        .some(e => e.textContent.includes('Error displaying widget'))""", timeout=60_000)
    other.wait_for_timeout(1000)
    ours = other.locator(".jp-OutputArea-child:has(.inb-static) + .jp-OutputArea-child")
    assert ours.evaluate_all("els => els.filter(e => e.textContent.includes("
                             "'Error displaying widget')).length") >= 5   # JupyterLab wrote them ...
    assert not any(ours.nth(i).is_visible() for i in range(ours.count()))   # ... unseen
    # and nowhere else: the progress bars left their last line as text (influence_nb.progress)
    errors = other.locator(".jp-OutputArea-output").filter(has_text="Error displaying widget")
    assert not any(errors.nth(i).is_visible() for i in range(errors.count()))
    snap = other.locator(".inb-static").filter(has=other.locator("tr.inb-s-selected")).first
    assert snap.is_visible() and other.locator(".inb-root").count() == 0
    other.close()


def test_an_untrusted_notebook_keeps_the_snapshots_look(page, lab, saved):
    """A notebook from someone else opens untrusted: JupyterLab's sanitizer drops <style>,
    <svg> and style values it cannot parse from its HTML. The snapshots keep their look — the
    table's layout, coloured tokens, the layer bars — from inline styles it keeps, and no
    output says "Error displaying widget"."""
    # content no other test signed (a signature is of the content, whatever the file's name)
    nb = dict(saved, metadata={**{k: v for k, v in saved["metadata"].items() if k != "widgets"},
                               "from": "someone else"})
    other = _reopen(page, lab, "untrusted.ipynb", nb, trusted=False)
    explorer = other.locator(".inb-static").filter(has=other.locator("tr.inb-s-selected")).first
    explorer.wait_for(timeout=60_000)
    other.wait_for_timeout(3000)   # the kernel starts and the outputs settle
    assert other.locator(".inb-static style").count() == 0   # the sanitizer ran
    assert explorer.locator("tbody tr").count() == 15
    look = explorer.evaluate("""e => { const s = el => getComputedStyle(el);
        const t = e.querySelector('td.inb-s-text'), h = e.querySelector('th');
        return {text: s(t).whiteSpace, size: s(e.querySelector('table')).fontSize,
                head: s(h).textAlign, sel: s(e.querySelector('tr.inb-s-selected')).backgroundColor,
                row: s(e.querySelector('tbody tr:not(.inb-s-selected)')).backgroundColor,
                toks: s(e.querySelector('.inb-s-tokens')).whiteSpace}; }""")
    assert look["text"] == "pre-wrap" and look["toks"] == "pre-wrap" and look["size"] == "12px"
    assert look["head"] == "left" and _alpha(look["sel"]) > 0.1 and _alpha(look["row"]) == 0, look
    bgs = explorer.locator(".inb-s-tok").evaluate_all(
        "els => els.map(e => getComputedStyle(e).backgroundColor)")
    assert sum(_alpha(bg) > 0.1 for bg in bgs) >= 5, bgs
    bars = other.locator(".inb-static .inb-s-bar-row span span").evaluate_all(
        "els => els.map(e => [e.getBoundingClientRect().width, getComputedStyle(e).backgroundColor])")
    assert sum(w > 1 and _alpha(bg) > 0.5 for w, bg in bars) >= 3, bars   # explorer, layers, lab
    errors = other.locator(".jp-OutputArea-output").filter(has_text="Error displaying widget")
    assert not any(errors.nth(i).is_visible() for i in range(errors.count()))
    charts = other.locator(".jp-RenderedImage img")   # the charts' PNG, where no SVG is drawn
    assert charts.count() >= 1 and charts.first.evaluate("e => e.naturalWidth") > 100
    try:
        explorer.screenshot(path=str(ARTIFACTS / "explorer_untrusted.png"), timeout=10_000)
    except Exception as e:  # playwright's Error / TimeoutError
        print(f"no screenshot of the untrusted snapshot: {str(e).splitlines()[0]}")
    other.close()


def test_nbconvert_html_holds_the_static_snapshots(lab, saved, tmp_path):
    """nbconvert HTML of the run notebook, with its widget state (then nbconvert also embeds
    the live views, whose HTML manager comes from a CDN) and without (JupyterLab's default
    save): either way the snapshots are there — the explorer's rows, coloured tokens and layer
    bars — and no Python object reprs."""
    for name, nb in [("with_state", saved), ("without_state", dict(saved, metadata={
            k: v for k, v in saved["metadata"].items() if k != "widgets"}))]:
        src = tmp_path / f"{name}.ipynb"
        src.write_text(json.dumps(nb))
        t0 = time.time()
        subprocess.run([sys.executable, "-m", "jupyter", "nbconvert", "--to", "html", str(src)],
                       check=True, capture_output=True)
        page = (tmp_path / f"{name}.html").read_text(encoding="utf-8")
        print(f"\nnbconvert {name}: {time.time() - t0:.1f} s, {len(page) // 1024} kB")
        assert "object at 0x" not in page
        assert page.count('<div class="inb-static"') >= 5   # explorer, tokens, bars, 2 labs
        start = page.index('<tr class="inb-s-selected"')   # the explorer's selected row
        explorer = page[page.rindex('<div class="inb-static"', 0, start):]
        explorer = explorer[:explorer.index('class="inb-s-bars"')]
        assert explorer.count("<tr") == 16 and "Δ log p per copy" in explorer   # head + 15
        assert "rgba(230, 97, 1," in explorer and 'class="inb-s-bar-row"' in page[start:]
        assert ("application/vnd.jupyter.widget-view+json" in page) == (name == "with_state")


def test_a_dead_kernel_is_shown(page):
    """Last (it shuts the notebook's kernel down): every view says so in one line, disables
    its controls and shows its snapshot in its place; a click on "most negative" changes
    nothing."""
    page.evaluate("window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.shutdown()")
    explorer = _explorer(page)
    explorer.locator(".inb-offline-note").wait_for(timeout=30_000)
    assert explorer.locator(".inb-offline-note").inner_text().startswith("No kernel")
    assert explorer.locator("button:enabled:not(.inb-local), select:enabled, input:enabled").count() == 0
    snap = page.locator(".jp-OutputArea-child:has(+ .jp-OutputArea-child .inb-root[data-view='explorer'])"
                        " .inb-static").first
    assert snap.is_visible() and not explorer.locator(".inb-row").first.is_visible()
    tab = explorer.locator(".inb-tab").nth(1)
    tab.dispatch_event("click")                       # a click that reaches the disabled tab
    page.wait_for_timeout(500)
    assert "inb-active" not in tab.get_attribute("class")
    assert page.locator(".inb-root[data-view='lab'] .inb-offline-note").count() >= 1
    explorer.scroll_into_view_if_needed()
    page.screenshot(path=str(ARTIFACTS / "dead_kernel.png"))
