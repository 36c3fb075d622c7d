"""A busybox root file system made from Debian's busybox-static.

The smallest real rootfs there is, built from a package the host has; shared
read-only into sandboxes for `cocoon sandbox run` (and the seed of the default
offline image).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from cocoon.config import Config
from cocoon.errors import HostError
from cocoon.util.proc import run

BUSYBOX = "/bin/busybox"
LIST_TIMEOUT_S = 30.0


def busybox_rootfs(cfg: Config) -> Path:
    """The cached tree for the host's busybox binary (keyed by its hash)."""
    if not os.path.isfile(BUSYBOX):
        raise HostError("busybox-static is not installed: apt-get install busybox-static")
    with open(BUSYBOX, "rb") as f:
        key = hashlib.sha256(f.read()).hexdigest()[:16]
    out = cfg.data / "rootfs" / f"busybox-{key}"
    if out.is_dir():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".busybox-", dir=out.parent))
    try:
        for d in ("bin", "etc", "proc", "sys", "dev", "tmp", "root", "var/tmp", "run"):
            (tmp / d).mkdir(parents=True, exist_ok=True)
        shutil.copy2(BUSYBOX, tmp / "bin/busybox")
        applets = run([BUSYBOX, "--list"], timeout_s=LIST_TIMEOUT_S).stdout.decode().split()
        for a in applets:
            if a != "busybox":
                os.symlink("busybox", tmp / "bin" / a)
        (tmp / "etc/passwd").write_text(
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n"
        )
        (tmp / "etc/group").write_text("root:x:0:\nnogroup:x:65534:\n")
        (tmp / "tmp").chmod(0o1777)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if out.is_dir():  # another process won the race
            return out
        raise
    return out
