"""Archive import: docker save and OCI layouts, made here; every member untrusted."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import time
import zlib
from pathlib import Path

import pytest

from cocoon.config import Config
from cocoon.errors import ImageError
from cocoon.images.archive import canonical_tag, load
from cocoon.images.manifest import OCI_CONFIG, OCI_INDEX, OCI_MANIFEST
from cocoon.images.store import ImageStore
from tests.unit.imagekit import MEDIA, Tar, compress, dg, header, member, pax, record

BASE = Tar().dir("bin").file("bin/sh", b"#!shell", mode=0o755).bytes()
APP = Tar().file("app/run", b"app").bytes()

Member = bytes | tuple[str, str]  # data, or ("symlink", target)


def write_archive(path: Path, members: dict[str, Member], gz: bool = False) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, m in members.items():
            ti = tarfile.TarInfo(name)
            if isinstance(m, tuple):
                ti.type, ti.linkname = tarfile.SYMTYPE, m[1]
                tf.addfile(ti)
            else:
                ti.size = len(m)
                tf.addfile(ti, io.BytesIO(m))
    path.write_bytes(gzip.compress(buf.getvalue()) if gz else buf.getvalue())
    return path


def config_for(*layers: bytes) -> bytes:
    return json.dumps({
        "architecture": "amd64", "os": "linux", "config": {"Cmd": ["sh"]},
        "rootfs": {"type": "layers", "diff_ids": [dg(t) for t in layers]},
    }).encode()  # fmt: skip


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(Config(data_dir=str(tmp_path / "data")))


LAYERS = ["l1/layer.tar", "l2/layer.tar", "l3/layer.tar"]


def docker_save(
    tags: list[str], refs: list[str] = LAYERS, extra: dict[str, Member] | None = None
) -> dict[str, Member]:
    """A `docker save` archive (old layout) whose manifest.json names refs as its layers."""
    config = config_for(BASE, APP, BASE)
    return {
        "l1/VERSION": b"1.0",
        "l1/json": b"{}",
        "l1/layer.tar": BASE,
        "l2/layer.tar": APP,
        "l3/layer.tar": ("symlink", "../l1/layer.tar"),  # old docker links repeated layers
        f"{dg(config)[7:]}.json": config,
        "manifest.json": json.dumps(
            [{"Config": f"{dg(config)[7:]}.json", "RepoTags": tags, "Layers": refs}]
        ).encode(),
        "repositories": b"{}",
        "../../escape": b"never written anywhere",
        **(extra or {}),
    }


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzipped"])
def test_docker_save_archive(store: ImageStore, tmp_path: Path, gz: bool) -> None:
    arc = write_archive(tmp_path / "save.tar", docker_save(["foo:1", "example.com/bar/baz:2"]), gz)
    [img] = load(store, arc)
    assert img.repo_tags == ["docker.io/library/foo:1", "example.com/bar/baz:2"]
    assert [x.diff_id for x in img.layers] == [dg(BASE), dg(APP), dg(BASE)]
    assert [x.digest for x in img.layers] == [dg(BASE), dg(APP), dg(BASE)]  # stored plain
    assert store.resolve("docker.io/library/foo:1").id == img.id
    assert Path(img.erofs).is_file()
    assert not (tmp_path / "escape").exists() and not (tmp_path.parent / "escape").exists()
    # junk of the archive (VERSION, json, repositories) does not end up as blobs
    assert sorted(store.blobs.digests()) == sorted(set(img.blobs))
    # loading twice is harmless
    assert [i.id for i in load(store, arc)] == [img.id]


def oci_layout(tmp_path: Path, tamper: bool = False) -> Path:
    blobs: dict[str, bytes] = {}

    def blob(data: bytes) -> dict[str, object]:
        blobs[f"blobs/sha256/{dg(data)[7:]}"] = data
        return {"digest": dg(data), "size": len(data)}

    config = config_for(BASE, APP)
    l1, l2 = compress(BASE, "gzip"), compress(APP, "zstd")
    amd64 = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, **blob(config)},
        "layers": [{"mediaType": MEDIA["gzip"], **blob(l1)},
                   {"mediaType": MEDIA["zstd"], **blob(l2)}],
    }).encode()  # fmt: skip
    arm = dg(b"an arm64 manifest this archive does not carry")
    nested = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": arm, "size": 10,
             "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
            {"mediaType": OCI_MANIFEST, **blob(amd64),
             "platform": {"os": "linux", "architecture": "amd64"}},
        ],
    }).encode()  # fmt: skip
    index = json.dumps({
        "schemaVersion": 2,
        "manifests": [
            {"mediaType": OCI_INDEX, **blob(nested),
             "annotations": {"org.opencontainers.image.ref.name": "r.io/nested:1"}},
            {"mediaType": OCI_MANIFEST, "digest": dg(amd64), "size": len(amd64),
             "annotations": {"io.containerd.image.name": "direct:2",
                             "org.opencontainers.image.ref.name": "2"}},
            {"mediaType": OCI_MANIFEST, "digest": dg(amd64), "size": len(amd64),
             "annotations": {"org.opencontainers.image.ref.name": "bare"}},
        ],
    }).encode()  # fmt: skip
    if tamper:
        name = f"blobs/sha256/{dg(l2)[7:]}"
        blobs[name] = blobs[name][:-1] + bytes([blobs[name][-1] ^ 1])
    docker = [{"Config": f"blobs/sha256/{dg(config)[7:]}", "RepoTags": ["extra:3"], "Layers": []}]
    return write_archive(
        tmp_path / "oci.tar",
        {
            "oci-layout": b'{"imageLayoutVersion": "1.0.0"}',
            "index.json": index,
            "manifest.json": json.dumps(docker).encode(),
            **blobs,
        },
    )


def test_oci_layout_archive(store: ImageStore, tmp_path: Path) -> None:
    [img] = load(store, oci_layout(tmp_path))
    assert sorted(img.repo_tags) == [
        "docker.io/library/direct:2",
        "docker.io/library/extra:3",
        "r.io/nested:1",
    ]
    assert [x.compression for x in img.layers] == ["gzip", "zstd"]
    assert store.inspect("r.io/nested:1").config.cmd == ["sh"]
    assert Path(img.erofs).is_file()


def test_tampered_blob_refused(store: ImageStore, tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="digest mismatch"):
        load(store, oci_layout(tmp_path, tamper=True))
    assert store.list() == []


@pytest.mark.parametrize(
    ("ref", "extra", "msg"),
    [
        ("../../../etc/passwd", {}, "no member"),
        ("/etc/passwd", {}, "no member"),
        ("loop/a", {"loop/a": ("symlink", "b"), "loop/b": ("symlink", "a")}, "too many links"),
        ("out", {"out": ("symlink", "/etc/passwd")}, "no member"),
        ("out", {"out": ("symlink", "../../../../etc/passwd")}, "no member"),
    ],
)
def test_bad_docker_layers(
    store: ImageStore, tmp_path: Path, ref: str, extra: dict[str, Member], msg: str
) -> None:
    """Layer names resolve inside the archive only: the host's /etc/passwd is never read."""
    arc = write_archive(tmp_path / "bad.tar", docker_save(["x:1"], [*LAYERS[:2], ref], extra))
    with pytest.raises(ImageError, match=msg):
        load(store, arc)
    assert store.list() == []


