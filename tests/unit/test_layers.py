"""Layer unpacking: whiteouts as the OCI spec says, and hostile tars refused without harm."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from cocoon.errors import ImageError
from cocoon.images.layers import Budget, unpack_layer
from tests.unit.imagekit import (
    END,
    Tar,
    compress,
    dg,
    header,
    member,
    mounted,
    padded,
    pax,
    record,
    snapshot,
)

ROOT = os.geteuid() == 0


@pytest.fixture
def env(tmp_path: Path) -> tuple[Path, Path]:
    """(staging root, an 'outside' dir with a secret the layers aim at)."""
    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("keep me")
    return root, outside


def apply(
    tmp: Path, root: Path, tar: bytes, how: str = "none", budget: Budget | None = None
) -> str:
    blob = tmp / f"blob-{dg(tar)[7:19]}-{how}"
    blob.write_bytes(compress(tar, how))
    return unpack_layer(blob, how, root, budget or Budget(1 << 30, 100_000), what="test layer")


def tree(root: Path) -> dict[str, str]:
    """path -> 'd' | 'f:<content>' | 'l:<target>' | 'p' for everything under root."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for n in dirs + files:
            p = Path(dirpath) / n
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "l:" + os.readlink(p)
            elif p.is_dir():
                out[rel] = "d"
            elif stat.S_ISFIFO(p.lstat().st_mode):
                out[rel] = "p"
            else:
                out[rel] = "f:" + p.read_text()
    return out


@pytest.mark.parametrize("how", ["none", "gzip", "zstd"])
def test_unpack_entries_and_metadata(tmp_path: Path, env: tuple[Path, Path], how: str) -> None:
    root, _ = env
    t = (
        Tar()
        .dir("./", mode=0o755)
        .dir("etc", mode=0o750, uid=3, gid=4, mtime=1234)
        .file("etc/passwd", b"root:x:0:0", mode=0o640, uid=5, gid=6, mtime=777)
        .file("bin/su", b"ELF", mode=0o4755)
        .symlink("bin/sh", "busybox", uid=7, gid=8)
        .hardlink("bin/su2", "bin/su")
        .fifo("run/fifo")
        .file("usr/share/cap", b"ping", pax={
            "SCHILY.xattr.security.capability":
                bytes.fromhex("0100000200200000000000000000000000000000").decode("latin-1"),
            "SCHILY.xattr.user.note": "hi", "SCHILY.xattr.trusted.overlay.opaque": "y"})
        .bytes()
    )  # fmt: skip
    assert apply(tmp_path, root, t, how) == dg(t)
    assert tree(root)["etc/passwd"] == "f:root:x:0:0"
    assert tree(root)["bin/sh"] == "l:busybox"
    assert tree(root)["run/fifo"] == "p"
    st = (root / "etc/passwd").stat()
    assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_mtime == 777
    assert (root / "etc").stat().st_mtime == 1234  # applied after its children were written
    assert stat.S_IMODE((root / "etc").stat().st_mode) == 0o750
    assert stat.S_IMODE((root / "bin/su").stat().st_mode) == 0o4755  # setuid kept
    assert (root / "bin/su2").stat().st_ino == (root / "bin/su").stat().st_ino
    if ROOT:
        assert (st.st_uid, st.st_gid) == (5, 6)
        assert ((root / "etc").stat().st_uid, (root / "etc").stat().st_gid) == (3, 4)
        assert (root / "bin/sh").lstat().st_uid == 7
        names = os.listxattr(root / "usr/share/cap")
        assert "user.note" in names and "security.capability" in names
        assert "trusted.overlay.opaque" not in names


