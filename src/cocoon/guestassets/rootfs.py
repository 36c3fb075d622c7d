"""The read-only erofs guest root image: busybox, crun, Python and the agent.

Files come from the host's installation of the Debian packages listed in
data/packages.txt (the set-up installs them), laid out merged-/usr like
Debian. Shared libraries are found with ldd; Python is trimmed to the stdlib
modules the agent actually imports (found by importing it with the guest's
own interpreter), precompiled with unchecked-hash .pyc since a read-only root
cannot cache bytecode.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from cocoon.config import Config
from cocoon.errors import GuestAssetError
from cocoon.guestassets.cache import BUILDER_VERSION, data_file, digest, guest_dir, package_versions
from cocoon.util.proc import run

Log = Callable[[str], None]

PYTHON = "/usr/bin/python3.11"
PYLIB = "/usr/lib/python3.11"
BUSYBOX = "/usr/bin/busybox"
CRUN = "/usr/bin/crun"
#: Imported lazily inside stdlib functions the agent calls (socket.recv_fds
#: imports array), so an import scan of the agent cannot see them.
EXTRA_MODULES = ["array", "encodings.ascii", "encodings.latin_1", "encodings.utf_8"]
AGENT_PACKAGES = ("protocol", "agent")
#: Single modules of other packages the agent imports (with their package's
#: __init__): the bounded JSON loader decodes host messages in the guest too.
AGENT_MODULES = ("util/__init__.py", "util/boundedjson.py")
#: Optional imports of the stdlib (asyncio tries ssl, shutil tries lzma/bz2):
#: left out of the image they cost nothing at boot (ssl alone was ~80 ms under
#: TCG) and their libraries (libssl, libcrypto: ~5 MB) stay out too.
BLOCKED_MODULES = ["ssl", "_ssl", "lzma", "_lzma", "bz2", "_bz2", "_hashlib"]


def packages() -> list[str]:
    text = data_file("packages.txt").decode()
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


def agent_sources() -> dict[str, bytes]:
    """The cocoon modules the guest runs: the package root, protocol, agent and AGENT_MODULES."""
    root = resources.files("cocoon")
    out = {"cocoon/__init__.py": (root / "__init__.py").read_bytes()}
    for pkg in AGENT_PACKAGES:
        for f in sorted((root / pkg).iterdir(), key=lambda t: t.name):
            if f.name.endswith(".py"):
                out[f"cocoon/{pkg}/{f.name}"] = f.read_bytes()
    for rel in AGENT_MODULES:
        out[f"cocoon/{rel}"] = root.joinpath(*rel.split("/")).read_bytes()
    return out


def image_key(cfg: Config) -> str:
    versions = package_versions(packages())
    parts: list[bytes | str] = [BUILDER_VERSION, repr(sorted(versions.items()))]
    parts.append(cfg.guest.image_compression)
    # The builder itself is an input: a change in how the image is made rebuilds it.
    parts.append((resources.files("cocoon.guestassets") / "rootfs.py").read_bytes())
    for name in ("init", "agent.py", "packages.txt"):
        parts += [name, data_file(name)]
    for name, body in sorted(agent_sources().items()):
        parts += [name, body]
    return digest(*parts)


def image_path(cfg: Config, key: str) -> Path:
    return guest_dir(cfg) / "rootfs" / f"{key}.erofs"


_LDD_RE = re.compile(r"(?:=>\s*)?(/\S+)\s+\(0x")


def shared_libs(binary: str) -> list[str]:
    cp = run(["ldd", binary], timeout_s=30, error=GuestAssetError, check=False)
    if cp.returncode != 0:  # static binaries say "not a dynamic executable"
        return []
    return sorted(set(_LDD_RE.findall(cp.stdout.decode())))


def _copy(root: Path, path: str) -> None:
    """Copy host ``path`` (and the symlink chain naming it) into root."""
    real = os.path.realpath(path)
    dst = root / real.lstrip("/")
    if not dst.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(real, dst)
    named = root / path.lstrip("/")
    if os.path.realpath(str(named)) != str(dst) and not named.exists():
        named.parent.mkdir(parents=True, exist_ok=True)
        # The parent may itself be a symlink (lib64 -> usr/lib64): link from where it lands.
        parent = Path(os.path.realpath(named.parent))
        if not named.is_symlink():
            os.symlink(os.path.relpath(dst, parent), parent / named.name)


def _with_libs(root: Path, binary: str) -> None:
    _copy(root, binary)
    for lib in shared_libs(binary):
        _copy(root, lib)


def python_modules(agent_dir: Path) -> list[str]:
    """Stdlib files the agent imports, found by importing it with the guest's Python."""
    code = (
        "import sys\n"
        f"sys.path.insert(0, {str(agent_dir)!r})\n"
        f"for m in {BLOCKED_MODULES!r}: sys.modules[m] = None\n"
        "import cocoon.agent.main, cocoon.agent.containers, cocoon.agent.system\n"
        f"for m in {EXTRA_MODULES!r}: __import__(m)\n"
        "for m in list(sys.modules.values()):\n"
        "    f = getattr(m, '__file__', None)\n"
        "    if f: print(f)\n"
    )
    # -B: the scan imports from the image tree; timestamp .pyc left there would
    # make compileall skip those files, and mkfs -T0 zeroes the sources' mtimes,
    # so the guest would find them stale and recompile the agent at every boot.
    cp = run([PYTHON, "-I", "-S", "-B", "-c", code], timeout_s=60, error=GuestAssetError)
    files = [ln for ln in cp.stdout.decode().splitlines() if ln.startswith(PYLIB + "/")]
    return sorted(set(files))


