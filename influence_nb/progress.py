"""Progress bars: ``tqdm.auto``'s, except that in a notebook a finished bar leaves its last line
as text. tqdm's notebook bar is an ipywidget; a notebook saved without widget state (JupyterLab's
default) reopens with "Error displaying widget: model not found" in its place. Ours is
displayed with a display id and, once closed, replaced by its final line (``text/plain``), so
the saved notebook holds "scoring: 100%|██████████| 299/299 [...]" and no widget to lose."""
from __future__ import annotations

from tqdm.auto import tqdm as _auto
from tqdm.notebook import tqdm as _notebook

__all__ = ["tqdm"]

if issubclass(_auto, _notebook):
    class tqdm(_auto):  # noqa: N801 (tqdm's name)
        """tqdm.notebook.tqdm whose widget becomes its last line of text when it closes (an
        unfinished bar's line says how far it got; ``leave=False`` leaves nothing)."""

        def __init__(self, *args, **kwargs) -> None:
            show = kwargs.pop("display", True)
            delayed = kwargs.get("delay", 0) > 0      # tqdm displays a delayed bar itself
            super().__init__(*args, display=show and delayed, **kwargs)
            self._handle = None
            if show and not delayed and not self.disable:
                from IPython.display import display
                self._handle = display(self.container, display_id=True)
                self.displayed = True

        def close(self) -> None:
            super().close()
            if getattr(self, "_handle", None) is not None:
                line = self.format_meter(**self.format_dict) if self.leave or (
                    self.total and self.n < self.total) else ""
                self._handle.update({"text/plain": line}, raw=True)
                self._handle = None
else:
    tqdm = _auto