def test_directory_xattrs_survive_into_the_image(tmp_path: Path, env: tuple[Path, Path]) -> None:
    """user.* on a directory (the root's too) reaches the tree and the erofs image
    built from it, as it does on files; a later layer listing the directory again
    gives it that layer's (none here), as docker and containerd show it (each
    layer is an overlayfs dir of its own; a merged dir has the upper one's)."""
    root, _ = env
    x = "SCHILY.xattr."
    apply(tmp_path, root, Tar()
          .dir("./", pax={x + "user.root": "r"})
          .dir("etc", pax={x + "user.dir": "d\x00v", x + "trusted.overlay.opaque": "y"})
          .file("etc/f", b"1", pax={x + "user.file": "f"})
          .bytes())  # fmt: skip
    img = tmp_path / "image.erofs"
    subprocess.run(["mkfs.erofs", "--quiet", str(img), str(root)], check=True)
    with mounted(img, tmp_path / "mnt") as mnt:
        for tree_root in (root, mnt):
            assert os.getxattr(tree_root, "user.root") == b"r"
            assert os.getxattr(tree_root / "etc", "user.dir") == b"d\0v"
            assert os.getxattr(tree_root / "etc/f", "user.file") == b"f"
            assert os.listxattr(tree_root / "etc") == ["user.dir"]
    apply(tmp_path, root, Tar().dir("etc", mode=0o700, pax={x + "user.new": "n"}).bytes())
    assert os.listxattr(root / "etc") == ["user.new"]
    assert stat.S_IMODE((root / "etc").stat().st_mode) == 0o700
    assert os.getxattr(root / "etc/f", "user.file") == b"f"  # not listed again: kept
    apply(tmp_path, root, Tar().dir(".").bytes())
    assert os.listxattr(root) == []


def test_whiteouts_and_opaque_dirs_across_layers(tmp_path: Path, env: tuple[Path, Path]) -> None:
    root, _ = env
    l1 = (
        Tar()
        .file("a/x", b"1").file("a/y", b"2").file("b/z", b"3")
        .file("c/old", b"4").file("c/sub/old", b"5")
        .file("d/sub/old", b"6").file("keep", b"7")
        .bytes()
    )  # fmt: skip
    l2 = (
        Tar()
        .file("a/.wh.x", b"")
        .file(".wh.b", b"")
        # this layer's c/new is listed before the marker: it must survive it
        .file("c/new", b"8")
        .file("c/.wh..wh..opq", b"")
        .file("d/sub/new", b"9")
        .file("d/.wh..wh..opq", b"")
        # a whiteout of a file this same layer wrote does not apply to it
        .file("e", b"10")
        .file(".wh.e", b"")
        .file(".wh..wh.plnk/123", b"aufs metadata")
        .bytes()
    )
    l3 = Tar().file("b/again", b"11").file("a/.wh.y", b"").file(".wh.nothing", b"").bytes()
    for layer in (l1, l2, l3):
        apply(tmp_path, root, layer)
    assert tree(root) == {
        "a": "d",
        "b": "d",
        "b/again": "f:11",
        "c": "d",
        "c/new": "f:8",
        "d": "d",
        "d/sub": "d",
        "d/sub/new": "f:9",
        "e": "f:10",
        "keep": "f:7",
    }


def test_many_opaque_markers_cost_linear_time(tmp_path: Path, env: tuple[Path, Path]) -> None:
    """Each marker used to re-list its directory: 3,000 files and 3,000 markers
    took ~13 s (N² lstat calls), and the entry cap allows a million."""
    root, _ = env
    apply(tmp_path, root, Tar().file("d/lower", b"1").file("d/sub/lower", b"2").bytes())
    t = Tar().dir("d/sub")
    for i in range(3000):
        t.file(f"d/f{i}", b"")
    for _ in range(3000):
        t.file("d/sub/.wh..wh..opq", b"").file("d/.wh..wh..opq", b"")
    t0 = time.monotonic()
    apply(tmp_path, root, t.bytes())
    assert time.monotonic() - t0 < 3
    assert "d/lower" not in tree(root) and "d/sub/lower" not in tree(root)
    assert len(os.listdir(root / "d")) == 3001


def test_later_layers_replace_types(tmp_path: Path, env: tuple[Path, Path]) -> None:
    root, _ = env
    apply(tmp_path, root, Tar().file("lib/libc.so", b"c").file("f", b"file").bytes())
    apply(tmp_path, root, Tar().symlink("lib", "usr/lib").dir("f").file("f/inner", b"i").bytes())
    assert tree(root) == {"lib": "l:usr/lib", "f": "d", "f/inner": "f:i"}
    # a whiteout of a symlink removes the link, not what it points at
    apply(tmp_path, root, Tar().file(".wh.lib", b"").bytes())
    assert "lib" not in tree(root)


