"""Template RAM for jailed clones: a sealed memfd, from one holder per template.

See sealedhold.py for why. ``template_ram_fd`` returns an fd of the memfd
that holds ``ram``'s bytes, starting the holder first when there is none (or
it died, or the template was rebuilt since): under a lock per template, so
concurrent first starts make one memfd and their clones share its pages.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from cocoon.errors import HypervisorError
from cocoon.hypervisor.base import file_stamp
from cocoon.util.fs import locked_file
from cocoon.util.proc import start_time

HOLDER = Path(__file__).with_name("sealedhold.py")
#: A holder copies the template's touched RAM (~70 MiB) once: well under a second.
READY_S = 10.0


#: One holder per template on the host, whatever state root its clones use
#: (tests use many): records live here, not under a root.
RECORDS = Path("/run/cocoon-sealed")


def _paths(ram: Path) -> tuple[Path, Path]:
    d = RECORDS
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    name = hashlib.sha256(str(ram).encode()).hexdigest()[:16]
    return d / f"{name}.json", d / f"{name}.lock"


def _open_held(record: Path, ram: Path) -> int | None:
    """An fd of the live holder's memfd, or None if there is no usable holder."""
    try:
        rec = json.loads(record.read_text())
        pid, fd, stamp = int(rec["pid"]), int(rec["fd"]), str(rec["stamp"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if stamp != file_stamp(ram) or start_time(pid) is None:
        return None
    try:
        mine = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    if os.fstat(mine).st_size != ram.stat().st_size:
        os.close(mine)
        return None
    return mine


def template_ram_fd(root: Path, ram: Path) -> int:
    del root  # the records are host-wide (RECORDS)
    record, lock = _paths(ram)
    with locked_file(lock, READY_S, "the template RAM holder"):
        fd = _open_held(record, ram)
        if fd is not None:
            return fd
        record.unlink(missing_ok=True)
        subprocess.Popen(
            [sys.executable, "-I", "-S", str(HOLDER), str(ram), str(record)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ).wait(READY_S)  # it forks away at once
        deadline = time.monotonic() + READY_S
        while time.monotonic() < deadline:
            fd = _open_held(record, ram)
            if fd is not None:
                return fd
            time.sleep(0.005)
    raise HypervisorError(f"no sealed copy of {ram} within {READY_S:g} s")
