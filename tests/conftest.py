import os

import pytest
import torch

# under pytest-xdist the cores are shared between workers: each takes its share of threads, so
# that two workers on two cores do not run four threads
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def pytest_configure(config: pytest.Config) -> None:
    """``--dist loadgroup`` keeps a notebook and the claims read from it on one worker by the
    group pytest-xdist appends to their ids; pytest 9.2 keeps ids where pytest-xdist 3.8 cannot
    append it, so each notebook would run twice, silently: refused instead."""
    if getattr(config.option, "dist", None) == "loadgroup" and \
            tuple(int(x) for x in pytest.__version__.split(".")[:2]) >= (9, 2):
        raise pytest.UsageError(f"pytest-xdist's groups have no effect with pytest "
                                f"{pytest.__version__}; pip install 'pytest<9.2' (make test does)")


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
