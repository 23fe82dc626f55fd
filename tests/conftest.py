import pytest


@pytest.fixture(scope="session")
def world():
    """The committed demo world: (model, tokenizer, corpus)."""
    from influence_nb import demo
    return demo.load()


@pytest.fixture(scope="session")
def tokenizer(world):
    return world[1]
