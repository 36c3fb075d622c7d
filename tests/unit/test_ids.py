"""The id patterns: each kind accepts exactly its own alphabet and length."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cocoon.config import Config
from cocoon.errors import OciError, SandboxError, StateError
from cocoon.protocol import ids
from cocoon.runtime.ocirecords import OciStore
from cocoon.runtime.records import ContainerDir
from cocoon.state.store import check_sandbox_id, list_ids

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


@pytest.mark.parametrize(
    "pattern, good",
    [(ids.CONTAINER_ID, HEX64), (ids.NAME, "web"), (ids.OCI_ID, "a+b"),
     (ids.OCI_RECORD_DIR, "a+b"), (ids.SANDBOX_ID, "abc")],
)  # fmt: skip
def test_a_trailing_newline_is_not_part_of_an_id(pattern: re.Pattern[str], good: str) -> None:
    """`$` also matches before a final newline: the host's checks take the
    whole string, so "abc\\n" never becomes a directory or a hostname."""
    assert pattern.fullmatch(good) and not pattern.fullmatch(good + "\n")


def test_the_host_refuses_ids_with_a_trailing_newline(tmp_path: Path) -> None:
    with pytest.raises(SandboxError, match="invalid sandbox id"):
        check_sandbox_id("abc\n")
    with pytest.raises(StateError, match="invalid container id"):
        ContainerDir(tmp_path, HEX64 + "\n")
    with pytest.raises(StateError, match="invalid container id"):
        ContainerDir(tmp_path, "a+b\n", ids.OCI_ID)
    with pytest.raises(OciError, match="invalid container id"):
        OciStore(Config()).dir("a+b\n")
    for name in ("abc", "abc\n"):
        (tmp_path / "sandboxes" / name).mkdir(parents=True)
    assert list_ids(tmp_path) == ["abc"]