def test_not_an_image_archive(store: ImageStore, tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="neither a docker-save"):
        load(store, write_archive(tmp_path / "x.tar", {"hello": b"world"}))
    (tmp_path / "junk.tar").write_bytes(b"\x1f\x8bnot gzip at all")
    with pytest.raises(ImageError, match="corrupt"):
        load(store, tmp_path / "junk.tar")


@pytest.mark.parametrize(
    ("ref", "canonical"),
    [
        ("busybox", "docker.io/library/busybox:latest"),
        ("foo/bar:1", "docker.io/foo/bar:1"),
        ("localhost:5000/a/b", "localhost:5000/a/b:latest"),
        ("index.docker.io/library/alpine:3", "docker.io/library/alpine:3"),
        ("ghcr.io/o/r:v1.2", "ghcr.io/o/r:v1.2"),
    ],
)
def test_canonical_tag(ref: str, canonical: str) -> None:
    assert canonical_tag(ref) == canonical


def test_invalid_archive_tag(store: ImageStore, tmp_path: Path) -> None:
    arc = write_archive(tmp_path / "t.tar", docker_save(["Bad Name!"]))
    with pytest.raises(ImageError, match="invalid image reference"):
        load(store, arc)


@pytest.mark.parametrize("member", ["manifest.json", "oci-layout"])
def test_deeply_nested_json_is_refused(store: ImageStore, tmp_path: Path, member: str) -> None:
    """Issue 19: the archive's own JSON went to json.loads unbounded (RecursionError)."""
    deep = b"[" * 1000 + b"]" * 1000
    members: dict[str, Member] = {"manifest.json": deep}
    if member == "oci-layout":
        members = {"oci-layout": deep, "index.json": b"{}"}
    arc = write_archive(tmp_path / "deep.tar", members)
    with pytest.raises(ImageError, match=f"{member} is not usable JSON: nested"):
        load(store, arc)