def test_hardlinks_to_symlinks_and_fifos(tmp_path: Path, env: tuple[Path, Path]) -> None:
    """Tar allows them, and layers made from real file systems have them: the link
    is another name for the symlink or fifo itself (in this layer or a lower one)."""
    root, outside = env
    before = snapshot(outside)
    apply(tmp_path, root, Tar().symlink("lower", "/etc/hostname").bytes())
    layer = (
        Tar()
        .symlink("bin/slink", f"{outside}/secret")
        .fifo("run/p")
        .hardlink("bin/h-slink", "bin/slink")
        .hardlink("h-p", "run/p")
        .hardlink("h-lower", "lower")
        .hardlink("h-file", "bin/h-slink")  # a link to a link of a symlink
        .bytes()
    )
    apply(tmp_path, root, layer)
    for link, target in (("bin/h-slink", "bin/slink"), ("h-p", "run/p"), ("h-lower", "lower")):
        a, b = (root / link).lstat(), (root / target).lstat()
        assert (a.st_ino, a.st_mode, a.st_nlink) == (b.st_ino, b.st_mode, b.st_nlink), link
    assert tree(root)["bin/h-slink"] == f"l:{outside}/secret"
    assert tree(root)["h-p"] == "p"
    assert (root / "h-file").lstat().st_nlink == 3
    assert snapshot(outside) == before


