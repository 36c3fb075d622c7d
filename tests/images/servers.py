"""Real servers for the pull tests: docker-registry 2.8, a token server, skopeo pushes.

The registry is Debian's docker-registry (distribution 2.8), the same code
that serves most private registries, run as a child process on 127.0.0.1 with
its storage in a temp dir so a test can corrupt a blob or kill the process.
The token server is ours (the registry only verifies tokens, it does not issue
them): RS256 JWTs carrying the signing certificate in ``x5c``, which the
registry checks against the ``rootcertbundle`` we configure.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

REGISTRY = "docker-registry"
SKOPEO = "skopeo"
HTPASSWD = "htpasswd"


def require(*binaries: str) -> None:
    """Skip (saying which) when a binary the test drives is not installed."""
    for b in binaries:
        if shutil.which(b) is None:
            pytest.skip(f"{b} not installed (scripts/setup.sh installs it)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Registry:
    """One docker-registry process; ``kill`` and ``start`` again keep storage and port."""

    def __init__(self, root: Path, auth: dict[str, Any] | None = None) -> None:
        self.root = root
        self.port = free_port()
        self.storage = root / "storage"
        self.log = root / "registry.log"
        self.config = root / "config.yml"
        self.proc: subprocess.Popen[bytes] | None = None
        root.mkdir(parents=True, exist_ok=True)
        # JSON is YAML: no YAML library needed to write the config.
        cfg: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "info", "accesslog": {"disabled": False}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage)},
                "delete": {"enabled": True},
            },
            "http": {"addr": f"127.0.0.1:{self.port}"},
        }
        if auth:
            cfg["auth"] = auth
        self.config.write_text(json.dumps(cfg, indent=2))

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [REGISTRY, "serve", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited: {self.log_text()[-2000:]}")
            try:
                urllib.request.urlopen(f"http://{self.host}/v2/", timeout=1).close()
                return
            except urllib.error.HTTPError:
                return  # 401: up, and asking for credentials
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"docker-registry did not answer: {self.log_text()[-2000:]}")

    def kill(self) -> None:
        """SIGKILL, as a crash or an OOM kill would: no graceful close of connections."""
        if self.proc and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def blob_data(self, digest: str) -> Path:
        """Where distribution's filesystem driver keeps a blob's bytes."""
        hex_ = digest.removeprefix("sha256:")
        return self.storage / "docker/registry/v2/blobs/sha256" / hex_[:2] / hex_ / "data"


@contextlib.contextmanager
def running(registry: Registry) -> Iterator[Registry]:
    registry.start()
    try:
        yield registry
    finally:
        registry.kill()


def push(
    layout: Path,
    tag: str,
    dest: str,
    *,
    all_images: bool = False,
    creds: str | None = None,
    fmt: str | None = None,
) -> None:
    """``skopeo copy oci:<layout>:<tag> docker://<dest>`` over plain HTTP."""
    policy = layout.parent / "policy.json"
    if not policy.exists():
        policy.write_text('{"default": [{"type": "insecureAcceptAnything"}]}')
    argv = [SKOPEO, "--policy", str(policy), "copy", "--quiet", "--dest-tls-verify=false"]
    if all_images:
        argv.append("--all")
    if creds:
        argv += ["--dest-creds", creds]
    if fmt:
        argv += ["--format", fmt]
    else:
        argv.append("--preserve-digests")  # the pull is compared with what we built
    argv += [f"oci:{layout}:{tag}", f"docker://{dest}"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"{' '.join(argv)}: {r.stderr[-2000:]}"


# -- token server --------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    """Issues registry tokens: anonymous -> no access, good password -> what was asked.

    Each request is recorded (scope, user) so tests can see what the client asked for.
    """

    SERVICE = "cocoon-test-registry"
    ISSUER = "cocoon-test-token-issuer"

    def __init__(self, root: Path, users: dict[str, str]) -> None:
        # Imported here so a machine without cryptography fails only the token tests.
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import padding, rsa
        from cryptography.x509.oid import NameOID

        self.users = users
        self.requests: list[dict[str, Any]] = []
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cocoon test token signer")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        self.cert_pem = root / "token-cert.pem"
        self.cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        x5c = base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()

        def sign(claims: dict[str, Any]) -> str:
            header = {"alg": "RS256", "typ": "JWT", "x5c": [x5c]}
            signing_input = (
                _b64url(json.dumps(header).encode()) + "." + _b64url(json.dumps(claims).encode())
            )
            sig = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
            return signing_input + "." + _b64url(sig)

        self._sign = sign
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server._handle(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.realm = f"http://127.0.0.1:{self.port}/token"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        url = urlsplit(h.path)
        q = parse_qs(url.query)
        user = ""
        header = h.headers.get("Authorization", "")
        if header.startswith("Basic "):
            name, _, password = base64.b64decode(header[6:]).decode().partition(":")
            if self.users.get(name) != password:
                self.requests.append({"user": name, "ok": False})
                return self._reply(h, 401, {"details": "incorrect username or password"})
            user = name
        scopes = q.get("scope", [])
        self.requests.append(
            {"user": user, "ok": True, "scope": scopes, "service": q.get("service")}
        )
        access = []
        if user:  # anonymous callers get a token that allows nothing
            for s in scopes:
                kind, name, actions = s.split(":")
                access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        token = self._sign(
            {
                "iss": self.ISSUER,
                "sub": user,
                "aud": self.SERVICE,
                "exp": now + 300,
                "nbf": now - 10,
                "iat": now,
                "jti": uuid.uuid4().hex,
                "access": access,
            }
        )
        self._reply(h, 200, {"token": token, "access_token": token, "expires_in": 300})

    @staticmethod
    def _reply(h: BaseHTTPRequestHandler, status: int, obj: dict[str, Any]) -> None:
        body = json.dumps(obj).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def registry_auth(self) -> dict[str, Any]:
        """The registry config's ``auth:`` section that trusts this server."""
        return {
            "token": {
                "realm": self.realm,
                "service": self.SERVICE,
                "issuer": self.ISSUER,
                "rootcertbundle": str(self.cert_pem),
            }
        }

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
