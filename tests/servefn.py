"""`cocoon serve` as the tests run it: a real process, real HTTP.

``Served`` starts the service on a state root and state dir of the test's,
with its unix socket and a TCP listener on a free loopback port, waits until
it answers, and stops it (SIGTERM, or kill -9 for the crash tests).
"""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path
from typing import Any

import httpx

from cocoon.serve.client import Client


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Served:
    def __init__(
        self, root: Path, state: Path, env: dict[str, str] | None = None, port: int = 0
    ) -> None:
        self.root = root
        self.state = state
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.socket = root / "serve.sock"
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = state.parent / f"{state.name}.log"

    def start(self) -> Served:
        self.state.parent.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "cocoon.cli", "--root", str(self.root), "serve",
                "--state-dir", str(self.state), "--listen", f"127.0.0.1:{self.port}"]  # fmt: skip
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=log, env=self.env)
        deadline = time.monotonic() + 60
        while True:
            assert self.proc.poll() is None, self.output()
            try:
                with self.admin() as c:
                    if c.request("GET", "/healthz").json()["ok"]:
                        return self
            except Exception:
                pass
            assert time.monotonic() < deadline, "the service did not answer:\n" + self.output()
            time.sleep(0.1)

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-5000:] if self.log.exists() else ""

    def prewarmed(self, at_least: int = 1, timeout_s: float = 120) -> int:
        """Wait until the service has ``at_least`` pre-warmed blanks ready."""
        deadline = time.monotonic() + timeout_s
        with self.admin() as c:
            while (n := int(c.request("GET", "/healthz").json()["prewarmed"])) < at_least:
                assert time.monotonic() < deadline, "no pre-warmed instance:\n" + self.output()
                time.sleep(0.1)
        return n

    def admin(self) -> Client:
        """The unix socket: the admin, no token."""
        return Client(socket=self.socket)

    def tcp(self, token: str = "") -> Client:
        return Client(url=self.url, token=token)

    def admin_token(self) -> str:
        return (self.state / "admin.token").read_text().strip()

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        return code


def zip_code(files: dict[str, str | bytes]) -> dict[str, Any]:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = 0o100755 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, data)
    return {"format": "zip", "data": base64.b64encode(buf.getvalue()).decode()}


def tgz_code(entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> dict[str, Any]:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for ti, data in entries:
            if data is not None:
                ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    return {"format": "tar.gz", "data": base64.b64encode(buf.getvalue()).decode()}


def entry(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.linkname = link
    ti.mode = 0o755
    return ti


def invoke(c: Client, name: str, payload: bytes = b"", ns: str = "default") -> httpx.Response:
    return c.invoke(ns, name, payload)
