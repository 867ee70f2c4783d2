"""Shared fixtures. Each fixture module under tests/fixtures/ is owned by one area."""

pytest_plugins = [
    "tests.fixtures.net",
    "tests.fixtures.spark",
    "tests.fixtures.models",
    "tests.fixtures.queries",
    "tests.fixtures.stored",
]


def pytest_collection_modifyitems(config, items):
    """`gpu` tests need CUDA: without it they are reported as skipped, with the reason, never silently."""
    import pytest
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
