"""Real QEMU VMs (TCG on these machines): shared fixtures and the leak check.

One booted sandbox is shared by the tests that only read from it or run their
own containers in it (a boot costs ~2 s under TCG); tests that break or kill a
VM boot their own. After every test nothing may be left: no QEMU or virtiofsd
naming the test root, no sandbox dir but the shared one, no mount under the root. On failure the
console of every sandbox still around is printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from cocoon.config import Config, load
from cocoon.guestassets.cache import resolve
from cocoon.guestassets.rootfs import image_key, image_path
from cocoon.hypervisor.base import Share
from cocoon.images.default import ensure_default_image
from cocoon.runtime.busybox import busybox_rootfs
from cocoon.runtime.lifecycle import remove
from cocoon.runtime.records import ContainerDir, ContainerStore
from cocoon.sandbox.sandbox import Sandbox
from cocoon.sandbox.spec import SandboxSpec
from cocoon.state import gc
from cocoon.state.store import list_ids
from cocoon.util.fs import mount_points_under

T = TypeVar("T")
ROOTFS_TAG = "rootfs"
#: Ids of session-long sandboxes: the leak check leaves them alone.
SHARED: set[str] = set()
GUEST_ROOTFS = "/run/rootfs"


class Runner:
    """A session-long event loop: the shared sandbox's channel lives in it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()

    def __call__(self, coro: Coroutine[Any, Any, T], timeout_s: float = 120) -> T:
        return self.loop.run_until_complete(asyncio.wait_for(coro, timeout_s))


@pytest.fixture(scope="session")
def run() -> Iterator[Runner]:
    r = Runner()
    yield r
    r.loop.close()


@pytest.fixture(scope="session")
def cfg() -> Iterator[Config]:
    c = load(None, env={k: v for k, v in os.environ.items() if k.startswith("COCOON_")})
    assets = resolve(c)  # clear error if the set-up did not build the guest assets
    # The VM tests must test this tree's agent, not an image built from older sources.
    expected = image_path(c, image_key(c))
    assert assets.image == expected, "guest image is stale: run `cocoon guest build`"
    root = Path(tempfile.mkdtemp(prefix="cocoon-test-", dir="/run"))
    c.root_dir = str(root)
    yield c
    gc.reap(root, force=True)
    # A leaked bind mount under the root would let rmtree delete through it
    # into the user's directory: detach whatever is still mounted first.
    for mp in sorted(mount_points_under(root), key=len, reverse=True):
        subprocess.run(["umount", "-l", mp], check=False)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def rootfs(cfg: Config) -> Path:
    return busybox_rootfs(cfg)


@pytest.fixture(scope="session")
def booted(cfg: Config, run: Runner, rootfs: Path) -> Iterator[Sandbox]:
    sb = run(Sandbox.create(cfg, SandboxSpec(shares=[Share(ROOTFS_TAG, rootfs, readonly=True)])))
    SHARED.add(sb.id)
    run(sb.mount("virtiofs", ROOTFS_TAG, GUEST_ROOTFS, readonly=True))
    yield sb
    run(sb.destroy())
    SHARED.discard(sb.id)


@pytest.fixture(autouse=True)
def no_leaks(cfg: Config) -> Iterator[None]:
    nets_before = our_netns()
    yield
    root = cfg.root
    stray = {p: s for p, s in gc.processes_naming(root).items() if s not in SHARED}
    dirs = [s for s in list_ids(root) if s not in SHARED]
    store = ContainerStore(cfg)
    containers = store.ids()
    for cid in containers:  # what a container left: its monitor's log says why
        log = root / "containers" / cid / "monitor.log"
        if log.exists():
            print(f"--- monitor of {cid[:12]} ---\n{log.read_text(errors='replace')[-3000:]}")
        with contextlib.suppress(Exception):
            remove(cfg, ContainerDir(store.root, cid), force=True)
    if stray or dirs:
        for s in dirs:
            console = root / "sandboxes" / s / "console.log"
            if console.exists():
                print(f"--- console of {s} ---\n{console.read_text(errors='replace')[-3000:]}")
        for s in set(dirs) | set(stray.values()):
            gc.reap(root, only=s, force=True)
    assert not stray, f"stray VM processes left: {stray}"
    assert not mount_points_under(root), "mounts left under the state root"
    assert not dirs, f"sandbox dirs left: {dirs}"
    assert not containers, f"containers left: {[c[:12] for c in containers]}"
    sockets = list((root / "ctl").glob("*")) if (root / "ctl").exists() else []
    assert not sockets, f"control sockets left: {sockets}"
    left = {n for n in our_netns() - nets_before if not _owned_elsewhere(n, root)}
    assert not left, f"network namespaces left: {left}"


def our_netns() -> set[str]:
    """Namespaces cocoon made for bridged sandboxes (/run/netns/cocoon-<id>)."""
    d = Path("/run/netns")
    return {p.name for p in d.glob("cocoon-*")} if d.is_dir() else set()


def _owned_elsewhere(netns: str, root: Path) -> bool:
    """Whether a namespace belongs to a live sandbox of another state root: on
    a shared host another session's tests make them while ours run. Ours are
    all gone by now (their dirs reaped above)."""
    sid = netns.removeprefix("cocoon-")
    for d in (*Path("/run").glob(f"*/sandboxes/{sid}"), *Path("/run").glob(f"*/*/sandboxes/{sid}")):
        if root not in d.parents:
            return True
    return False


@pytest.fixture(scope="session")
def busybox(cfg: Config) -> None:
    """The default image in the store (the README's set-up builds it too)."""
    ensure_default_image(cfg)


def ok(r: subprocess.CompletedProcess[bytes]) -> str:
    """stdout of a command that must succeed (its stderr says why not)."""
    assert r.returncode == 0, r.stderr.decode()
    return r.stdout.decode()


def spec(args: list[str], **kw: Any) -> dict[str, Any]:
    from cocoon.oci.spec import default_spec

    return default_spec(args, env=["PATH=/bin", "TERM=xterm"], readonly_rootfs=True, **kw)


def cocoon(
    cfg: Config, *args: str, input: bytes | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    """The `cocoon` command against the test root, as a user would run it."""
    return subprocess.run(
        [sys.executable, "-m", "cocoon.cli", "--root", str(cfg.root), *args],
        capture_output=True,
        input=input,
        timeout=120,
        env={**os.environ, **(env or {})},
    )
