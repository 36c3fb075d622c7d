"""Differential fidelity: cocoon's rootfs of tricky images against umoci's, entry by entry.

Each image below is built here, layer by layer, as real tools write them.
cocoon's side is the store's own path (the layers unpacked as a pull or a load
unpacks them, the erofs built, the image loop-mounted read-only); it is built
twice, by mkfs.erofs and by cocoon's own erofs writer (the fallback for trees
mkfs.erofs 1.5 gets wrong), so both are held to the reference. umoci's side
is ``umoci unpack`` of the same blobs in an OCI layout. Per path: type, mode,
owner, size and content hash, symlink target, device numbers, mtime (ns),
xattrs, and the hardlink groups. Any difference fails and names the path.

Known, deliberate differences, left out of the comparison and said here:

- Device nodes: cocoon refuses layers with them (a container gets its devices
  from the runtime; a block device in an image reaches host disks), so no
  image here has any, and device numbers compare as absent on both sides.
- ``trusted.*`` xattrs: cocoon drops them (``trusted.overlay.*`` would steer
  the guest's overlayfs) and keeps ``user.*`` and ``security.capability``;
  only those are compared. umoci 0.4.7 applies them all.
- The mtime of a directory that the last layer to touch it wrote into (or
  deleted from) without listing it, the root's included when no ``./`` entry
  says it: umoci puts back the mtime the directory had; cocoon leaves the time
  of the unpack, as docker and containerd do (each layer is extracted into a
  directory of its own, where such a parent is made at that time, and the
  merged directory shows the upper one's). Docker and buildkit list every
  parent of what a layer changes, so real images meet this little. These
  directories are found from the layers (``_unlisted_dirs``) and compare all
  but their mtime.
- zstd layers: umoci 0.4.7 reads none, so its copy of the image has the same
  tars gzip'd (the diff_ids are the same); and it refuses old GNU sparse
  members (type ``S``), so its copy of such a layer is the same file tarred
  without --sparse (the same bytes, zeros written out).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cocoon.config import Config
from cocoon.images import store as store_mod
from cocoon.images.store import ImageStore
from tests.unit.imagekit import END, Tar, compress, member, pax, record
from tests.unit.treediff import differences, read_tree

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="loop-mounts images, unpacks as root"),
    pytest.mark.skipif(shutil.which("umoci") is None, reason="umoci not installed"),
]

MEDIA = {
    "none": "application/vnd.oci.image.layer.v1.tar",
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}
#: The xattrs compared: what cocoon keeps (see the module doc).
XATTRS = ("user.", "security.capability")
T0 = 1_600_000_000

#: (tar, compression) per layer, or (tar, compression, the tar umoci gets instead).
Layers = list[tuple[bytes, str] | tuple[bytes, str, bytes]]


def _dg(b: bytes) -> str:
    return "sha256:" + hashlib.sha256(b).hexdigest()


# -- the images ----------------------------------------------------------------


def whiteouts() -> Layers:
    """Whiteouts and opaque dirs across layers; a same-layer entry survives its
    layer's whiteout whatever the order; a whiteout of nothing is harmless."""
    base = (
        Tar().dir("a", mtime=T0).dir("a/b", mtime=T0).file("a/b/f", b"1", mtime=T0)
        .file("a/keep", b"k", mtime=T0).dir("o", mtime=T0).file("o/old", b"o", mtime=T0)
        .dir("o/sub", mtime=T0).file("o/sub/x", b"x", mtime=T0).file("gone", b"g", mtime=T0)
        .dir("gonedir", mtime=T0).file("gonedir/y", b"y", mtime=T0)
    )  # fmt: skip
    top = (
        Tar().dir("a", mtime=T0 + 1).file("a/.wh.b", b"", mtime=T0 + 1)
        .file("a/b", b"now a file", mtime=T0 + 1)  # listed after its own whiteout
        .dir("o", mtime=T0 + 1).file("o/new", b"n", mtime=T0 + 1)
        .file("o/.wh..wh..opq", b"", mtime=T0 + 1)  # after o/new: o/new stays
        .file(".wh.gone", b"", mtime=T0 + 1).file(".wh.gonedir", b"", mtime=T0 + 1)
        .file(".wh.never-was", b"", mtime=T0 + 1)
    )  # fmt: skip
    again = Tar().dir("o", mtime=T0 + 2).dir("o/sub", mtime=T0 + 2).file("o/sub/back", b"b")
    return [(base.bytes(), "gzip"), (top.bytes(), "zstd"), (again.bytes(), "none")]