def _raw_archive(tmp_path: Path, body: bytes) -> Path:
    path = tmp_path / "hostile.tar"
    path.write_bytes(body + bytes(1024))
    return path


def test_load_parses_a_huge_pax_header_in_linear_time(store: ImageStore, tmp_path: Path) -> None:
    """Issue 19: `cocoon load` indexed archives with tarfile, whose pax parsing is
    quadratic before 3.11.10 (~20 min for a 1 MiB header); now cocoon's reader."""
    digits = record(b"comment", b"9" * (900 << 10))
    arc = _raw_archive(tmp_path, pax(digits) + member(b"junk", b"x"))
    t0 = time.monotonic()
    with pytest.raises(ImageError, match="neither a docker-save archive"):
        load(store, arc)
    assert time.monotonic() - t0 < 2.0


def test_load_refuses_chained_headers_in_one_line(store: ImageStore, tmp_path: Path) -> None:
    """~400 chained pax headers overflowed tarfile's recursion (RecursionError)."""
    arc = _raw_archive(tmp_path, pax(record(b"path", b"a")) * 400 + member(b"a", b"x"))
    with pytest.raises(ImageError, match="extended headers in a row"):
        load(store, arc)


def test_load_refuses_a_negative_member_size(store: ImageStore, tmp_path: Path) -> None:
    neg = b"\xff" * 12  # base-256 -1
    arc = _raw_archive(tmp_path, header(b"manifest.json", fields={124: neg}))
    with pytest.raises(ImageError, match="manifest.json|size"):
        load(store, arc)


def test_load_refuses_a_compressed_archive_bomb_early(tmp_path: Path) -> None:
    """Issue 14: a compressed archive gets the layers' guards: past the floor, more
    than max_inflation_ratio times its size is refused before it fills the disk,
    and the temp file it inflated into is gone."""
    cfg = Config(data_dir=str(tmp_path / "data"))
    cfg.images.inflation_floor_bytes = 1 << 20
    cfg.images.max_inflation_ratio = 10
    store = ImageStore(cfg)
    z = zlib.compressobj(9, zlib.DEFLATED, 31)  # a gzip stream
    body = b"".join(z.compress(bytes(1 << 20)) for _ in range(64)) + z.flush()
    bomb = tmp_path / "bomb.tar.gz"
    bomb.write_bytes(body)
    assert len(body) < 200 << 10
    with pytest.raises(ImageError, match="inflate to more than .*max_inflation_ratio"):
        load(store, bomb)
    assert list(store.tmp_dir.iterdir()) == []
