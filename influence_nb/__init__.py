"""influence_nb: influence functions for language models (EK-FAC, after Grosse et al. 2023),
inline in JupyterLab.

Scores are reported so that **positive means adding the training sequence raises
log p(completion | prompt)**; the unit is ``results.UNIT`` (Δ log p per copy = score / N).

The data path, bottom layer first (a module imports only its own group or those before it;
tests/test_layers.py checks):
:mod:`data`, :mod:`task`, :mod:`layers`, :mod:`hooks`, :mod:`batching`, :mod:`store` → :mod:`passes` (the
one loop over a corpus, feeding consumers) → :mod:`statistics` (A, S, their eigenbases, Λ) →
:mod:`curvature` (EK-FAC factors) → :mod:`queries` (preconditioned query gradients) →
:mod:`scoring`, :mod:`projection`, :mod:`sketch`, :mod:`validate` → :mod:`index`, :mod:`search`,
:mod:`calibration`, :mod:`plan` →
:mod:`results`, :mod:`session`, :mod:`retriever` → :mod:`widgets`, :mod:`charts`,
:mod:`magics`, :mod:`cli`. This package module wires the notebook view in (the explorer
displays a result) in a notebook kernel when the widget dependencies are installed.
"""
import importlib.util
import sys

from .curvature import FactorArgs, Factors, fit_factors
from .data import Batch, Corpus, CorpusError
from .hooks import Capture
from .layers import find_layers
from .queries import Queries, make_queries, query_gradients
from .results import InfluenceResult
from .scoring import ScoreArgs, scan, self_influence, token_scores
from .session import Influence
from .task import Task

__version__ = "0.1.0"

# in a notebook kernel (IPython loaded) with the "notebook" extra installed, a result displays
# itself as the explorer; scripts, the CLI and torchrun workers skip the widget imports
if "IPython" in sys.modules and importlib.util.find_spec("anywidget") is not None:
    from . import widgets  # noqa: F401  registers InfluenceResult.view

__all__ = ["Batch", "Capture", "Corpus", "CorpusError", "FactorArgs", "Factors", "Influence",
           "InfluenceResult", "Queries", "ScoreArgs", "Task", "__version__", "find_layers",
           "fit_factors", "make_queries", "query_gradients", "scan", "self_influence",
           "load_ipython_extension", "token_scores"]


def load_ipython_extension(ipython: "object") -> None:
    """``%load_ext influence_nb``: register the magics of :mod:`influence_nb.magics`."""
    from .magics import load_ipython_extension as load
    load(ipython)
