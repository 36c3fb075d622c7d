"""docker -u semantics, resolved by the agent against the container's own files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cocoon.agent.system import resolve_user
from cocoon.protocol.errors import RemoteError


@pytest.fixture
def rootfs(tmp_path: Path) -> str:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\ngarbage line\n"
    )
    (tmp_path / "etc/group").write_text("root:x:0:\napp:x:1001:\nwheel:x:10:app,other\n")
    return str(tmp_path)


def user(spec: str) -> dict[str, Any]:
    return {"user": {"uid": 0, "gid": 0, "username": spec}}


@pytest.mark.parametrize(
    "spec, uid, gid, extra",
    [
        ("app", 1000, 1001, [10]),
        ("1000", 1000, 1001, [10]),
        ("app:wheel", 1000, 10, []),
        ("4242", 4242, 0, None),
        ("4242:77", 4242, 77, None),
        ("root:app", 0, 1001, None),
    ],
)
def test_resolution(rootfs: str, spec: str, uid: int, gid: int, extra: list[int] | None) -> None:
    p = user(spec)
    resolve_user(rootfs, p)
    assert (p["user"]["uid"], p["user"]["gid"]) == (uid, gid)
    assert p["user"].get("additionalGids") == (extra or None)
    assert "username" not in p["user"]


@pytest.mark.parametrize("spec, why", [("nobody", "not found"), ("app:nogroup", "not found")])
def test_unknown_names(rootfs: str, spec: str, why: str) -> None:
    with pytest.raises(RemoteError, match=why):
        resolve_user(rootfs, user(spec))


@pytest.mark.parametrize("spec", ["²", "1000:²", "99999999999", "٣"])
def test_digits_int_refuses_are_names(rootfs: str, spec: str) -> None:
    """Issue 19: "²".isdigit() is true but int("²") fails: an image's User "²" was an
    internal ValueError; it is a user (or group) that is not there."""
    with pytest.raises(RemoteError, match="not found"):
        resolve_user(rootfs, user(spec))


def test_garbage_ids_in_the_images_files_are_skipped(rootfs: str) -> None:
    Path(rootfs, "etc/passwd").write_text("odd:x:²:0::/:/bin/sh\nodd:x:7:8::/:/bin/sh\n")
    Path(rootfs, "etc/group").write_text("g:x:²:\ng:x:9:odd\n")
    p = user("odd:g")
    resolve_user(rootfs, p)
    assert (p["user"]["uid"], p["user"]["gid"]) == (7, 9)