def type_changes() -> Layers:
    """Every type replaced by every other across layers, and back."""
    base = (
        Tar().file("f2d", b"file").dir("d2f", mtime=T0).file("d2f/child", b"c")
        .symlink("l2f", "/etc/passwd").fifo("p2l").file("f2l", b"x").dir("d2l", mtime=T0)
        .file("d2l/in", b"i")
    )  # fmt: skip
    mid = (
        Tar().dir("f2d", mtime=T0).file("f2d/in", b"now a dir").file("d2f", b"now a file")
        .file("l2f", b"now a file").symlink("p2l", "target").symlink("f2l", "f2d/in")
        .symlink("d2l", "f2d")
    )  # fmt: skip
    top = Tar().file("f2d", b"file again").dir("d2f", mtime=T0 + 5).fifo("l2f")
    return [(base.bytes(), "gzip"), (mid.bytes(), "gzip"), (top.bytes(), "zstd")]


def hardlinks() -> Layers:
    """Hardlink groups made in a layer, linked into from a later one, and broken
    (a link replaced by a file); links to a symlink and to a fifo."""
    base = (
        Tar().dir("h", mtime=T0).file("h/one", b"shared", mode=0o640, uid=7, mtime=T0)
        .hardlink("h/two", "h/one").hardlink("h/three", "h/one")
        .symlink("h/sym", "one").hardlink("h/sym-link", "h/sym")
        .fifo("h/fifo").hardlink("h/fifo-link", "h/fifo")
    )  # fmt: skip
    top = (
        Tar().dir("h", mtime=T0).file("h/two", b"broken off", mtime=T0)
        .hardlink("h/four", "h/one").dir("other", mtime=T0).hardlink("other/five", "h/three")
    )  # fmt: skip
    return [(base.bytes(), "zstd"), (top.bytes(), "gzip")]


def long_names() -> Layers:
    """Names past ustar's 100 bytes: pax path and linkpath, GNU long names and
    links, ustar's 155-byte prefix; a name of NAME_MAX; lost+found names."""
    deep = "/".join(["p" * 60] * 5)
    pax_layer = (
        Tar().dir("p" * 60).dir("/".join(["p" * 60] * 2)).dir("/".join(["p" * 60] * 3))
        .dir("/".join(["p" * 60] * 4)).dir(deep).file(deep + "/pax-file", b"pax")
        .symlink("pax-link", "t" * 300).file("n" * 255, b"NAME_MAX")
        .dir("lost+found").file("lost+found/kept", b"lf").file("lost+found.txt", b"lft")
    )  # fmt: skip
    gnu = Tar(fmt=tarfile.GNU_FORMAT).dir("g" * 120).file("g" * 120 + "/" + "q" * 130, b"gnu")
    gnu.symlink("gnu-link", "u" * 200).hardlink("gnu-hard", "g" * 120 + "/" + "q" * 130)
    ustar = Tar(fmt=tarfile.USTAR_FORMAT).dir("s" * 90).dir("s" * 90 + "/" + "t" * 50)
    ustar.file("s" * 90 + "/" + "t" * 50 + "/" + "v" * 80, b"prefix + name")
    return [(pax_layer.bytes(), "gzip"), (gnu.bytes(), "none"), (ustar.bytes(), "zstd")]


def odd_names() -> Layers:
    """UTF-8 names, names that are not UTF-8 (pax hdrcharset=BINARY, and raw
    bytes in a ustar header), spaces, newlines, ./-prefixed names."""
    utf8 = (
        Tar().file("café", b"1").file("日本語", b"2").file("emoji-😀", b"3")
        .file("with space", b"4").file("new\nline", b"5").file("./dot/slash", b"6")
        .dir("./dot", mtime=T0)
    )  # fmt: skip
    raw = b"latin1-caf\xe9"
    binary = (
        pax(record(b"hdrcharset", b"BINARY") + record(b"path", b"bin-\xff\xfe"))
        + member(b"x", b"7")
        + member(raw, b"8")
        + END
    )
    return [(utf8.bytes(), "gzip"), (binary, "zstd")]


