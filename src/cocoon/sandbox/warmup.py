"""A throwaway container of our own, run in a VM before any tenant gets it.

What a container start runs in the guest (the agent's network and mount
paths, the overlay mount, crun create, the container's namespaces, its exit)
is then code the VM has already run and data it has already read:

- A template built after a warm-up carries the guest's side of that in its
  RAM, shared by every clone: the agent's imports and caches, and crun with
  its ten libraries in the page cache (else each clone reads them from its
  image disk again). That holds under KVM as much as under TCG.
- A pooled sandbox, warmed once more after its restore, also has that code
  in QEMU's TCG translation cache, which no template can carry: a clone
  starts with an empty one, and translating crun and those paths was most
  of a start's guest time (measured here: crun create 0.25 s cold against
  0.17 s warm, the first ConfigureNetwork 0.11 s against 0.006 s).

A pooled sandbox's warm-up container also has what container engines put
in a spec and ``cocoon run`` does not: a network namespace of its own
(podman's ``--network=none``, crun's and runc's default spec), a read-only
root, rlimits and ambient capabilities. Creating a network namespace runs a
good part of the guest kernel's network code; untranslated, it cost the first
engine-made container in a pooled sandbox 0.10 s of crun create against
0.05 s once translated (measured here with crun's default spec on a 9p
rootfs). A template's warm-up leaves that out: no clone inherits translated
code, and the namespace's teardown would still be running in the guest when
the template is saved, so every clone would finish it.

The container's root is an overlay on the guest's own read-only root, and
its output goes nowhere: nothing of any tenant is ever in the VM, and every
trace of the warm-up (mounts, crun state, cgroup) is removed before the VM
is offered. The network step is the one a container with no NIC makes; a
real start replaces its files.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from pathlib import Path
from typing import Any

from cocoon.errors import HostError, SandboxError
from cocoon.oci import seccomp
from cocoon.oci.spec import default_spec
from cocoon.protocol import messages
from cocoon.sandbox.channel import AgentChannel
from cocoon.storage import hub
from cocoon.util import mounts

WARM_DIR = "/run/cocoon/warm"
WARM_ID = "cocoon-warm-up"
#: Generous: a cold guest under TCG takes ~0.5 s; a stuck one must not hang a build.
STEP_TIMEOUT_S = 60.0


async def warm_up(
    channel: AgentChannel,
    *,
    engine_spec: bool = False,
    rootfs: str = "",
    spec: dict[str, Any] | None = None,
) -> None:
    """Run ``/bin/true`` in a container on an overlay of the guest's root,
    its stdout and stderr on streams as a tenant's are (the pipes and pump
    threads are part of what a start runs); with ``engine_spec``, under a
    spec shaped like the engines' (``warm_spec``). With ``rootfs``, on that
    root instead (a pooled sandbox's hub: ``hub_warm_up``), and ``spec``
    instead of ``warm_spec``'s."""

    async def ok(msg: messages.Message) -> None:
        await channel.call(msg, messages.Ok, timeout_s=STEP_TIMEOUT_S)

    await ok(messages.ConfigureNetwork([], [], [], "", "", "", []))
    own_root = not rootfs
    if own_root:
        rootfs = f"{WARM_DIR}/rootfs"
        await ok(messages.Mount("tmpfs", "tmpfs", WARM_DIR, "", ["size=4m", "mode=0700"], False))
        layers = ["lowerdir=/", f"upperdir={WARM_DIR}/upper", f"workdir={WARM_DIR}/work"]
        await ok(messages.Mount("overlay", "overlay", rootfs, "", layers, False))
    body = json.dumps(spec if spec is not None else warm_spec(engine_spec))
    out, err = channel.open_in(), channel.open_in()
    try:
        stdio = messages.StdioSpec(0, out.chan, err.chan, False, 0, 0)
        create = messages.CreateContainer(WARM_ID, rootfs, body, stdio)
        await channel.call(create, messages.ProcessStarted, timeout_s=STEP_TIMEOUT_S)
        await ok(messages.StartContainer(WARM_ID))
        wait = messages.WaitProcess(WARM_ID, "")
        done = await channel.call(wait, messages.ProcessExited, timeout_s=STEP_TIMEOUT_S)
        async with asyncio.timeout(STEP_TIMEOUT_S):  # EOF follows the exit report
            for stream in (out, err):
                while await stream.read():
                    pass
    finally:
        # At EOF (or dropped): the channel must be quiet before a pool hands it over.
        for stream in (out, err):
            channel.session.close_in(stream.chan)
    await ok(messages.DeleteContainer(WARM_ID))
    for target in (rootfs, WARM_DIR) if own_root else ():
        await ok(messages.Unmount(target))
    if done.exit_code != 0:
        raise SandboxError(f"its warm-up container exited {done.exit_code}")


async def hub_warm_up(channel: AgentChannel, hub_path: Path, share_tag: str, work: Path) -> None:
    """A pooled sandbox's hub used once, as a taker's start uses it: the
    guest mounts the hub (9p), and a container runs on a root there (a host
    dir whose /bin/true is the host's static busybox) under an engine's spec
    (``engine_like_spec``), its files bound in from another slot. Without it,
    the guest kernel's 9p client paths (mount, lookups, creating mount
    points, exec and binds over 9p) are first run, and translated, by the
    tenant's first container. Everything is gone after: the guest's mount,
    the slots, the host dir ``work`` (in the sandbox's own dir: no sweep
    of hubs takes it for a hub). Skipped where the host has no static busybox."""
    busybox = shutil.which("busybox")
    if busybox is None:
        return
    work.mkdir(mode=0o700)
    true = work / "rootfs" / "bin" / "true"
    try:
        true.parent.mkdir(parents=True)
        true.touch()
        (work / "files" / "shm").mkdir(parents=True)
        for name in ENGINE_FILES:
            (work / "files" / name).write_text("\n")
        mounts.bind(busybox, str(true))
        root = hub.attach(hub_path, 0, work / "rootfs", readonly=False)
        files = hub.attach(hub_path, 1, work / "files", readonly=True)
        mount = messages.Mount("9p", share_tag, hub.GUEST_DIR, "", [], False)
        await channel.call(mount, messages.Ok, timeout_s=STEP_TIMEOUT_S)
        # Not in a `finally`: a warm-up that failed, or was cancelled, has its
        # sandbox destroyed, and a request there would only turn a
        # cancellation into a channel error.
        await warm_up(channel, rootfs=root, spec=engine_like_spec(files))
        unmount = messages.Unmount(hub.GUEST_DIR)
        await channel.call(unmount, messages.Ok, timeout_s=STEP_TIMEOUT_S)
    finally:
        try:
            hub.clear(hub_path)
        finally:  # the hub's failure to clear leaves no bind of ours behind
            if true.exists():
                with contextlib.suppress(HostError):
                    mounts.detach(str(true))
            shutil.rmtree(work, ignore_errors=True)


#: The files engines bind into a container (podman: from its userdata dir;
#: containerd's CRI: the pod's), each as a file of its own.
ENGINE_FILES = ("hosts", "hostname", "resolv.conf", ".containerenv")


def engine_like_spec(files: str) -> dict[str, Any]:
    """``warm_spec``'s engine spec with the rest of what engines ask of crun
    and our warm-up spec did not: their file binds (and a /dev/shm bind) from
    ``files``, limits on the container's cgroup (a pids limit, and the
    deny-all device rule, for which crun attaches a BPF device filter), and a
    seccomp filter, compiled on the host as every container's is
    (oci/seccomp.py). Measured: the first podman container's crun create in
    a pooled sandbox ~15 ms faster than after the plain engine spec."""
    spec = warm_spec(True)
    for name in ENGINE_FILES:
        dst = "/run/.containerenv" if name == ".containerenv" else f"/etc/{name}"
        spec["mounts"].append(
            {"destination": dst, "type": "bind", "source": f"{files}/{name}",
             "options": ["bind", "rprivate"]}
        )  # fmt: skip
    spec["mounts"].append(
        {"destination": "/dev/shm", "type": "bind", "source": f"{files}/shm",
         "options": ["bind", "rprivate", "nosuid", "noexec", "nodev"]}
    )  # fmt: skip
    spec["mounts"] = [m for m in spec["mounts"]
                      if not (m["destination"] == "/dev/shm" and m["type"] == "tmpfs")]  # fmt: skip
    spec["linux"]["resources"] = {"devices": [{"allow": False, "access": "rwm"}],
                                  "pids": {"limit": 1024}}  # fmt: skip
    spec["linux"]["seccomp"] = {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [{"names": ["kexec_load", "init_module"], "action": "SCMP_ACT_ERRNO"}],
    }
    return seccomp.compiled(spec)


def warm_spec(engine_spec: bool) -> dict[str, Any]:
    """The warm-up container's spec: ours, or with what engines add to it."""
    spec = default_spec(["/bin/true"], env=["PATH=/bin:/usr/bin"])
    if engine_spec:
        spec["linux"]["namespaces"].append({"type": "network"})
        spec["root"]["readonly"] = True
        spec["process"]["rlimits"] = [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}]
        caps = spec["process"]["capabilities"]
        caps["ambient"] = caps["inheritable"] = ["CAP_KILL"]
    return spec
