"""The sealed copies of template RAM that jailed clones map (hypervisor.sealed)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from cocoon.hypervisor.sealed import _paths, template_ram_fd
from cocoon.util.proc import start_time


def _gone(pid: int, within_s: float = 6.0) -> bool:
    deadline = time.monotonic() + within_s
    while start_time(pid) is not None:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_one_sealed_copy_per_template_whatever_the_root(tmp_path: Path) -> None:
    ram = tmp_path / "ram"
    ram.write_bytes(os.urandom(1 << 16) + bytes(1 << 20))
    a = template_ram_fd(tmp_path / "root-a", ram)
    b = template_ram_fd(tmp_path / "root-b", ram)
    try:
        assert os.path.samestat(os.fstat(a), os.fstat(b)), "two copies of one template"
        assert os.pread(a, 1 << 16, 0) == ram.read_bytes()[: 1 << 16]
        rw = os.open(f"/proc/self/fd/{b}", os.O_RDWR)  # as a jailed QEMU opens it
        try:
            os.pwrite(rw, b"x", 0)
            raise AssertionError("the copy is writable")
        except PermissionError:
            pass  # sealed
        finally:
            os.close(rw)
        record, _ = _paths(ram)
        pid = json.loads(record.read_text())["pid"]
        # gone with its record (as after a crash, or gc)...
        record.unlink()
        assert _gone(pid), "the holder outlived its record"
    finally:
        os.close(a)
        os.close(b)


def test_the_holder_ends_with_its_template(tmp_path: Path) -> None:
    ram = tmp_path / "ram"
    ram.write_bytes(bytes(1 << 20))
    fd = template_ram_fd(tmp_path, ram)
    os.close(fd)
    record, _ = _paths(ram)
    pid = json.loads(record.read_text())["pid"]
    ram.unlink()
    assert _gone(pid), "the holder outlived its template"
    assert not record.exists()