def modes_owners_times() -> Layers:
    """setuid, setgid, sticky, mode 000; ids past 16 and 31 bits; mtimes: 0, ns
    (pax), past 2038; the root's own mode, owner and mtime (``./``)."""
    t = (
        Tar().dir(".", mode=0o751, uid=5, gid=6, mtime=T0)
        .file("suid", b"s", mode=0o4755).file("sgid", b"g", mode=0o2711)
        .dir("sticky", mode=0o1777, mtime=T0).file("none", b"0", mode=0o000)
        .file("big-ids", b"b", uid=70_000, gid=3_000_000_000)
        .file("epoch", b"e", mtime=0).file("far", b"f", mtime=4_102_444_800)
        .file("ns", b"n", pax={"mtime": "1700000000.123456789"})
        .symlink("owned-link", "suid", uid=1234, gid=5678)
        .dir("dir-ns", mtime=T0, pax={"mtime": "1700000001.5"})
    )  # fmt: skip
    again = Tar().file("later", b"l", mode=0o6755, uid=65_534, gid=65_534)
    return [(t.bytes(), "gzip"), (again.bytes(), "gzip")]


def xattrs() -> Layers:
    """user.* and security.capability on files, dirs and the root; a dir listed
    again by a later layer; trusted.* (cocoon drops it, see the module doc)."""
    cap = "\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"
    t = (
        Tar().dir(".", mtime=T0, pax={"SCHILY.xattr.user.root": "r"})
        .file("f", b"x", pax={"SCHILY.xattr.user.a": "1", "SCHILY.xattr.user.b": "two"})
        .file("ping", b"p", mode=0o755, pax={"SCHILY.xattr.security.capability": cap})
        .dir("d", mtime=T0, pax={"SCHILY.xattr.user.dir": "d"})
        .file("t", b"t", pax={"SCHILY.xattr.trusted.overlay.opaque": "y"})
        .file("big", b"v", pax={"SCHILY.xattr.user.big": "v" * 3000})
    )  # fmt: skip
    relisted = Tar().dir("d", mtime=T0 + 1).file("d/new", b"n", pax={"SCHILY.xattr.user.n": "n"})
    return [(t.bytes(), "zstd"), (relisted.bytes(), "gzip")]


def sparse_and_duplicates(tmp: Path) -> Layers:
    """GNU tar --sparse (pax 1.0, and old GNU) files; the same path twice in one
    layer (the last wins); an empty layer; zero-filled files (holes on disk)."""
    src = tmp / "sparse-src"
    src.mkdir()
    with open(src / "sparse", "wb") as f:
        f.truncate(48 << 20)
        f.seek(7 << 20)
        f.write(b"middle")
        f.seek((48 << 20) - 3)
        f.write(b"end")
    os.utime(src / "sparse", (T0, T0))

    def tar(*args: str) -> bytes:
        argv = ["tar", *args, "--numeric-owner", "-cf", "-", "-C", str(src), "sparse"]
        return subprocess.run(argv, check=True, capture_output=True).stdout

    layers: Layers = [
        (tar("--sparse", "--format=pax"), "gzip"),
        (tar("--sparse", "--format=gnu"), "gzip", tar("--format=gnu")),
    ]
    dup = (
        Tar().file("dup", b"first").file("dup", b"second", mode=0o600).dir("dd", mtime=T0)
        .dir("dd", mtime=T0 + 9, mode=0o700).file("zeros", bytes(1 << 20))
        .file("mixed", b"x" + bytes(20_000) + b"y")
    )  # fmt: skip
    layers += [(dup.bytes(), "zstd"), (Tar().bytes(), "none")]
    return layers


def implicit_parents() -> Layers:
    """Entries whose parent directories no entry lists (the parents are made)."""
    return [(Tar().file("x/y/z", b"deep").file("x/w", b"w").bytes(), "gzip")]


IMAGES: dict[str, Callable[..., Layers]] = {
    f.__name__: f
    for f in (
        whiteouts,
        type_changes,
        hardlinks,
        long_names,
        odd_names,
        modes_owners_times,
        xattrs,
        sparse_and_duplicates,
        implicit_parents,
    )
}


def _unlisted_dirs(layers: Layers) -> set[bytes]:
    """Directories whose last layer to touch them wrote into them without
    listing them (see the module doc), as read_tree names them."""
    last: dict[tuple[str, ...], bool] = {}  # dir -> listed by the last layer touching it
    for tar, *_ in layers:
        listed: set[tuple[str, ...]] = set()
        touched: set[tuple[str, ...]] = set()
        with tarfile.open(fileobj=io.BytesIO(tar), errors="surrogateescape") as tf:
            for m in tf:
                parts = tuple(p for p in m.name.split("/") if p not in ("", "."))
                touched.update(parts[:i] for i in range(len(parts)))
                if m.isdir():
                    listed.add(parts)
        for d in touched | listed:
            last[d] = d in listed
    return {
        b"/".join(os.fsencode(p) for p in d) or b"." for d, was_listed in last.items()
        if not was_listed
    }  # fmt: skip


