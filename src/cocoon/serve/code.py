"""A function's code: an uploaded archive unpacked escape-proof, or a host directory.

An archive is untrusted input unpacked as root on the host, so it goes
through the image layer unpacker (images.layers), which trusts nothing: no
absolute names, no ``..``, never a write through a symlink (every path is
walked with ``O_NOFOLLOW`` directory fds), hardlinks only to entries already
in the tree, no device nodes, and caps on the bytes unpacked, the entries, the
inflation ratio (past a floor) and the free space left on the disk. A tar.gz
goes to it as it is; a zip is first turned into a plain tar, entry by entry,
under the same byte and ratio caps (zip's own sizes are not trusted: bytes are
counted as they inflate, and zipfile checks every entry's CRC), refusing
encrypted entries, unknown compression methods and special files.

Unpacked trees are content-addressed (``<state>/code/<sha256 of the
archive>``), written in a staging dir and renamed into place when whole: a
refused or interrupted unpack leaves nothing a version can point at, and the
same archive deployed twice is unpacked once. The code dir is root-only
(0700): setuid bits in an archive reach no host user. Versions bind it
read-only into their instances' VMs.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import secrets
import shutil
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path
from typing import Any

from cocoon.config import Config
from cocoon.errors import CodeError, ImageError
from cocoon.images.guard import GuardLimits, WriteGuard
from cocoon.images.layers import Budget, split_path, unpack_layer

FORMATS = ("zip", "tar.gz")
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
GZIP_MAGIC = b"\x1f\x8b"
#: Below this many bytes unpacked, no inflation ratio applies (small archives
#: of text compress well: a 100 KiB zip of source may well hold 2 MiB).
RATIO_FLOOR = 16 << 20
#: CPU seconds one archive may take to unpack.
MAX_CPU_S = 120.0
MAX_LINK_BYTES = 4096
CHUNK = 1 << 20


def _reword(text: str, cfg: Config) -> str:
    """The layer unpacker's words, said of a code archive and its settings."""
    sv = cfg.serve
    return (
        text.replace("images.max_unpacked_bytes", "serve.max_unpacked_bytes")
        .replace("images.max_entries", "serve.max_code_entries")
        .replace("images.max_inflation_ratio", "serve.max_inflation_ratio")
        .replace("images.max_unpack_cpu_s", f"{MAX_CPU_S:.0f} s")
        .replace("the image unpacks", "the archive unpacks")
        .replace("unpacking the image", "unpacking the archive")
        .replace("the image has more than", "the archive has more than")
        .replace("take the image over", "take the archive over")
        .replace("in image layers", "in code archives")
        .replace("corrupt or unwritable layer", "corrupt archive")
        .replace(f"{sv.max_unpacked_bytes} B", f"{sv.max_unpacked_bytes >> 20} MiB")
    )


def _budget(cfg: Config, place: Path) -> Budget:
    limits = GuardLimits(
        max_ratio=cfg.serve.max_inflation_ratio,
        ratio_floor=RATIO_FLOOR,
        min_free_bytes=cfg.images.min_free_bytes,
        min_free_percent=cfg.images.min_free_percent,
    )
    return Budget(
        cfg.serve.max_unpacked_bytes,
        cfg.serve.max_code_entries,
        MAX_CPU_S,
        guard=WriteGuard(limits, str(place)),
    )


def code_root(cfg: Config, state_dir: Path) -> Path:
    root = state_dir / "code"
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    return root


def store_archive(cfg: Config, root: Path, data: bytes, fmt: str) -> dict[str, Any]:
    """Unpack ``data`` (``fmt``: zip or tar.gz) under ``root`` unless an
    identical archive already was; the version's code record."""
    if fmt not in FORMATS:
        raise CodeError(f"unknown code format {fmt!r}: use zip or tar.gz")
    if len(data) > cfg.serve.max_code_bytes:
        raise CodeError(
            f"the code archive is {len(data)} B, over the {cfg.serve.max_code_bytes >> 20} MiB "
            "cap (serve.max_code_bytes)"
        )
    if fmt == "zip" and not data.startswith(ZIP_MAGIC):
        raise CodeError("the code is said to be a zip archive, but is not one")
    if fmt == "tar.gz" and not data.startswith(GZIP_MAGIC):
        raise CodeError("the code is said to be a tar.gz archive, but is not gzip data")
    digest = hashlib.sha256(data).hexdigest()
    record = {"kind": "archive", "format": fmt, "digest": digest, "size": len(data)}
    target = root / digest
    if target.is_dir():
        return record
    staging = root / f".staging-{digest[:16]}-{secrets.token_hex(4)}"
    staging.mkdir(mode=0o700)
    try:
        tree = staging / "tree"
        tree.mkdir(mode=0o755)
        budget = _budget(cfg, root)
        try:
            if fmt == "tar.gz":
                blob = staging / "code.tar.gz"
                blob.write_bytes(data)
                unpack_layer(blob, "gzip", tree, budget, what="code archive")
            else:
                tar = staging / "code.tar"
                _zip_to_tar(cfg, data, tar, staging)
                unpack_layer(tar, "none", tree, budget, what="code archive")
        except ImageError as e:
            raise CodeError(_reword(str(e), cfg)) from None
        os.chmod(tree, 0o755)
        with contextlib.suppress(FileExistsError, OSError):
            os.rename(tree, target)  # a concurrent unpack of the same archive may have won
        if not target.is_dir():
            raise CodeError("the unpacked code could not be put in place")
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # rmtree follows no symlink
    return record


