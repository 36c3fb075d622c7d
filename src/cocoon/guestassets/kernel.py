"""Guest kernel from Debian's linux-source-6.1 and our Kconfig fragment.

allnoconfig + fragment (KCONFIG_ALLCONFIG) keeps the kernel small (no modules,
~5 MB bzImage) and fast to boot. Every fragment line is checked against the
resulting .config: Kconfig silently drops options whose dependencies are off
(EROFS without MISC_FILESYSTEMS), and a kernel without them fails much later
and much more confusingly.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

from cocoon.config import Config
from cocoon.errors import GuestAssetError
from cocoon.guestassets.cache import BUILDER_VERSION, data_file, digest, guest_dir, package_versions
from cocoon.util.proc import run

SOURCE_PACKAGE = "linux-source-6.1"
SOURCE_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
BUILD_TIMEOUT_S = 3600

Log = Callable[[str], None]


def fragment_lines(fragment: bytes) -> list[str]:
    return [
        ln.strip()
        for ln in fragment.decode().splitlines()
        if ln.strip() and not ln.lstrip().startswith("#")
    ]


def missing_options(fragment: bytes, dotconfig: str) -> list[str]:
    have = set(dotconfig.splitlines())
    return [ln for ln in fragment_lines(fragment) if ln not in have]


def kernel_key() -> str:
    fragment = data_file("kernel.config")
    versions = package_versions([SOURCE_PACKAGE])
    return digest(BUILDER_VERSION, fragment, repr(sorted(versions.items())))


def kernel_path(cfg: Config, key: str) -> Path:
    return guest_dir(cfg) / "kernel" / key / "bzImage"


def build(cfg: Config, log: Log) -> Path:
    key = kernel_key()
    out = kernel_path(cfg, key)
    if out.is_file():
        log(f"kernel {key}: cached ({out})")
        return out
    if not SOURCE_TARBALL.is_file():
        raise GuestAssetError(f"{SOURCE_TARBALL} missing: apt-get install {SOURCE_PACKAGE}")
    fragment = data_file("kernel.config")
    jobs = cfg.guest.build_jobs or os.cpu_count() or 1
    build_root = cfg.data / "build"
    build_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kernel-", dir=build_root) as tmp:
        log(f"kernel {key}: unpacking {SOURCE_TARBALL.name}")
        with tarfile.open(SOURCE_TARBALL) as tf:
            tf.extractall(tmp, filter="data")
        src = Path(tmp) / SOURCE_TARBALL.name.removesuffix(".tar.xz")
        frag = Path(tmp) / "cocoon.config"
        frag.write_bytes(fragment)
        make = ["make", "-C", str(src), "ARCH=x86_64"]
        run(
            [*make, f"KCONFIG_ALLCONFIG={frag}", "allnoconfig"],
            timeout_s=300,
            error=GuestAssetError,
        )
        missing = missing_options(fragment, (src / ".config").read_text())
        if missing:
            raise GuestAssetError(
                f"kernel config dropped {len(missing)} option(s), first {missing[0]}: "
                "a dependency is off; fix guestassets/data/kernel.config"
            )
        log(f"kernel {key}: building bzImage with -j{jobs} (several minutes)")
        run([*make, f"-j{jobs}", "bzImage"], timeout_s=BUILD_TIMEOUT_S, error=GuestAssetError)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp_out = out.with_suffix(".tmp")
        shutil.copyfile(src / "arch/x86/boot/bzImage", tmp_out)
        shutil.copyfile(src / ".config", out.parent / "config")
        os.replace(tmp_out, out)
    log(f"kernel {key}: built {out} ({out.stat().st_size >> 10} KiB)")
    return out
