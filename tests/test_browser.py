"""Notebook 01 in a real JupyterLab, driven in headless Chromium (Debian's package) by Playwright:
the widgets render token colours whose sign matches the scores, hovering shows the exact value,
clicking a token changes ``selected`` in the kernel. Screenshots go to ``artifacts/browser/``."""
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

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "artifacts" / "browser"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(),
                                reason="needs Debian's chromium: apt-get install -y chromium")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """JupyterLab on 127.0.0.1 with a token, serving a scratch copy of notebook 01."""
    work = tmp_path_factory.mktemp("lab")
    shutil.copy(ROOT / "notebooks" / "01_tour.ipynb", work)
    settings = work / ".settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))
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
        yield f"{url}/lab/tree/01_tour.ipynb?token={token}"
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
        page.goto(lab)
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
        assert not errors, f"notebook 01 raised in the browser: {errors}"
        yield page
        browser.close()


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


def test_token_colours_match_score_signs(page):
    spans = page.locator(".inb-root[data-view='explorer'] .inb-detail .inb-tok")
    spans.first.wait_for(timeout=30_000)
    assert spans.count() >= 5
    data = page.locator(".inb-tok[data-score]").evaluate_all(
        "els => els.map(e => [Number(e.dataset.score), getComputedStyle(e).backgroundColor])")
    signs = {"pos": 0, "neg": 0}
    for v, bg in data:
        r, g, b = _rgb(bg)
        if (r, g, b) == (255, 255, 255):  # |score| below one colour step of its view's scale
            continue
        if v > 0:
            assert r > b, f"positive score {v} drawn as {bg}"
            signs["pos"] += 1
        else:
            assert b > r, f"negative score {v} drawn as {bg}"
            signs["neg"] += 1
    assert signs["pos"] >= 5 and signs["neg"] >= 5, signs
    explorer = page.locator(".inb-root[data-view='explorer']")
    explorer.scroll_into_view_if_needed()
    explorer.screenshot(path=str(ARTIFACTS / "explorer.png"))


def test_hover_shows_exact_value(page):
    span = page.locator(".inb-root[data-view='tokens'] .inb-tok").nth(3)
    span.scroll_into_view_if_needed()
    span.hover()
    tip = page.locator(".inb-tip.inb-show")
    tip.wait_for(timeout=5_000)
    text = tip.inner_text()
    assert f"score {span.get_attribute('data-score')}" in text
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
    page.evaluate("""async (code) => {
        const nb = window.jupyterapp.shell.currentWidget;
        nb.content.activeCellIndex = nb.content.widgets.length - 1;
        await window.jupyterapp.commands.execute('notebook:insert-cell-below');
        nb.content.activeCell.model.sharedModel.setSource(code);
        await window.jupyterapp.commands.execute('notebook:run-cell');
    }""", code)
    menu = page.locator(".inb-root[data-view='explorer'] .inb-source-select")
    menu.wait_for(timeout=60_000)
    explorer = page.locator(".inb-root[data-view='explorer']").filter(
        has=page.locator(".inb-source-select"))
    rows = explorer.locator(".inb-row")
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
