"""Every notebook cold, as a newcomer meets it: a fresh kernel, an empty cache (nothing fitted,
no world built), executed top to bottom with nbclient. Per notebook: seconds from the start of
execution (kernel start included) to the first widget on screen, to the end, and the slowest
cells.

    python benchmarks/notebooks_cold.py [--notebooks 01 06] [--cache DIR]

Each notebook gets its own empty cache folder (under ``--cache``, default a temporary one), so
one notebook's fit does not warm the next. The goal (issue #31): the first widget in about a
minute, every notebook within 180 s.
"""
import argparse
import os
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from common import report

WIDGET = "application/vnd.jupyter.widget-view+json"
NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


class Timed(NotebookClient):
    """nbclient's client with the time at which each cell finished."""

    async def async_execute_cell(self, cell, cell_index, *args, **kw):
        out = await super().async_execute_cell(cell, cell_index, *args, **kw)
        self.finished.append((cell_index, time.perf_counter()))
        return out


def run(path: Path, cache: Path) -> dict:
    """Execute one notebook cold -> its timings."""
    nb = nbformat.read(path, as_version=4)
    os.environ["INFLUENCE_NB_CACHE"] = str(cache)
    client = Timed(nb, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.finished = []
    t0 = time.perf_counter()
    client.execute()
    widget = next((t for i, t in client.finished
                   if any(WIDGET in o.get("data", {}) for o in nb.cells[i].get("outputs", []))),
                  None)
    starts = [t0] + [t for _, t in client.finished[:-1]]
    cells = sorted(((t - s, i) for (i, t), s in zip(client.finished, starts)), reverse=True)
    return dict(notebook=path.name, first_widget_s=None if widget is None else round(widget - t0, 1),
                total_s=round(client.finished[-1][1] - t0, 1),
                slowest_cells=[dict(cell=i, s=round(s, 1)) for s, i in cells[:3]])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--notebooks", nargs="*", default=None,
                   help="number prefixes, e.g. 01 06 (default: all)")
    p.add_argument("--cache", type=Path, default=None,
                   help="parent of the per-notebook empty caches (default: a temporary folder)")
    args = p.parse_args(argv)
    paths = sorted(NOTEBOOKS.glob("*.ipynb"))
    if args.notebooks:
        paths = [q for q in paths if q.name[:2] in args.notebooks]
    with tempfile.TemporaryDirectory() as tmp:
        parent = args.cache or Path(tmp)
        rows = []
        for q in paths:
            cache = parent / q.stem
            cache.mkdir(parents=True, exist_ok=False)
            rows.append(run(q, cache))
    report(dict(benchmark="notebooks_cold", notebooks=rows))


if __name__ == "__main__":
    main()
