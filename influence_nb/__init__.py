"""influence_nb: influence functions for language models (EK-FAC, after Grosse et al. 2023),
inline in JupyterLab. See README.md for the conventions (positive = raises the query's
log-probability)."""
from .data import Batch, Corpus, CorpusError

__version__ = "0.1.0"

__all__ = ["Batch", "Corpus", "CorpusError", "__version__"]
