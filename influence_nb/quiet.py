"""Third-party output that is not the user's business: transformers' progress bars while a
model or tokenizer loads ("Loading weights") or is saved ("Writing model shards", when a demo
world is built on first use), which appear even where every influence_nb call says
``progress=False``, and the FutureWarning peft's PeftModel raises on transformers 5 by
reading ``is_gradient_checkpointing`` (a red box in a notebook; peft's call, not ours)."""
from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["loading_quietly"]


@contextmanager
def loading_quietly() -> Iterator[None]:
    """Hide transformers' (and the Hub's) progress bars and peft's deprecation warning inside
    the block; the settings the caller had are restored after it."""
    from transformers.utils import logging
    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", r"`is_gradient_checkpointing` is deprecated",
                                    FutureWarning)
            yield
    finally:
        if enabled:
            logging.enable_progress_bar()
