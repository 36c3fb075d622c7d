import pytest

from cocoon.util.units import parse_size


@pytest.mark.parametrize(
    "text, n",
    [("512", 512), ("64k", 65536), ("256m", 256 << 20), ("1.5g", 3 << 29), ("2GiB", 2 << 30)],
)
def test_sizes(text: str, n: int) -> None:
    assert parse_size(text) == n


@pytest.mark.parametrize("bad", ["", "-1m", "1x", "m"])
def test_bad_sizes(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_size(bad)
