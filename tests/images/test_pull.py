"""Pulls from a real docker-registry: tags, digests, indexes, every layer compression.

What a user sees: the right manifest for the platform asked for, every blob
in the store and verified, nothing on stdout, and one-line errors that say
what to do.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import pty
import re
import ssl
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import cocoon
from cocoon.config import Config
from cocoon.errors import ImageError
from cocoon.images import registry_http
from cocoon.images.blobs import BlobStore
from cocoon.images.manifest import (
    DOCKER_MANIFEST,
    MAX_CONFIG,
    OCI_MANIFEST,
    Platform,
    parse_config,
)
from cocoon.images.registry import PulledImage, pull
from cocoon.images.store import ImageStore

from .conftest import Pushed
from .layout import Image
from .servers import free_port

pytestmark = pytest.mark.timeout(60)


def run_pull(cfg: Config, store: BlobStore, ref: str, platform: str | None = None) -> PulledImage:
    p = Platform.parse(platform) if platform else None
    return asyncio.run(pull(cfg, store, ref, p))


def assert_complete(store: BlobStore, got: PulledImage, want: Image) -> None:
    """Everything the image is made of is in the store, and each file hashes to its name."""
    assert got.manifest_digest == want.manifest_digest
    assert got.config_digest == want.config_digest
    assert [(x.digest, x.size, x.media_type) for x in got.layers] == [
        (x.digest, x.size, x.media_type) for x in want.layers
    ]
    for d in [got.manifest_digest, got.config_digest, *(x.digest for x in got.layers)]:
        assert "sha256:" + hashlib.sha256(store.path(d).read_bytes()).hexdigest() == d
    assert list((store.root / "ingest").iterdir()) == []


def test_pull_by_tag_all_compressions(
    pushed: Pushed, cfg: Config, store: BlobStore, capfd: pytest.CaptureFixture[str]
) -> None:
    got = run_pull(cfg, store, f"{pushed.host}/test/mixed:1")
    assert_complete(store, got, pushed.mixed)
    assert {x.compression for x in got.layers} == {"gzip", "zstd", "none"}
    assert got.reference == f"{pushed.host}/test/mixed:1"
    assert got.manifest_media_type == OCI_MANIFEST
    assert got.platform == Platform("linux", "amd64") and got.index_digest is None
    config = parse_config(store.read(got.config_digest, MAX_CONFIG))
    assert config.cmd == ["/bin/sh"] and len(config.diff_ids) == 3
    out, _ = capfd.readouterr()
    assert out == ""  # progress goes to stderr only, and only on a terminal


def test_progress_bars_on_a_terminal(pushed: Pushed, tmp_path: Path) -> None:
    """On a TTY, one bar per layer goes to stderr; stdout still gets nothing."""
    script = (
        "import asyncio, pathlib\n"
        "from cocoon.config import Config\n"
        "from cocoon.images.blobs import BlobStore\n"
        "from cocoon.images.registry import pull\n"
        f"cfg = Config(data_dir={str(tmp_path / 'data')!r})\n"
        f"store = BlobStore(pathlib.Path({str(tmp_path / 'blobs')!r}))\n"
        f"asyncio.run(pull(cfg, store, {pushed.host + '/test/mixed:1'!r}))\n"
    )
    master, slave = pty.openpty()
    env = dict(os.environ, PYTHONPATH=str(Path(cocoon.__file__).parents[1]), COLUMNS="120")
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=slave, env=env
    )
    os.close(slave)
    chunks: list[bytes] = []

    def drain() -> None:  # read while it runs: a full pty would block the child
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed its end
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain)
    reader.start()
    out, _ = proc.communicate(timeout=30)
    reader.join(timeout=10)
    os.close(master)
    tty = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, tty[-2000:]
    assert out == b""
    for layer in pushed.mixed.layers:
        assert layer.digest[7:19] in tty


def test_pull_by_digest(pushed: Pushed, cfg: Config, store: BlobStore) -> None:
    digest = pushed.mixed.manifest_digest
    got = run_pull(cfg, store, f"{pushed.host}/test/mixed@{digest}")
    assert_complete(store, got, pushed.mixed)
    assert got.reference == f"{pushed.host}/test/mixed@{digest}"
    # tag and digest: the digest decides, as in docker.
    got = run_pull(cfg, store, f"{pushed.host}/test/mixed:nosuchtag@{digest}")
    assert got.manifest_digest == digest
    # Everything is in the store and verified: by digest, no registry is needed at all.
    offline = f"127.0.0.1:{free_port()}/test/mixed@{digest}"
    assert run_pull(cfg, store, offline).manifest_digest == digest


def test_second_pull_downloads_no_blob(pushed: Pushed, cfg: Config, store: BlobStore) -> None:
    ref = f"{pushed.host}/test/mixed:1"
    run_pull(cfg, store, ref)

    def blob_gets() -> int:
        return len(re.findall(r'"GET /v2/test/mixed/blobs/', pushed.registry.log_text()))

    before = blob_gets()
    assert_complete(store, run_pull(cfg, store, ref), pushed.mixed)
    assert blob_gets() == before


def test_cocoon_pull_command(pushed: Pushed, tmp_path: Path) -> None:
    """`cocoon pull`: the image id alone on stdout, the digest on stderr, the image
    recorded with its erofs (layers unpacked as they arrived); again: same id."""
    ref = f"{pushed.host}/test/mixed:1"
    env = dict(
        os.environ,
        PYTHONPATH=str(Path(cocoon.__file__).parents[1]),
        COCOON_DATA_DIR=str(tmp_path / "data"),
    )
    ids = []
    for _ in range(2):
        p = subprocess.run(
            [sys.executable, "-m", "cocoon.cli", "pull", ref],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert p.returncode == 0, p.stderr
        assert p.stderr.strip() == f"Digest: {pushed.mixed.manifest_digest}"
        ids.append(p.stdout)
    assert ids[0] == ids[1] and re.fullmatch(r"sha256:[0-9a-f]{64}\n", ids[0])
    images = ImageStore(Config(data_dir=str(tmp_path / "data")))
    (img,) = images.list()
    assert img.id == ids[0].strip() and img.repo_tags == [ref]
    assert Path(img.erofs).stat().st_size == img.size > 0
    assert list(images.tmp_dir.iterdir()) == []
    assert list((images.blobs.root / "ingest").iterdir()) == []


@pytest.mark.parametrize("arch", ["amd64", "arm64"])
def test_index_picks_platform(pushed: Pushed, cfg: Config, store: BlobStore, arch: str) -> None:
    got = run_pull(cfg, store, f"{pushed.host}/test/multi:1", f"linux/{arch}")
    want = pushed.amd64 if arch == "amd64" else pushed.arm64
    assert_complete(store, got, want)
    assert got.platform == Platform("linux", arch)
    assert got.index_digest == pushed.index_digest and store.has(pushed.index_digest)
    other = pushed.arm64 if arch == "amd64" else pushed.amd64
    assert not store.has(other.manifest_digest) and not store.has(other.layers[0].digest)


def test_index_default_platform_is_linux_amd64(
    pushed: Pushed, cfg: Config, store: BlobStore
) -> None:
    got = run_pull(cfg, store, f"{pushed.host}/test/multi:1")
    assert got.manifest_digest == pushed.amd64.manifest_digest


def test_index_without_the_platform(pushed: Pushed, cfg: Config, store: BlobStore) -> None:
    with pytest.raises(ImageError) as e:
        run_pull(cfg, store, f"{pushed.host}/test/multi:1", "linux/s390x")
    assert str(e.value) == (
        f"pull {pushed.host}/test/multi:1: no image for platform linux/s390x "
        "(available: linux/amd64, linux/arm64)"
    )


def test_docker_schema2_and_single_platform_mismatch(
    pushed: Pushed, cfg: Config, store: BlobStore
) -> None:
    got = run_pull(cfg, store, f"{pushed.host}/test/docker:1")
    assert got.manifest_media_type == DOCKER_MANIFEST
    assert [x.media_type for x in got.layers] == [
        "application/vnd.docker.image.rootfs.diff.tar.gzip"
    ]
    assert got.platform == Platform("linux", "arm64")
    with pytest.raises(ImageError, match=r"image is for linux/arm64, not linux/amd64$"):
        run_pull(cfg, store, f"{pushed.host}/test/docker:1", "linux/amd64")


def test_unknown_tag_digest_and_repository(pushed: Pushed, cfg: Config, store: BlobStore) -> None:
    ref = f"{pushed.host}/test/mixed:nosuchtag"
    with pytest.raises(ImageError) as e:
        run_pull(cfg, store, ref)
    assert str(e.value) == f"pull {ref}: manifest unknown (no such tag)"
    ref = f"{pushed.host}/test/mixed@sha256:" + "0" * 64
    with pytest.raises(ImageError, match=r"manifest unknown \(no such digest\)$"):
        run_pull(cfg, store, ref)
    with pytest.raises(ImageError, match="manifest unknown"):
        run_pull(cfg, store, f"{pushed.host}/no/such/repo:1")
    assert store.digests() == []


def test_layer_cap(pushed: Pushed, cfg: Config, store: BlobStore) -> None:
    cfg.images.max_layer_bytes = 1000  # the uncompressed layer is 10 KiB
    with pytest.raises(ImageError, match=r"is 10240 B, more than images.max_layer_bytes = 1000"):
        run_pull(cfg, store, f"{pushed.host}/test/mixed:1")
    assert not any(store.has(x.digest) for x in pushed.mixed.layers)


def test_unreachable_registry(
    cfg: Config, store: BlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(registry_http, "BACKOFF_S", 0.01)
    port = free_port()  # nothing listens there
    with pytest.raises(ImageError) as e:
        run_pull(cfg, store, f"127.0.0.1:{port}/x:y")
    assert str(e.value) == f"registry 127.0.0.1:{port} unreachable: connection refused"


def test_https_unless_listed_insecure(pushed: Pushed, cfg: Config, store: BlobStore) -> None:
    """A registry not in images.insecure_registries is spoken to over verified TLS only."""
    ref = f"{pushed.host}/test/mixed:1"
    cfg.images.insecure_registries = [f"127.0.0.1:{pushed.registry.port + 1}"]
    with pytest.raises(ImageError) as e:
        run_pull(cfg, store, ref)
    msg = str(e.value)
    assert msg.startswith(f"registry {pushed.host} unreachable: TLS handshake failed")
    assert msg.endswith(f"add {pushed.host} to images.insecure_registries")
    cfg.images.insecure_registries = [pushed.host]  # host:port entry: that port only
    assert run_pull(cfg, store, ref).manifest_digest == pushed.mixed.manifest_digest


class _Redirector:
    """A front for the registry that proxies manifests and redirects blobs (as a CDN setup)."""

    def __init__(self, target: str, blob_host: str) -> None:
        self.redirects = 0
        front = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if "/blobs/" in self.path:
                    front.redirects += 1
                    self.send_response(307)
                    base = blob_host if "://" in blob_host else f"http://{blob_host}"
                    self.send_header("Location", f"{base}{self.path}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                req = urllib.request.Request(
                    f"http://{target}{self.path}",
                    headers={"Accept": self.headers.get("Accept", "*/*")},
                )
                try:
                    with urllib.request.urlopen(req, timeout=10) as r:
                        status, headers, body = r.status, r.headers, r.read()
                except urllib.error.HTTPError as e:
                    status, headers, body = e.code, e.headers, e.read()
                self.send_response(status)
                for h in ("Content-Type", "Docker-Content-Digest"):
                    if headers.get(h):
                        self.send_header(h, headers[h])
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def redirector(pushed: Pushed, request: pytest.FixtureRequest) -> Iterator[_Redirector]:
    r = _Redirector(pushed.host, getattr(request, "param", pushed.host))
    yield r
    r.close()


def test_blobs_redirected_to_storage(
    pushed: Pushed, redirector: _Redirector, cfg: Config, store: BlobStore
) -> None:
    got = run_pull(cfg, store, f"{redirector.host}/test/mixed:1")
    assert_complete(store, got, pushed.mixed)
    assert redirector.redirects == 1 + len(pushed.mixed.layers)  # config + layers


class _TLSProxy:
    """Blob storage on https (a cert for IP 127.0.0.1 made here): proxies GETs to the registry."""

    def __init__(self, target: str, tmp: Path) -> None:
        self.cert = tmp / "cert.pem"
        key = tmp / "key.pem"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]
            + ["-nodes", "-keyout", str(key), "-out", str(self.cert), "-days", "2"]
            + ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
            check=True,
            capture_output=True,
        )
        self.served = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                proxy.served += 1
                with urllib.request.urlopen(f"http://{target}{self.path}", timeout=10) as r:
                    body = r.read()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cert, key)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_plain_http_registry_redirected_to_https_verifies_tls(
    pushed: Pushed, cfg: Config, store: BlobStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An insecure (plain HTTP) registry's client carries no CA bundle; a hop to
    https still gets a verifying one: an untrusted cert is refused, the same
    cert made trusted (SSL_CERT_FILE) is accepted."""
    tls = _TLSProxy(pushed.host, tmp_path)
    front = _Redirector(pushed.host, tls.url)
    try:
        ref = f"{front.host}/test/mixed:1"
        with pytest.raises(ImageError, match="TLS certificate not trusted"):
            run_pull(cfg, store, ref)
        monkeypatch.setenv("SSL_CERT_FILE", str(tls.cert))
        got = run_pull(cfg, store, ref)
        assert_complete(store, got, pushed.mixed)
        assert tls.served >= len(pushed.mixed.layers)
    finally:
        front.close()
        tls.close()


@pytest.mark.parametrize("redirector", ["127.0.0.2:9"], indirect=True)
def test_redirect_to_plain_http_elsewhere_refused(
    redirector: _Redirector, cfg: Config, store: BlobStore
) -> None:
    """A registry may not send us to plain HTTP on a host nobody listed as insecure."""
    with pytest.raises(ImageError) as e:
        run_pull(cfg, store, f"{redirector.host}/test/mixed:1")
    assert f"registry {redirector.host} sent us to http://127.0.0.2:9/v2/" in str(e.value)
    assert "only https" in str(e.value)
