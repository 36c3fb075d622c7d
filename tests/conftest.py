"""Fixtures every test directory may use."""

import logging
from collections.abc import Iterator

import pytest

from tests.netpair import make_pair  # noqa: F401 (a fixture: network namespace pairs)


@pytest.fixture(autouse=True)
def _cocoon_log_reset() -> Iterator[None]:
    """A test that runs a command line in-process configures the ``cocoon``
    logger for it; the next test starts from logging's defaults again."""
    yield
    root = logging.getLogger("cocoon")
    for h in list(root.handlers):
        root.removeHandler(h)
    root.setLevel(logging.NOTSET)
