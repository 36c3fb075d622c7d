"""A registry that lies or dies: nothing unverified is stored, and the next pull resumes.

Each test here runs its own docker-registry, because it corrupts that
registry's storage behind its back or SIGKILLs it mid-download.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from cocoon.config import Config
from cocoon.errors import ImageError
from cocoon.images import registry_http, service
from cocoon.images.blobs import BlobStore, BlobWriter
from cocoon.images.registry import PulledImage, pull
from cocoon.images.store import ImageStore

from .layout import Layout
from .servers import Registry, push

pytestmark = pytest.mark.timeout(60)

BIG = 50 << 20
KILL_AT = 8 << 20


def run_pull(cfg: Config, store: BlobStore, ref: str) -> PulledImage:
    return asyncio.run(pull(cfg, store, ref))


def ingest(store: BlobStore) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in (store.root / "ingest").iterdir()}


def test_corrupted_layer_is_refused(
    own_registry: Registry, tmp_path: Path, cfg: Config, store: BlobStore
) -> None:
    lay = Layout(tmp_path / "layout")
    image = lay.image([({"etc/a": b"a" * 5000}, "gzip"), ({"etc/b": b"b" * 5000}, "none")])
    lay.tag("x", image.manifest_digest, image.manifest_size)
    own_registry.start()
    push(lay.root, "x", f"{own_registry.host}/bad/layer:1")
    bad = image.layers[1]
    data = own_registry.blob_data(bad.digest)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size, different bytes: only the digest can tell
    data.write_bytes(bytes(raw))

    ref = f"{own_registry.host}/bad/layer:1"
    with pytest.raises(ImageError) as e:
        run_pull(cfg, store, ref)
    assert str(e.value).startswith(
        f"pull {ref}: layer {bad.digest[:19]}: digest mismatch: expected {bad.digest}, content is "
    )
    assert not store.has(bad.digest)
    # The bad bytes are not kept for a "resume" either. (The good layer, cancelled
    # by the failure, may have left its partial: that one is a valid prefix.)
    assert bad.digest[7:] + ".partial" not in ingest(store)


def test_corrupted_manifest_is_refused(
    own_registry: Registry, tmp_path: Path, cfg: Config, store: BlobStore
) -> None:
    lay = Layout(tmp_path / "layout")
    image = lay.image([({"etc/a": b"a"}, "gzip")])
    lay.tag("x", image.manifest_digest, image.manifest_size)
    own_registry.start()
    push(lay.root, "x", f"{own_registry.host}/bad/manifest:1")
    data = own_registry.blob_data(image.manifest_digest)
    text = data.read_bytes()
    forged = text.replace(b'{"schemaVersion": 2,', b'{"schemaVersion":2 ,', 1)
    assert forged != text and len(forged) == len(text)
    data.write_bytes(forged)  # still a valid manifest, but not the one the tag names

    host = own_registry.host
    with pytest.raises(ImageError, match=r"manifest digest mismatch: registry says sha256:"):
        run_pull(cfg, store, f"{host}/bad/manifest:1")
    with pytest.raises(
        ImageError, match=rf"manifest digest mismatch: expected {image.manifest_digest}"
    ):
        run_pull(cfg, store, f"{host}/bad/manifest@{image.manifest_digest}")
    assert store.digests() == []


def kill_registry_midway(
    monkeypatch: pytest.MonkeyPatch, own_registry: Registry, digest: str
) -> Callable[[BlobWriter, bytes], None]:
    """SIGKILL the registry (no goodbye) once KILL_AT bytes of ``digest`` are in:
    from inside the write, so the moment is exact, not a race against the
    transfer. Returns the real write, to put back for a second pull."""
    real_write = BlobWriter.write

    def write_then_kill(self: BlobWriter, data: bytes) -> None:
        real_write(self, data)
        if self.digest == digest and self.offset >= KILL_AT and own_registry.proc:
            own_registry.kill()

    monkeypatch.setattr(BlobWriter, "write", write_then_kill)
    monkeypatch.setattr(registry_http, "BACKOFF_S", 0.05)
    return real_write


@pytest.mark.timeout(90)
def test_registry_killed_mid_pull_then_resumed(
    own_registry: Registry,
    tmp_path: Path,
    cfg: Config,
    store: BlobStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lay = Layout(tmp_path / "layout")
    big_data = os.urandom(BIG)  # incompressible, like a real big layer
    image = lay.image([({"big.bin": big_data}, "none"), ({"small": b"small"}, "gzip")])
    del big_data
    lay.tag("big", image.manifest_digest, image.manifest_size)
    own_registry.start()
    ref = f"{own_registry.host}/big/app:1"
    push(lay.root, "big", ref)
    big = image.layers[0]

    real_write = kill_registry_midway(monkeypatch, own_registry, big.digest)
    with pytest.raises(ImageError) as e:
        run_pull(cfg, store, ref)
    assert str(e.value) == f"registry {own_registry.host} unreachable: connection refused"
    assert not store.has(big.digest)
    kept = ingest(store)[big.digest[7:] + ".partial"]
    assert KILL_AT <= kept < big.size

    monkeypatch.setattr(BlobWriter, "write", real_write)
    own_registry.start()  # same port, same storage
    got = run_pull(cfg, store, ref)
    assert [x.digest for x in got.layers] == [x.digest for x in image.layers]
    assert all(store.has(x.digest) for x in got.layers) and ingest(store) == {}
    # The second pull asked only for the missing tail of the big layer.
    sent = re.findall(
        rf'"GET /v2/big/app/blobs/{big.digest} HTTP/1.1" (\d+) (\d+)', own_registry.log_text()
    )
    assert sent[-1] == ("206", str(big.size - kept))


@pytest.mark.timeout(90)
def test_registry_killed_while_layers_are_unpacked_then_pulled_again(
    own_registry: Registry, tmp_path: Path, cfg: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`cocoon pull` unpacks layers as they arrive: a registry that dies meanwhile
    leaves no image, no erofs and no staging dir, only the partial to resume."""
    lay = Layout(tmp_path / "layout")
    big_data = os.urandom(BIG // 2)
    image = lay.image([({"small": b"small"}, "gzip"), ({"big.bin": big_data}, "gzip")])
    lay.tag("big", image.manifest_digest, image.manifest_size)
    own_registry.start()
    ref = f"{own_registry.host}/big/app:1"
    push(lay.root, "big", ref)
    big = image.layers[1]
    real_write = kill_registry_midway(monkeypatch, own_registry, big.digest)
    with pytest.raises(ImageError, match="unreachable: connection refused"):
        asyncio.run(service.pull(cfg, ref, progress=False))
    images = ImageStore(cfg)
    assert images.list() == [] and list(images.erofs_dir.iterdir()) == []
    assert list(images.tmp_dir.iterdir()) == []
    assert list(ingest(images.blobs)) == [big.digest[7:] + ".partial"]

    monkeypatch.setattr(BlobWriter, "write", real_write)
    own_registry.start()
    img = asyncio.run(service.pull(cfg, ref, progress=False))
    assert img.repo_tags == [ref] and Path(img.erofs).is_file()
    assert [x.digest for x in img.layers] == [x.digest for x in image.layers]
    assert ingest(images.blobs) == {} and list(images.tmp_dir.iterdir()) == []