# -- the two unpackers -----------------------------------------------------------


def _image(layers: Layers) -> tuple[list[bytes], bytes, bytes]:
    """(blobs, config, manifest) of an OCI image of ``layers`` (cocoon's tars)."""
    plain = [(tar, how) for tar, how, *_ in layers]
    blobs = [compress(tar, how) for tar, how in plain]
    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [_dg(t) for t, _ in plain]},
    }).encode()  # fmt: skip
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": _dg(config), "size": len(config)},
        "layers": [{"mediaType": MEDIA[how], "digest": _dg(b), "size": len(b)}
                   for b, (_, how) in zip(blobs, plain, strict=True)],
    }).encode()  # fmt: skip
    return blobs, config, manifest


def _umoci(tmp: Path, layers: Layers) -> Path:
    # What umoci 0.4.7 can read: see the module doc.
    blobs, config, manifest = _image(
        [(alt[0] if alt else t, "gzip" if h == "zstd" else h) for t, h, *alt in layers]
    )
    layout = tmp / "layout"
    (layout / "blobs" / "sha256").mkdir(parents=True)
    for b in (*blobs, config, manifest):
        (layout / "blobs" / "sha256" / _dg(b)[7:]).write_bytes(b)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    index = {"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": _dg(manifest), "size": len(manifest),
        "annotations": {"org.opencontainers.image.ref.name": "img"},
    }]}  # fmt: skip
    (layout / "index.json").write_text(json.dumps(index))
    bundle = tmp / "bundle"
    r = subprocess.run(
        ["umoci", "unpack", "--image", f"{layout}:img", str(bundle)], capture_output=True
    )
    assert r.returncode == 0, r.stderr.decode()
    return bundle / "rootfs"


def _cocoon(tmp: Path, layers: Layers, own_writer: bool, mp: pytest.MonkeyPatch) -> Path:
    """The erofs image cocoon's store builds from ``layers`` (as a pull or a load does)."""
    store = ImageStore(Config(data_dir=str(tmp / "data")))
    blobs, config, manifest = _image(layers)
    for b in blobs:
        store.blobs.put(_dg(b), b)
    real = store_mod._own_writer
    with mp.context() as m:
        m.setattr(store_mod, "_own_writer", lambda b: real(b) or ("forced" if own_writer else ""))
        img = store.add(_dg(manifest), manifest, config)
    return Path(img.erofs)


def _mounted_tree(image: Path, where: Path) -> dict[str, Any]:
    where.mkdir()
    subprocess.run(["mount", "-t", "erofs", "-o", "loop,ro", str(image), str(where)], check=True)
    try:
        return read_tree(where, XATTRS)
    finally:
        subprocess.run(["umount", str(where)], check=True)


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_cocoon_unpacks_as_umoci_does(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make = IMAGES[name]
    layers = make(tmp_path) if make is sparse_and_duplicates else make()
    ref = read_tree(_umoci(tmp_path / "umoci", layers), XATTRS)
    assert ref["entries"], "umoci unpacked nothing"
    unlisted = _unlisted_dirs(layers)
    for d in unlisted & ref["entries"].keys():
        ref["entries"][d]["mtime_ns"] = None
    for own in (False, True):
        builder = "cocoon's erofs writer" if own else "mkfs.erofs"
        work = tmp_path / ("own" if own else "mkfs")
        got = _mounted_tree(_cocoon(work, layers, own, monkeypatch), work / "mnt")
        for d in unlisted & got["entries"].keys():
            got["entries"][d]["mtime_ns"] = None
        diff = differences(ref, got, "umoci", f"cocoon ({builder})")
        assert diff == [], "\n".join(diff)


def test_the_images_cover_what_they_claim(tmp_path: Path) -> None:
    """A guard on the test itself: the layers hold the formats the docstrings name."""
    kinds: set[str] = set()
    for name, make in IMAGES.items():
        (tmp_path / name).mkdir()
        layers = make(tmp_path / name) if make is sparse_and_duplicates else make()
        for tar, how, *_ in layers:
            kinds.add(how)
            with tarfile.open(fileobj=io.BytesIO(tar), errors="surrogateescape") as tf:
                for m in tf:
                    if m.issparse():
                        kinds.add("sparse")
                    if m.islnk():
                        kinds.add("hardlink")
                    if len(m.name.encode(errors="surrogateescape")) > 100:
                        kinds.add("long name")
    assert {"gzip", "zstd", "none", "sparse", "hardlink", "long name"} <= kinds
