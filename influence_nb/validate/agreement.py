"""How well two sets of scores agree: the correlations every check reports."""
from __future__ import annotations

import numpy as np
import pandas as pd
from torch import Tensor


def spearman(x: np.ndarray | Tensor, y: np.ndarray | Tensor) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    return pd.Series(np.asarray(x)).corr(pd.Series(np.asarray(y)), method="spearman")


def pearson(x: np.ndarray | Tensor, y: np.ndarray | Tensor) -> float:
    """Pearson correlation."""
    return float(np.corrcoef(np.asarray(x, float), np.asarray(y, float))[0, 1])
