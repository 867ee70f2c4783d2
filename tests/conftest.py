"""Shared fixtures. Each fixture module under tests/fixtures/ is owned by one area."""

pytest_plugins = [
    "tests.fixtures.net",
    "tests.fixtures.spark",
    "tests.fixtures.models",
]
