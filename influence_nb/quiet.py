"""Third-party output that is not the user's business: transformers' progress bars while a
model or tokenizer loads ("Loading weights"), which appear even where every influence_nb call
says ``progress=False``."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["loading_quietly"]


@contextmanager
def loading_quietly() -> Iterator[None]:
    """Hide transformers' (and the Hub's) progress bars inside the block; the setting the
    caller had is restored after it."""
    from transformers.utils import logging
    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            logging.enable_progress_bar()
