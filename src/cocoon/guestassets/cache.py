"""Content-addressed cache of built guest assets, and the pointer to the current ones."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from cocoon.config import Config
from cocoon.errors import GuestAssetError
from cocoon.util.fs import atomic_write
from cocoon.util.proc import run

#: Bump when the build procedure changes in a way the inputs do not show.
BUILDER_VERSION = "1"


def data_file(name: str) -> bytes:
    return (resources.files("cocoon.guestassets") / "data" / name).read_bytes()


def guest_dir(cfg: Config) -> Path:
    return cfg.data / "guest"


def package_versions(names: list[str]) -> dict[str, str]:
    """Installed versions of Debian packages; a missing one is a clear error."""
    versions: dict[str, str] = {}
    for n in names:
        cp = run(
            ["dpkg-query", "-W", "-f=${Version} ${db:Status-Abbrev}", n],
            timeout_s=30,
            error=GuestAssetError,
            check=False,
        )
        out = cp.stdout.decode()
        if cp.returncode != 0 or not out.split()[1:2] == ["ii"]:
            raise GuestAssetError(
                f"Debian package {n} is not installed: run the README set-up (apt-get install {n})"
            )
        versions[n] = out.split()[0]
    return versions


def digest(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        b = p.encode() if isinstance(p, str) else p
        h.update(len(b).to_bytes(8, "big"))
        h.update(b)
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class Assets:
    kernel: Path
    image: Path
    #: An initramfs beside the kernel (Debian's cloud kernel needs one for its modules).
    initrd: Path | None = None


def current_file(cfg: Config) -> Path:
    return guest_dir(cfg) / "current.json"


def set_current(cfg: Config, kind: str, path: Path) -> None:
    f = current_file(cfg)
    f.parent.mkdir(parents=True, exist_ok=True)
    try:
        cur = json.loads(f.read_text())
    except (OSError, ValueError):
        cur = {}
    cur[kind] = str(path)
    atomic_write(f, json.dumps(cur, indent=1).encode())


def resolve(cfg: Config) -> Assets:
    """Kernel and image a sandbox boots: config overrides, else the last build."""
    try:
        cur = json.loads(current_file(cfg).read_text())
    except (OSError, ValueError):
        cur = {}
    kernel = cfg.hypervisor.kernel or cur.get(f"kernel-{cfg.guest.kernel_source}", "")
    image = cfg.hypervisor.image or cur.get("image", "")
    for what, p in (("guest kernel", kernel), ("guest root image", image)):
        if not p or not Path(p).is_file():
            raise GuestAssetError(
                f"{what} not built: run `cocoon guest build`"
                + ("" if cfg.guest.kernel_source == "build" else " --kernel-source debian-cloud")
            )
    initrd = Path(kernel).with_name("initrd.img")
    return Assets(Path(kernel), Path(image), initrd if initrd.is_file() else None)
