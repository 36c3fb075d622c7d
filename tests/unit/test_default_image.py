"""The built-in busybox image: a real, deterministic OCI image in the store, cheap to ensure."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from cocoon.config import Config
from cocoon.images import default
from cocoon.images.default import DEFAULT_TAG, build_image, ensure_default_image
from cocoon.images.manifest import parse_config, parse_manifest
from cocoon.images.store import ImageStore
from tests.unit.imagekit import dg

pytestmark = pytest.mark.skipif(not default.BUSYBOX.is_file(), reason="no busybox-static")


def test_layer_is_deterministic_and_well_formed() -> None:
    blob, config, manifest = build_image()
    assert build_image() == (blob, config, manifest)
    mf = parse_manifest(manifest)
    assert mf.config.digest == dg(config) and mf.layers[0].digest == dg(blob)
    assert mf.layers[0].compression == "gzip"
    cfg = parse_config(config)
    assert (cfg.os, cfg.architecture, cfg.cmd) == ("linux", "amd64", ["sh"])
    assert cfg.env == [default.PATH_ENV]
    layer = gzip.decompress(blob)
    assert cfg.diff_ids == [dg(layer)]
    with tarfile.open(fileobj=io.BytesIO(layer)) as tf:
        members = tf.getmembers()
    names = [m.name for m in members]
    assert names == sorted(names)
    assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 for m in members)
    sh = next(m for m in members if m.name == "bin/sh")
    assert sh.issym() and sh.linkname == "busybox"
    assert next(m for m in members if m.name == "tmp").mode == 0o1777


def test_ensure_default_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = Config(data_dir=str(tmp_path / "data"))
    img = ensure_default_image(cfg)
    assert img.repo_tags == [DEFAULT_TAG] and Path(img.erofs).is_file()
    assert ImageStore(cfg).inspect(DEFAULT_TAG).config.cmd == ["sh"]

    def no_build(*args: object) -> None:
        raise AssertionError("rebuilt the default image")

    monkeypatch.setattr(default, "build_image", no_build)
    assert ensure_default_image(cfg).id == img.id

    if not shutil.which("fsck.erofs"):
        pytest.skip("no fsck.erofs to look inside")
    out = tmp_path / "extract"
    subprocess.run(["fsck.erofs", f"--extract={out}", img.erofs], check=True, capture_output=True)
    assert (out / "bin/busybox").read_bytes() == default.BUSYBOX.read_bytes()
    assert os.readlink(out / "bin/sh") == "busybox"
    assert (out / "etc/passwd").read_text().startswith("root:x:0:0:")
    assert stat.S_IMODE((out / "tmp").stat().st_mode) == 0o1777
    for d in ("proc", "sys", "dev", "root", "var"):
        assert (out / d).is_dir()
    if os.geteuid() == 0:
        r = subprocess.run(
            ["chroot", str(out), "/bin/sh", "-c", "echo hi; cat /etc/group"],
            capture_output=True,
            text=True,
        )
        assert r.stdout.startswith("hi\nroot:x:0:"), r.stderr
    manifest = json.loads(ImageStore(cfg).blobs.read(img.manifest_digest, 1 << 20))
    assert manifest["layers"][0]["mediaType"].endswith("tar+gzip")
