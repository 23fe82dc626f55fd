"""The ``influence-nb`` command line (see :mod:`influence_nb.cli.main` for the verbs): a shared
core (:mod:`.core`: options declared once, the parser, the config file; :mod:`.inputs`: the
model, corpus and query options and their loaders) and one module per verb."""
from .main import main

__all__ = ["main"]
