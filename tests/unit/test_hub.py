"""storage/hub against the host's real mount table (root, as the suite runs):
a slot covered later shows the new directory, read-only, and the hub's
removal takes both layers and nothing of what was bound."""

from __future__ import annotations

import errno
from collections.abc import Iterator
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


def test_a_hub_another_reaper_removes_meanwhile_is_removed_not_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pool stopping and `cocoon gc` may reap one sandbox at once: the
    hub (or a slot) gone between our look and our rmdir is done, not a
    failure that leaves the reap half-way."""
    (tmp_path / "root").mkdir()
    h = hub.hub_dir(tmp_path / "root", "sb1")
    hub.create(h)
    hub.attach(h, 0, tmp_path, readonly=True)
    real_iterdir = Path.iterdir

    def raced(self: Path) -> Iterator[Path]:
        kids = list(real_iterdir(self))
        if self == h:  # the other reaper empties and removes the hub first
            for k in kids:
                k.rmdir()
            self.rmdir()
        return iter(kids)

    monkeypatch.setattr(Path, "iterdir", raced)
    hub.remove(h)
    monkeypatch.undo()
    assert not h.exists() and mount_points_under(tmp_path) == []
