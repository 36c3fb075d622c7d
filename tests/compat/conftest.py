"""podman and containerd driving `cocoon-runtime` exactly as they drive runc.

Real Debian podman 4.3 (its own storage under a temp dir, cgroupfs, file
events, no network) and containerd 1.6 (started here with its own root, state
and socket, images imported with `ctr image import`). The image is an OCI
archive built here from the busybox tree cocoon's own tests use. After every
test: nothing left in `cocoon-runtime list`, no VM process of its root.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cocoon.config import load
from cocoon.runtime.busybox import busybox_rootfs
from cocoon.state import gc

#: Where cocoon-runtime keeps state when its caller passes no --root (podman).
DEFAULT_ROOT = Path("/run/cocoon-runtime")
IMAGE = "docker.io/library/busybox:latest"


def runtime() -> str:
    path = shutil.which("cocoon-runtime")
    assert path, "cocoon-runtime is not installed: run scripts/setup.sh"
    return path


def _blob(root: Path, data: bytes) -> dict[str, object]:
    d = hashlib.sha256(data).hexdigest()
    (root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (root / "blobs" / "sha256" / d).write_bytes(data)
    return {"digest": f"sha256:{d}", "size": len(data)}


def oci_archive(
    rootfs: Path, dest: Path, name: str = IMAGE, cmd: tuple[str, ...] = ("sh",)
) -> Path:
    """An OCI image archive (a tarred image layout) of ``rootfs``, tagged ``name``
    (IMAGE by default), running ``cmd``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for path in sorted(rootfs.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(rootfs)), recursive=False)
    layer = buf.getvalue()
    work = Path(tempfile.mkdtemp(prefix="cocoon-oci-"))
    try:
        ldesc = _blob(work, layer)
        config = {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"], "Cmd": list(cmd)},
            "rootfs": {"type": "layers", "diff_ids": [ldesc["digest"]]},
        }
        cdesc = _blob(work, json.dumps(config).encode())
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **cdesc},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", **ldesc}],
        }
        mdesc = _blob(work, json.dumps(manifest).encode())
        index = {
            "schemaVersion": 2,
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    **mdesc,
                    "annotations": {
                        "io.containerd.image.name": name,
                        "org.opencontainers.image.ref.name": "latest",
                    },
                }
            ],
        }
        (work / "index.json").write_text(json.dumps(index))
        (work / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
        with tarfile.open(dest, "w") as tar:
            for p in sorted(work.rglob("*")):
                tar.add(p, arcname=str(p.relative_to(work)), recursive=False)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dest


def image_archive_of(work: Path) -> Path:
    """The busybox tree cocoon's tests use, as an OCI archive under ``work``."""
    tree = work / "tree" / "rootfs"
    shutil.copytree(busybox_rootfs(load()), tree, symlinks=True)
    tree.chmod(0o755)  # a user other than root must be able to enter /
    return oci_archive(tree, work / "busybox-oci.tar")


@pytest.fixture(scope="session")
def image_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return image_archive_of(tmp_path_factory.mktemp("image"))


def leftovers(root: Path) -> tuple[list[str], dict[int, str]]:
    cp = subprocess.run(
        [runtime(), "--root", str(root), "list", "-q"], capture_output=True, text=True
    )
    return cp.stdout.split(), gc.processes_naming(root)


def assert_clean(root: Path, timeout_s: float = 20.0) -> None:
    """Nothing of cocoon's left under ``root`` (teardown may still be finishing)."""
    deadline = time.monotonic() + timeout_s
    while True:
        ids, procs = leftovers(root)
        if not ids and not procs:
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    for cid in ids:
        subprocess.run([runtime(), "--root", str(root), "delete", "--force", cid], check=False)
    gc.reap(root, force=True)
    raise AssertionError(f"left behind under {root}: containers {ids}, processes {procs}")


class Podman:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.argv = [
            "podman", "--root", str(base / "root"), "--runroot", str(base / "runroot"),
            "--storage-driver", "vfs", "--cgroup-manager", "cgroupfs",
            "--events-backend", "file", "--runtime", runtime(),
        ]  # fmt: skip

    def __call__(
        self, *args: str, input: bytes | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [*self.argv, *args], capture_output=True, input=input, timeout=timeout
        )


@pytest.fixture(scope="session")
def podman(image_archive: Path) -> Iterator[Podman]:
    if not shutil.which("podman"):
        pytest.fail("podman is not installed: run scripts/setup.sh")
    base = Path(tempfile.mkdtemp(prefix="cocoon-podman-"))
    p = Podman(base)
    r = p("load", "-q", "-i", str(image_archive))
    assert r.returncode == 0, r.stderr.decode()
    yield p
    p("rm", "-af", "-t", "0")
    subprocess.run(
        ["podman", "--root", str(base / "root"), "--runroot", str(base / "runroot"),
         "--storage-driver", "vfs", "system", "reset", "-f"],
        capture_output=True, check=False,
    )  # fmt: skip
    shutil.rmtree(base, ignore_errors=True)


#: containerd's name for cocoon's shim v2, and the binary it looks for on its PATH.
SHIM_RUNTIME = "io.containerd.cocoon.v2"
SHIM_BINARY = "containerd-shim-cocoon-v2"


def shim_bin(dest: Path) -> Path:
    """A dir holding ``containerd-shim-cocoon-v2``: a wrapper running this
    checkout's shim (its src on PYTHONPATH) with this interpreter, so that the
    tests drive the code under test whatever is installed."""
    src = Path(__file__).resolve().parents[2] / "src"
    dest.mkdir(parents=True, exist_ok=True)
    script = dest / SHIM_BINARY
    code = "import sys; from cocoon.entry import containerd_shim; containerd_shim()"
    script.write_text(f"#!/bin/sh\nPYTHONPATH={src} exec {sys.executable} -c '{code}' \"$@\"\n")
    script.chmod(0o755)
    return dest


def runtime_bin(dest: Path) -> Path:
    """A dir holding ``cocoon-runtime``: a wrapper running this checkout's, as
    ``shim_bin`` does the shim (for a runc shim's ``BinaryName``)."""
    src = Path(__file__).resolve().parents[2] / "src"
    dest.mkdir(parents=True, exist_ok=True)
    script = dest / "cocoon-runtime"
    code = "import sys; from cocoon.entry import cocoon_runtime; cocoon_runtime()"
    script.write_text(f"#!/bin/sh\nPYTHONPATH={src} exec {sys.executable} -c '{code}' \"$@\"\n")
    script.chmod(0o755)
    return script


class Containerd:
    """A containerd of its own (root, state, socket, config). ``cri`` is the
    CRI plugin's config (TOML below ``[plugins."io.containerd.grpc.v1.cri"]``'s
    level): without it the plugin is disabled; ``env`` adds to the
    environment the shims inherit."""

    def __init__(
        self, base: Path, run: Path, cri: str | None = None, env: dict[str, str] | None = None
    ) -> None:
        self.base = base
        self.run = run
        self.sock = run / "containerd.sock"
        #: The shim's state roots (one per namespace), private to this containerd.
        self.shim_root = run / "cocoon-shim"
        (base / "config.toml").write_text(
            "version = 2\n"
            f'root = "{base / "root"}"\n'
            f'state = "{run / "state"}"\n'
            + ('disabled_plugins = ["io.containerd.grpc.v1.cri"]\n' if cri is None else "")
            + f'[grpc]\n  address = "{self.sock}"\n'
            + (cri or "")
        )
        self.log = open(base / "containerd.log", "wb")  # noqa: SIM115
        # The shims containerd starts inherit its environment: our shim on the
        # PATH, and its state under our private dir.
        env = {
            **os.environ,
            "PATH": f"{shim_bin(base / 'bin')}:{os.environ.get('PATH', '')}",
            "COCOON_SHIM_ROOT_DIR": str(self.shim_root),
            **(env or {}),
        }
        self.proc = subprocess.Popen(
            ["containerd", "--config", str(base / "config.toml")],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, env=env,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while not self.sock.exists():
            assert self.proc.poll() is None, (base / "containerd.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "containerd never made its socket"
            time.sleep(0.05)

    def ctr(
        self, *args: str, timeout: float = 120, input: bytes | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            ["ctr", "--address", str(self.sock), "-n", "cocoontest", *args],
            capture_output=True, timeout=timeout, input=input,
        )  # fmt: skip

    #: the runc shim's runtime root for our namespace
    @property
    def runtime_root(self) -> Path:
        return Path("/run/containerd/runc/cocoontest")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="session")
def containerd(image_archive: Path) -> Iterator[Containerd]:
    if not shutil.which("containerd"):
        pytest.fail("containerd is not installed: run scripts/setup.sh")
    base = Path(tempfile.mkdtemp(prefix="cocoon-containerd-"))
    run = Path(tempfile.mkdtemp(prefix="ctd-", dir="/run"))
    c = Containerd(base, run)
    r = c.ctr("image", "import", str(image_archive))
    assert r.returncode == 0, r.stderr.decode()
    yield c
    c.stop()
    shutil.rmtree(run, ignore_errors=True)
    shutil.rmtree(base, ignore_errors=True)
