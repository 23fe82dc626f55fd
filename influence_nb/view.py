"""What every widget of ours is: an anywidget view whose ES module carries the display rules of
:mod:`influence_nb.style` and whose CSS lives in ``widgets/``, that answers a view's "ping" so that
a view knows whether a kernel is there, and that displays a static HTML snapshot of itself
(:mod:`influence_nb.snapshot`) beside the live view, kept up to date while the kernel runs.
"""
from __future__ import annotations

import importlib.resources
import os
from pathlib import Path
from typing import Any

import anywidget
import traitlets as t

from . import snapshot, style
from .results import unit_note


def asset(name: str) -> Path:
    """A widget file: ``influence_nb/_static`` when installed, ``widgets/`` in a source tree."""
    try:
        return Path(str(importlib.resources.files("influence_nb._static") / name))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "widgets" / name


class View(anywidget.AnyWidget):
    """A view of ours: the ESM and CSS in ``widgets/``, a static snapshot beside it."""
    _esm = style.esm(asset("influence.js").read_text())
    _css = asset("influence.css")
    _view = t.Unicode().tag(sync=True)
    # N, the training sequences the curvature was fitted on (0: unknown): score / N is the
    # first-order change in log p for one added copy of a sequence
    n_train = t.Int(0).tag(sync=True)
    unit = t.Unicode("").tag(sync=True)   # results.UNIT with N: what a score means

    @t.observe("n_train")
    def _unit(self, _: Any = None) -> None:
        self.unit = unit_note(self.n_train)

    def __init__(self, **kw: Any):
        super().__init__(**kw)
        self._unit()
        self._snapshots: list[Any] = []   # display handles of the snapshots shown so far
        self.on_msg(self._on_msg)
        self.observe(self._refresh, names=[n for n in self.trait_names(sync=True)
                                           if not n.startswith("_")])

    def _on_msg(self, _: Any, content: dict, buffers: Any) -> None:
        """Messages from a view: "ping" (is the kernel there? see ``connection`` in the JS) is
        answered with "pong"; others go to :meth:`_command`."""
        if content.get("type") == "ping":
            self.send({"type": "pong"})
        else:
            self._command(content)

    def _command(self, content: dict) -> None:
        """A view's request (the lab's "score")."""

    def to_html(self) -> str:
        """A self-contained static HTML snapshot of the view (plain HTML with inline styles,
        no script, no network, every text escaped)."""
        raise NotImplementedError

    def save(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_html` as a standalone HTML page to ``path``; returns the path."""
        path = Path(path)
        path.write_text(snapshot.document(self.to_html(), f"influence_nb {self._view}"),
                        encoding="utf-8")
        return path

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._view} view; .to_html() / .save(path) for a snapshot)"

    def _ipython_display_(self, **kw: Any) -> None:
        """Two outputs: the snapshot (a display that :meth:`_refresh` updates) and the view."""
        from IPython.display import display
        self._snapshots.append(display({"text/html": self.to_html()}, raw=True,
                                       display_id=True))
        bundle = self._repr_mimebundle_()            # data, or (data, metadata)
        data, meta = bundle if isinstance(bundle, tuple) else (bundle, {})
        if data is not None:
            display(dict(data, **{"text/plain": ""}), metadata=meta, raw=True)

    def _refresh(self, _: Any = None) -> None:
        """Bring the displayed snapshots up to date (what a saved notebook will show)."""
        if self._snapshots:
            page = self.to_html()
            for handle in self._snapshots:
                handle.update({"text/html": page}, raw=True)
