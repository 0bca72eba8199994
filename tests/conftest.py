"""Shared pytest setup. ``--runslow`` enables tests marked ``slow`` (long reliability runs)."""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run tests marked slow (long reliability and load runs)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: enable with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
