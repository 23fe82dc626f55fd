import os

import pytest
import torch

# under pytest-xdist the cores are shared between workers: each takes its share of threads, so
# that two workers on two cores do not run four threads
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


@pytest.fixture(scope="session")
def world():
    """The committed demo world: (model, tokenizer, corpus)."""
    from influence_nb import demo
    return demo.load()


@pytest.fixture(scope="session")
def tokenizer(world):
    return world[1]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one torch thread is fastest and immune to a busy machine (a test module
    opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
