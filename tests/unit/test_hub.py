"""storage/hub against the host's real mount table (root, as the suite runs):
a slot covered later shows the new directory, read-only, and the hub's
removal takes both layers and nothing of what was bound."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from cocoon.storage import hub
from cocoon.util.fs import mount_points_under


def test_a_covered_slot_shows_the_code_read_only_and_goes_with_the_hub(tmp_path: Path) -> None:
    empty, code = tmp_path / "empty", tmp_path / "code"
    empty.mkdir()
    code.mkdir()
    (code / "h.sh").write_text("echo hi\n")
    (tmp_path / "root").mkdir()
    h = hub.hub_dir(tmp_path / "root", "sb1")
    hub.create(h)
    try:
        hub.attach(h, 0, empty, readonly=True)
        slot = h / "0"
        assert list(slot.iterdir()) == []
        hub.cover(slot, code)
        assert (slot / "h.sh").read_text() == "echo hi\n"
        with pytest.raises(OSError) as e:
            (slot / "new").write_text("x")
        assert e.value.errno == errno.EROFS
    finally:
        hub.remove(h)
    assert not h.exists() and mount_points_under(tmp_path) == []
    assert (code / "h.sh").exists() and list(empty.iterdir()) == []
