"""The id patterns: each kind accepts exactly its own alphabet and length."""

from __future__ import annotations

import re

import pytest

from cocoon.protocol import ids

HEX64 = "0123456789abcdef" * 4


@pytest.mark.parametrize(
    "pattern, good, bad",
    [
        (ids.CONTAINER_ID, [HEX64], [HEX64[:-1], HEX64.upper(), HEX64 + "0", "web"]),
        (ids.NAME, ["web", "Web_1.a-b", "a" * 128], ["a" * 129, "-a", ".a", "a+b", "a/b", ""]),
        (ids.OCI_ID, ["a+b", "Pod_1.x-y", "a" * 128], ["a" * 129, "+a", "a/b", "a b", ""]),
        (ids.OCI_RECORD_DIR, ["a+b", "a" * 500], ["+a", "a/b", ".."]),
        (ids.SANDBOX_ID, ["abc", "a1_b.c-d", "a" * 64], ["a" * 65, "Abc", "a+b", "_a", ""]),
    ],
)
def test_each_kind_accepts_its_own_ids(
    pattern: re.Pattern[str], good: list[str], bad: list[str]
) -> None:
    assert all(pattern.match(s) for s in good), [s for s in good if not pattern.match(s)]
    assert not any(pattern.match(s) for s in bad), [s for s in bad if pattern.match(s)]
