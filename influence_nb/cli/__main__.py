"""``python -m influence_nb.cli`` (what torchrun launches): the ``influence-nb`` command."""
from .main import main

main()