HOSTILE = {
    "dotdot": lambda o: Tar().file("../outside/secret", b"pwned"),
    "dotdot-inner": lambda o: Tar().file("a/../../outside/secret", b"pwned"),
    "absolute": lambda o: Tar().file(f"{o}/secret", b"pwned"),
    "symlink-abs-then-write": lambda o: Tar().symlink("a", str(o)).file("a/secret", b"pwned"),
    "symlink-rel-then-write": lambda o: Tar().symlink("a", "../outside").file("a/secret", b"pw"),
    "symlink-deep-then-mkdir": lambda o: Tar().dir("d").symlink("d/l", str(o)).dir("d/l/new"),
    "symlink-then-hardlink": lambda o: Tar().symlink("a", str(o)).hardlink("h", "a/secret"),
    "hardlink-dotdot": lambda o: Tar().hardlink("h", "../outside/secret"),
    "hardlink-missing": lambda o: Tar().hardlink("h", "nothing"),
    "hardlink-later": lambda o: Tar().hardlink("h", "f").file("f"),
    "hardlink-to-dir": lambda o: Tar().dir("d").hardlink("h", "d"),
    "hardlink-to-symlink-then-write": (
        lambda o: Tar().symlink("l", str(o)).hardlink("h", "l").file("h/secret", b"pwned")
    ),
    "symlink-then-whiteout": lambda o: Tar().symlink("a", str(o)).file("a/.wh.secret", b""),
    "symlink-then-opaque": lambda o: Tar().symlink("a", str(o)).file("a/.wh..wh..opq", b""),
    "char-device": lambda o: Tar().device("dev/mem"),
    "block-device": lambda o: Tar().device("dev/sda", tarfile.BLKTYPE),
    "long-name": lambda o: Tar().file("a/" + "n" * 256, b""),
    "long-path": lambda o: Tar().file("/".join(["d" * 200] * 21), b""),
    "too-deep": lambda o: Tar().file("d/" * 300 + "f", b""),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_layers_refused(tmp_path: Path, env: tuple[Path, Path], case: str) -> None:
    root, outside = env
    before = snapshot(outside)
    tar = HOSTILE[case](outside).bytes()
    with pytest.raises(ImageError, match="test layer: entry '") as e:
        apply(tmp_path, root, tar)
    assert snapshot(outside) == before, str(e.value)
    assert not (tmp_path / "secret").exists()
    assert len(str(e.value).splitlines()) == 1


def test_decompression_bomb_against_image_budget(tmp_path: Path, env: tuple[Path, Path]) -> None:
    root, _ = env
    budget = Budget(max_bytes=3 << 20, max_entries=1000)
    layer = Tar().file("zeros", bytes(2 << 20)).bytes()  # 2 MiB: ~2 KiB gzipped
    assert len(compress(layer, "gzip")) < 10_000
    apply(tmp_path, root, layer, "gzip", budget)
    # a second layer of the same image takes it over: the budget is per image
    with pytest.raises(ImageError, match="max_unpacked_bytes"):
        apply(tmp_path, root, Tar().file("more", bytes(2 << 20)).bytes(), "gzip", budget)
    # bytes after the tar's end count too (and are hashed into the diff_id)
    with pytest.raises(ImageError, match="max_unpacked_bytes"):
        apply(tmp_path, root, Tar().bytes() + bytes(4 << 20), "zstd", Budget(3 << 20, 10))


def test_entry_count_cap(tmp_path: Path, env: tuple[Path, Path]) -> None:
    root, _ = env
    t = Tar()
    for i in range(11):
        t.file(f"f{i}")
    with pytest.raises(ImageError, match=r"entry 'f10'.*max_entries"):
        apply(tmp_path, root, t.bytes(), budget=Budget(1 << 30, 10))


def test_cpu_cap_per_image(tmp_path: Path, env: tuple[Path, Path]) -> None:
    """The unpacking thread's CPU time, summed over an image's layers, is capped
    (images.max_unpack_cpu_s): a backstop for metadata-only streams."""
    root, _ = env
    layer = Tar().file("f", b"x").bytes()
    budget = Budget(1 << 30, 100, max_cpu_s=60.0)
    apply(tmp_path, root, layer, budget=budget)
    assert 0 < budget.cpu_s < 60
    budget.cpu_s = 60.0  # as if the earlier layers had used it all
    with pytest.raises(ImageError, match=r"more than 60 s of CPU \(images.max_unpack_cpu_s\)"):
        apply(tmp_path, root, layer, "gzip", budget)


def test_sparse_runs_count_as_entries(tmp_path: Path, env: tuple[Path, Path]) -> None:
    root, _ = env
    runs = b",".join(b"%d,1" % (2 * i) for i in range(20))
    tar = pax(record(b"GNU.sparse.size", b"40") + record(b"GNU.sparse.map", runs))
    tar += member(b"f", b"x" * 20) + END
    apply(tmp_path, root, tar, budget=Budget(1 << 30, 21))
    assert (root / "f").read_bytes() == b"x\0" * 20
    with pytest.raises(ImageError, match="20 sparse data runs take the image over 20 entries"):
        apply(tmp_path, root, tar, budget=Budget(1 << 30, 20))


def test_huge_extended_header_refused(tmp_path: Path, env: tuple[Path, Path]) -> None:
    root, _ = env
    t = Tar().file("f", b"x", pax={"comment": "c" * ((1 << 20) + 10)}).bytes()
    with pytest.raises(ImageError, match="pax header of 1048603 B"):
        apply(tmp_path, root, t)


# Headers tarfile hung, crawled or crashed on (issue 19), and their neighbours:
# each must be one ImageError line, at once.
DIGITS = b"1" * (128 << 10)
LONG = header(b"././@LongLink", b"L", 2) + padded(b"a\0")
BAD_HEADERS = {
    "negative-size-base256": (header(b"f", fields={124: b"\xff" * 12}), "size -1 is out of range"),
    "negative-size-pax": (pax(record(b"size", b"-1")) + member(b"f", b"x"), "pax size b'-1'"),
    "size-not-octal": (header(b"f", fields={124: b"12x4\0"}), "size field"),
    "mtime-nan": (pax(record(b"mtime", b"nan")) + member(b"f"), "pax mtime b'nan'"),
    "mtime-exponent": (pax(record(b"mtime", b"1e9")) + member(b"f"), "pax mtime"),
    "uid-superscript": (pax(record(b"uid", "²".encode())) + member(b"f"), "pax uid"),
    "sparse-size-word": (
        pax(record(b"GNU.sparse.size", b"big") + record(b"GNU.sparse.map", b"0,1"))
        + member(b"f", b"x"),
        "sparse real size b'big'",
    ),
    "sparse-realsize-word": (
        pax(
            record(b"GNU.sparse.major", b"1")
            + record(b"GNU.sparse.minor", b"0")
            + record(b"GNU.sparse.realsize", b"-5")
        )
        + member(b"f", padded(b"1\n0\n1\n") + b"x"),
        "sparse real size b'-5'",
    ),
    "sparse-map-words": (
        pax(record(b"GNU.sparse.size", b"9") + record(b"GNU.sparse.map", b"a,b"))
        + member(b"f", b"x"),
        "sparse map number b'a'",
    ),
    "sparse-map-odd": (
        pax(record(b"GNU.sparse.size", b"9") + record(b"GNU.sparse.map", b"0"))
        + member(b"f", b"x"),
        "an offset but no length",
    ),
    "sparse-unknown-version": (
        pax(record(b"GNU.sparse.major", b"2") + record(b"GNU.sparse.minor", b"0"))
        + member(b"f", b"x"),
        "sparse format b'2.0'",
    ),
    "record-length-20-digits": (pax(b"0" * 18 + b"20 a=b\n") + member(b"f"), "no valid length"),
    "record-length-past-end": (pax(b"99 a=b\n") + member(b"f"), "wrong length"),
    "record-no-keyword": (pax(b"6 =ab\n") + member(b"f"), "no keyword"),
    "record-all-digits": (pax(DIGITS) + member(b"f"), "no valid length"),
    "chained-pax-400": (pax(record(b"path", b"a")) * 400 + member(b"f"), "8 extended headers"),
    "chained-longname-400": (LONG * 400 + member(b"f"), "8 extended headers"),
    "globals-65": ((pax(record(b"comment", b"x"), b"g") + member(b"f")) * 65, "64 global"),
    "long-name-too-long": (header(b"L", b"L", 9000) + padded(b"a" * 9000), "GNU long name of"),
    "ends-after-pax": (pax(record(b"path", b"a")), "ends after an extended header"),
    "bad-checksum": (member(b"a") + member(b"b")[:148] + b"7" + member(b"b")[149:], "checksum"),
    "not-a-tar": (b"hello world" * 100, "not a tar archive"),
    "cut-header": (member(b"a") + member(b"b")[:300], "ends inside a header"),
}


@pytest.mark.parametrize("case", sorted(BAD_HEADERS))
def test_hostile_headers_one_line_at_once(
    tmp_path: Path, env: tuple[Path, Path], case: str
) -> None:
    root, _ = env
    tar, match = BAD_HEADERS[case]
    t0 = time.monotonic()
    with pytest.raises(ImageError, match=re.escape(match)) as e:
        apply(tmp_path, root, tar)
    assert time.monotonic() - t0 < 2, case
    assert str(e.value).startswith("test layer: ") and len(str(e.value).splitlines()) == 1


def test_pax_headers_parsed_in_linear_time(tmp_path: Path, env: tuple[Path, Path]) -> None:
    """CPython's tarfile before 3.11.10 took ~20 s on 128 k digits (CVE-2024-6232)."""
    root, _ = env
    big = pax(record(b"comment", DIGITS) + record(b"hdrcharset", b"\xff\xfe")) + member(b"f", b"ok")
    t0 = time.monotonic()
    apply(tmp_path, root, big + END)
    assert time.monotonic() - t0 < 1
    assert (root / "f").read_bytes() == b"ok"


def test_names_are_bytes_whatever_hdrcharset_says(tmp_path: Path, env: tuple[Path, Path]) -> None:
    root, _ = env
    name = b"caf\xe9-\xff"  # latin-1, not UTF-8
    tar = pax(record(b"hdrcharset", b"BINARY") + record(b"path", name)) + member(b"x", b"1")
    apply(tmp_path, root, tar + END)
    assert os.listdir(os.fsencode(root)) == [name]


def test_extended_headers_apply_as_docker_reads_them(
    tmp_path: Path, env: tuple[Path, Path]
) -> None:
    """A global header is skipped (docker and containerd ignore them); GNU long
    names win over pax paths; a chain of pax, long name and long link is fine."""
    root, _ = env
    long_name = b"d/" + b"n" * 150
    long_link = b"t" * 150
    tar = (
        pax(record(b"path", b"evil") + record(b"mtime", b"1.5"), b"g")
        + member(b"f", b"1")
        + pax(record(b"path", b"loses") + record(b"mtime", b"1234.999999999999"))
        + header(b"././@LongLink", b"L", len(long_name) + 1) + padded(long_name + b"\0")
        + header(b"././@LongLink", b"K", len(long_link)) + padded(long_link)
        + header(b"short", b"2")
    )  # fmt: skip
    apply(tmp_path, root, tar + END)
    assert tree(root) == {"f": "f:1", "d": "d", long_name.decode(): "l:" + long_link.decode()}
    assert (root / "f").stat().st_mtime == 1_000_000
    assert (root / long_name.decode()).lstat().st_mtime_ns == 1234_999_999_999


def test_end_of_archive_forms(tmp_path: Path, env: tuple[Path, Path]) -> None:
    """Two zero blocks, one, none at all: each ends the archive (as Go reads it);
    what follows the end is hashed into the diff_id, never unpacked."""
    root, _ = env
    for i, tail in enumerate((END, END[:512], b"", END[:512] + member(b"ignored"))):
        tar = member(b"f%d" % i, b"x") + tail
        assert apply(tmp_path, root, tar) == dg(tar)
    assert sorted(tree(root)) == ["f0", "f1", "f2", "f3"]


def _sparse_source(tmp_path: Path) -> tuple[Path, dict[int, bytes]]:
    """A 256 MiB file that is almost all hole: a few runs of data, one at the very end."""
    src = tmp_path / "src"
    src.mkdir()
    f = src / "sparse"
    runs = {0: b"head" * 1024, 100 << 20: os.urandom(64 << 10), (256 << 20) - 5: b"tail!"}
    with open(f, "wb") as out:
        out.truncate(256 << 20)
        for offset, data in runs.items():
            out.seek(offset)
            out.write(data)
    return src, runs


def _same_content(a: Path, b: Path) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            ca, cb = fa.read(8 << 20), fb.read(8 << 20)
            if ca != cb:
                return False
            if not ca:
                return True


@pytest.mark.parametrize(
    "fmt", ["--format=pax", "--sparse-version=0.0", "--sparse-version=0.1", "--format=gnu"]
)
def test_gnu_sparse_files_keep_their_holes(
    tmp_path: Path, env: tuple[Path, Path], fmt: str
) -> None:
    """tar --sparse layers (pax 1.0 is GNU tar's default; 0.0, 0.1 and old GNU
    too): the content comes out whole, the holes stay holes, and the apparent
    size counts against the budget though the layer is ~100 KB."""
    root, _ = env
    src, runs = _sparse_source(tmp_path)
    args = [fmt] if fmt.startswith("--format") else ["--format=pax", fmt]
    tar = subprocess.run(
        ["tar", "--sparse", *args, "-cf", "-", "-C", str(src), "sparse"],
        check=True,
        capture_output=True,
    ).stdout
    assert len(tar) < 200_000
    budget = Budget(1 << 30, 100)
    apply(tmp_path, root, tar, "gzip", budget)
    out = root / "sparse"
    st = out.stat()
    assert st.st_size == 256 << 20
    assert st.st_blocks * 512 < 1 << 20  # not 256 MiB of zeros
    assert _same_content(out, src / "sparse")
    assert budget.bytes >= 256 << 20 and budget.holes > 255 << 20
    with pytest.raises(ImageError, match=r"entry 'sparse': 268435456 B would take the image"):
        apply(tmp_path, root, tar, "gzip", Budget(128 << 20, 100))


def _old_gnu_sparse(runs: list[tuple[int, int]], realsize: int, extended: bool) -> bytes:
    fields = {257: b"ustar  \0", 482: b"\1" if extended else b"\0", 483: b"%011o\0" % realsize}
    for i, (offset, length) in enumerate(runs):
        fields[386 + 24 * i] = b"%011o\0%011o\0" % (offset, length)
    return header(b"f", b"S", sum(n for _, n in runs), fields)


SPARSE_10 = record(b"GNU.sparse.major", b"1") + record(b"GNU.sparse.minor", b"0")
BAD_SPARSE = {
    "overlap": (
        pax(record(b"GNU.sparse.size", b"30") + record(b"GNU.sparse.map", b"0,10,5,10"))
        + member(b"f", b"x" * 20),
        "out of order",
    ),
    "past-end": (
        pax(record(b"GNU.sparse.size", b"5") + record(b"GNU.sparse.map", b"0,10"))
        + member(b"f", b"x" * 10),
        "past the file's end",
    ),
    "map-vs-data": (
        pax(record(b"GNU.sparse.size", b"99") + record(b"GNU.sparse.map", b"0,10"))
        + member(b"f", b"x" * 5),
        "a sparse map of 10 B for 5 B of data",
    ),
    "numblocks": (
        pax(
            record(b"GNU.sparse.size", b"99")
            + record(b"GNU.sparse.numblocks", b"2")
            + record(b"GNU.sparse.map", b"0,5")
        )
        + member(b"f", b"x" * 5),
        "numblocks does not match",
    ),
    "0.0-out-of-turn": (
        pax(record(b"GNU.sparse.size", b"9") + record(b"GNU.sparse.numbytes", b"1"))
        + member(b"f", b"x"),
        "out of turn",
    ),
    "1.0-too-many-runs": (
        pax(SPARSE_10 + record(b"GNU.sparse.realsize", b"9")) + member(b"f", padded(b"99999999\n")),
        "99999999 runs (too many)",
    ),
    "1.0-map-past-data": (
        pax(SPARSE_10 + record(b"GNU.sparse.realsize", b"9"))
        + member(b"f", b"300\n" + b"0\n" * 254),
        "runs past the file's data",
    ),
    "1.0-number-too-long": (
        pax(SPARSE_10 + record(b"GNU.sparse.realsize", b"9")) + member(b"f", b"1\n" + b"7" * 1500),
        "sparse map number b'7777",
    ),
    "1.0-padding-for-a-number": (
        pax(SPARSE_10 + record(b"GNU.sparse.realsize", b"9")) + member(b"f", padded(b"3\n0\n1\n")),
        "number b'\\x00",
    ),
    "1.0-on-a-directory": (
        pax(SPARSE_10 + record(b"GNU.sparse.realsize", b"9")) + member(b"d", kind=b"5"),
        "not a file",
    ),
    "old-gnu-extension-cut": (_old_gnu_sparse([(0, 1)], 9, True), "ends inside a sparse map"),
    "old-gnu-past-end": (_old_gnu_sparse([(0, 1), (8, 2)], 9, False), "past the file's end"),
}


@pytest.mark.parametrize("case", sorted(BAD_SPARSE))
def test_hostile_sparse_maps_refused(tmp_path: Path, env: tuple[Path, Path], case: str) -> None:
    root, _ = env
    tar, match = BAD_SPARSE[case]
    with pytest.raises(ImageError, match=re.escape(match)) as e:
        apply(tmp_path, root, tar)
    assert len(str(e.value).splitlines()) == 1


SEEDS = Path(__file__).parents[2] / "fuzz/corpus/tar_layer"


@pytest.mark.parametrize("seed", sorted(p.name for p in SEEDS.iterdir()))
def test_fuzz_seeds_are_valid_layers(tmp_path: Path, env: tuple[Path, Path], seed: str) -> None:
    """The tar_layer fuzz target's seeds (ustar, pax, GNU long names, every sparse
    format, hardlinks, whiteouts; plain, gzip, zstd) must unpack: a refused seed
    would only teach the fuzzer the first error."""
    root, _ = env
    data = (SEEDS / seed).read_bytes()
    how = "gzip" if seed.endswith(".gz") else "zstd" if seed.endswith(".zst") else "none"
    blob = tmp_path / "blob"
    blob.write_bytes(data)
    unpack_layer(blob, how, root, Budget(1 << 30, 1000))
    assert os.listdir(root)


def test_compression_must_match_media_type(tmp_path: Path, env: tuple[Path, Path]) -> None:
    root, _ = env
    t = Tar().file("f").bytes()
    blob = tmp_path / "blob"
    for data, claimed, msg in [
        (t, "gzip", "not gzip"),
        (t, "zstd", "not zstd"),
        (compress(t, "gzip"), "none", "compressed"),
        (compress(t, "gzip")[:40], "gzip", "corrupt"),
        (b"", "none", "empty"),
    ]:
        blob.write_bytes(data)
        with pytest.raises(ImageError, match=msg):
            unpack_layer(blob, claimed, root, Budget(1 << 30, 100))


def test_diff_id_checked(tmp_path: Path, env: tuple[Path, Path]) -> None:
    root, _ = env
    t = Tar().file("f").bytes()
    blob = tmp_path / "blob"
    blob.write_bytes(compress(t, "gzip"))
    assert unpack_layer(blob, "gzip", root, Budget(1 << 30, 100), diff_id=dg(t)) == dg(t)
    with pytest.raises(ImageError, match="image config says"):
        unpack_layer(blob, "gzip", root, Budget(1 << 30, 100), diff_id=dg(b"other"))


def _gz_blob(tmp_path: Path, data: bytes, name: str) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def test_threaded_gunzip_members_truncation_garbage(tmp_path: Path, env: tuple[Path, Path]) -> None:
    """gzip is inflated by a thread: multi-member streams work, a cut or
    garbage-tailed stream fails, and the diff_id is the uncompressed stream's."""
    import gzip
    import hashlib

    root, _ = env
    layer = Tar().file("a", b"x" * 300_000).file("b", os.urandom(200_000)).bytes()
    half = len(layer) // 2
    two = gzip.compress(layer[:half]) + gzip.compress(layer[half:])
    blob = _gz_blob(tmp_path, two, "two")
    got = unpack_layer(blob, "gzip", root, Budget(1 << 30, 100))
    assert got == "sha256:" + hashlib.sha256(layer).hexdigest()
    assert (root / "b").stat().st_size == 200_000
    whole = gzip.compress(layer)
    for name, data in (("cut", whole[: len(whole) // 2]), ("tail", whole + b"garbage!")):
        with pytest.raises(ImageError, match="corrupt"):
            unpack_layer(_gz_blob(tmp_path, data, name), "gzip", root, Budget(1 << 30, 100))


def test_gzip_bomb_stops_at_the_budget_in_bounded_steps(
    tmp_path: Path, env: tuple[Path, Path]
) -> None:
    """1 GiB of zeros in ~1 MiB of gzip: refused at a 64 MiB budget, quickly."""
    import time
    import zlib

    root, _ = env
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    chunk = bytes(16 << 20)
    data = b"".join(c.compress(Tar().bytes()[:512]) for _ in range(1))
    data += b"".join(c.compress(chunk) for _ in range(64)) + c.flush()
    blob = _gz_blob(tmp_path, data, "bomb")
    t0 = time.monotonic()
    with pytest.raises(ImageError):
        unpack_layer(blob, "gzip", root, Budget(64 << 20, 100))
    assert time.monotonic() - t0 < 10


@pytest.mark.parametrize("how", ["none", "gzip", "zstd"])
def test_file_data_across_chunks_and_cut_mid_file(
    tmp_path: Path, env: tuple[Path, Path], how: str
) -> None:
    """File data goes straight from the decompressor's chunks to the files: sizes
    that straddle chunk (1 MiB) and block (512 B) boundaries come out whole, and
    a stream cut inside a file's data is refused, not written short."""
    root, _ = env
    big, odd = os.urandom((3 << 20) + 517), os.urandom(1001)
    layer = Tar().file("a", odd).file("big", big).file("b", b"x" * 513).file("e", b"").bytes()
    apply(tmp_path, root, layer, how)
    assert (root / "big").read_bytes() == big
    assert (root / "a").read_bytes() == odd
    assert (root / "b").read_bytes() == b"x" * 513
    assert (root / "e").read_bytes() == b""
    cut = layer[: 512 * 3 + (2 << 20)]  # inside big's data
    with pytest.raises(ImageError, match=r"entry 'big'.*truncated") as e:
        apply(tmp_path, root, cut, how)
    assert len(str(e.value).splitlines()) == 1


def test_opened_layer_inflates_ahead_without_waiting(
    tmp_path: Path, env: tuple[Path, Path]
) -> None:
    """open_layer of a gzip blob still arriving returns at once (its thread waits);
    a layer opened and never applied is closed with its thread."""
    import threading
    import time

    from cocoon.images.blobs import BlobStore
    from cocoon.images.decompress import open_layer

    root, _ = env
    store = BlobStore(tmp_path / "blobs")
    tar = Tar().file("f", b"late").bytes()
    gz = compress(tar, "gzip")
    stop = threading.Event()
    t0 = time.monotonic()
    layer = open_layer(store.follow(dg(gz), stop), "gzip", "test layer")
    assert time.monotonic() - t0 < 0.5
    store.put(dg(gz), gz)
    assert unpack_layer(layer, "gzip", root, Budget(1 << 30, 100)) == dg(tar)
    assert (root / "f").read_bytes() == b"late"

    before = threading.active_count()
    never = open_layer(store.follow(dg(b"never"), stop), "gzip", "test layer")
    assert threading.active_count() == before + 1
    stop.set()
    store.wake_followers()
    never.close()
    assert threading.active_count() == before


@pytest.mark.parametrize("how", ["gzip", "zstd"])
def test_zero_blocks_are_written_as_holes(tmp_path: Path, env: tuple[Path, Path], how: str) -> None:
    """A file's block-aligned zero blocks cost no disk (a 64 MiB file of zeros
    takes almost none), files ending in zeros keep their size, and every file
    reads back as it was; the image's budget knows how much is hole."""
    root, _ = env
    mixed = os.urandom(5000) + bytes(20_000) + b"x" + bytes(3 << 20) + os.urandom(100)
    tail = b"head" + bytes(1 << 20)
    layer = Tar().file("zeros", bytes(64 << 20)).file("mixed", mixed).file("tail", tail).bytes()
    budget = Budget(1 << 30, 100)
    apply(tmp_path, root, layer, how, budget)
    assert (root / "zeros").stat().st_size == 64 << 20
    assert (root / "zeros").stat().st_blocks * 512 <= 64 << 10
    assert (root / "mixed").read_bytes() == mixed
    assert (root / "mixed").stat().st_blocks * 512 < 64 << 10
    assert (root / "tail").read_bytes() == tail
    assert budget.holes >= (64 << 20) + (3 << 20) + (1 << 20) - 3 * 4096
