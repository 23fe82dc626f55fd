import pytest
import torch


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