def populate(root: Path) -> None:
    for d in ("usr/bin", "usr/sbin", "usr/lib", "usr/lib64"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for link in ("bin", "sbin", "lib", "lib64"):
        os.symlink(f"usr/{link}", root / link)
    for d in ("proc", "sys", "dev", "run", "tmp", "mnt", "root", "etc", "var/tmp"):
        (root / d).mkdir(parents=True, exist_ok=True)
    # busybox (static) and its applets
    _copy(root, BUSYBOX)
    applets = run([BUSYBOX, "--list-full"], timeout_s=30, error=GuestAssetError, check=False)
    applets_text = applets.stdout.decode()
    for rel in applets_text.split():
        target = root / "usr" / rel.removeprefix("usr/")
        if not target.exists() and not target.is_symlink():
            target.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.path.relpath(root / "usr/bin/busybox", target.parent), target)
    # our init replaces busybox's
    init = root / "usr/sbin/init"
    if init.is_symlink() or init.exists():
        init.unlink()
    init.write_bytes(data_file("init"))
    init.chmod(0o755)
    # crun and Python with their libraries
    _with_libs(root, CRUN)
    _with_libs(root, PYTHON)
    os.symlink("python3.11", root / "usr/bin/python3")
    # the agent
    agent_root = root / "usr/lib/cocoon"
    for rel, body in agent_sources().items():
        p = agent_root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(body)
    (agent_root / "agent.py").write_bytes(data_file("agent.py"))
    # the stdlib subset, plus the extension modules' libraries
    (root / PYLIB.lstrip("/") / "lib-dynload").mkdir(parents=True, exist_ok=True)
    for f in python_modules(agent_root):
        if f.endswith(".so"):
            _with_libs(root, f)
        else:
            _copy(root, f)
    (root / "etc/passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n"
    )
    (root / "etc/group").write_text("root:x:0:\ntty:x:5:\nnogroup:x:65534:\n")
    (root / "etc/hostname").write_text("cocoon\n")
    os.symlink("../proc/self/mounts", root / "etc/mtab")
    # Written by the agent from the host's Identity request: each sandbox,
    # template clones included, has its own.
    os.symlink("../run/machine-id", root / "etc/machine-id")
    # unchecked-hash: the image is read-only, so .pyc are never revalidated
    run(
        [PYTHON, "-m", "compileall", "-q", "-j0", "--invalidation-mode", "unchecked-hash",
         "-s", str(root), "-p", "/", str(root / PYLIB.lstrip("/")), str(agent_root)],
        timeout_s=300,
        error=GuestAssetError,
    )  # fmt: skip


def build(cfg: Config, log: Log) -> Path:
    key = image_key(cfg)
    out = image_path(cfg, key)
    if out.is_file():
        log(f"image {key}: cached ({out})")
        return out
    for tool in ("mkfs.erofs", "ldd", PYTHON, CRUN, BUSYBOX):
        if not shutil.which(tool):
            raise GuestAssetError(f"{tool} not found: run the README set-up")
    build_root = cfg.data / "build"
    build_root.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="rootfs-", dir=build_root) as tmp:
        root = Path(tmp) / "root"
        root.mkdir()
        populate(root)
        argv = ["mkfs.erofs", "--quiet", "--all-root", "-T0"]
        if cfg.guest.image_compression != "none":
            argv.append(f"-z{cfg.guest.image_compression}")
        tmp_img = Path(tmp) / "image.erofs"
        run([*argv, str(tmp_img), str(root)], timeout_s=300, error=GuestAssetError)
        os.replace(tmp_img, out)
    log(f"image {key}: built {out} ({out.stat().st_size >> 10} KiB)")
    prune(out)
    return out


def prune(keep: Path, also_keep: int = 1) -> None:
    """Drop superseded images (every agent change makes one), newest few excepted.

    A VM still running from a deleted image keeps its open file: nothing breaks.
    """
    old = sorted(
        (p for p in keep.parent.glob("*.erofs") if p != keep),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    for p in old[also_keep:]:
        p.unlink(missing_ok=True)
