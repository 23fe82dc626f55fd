"""Every notebook in ``notebooks/`` executes without error (nbclient, one kernel each, the cached
demo factors shared through the cache directory), is committed without outputs, and notebook 02
supports the paper's word-ordering claim. Run times are printed (``pytest -s``)."""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.slow  # kernels / torchrun: `make test`, not `make check`

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
TIMES: dict[str, float] = {}


def _stdout(nb: nbformat.NotebookNode) -> str:
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.outputs if o.output_type == "stream" and o.name == "stdout")


@pytest.fixture(scope="session")
def executed():
    """Execute a notebook once (in its own folder, on one thread); the executed copy. Session
    scope: a worker that runs other modules' tests between a notebook and the claims read from
    it keeps its execution (module scope ran notebook 08 twice, 146 s more)."""
    cache: dict[str, nbformat.NotebookNode] = {}

    def run(path: Path) -> nbformat.NotebookNode:
        if path.name not in cache:
            nb = nbformat.read(path, as_version=4)
            t0 = time.time()
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("OMP_NUM_THREADS", "1")  # inherited by the kernel
                NotebookClient(nb, timeout=600, kernel_name="python3",
                               resources={"metadata": {"path": str(path.parent)}}).execute()
            TIMES[path.name] = round(time.time() - t0, 1)
            print(f"\n{path.name}: {TIMES[path.name]} s")
            nbformat.validate(nb)
            cache[path.name] = nb
        return cache[path.name]
    return run


def test_notebooks_are_committed_clean():
    assert len(NOTEBOOKS) >= 6
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        dirty = [i for i, c in enumerate(nb.cells)
                 if c.cell_type == "code" and (c.outputs or c.execution_count)]
        assert not dirty, f"{path.name}: cells {dirty} hold outputs; clear them before committing"


def _group(prefix: str) -> pytest.MarkDecorator:
    """A notebook and the claims read from its outputs run on one pytest-xdist worker (``--dist
    loadgroup``), so that it executes once."""
    return pytest.mark.xdist_group(f"notebook-{prefix}")


@pytest.mark.parametrize("path", [pytest.param(p, marks=_group(p.name[:2])) for p in NOTEBOOKS],
                         ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, executed):
    nb = executed(path)
    widgets = sum("application/vnd.jupyter.widget-view+json" in o.get("data", {})
                  for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    charts = sum("image/svg+xml" in o.get("data", {})
                 for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert widgets + charts >= 1, f"{path.name} displayed no widget and no chart"
    # each chart with a PNG beside its SVG: an untrusted notebook shows no SVG
    assert all("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
               for o in c.outputs if "image/svg+xml" in o.get("data", {}))
    # every live view follows its static snapshot; a bare widget (a progress bar) would read
    # "Error displaying widget: model not found" in a notebook saved without widget state
    bare = [(i, o.get("data", {}).get("text/plain", "")[:80])
            for i, c in enumerate(nb.cells) if c.cell_type == "code"
            for before, o in zip([{}] + c.outputs, c.outputs)
            if "application/vnd.jupyter.widget-view+json" in o.get("data", {})
            and "inb-static" not in before.get("data", {}).get("text/html", "")]
    assert not bare, f"{path.name}: widgets with no snapshot before them: {bare}"


@_group("02")
def test_word_ordering_claim(executed):
    """Paper §5.3.4: flipped statements get much less influence than ordered ones — averaged
    over all planted facts of demo world v2, on the whole completion (the paper's measurement;
    v2's names also occur outside their facts, so a flipped statement no longer teaches their
    spelling) and on the object's first token (the token that names the entity)."""
    from influence_nb import demo
    path = next(p for p in NOTEBOOKS if p.name.startswith("02_"))
    line = [ln for ln in _stdout(executed(path)).splitlines() if "flipped_over_ordered" in ln]
    claim = json.loads(line[-1])
    print(f"\nword ordering: {claim}")
    assert claim["n_facts"] == len(demo.facts()) == 120
    # measured on v2: 0.68 whole object, 0.039 first token (v1, names only in their facts:
    # 0.92 and 0.028); the paper's en→zh example: 0.030 / 0.116 = 0.26
    for name, bound in (("whole object", 0.8), ("first token", 0.1)):
        assert claim[name]["ordered"] > 0, name
        assert claim[name]["flipped_over_ordered"] < bound, name


@_group("09")
def test_pretraining_vs_finetuning_claim(executed):
    """Notebook 09: asked for its consent to being shut down, the LoRA-fine-tuned demo assistant
    draws its strongest pretraining support from the survival-themed passages — through the
    adapter parameters and through the base weights alike — while its top-10 overall, through
    the adapter, are fine-tuning dialogues."""
    path = next(p for p in NOTEBOOKS if p.name.startswith("09_"))
    line = [ln for ln in _stdout(executed(path)).splitlines() if "top10_pretraining_survival" in ln]
    claim = json.loads(line[-1])
    print(f"\npretraining vs fine-tuning: {claim}")
    assert claim["adapter"]["top10_pretraining_survival"] >= 0.8
    assert claim["base"]["top10_pretraining_survival"] >= 0.8
    assert claim["adapter"]["top10_from_pretraining"] <= 0.2
    assert 0.2 < claim["spearman_adapter_vs_base"] < 0.99     # related, not the same ranking


PROSE = ("01_", "08_", "09_")   # notebooks whose prose quotes only what their cells assert


def _decimals(text: str) -> list[str]:
    """The decimal numbers a text quotes (−29.1, 0.62), minus signs as "-"; section numbers
    (§5.2) and version numbers (1.0.1) left out."""
    text = text.replace("−", "-")
    return [m.group(0).lstrip("+") for m in re.finditer(r"(?<![§\w.])[-+]?\d+\.\d+(?![.\d])", text)]


@pytest.mark.parametrize("prefix", PROSE)
def test_prose_quotes_only_numbers_its_cells_assert(prefix):
    """Every decimal number a notebook's markdown quotes is a literal in one of its code cells
    (where an assert holds the computed value to it), so the text cannot drift from the cells
    unseen; notebook 08's validation-world figures are checked against docs/results.md there."""
    path = next(p for p in NOTEBOOKS if p.name.startswith(prefix))
    nb = nbformat.read(path, as_version=4)
    code = " ".join(c.source.replace("−", "-") for c in nb.cells if c.cell_type == "code")
    asserted = " ".join(c.source for c in nb.cells if c.cell_type == "code" and "assert" in c.source)
    quoted = [n for c in nb.cells if c.cell_type == "markdown" for n in _decimals(c.source)]
    missing = [n for n in quoted if n.lstrip("-") not in code]
    assert not missing, f"{path.name} quotes {missing} in its text, computed by no cell"
    assert not quoted or "assert" in asserted


@pytest.mark.parametrize("prefix", [pytest.param(p, marks=_group(p[:2])) for p in PROSE],
                         ids=list(PROSE))
def test_no_warnings_in_red(prefix, executed):
    """No cell of these notebooks prints a warning (a red box in JupyterLab): notebook 09 once
    showed transformers' FutureWarning from peft's adapter loading."""
    path = next(p for p in NOTEBOOKS if p.name.startswith(prefix))
    nb = executed(path)
    red = [(i, o.text[:200]) for i, c in enumerate(nb.cells) if c.cell_type == "code"
           for o in c.outputs if o.output_type == "stream" and o.name == "stderr"
           and "Warning" in o.text]
    assert not red, f"{path.name}: {red}"