def _zip_to_tar(cfg: Config, data: bytes, out: Path, staging: Path) -> None:
    """A zip archive as a plain tar for the layer unpacker, counting every
    inflated byte against the caps."""
    sv = cfg.serve
    cap = min(sv.max_unpacked_bytes, max(RATIO_FLOOR, int(sv.max_inflation_ratio * len(data))))
    total = 0
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise CodeError(f"corrupt zip archive: {e}") from None
    with zf, tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tf:
        infos = zf.infolist()
        if len(infos) > sv.max_code_entries:
            raise CodeError(
                f"the archive has more than {sv.max_code_entries} entries (serve.max_code_entries)"
            )
        for info in infos:
            name = info.filename
            split_path(name.rstrip("/"), repr(name[:200]), "code archive")  # early, clear refusal
            mode = info.external_attr >> 16
            kind = stat.S_IFMT(mode)
            ti = tarfile.TarInfo(name.rstrip("/") or ".")
            ti.mtime = 0
            if info.is_dir() or kind == stat.S_IFDIR:
                ti.type = tarfile.DIRTYPE
                ti.mode = (mode & 0o777) or 0o755
                tf.addfile(ti)
                continue
            if kind not in (0, stat.S_IFREG, stat.S_IFLNK):
                raise CodeError(f"code archive: entry {name[:200]!r}: special files are refused")
            tmp = staging / "entry"
            n = 0
            try:
                with zf.open(info) as src, open(tmp, "wb") as dst:
                    while chunk := src.read(CHUNK):
                        n += len(chunk)
                        total += len(chunk)
                        if total > cap:
                            raise CodeError(
                                f"code archive: {len(data) >> 10} KiB unpack to more than "
                                f"{cap >> 20} MiB (serve.max_unpacked_bytes, or "
                                f"{sv.max_inflation_ratio:g} times the archive past "
                                f"{RATIO_FLOOR >> 20} MiB: serve.max_inflation_ratio); "
                                "refusing a likely decompression bomb"
                            )
                        dst.write(chunk)
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
                raise CodeError(f"code archive: entry {name[:200]!r}: corrupt: {e}") from None
            except (RuntimeError, NotImplementedError) as e:  # encrypted, unknown method
                raise CodeError(f"code archive: entry {name[:200]!r}: {e}") from None
            if kind == stat.S_IFLNK:
                if n > MAX_LINK_BYTES:
                    raise CodeError(f"code archive: entry {name[:200]!r}: symlink target too long")
                ti.type = tarfile.SYMTYPE
                ti.linkname = tmp.read_bytes().decode("utf-8", "replace")
                ti.mode = 0o777
                tf.addfile(ti)
                continue
            ti.type = tarfile.REGTYPE
            ti.mode = (mode & 0o777) or 0o644
            ti.size = n
            with open(tmp, "rb") as f:
                tf.addfile(ti, f)
        with contextlib.suppress(FileNotFoundError):
            (staging / "entry").unlink()


def host_dir(path: str) -> dict[str, Any]:
    """A host directory as a version's code (development: edits show at once)."""
    if not os.path.isabs(path):
        raise CodeError(f"code directory {path[:200]!r} must be an absolute path")
    real = os.path.realpath(path)
    if not os.path.isdir(real):
        raise CodeError(f"code directory {path[:200]!r} does not exist or is not a directory")
    return {"kind": "host_dir", "path": real}


def code_dir(root: Path, code: dict[str, Any]) -> Path:
    """Where a version's code is on the host."""
    if code["kind"] == "host_dir":
        return Path(code["path"])
    return root / str(code["digest"])


def check_handler(tree: Path, handler: str) -> None:
    """The handler must be a regular file in the code, reached without
    following any symlink (checked as the guest would not: on the host)."""
    try:
        parts = split_path(handler, repr(handler[:200]), "handler") if handler else ()
    except ImageError as e:
        raise CodeError(str(e)) from None
    if not parts:
        raise CodeError("handler must name a file in the code, e.g. handler.sh")
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(tree, flags | os.O_DIRECTORY)
    except OSError as e:
        raise CodeError(f"cannot open the code: {e.strerror}") from None
    try:
        for comp in parts[:-1]:
            nfd = os.open(comp, flags | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        st = os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
    except OSError:
        raise CodeError(f"handler {handler[:200]!r} is not a file in the code") from None
    finally:
        os.close(fd)
    if not stat.S_ISREG(st.st_mode):
        raise CodeError(f"handler {handler[:200]!r} is not a regular file in the code")


def remove_unused(root: Path, code: dict[str, Any]) -> None:
    """An unpacked tree no version uses any more (never a host directory)."""
    if code.get("kind") == "archive":
        shutil.rmtree(root / str(code["digest"]), ignore_errors=True)
