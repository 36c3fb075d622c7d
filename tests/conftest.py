"""Fixtures every test directory may use."""

from tests.netpair import make_pair  # noqa: F401 (a fixture: network namespace pairs)
