"""Which sandboxes can start from a template, and how a template VM is made.

A clone has the template's devices, so what a sandbox asks for must fit the
template's slots (``Layout``): the image's disk and up to two scratch disks,
up to four host directories (9p, the only shared file system a clone can
have: QEMU 7.2 cannot save a VM with a virtio-fs device, and virtiofsd would
map the template's RAM file shared and write into it), and the NICs (one
template per NIC count, and per whether there are host directories: see
``layout``). Everything else boots cold: ``unfit`` says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import time
from pathlib import Path

from cocoon.config import Config
from cocoon.errors import TemplateError
from cocoon.hypervisor import cgroup, jail
from cocoon.hypervisor.base import Hypervisor, Layout, Nic, TemplateMemory, VmSpec, file_stamp
from cocoon.hypervisor.jail import Jail
from cocoon.network.plumb import throwaway_taps
from cocoon.sandbox import template
from cocoon.sandbox.channel import AgentChannel
from cocoon.sandbox.template import template_mac
from cocoon.sandbox.warmup import warm_up
from cocoon.state.store import ProcessRecord, SandboxDir, SandboxState
from cocoon.util.proc import run_ns, start_time

#: Templates are made for up to this many NICs (each count its own template).
MAX_NICS = 4
#: Seconds the template VM's QEMU gets to write its device state (~70 KB).
SAVE_TIMEOUT_S = 30.0
#: Before the save, the guest is left alone at least this long, and then
#: until its QEMU used under QUIET_CPU of a core over QUIET_WINDOW_S; never
#: longer than SETTLE_MAX_S (a busy host can keep a guest from quieting).
SETTLE_MIN_S = 0.3
QUIET_WINDOW_S = 0.1
QUIET_CPU = 0.02
SETTLE_MAX_S = 3.0


def unfit(cfg: Config, spec: VmSpec) -> str:
    """Why ``spec`` cannot start from a template ("" = it can)."""
    if spec.init is not None:
        return "a custom init"
    if spec.channel != "virtio-serial":
        return "the vsock channel (its guest CID is saved with the VM)"
    if cfg.hypervisor.machine != "microvm":
        return f"machine {cfg.hypervisor.machine}"
    if spec.shares and cfg.guest.kernel_source == "debian-cloud" and not cfg.hypervisor.kernel:
        return "host directories with Debian's cloud kernel (no 9p)"
    if len(spec.nics) > MAX_NICS:
        return f"more than {MAX_NICS} NICs"
    if not layout(spec).fits(spec.disks, len(spec.shares), len(spec.nics)):
        return "more disks or host directories than a template has slots for"
    return ""


def layout(spec: VmSpec) -> Layout:
    """The slots of the template ``spec`` is cloned from: its NICs, and share
    slots only if it has host directories. A 9p device costs every clone
    ~1.2 MiB of QEMU's memory (its file server's hash tables) used or not, so
    a sandbox with none (most `cocoon run`s) comes from a template without."""
    return Layout(shares=Layout().shares if spec.shares else 0, nics=len(spec.nics))


def shape(spec: VmSpec) -> VmSpec:
    """The template VM for ``spec``: same machine, every slot empty (and its
    builder's own jail, if any: see build)."""
    return dataclasses.replace(
        spec,
        jail=None,
        disks=[],
        shares=[],
        nics=[Nic(template_mac(i), -1, n.vhost) for i, n in enumerate(spec.nics)],
        layout=layout(spec),
        init=None,
    )


def clone_spec(spec: VmSpec, ram: Path, state_empty: Path) -> VmSpec:
    """``spec`` as a clone: its disks, shares and taps in the template's slots."""
    return dataclasses.replace(
        spec,
        nics=[Nic(template_mac(i), n.fd, n.vhost) for i, n in enumerate(spec.nics)],
        layout=layout(spec),
        template=TemplateMemory(ram, False, state_empty),
    )


def template_meta(cfg: Config, backend: Hypervisor, spec: VmSpec) -> dict[str, object]:
    inputs = backend.machine_files(spec)
    return {
        "vcpus": spec.vcpus,
        "memory_mib": spec.memory_mib,
        "nics": len(spec.nics),
        "shares": spec.layout.shares if spec.layout is not None else 0,
        "accel": spec.accel,
        "machine": cfg.hypervisor.machine,
        "inputs": inputs,
        # What the key hashed them as: a template whose inputs changed since
        # can never be chosen again, and `cocoon gc` removes it.
        "stamps": {f: file_stamp(f) for f in inputs},
        "making": template.MAKING,
    }


async def build(
    cfg: Config, backend: Hypervisor, tshape: VmSpec, work: Path, timeout_s: float
) -> None:
    """Boot the template VM to agent-ready with its RAM in ``work/ram``, then
    save its device state to ``work/state``.

    The VM is a sandbox dir of its own (annotated ``cocoon.template``), so a
    builder killed at any point leaves a VM ``cocoon gc`` reaps, and a build
    dir that is never published.
    """
    sdir = SandboxDir(cfg.root, "tpl-" + work.name.rsplit("-", 1)[-1])
    sdir.create()
    sdir.take_ownership()
    st = SandboxState(id=sdir.id, hypervisor=backend.name, accel=tshape.accel,
                      annotations={"cocoon.template": work.name})  # fmt: skip
    sdir.write(st)
    jailed = jail_for(cfg, sdir, st)

    def record(name: str, pid: int) -> None:
        st.processes[name] = ProcessRecord(pid, start_time(pid))
        sdir.write(st)

    fds: list[int] = []
    launched = None
    channel: AgentChannel | None = None
    try:
        fds = throwaway_taps(len(tshape.nics)) if tshape.nics else []
        spec = dataclasses.replace(
            tshape,
            id=sdir.id,
            workdir=sdir.path,
            nics=[Nic(n.mac, fd, n.vhost) for n, fd in zip(tshape.nics, fds, strict=True)],
            template=TemplateMemory(work / "ram", True, work / "empty"),
            jail=jailed,
        )
        deadline = time.monotonic() + timeout_s
        launched = backend.launch(spec, record)
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        fds = []
        channel = await AgentChannel.connect(
            launched.agent_socket, deadline=deadline, agent_timeout_s=cfg.hypervisor.agent_timeout_s
        )
        await channel.handshake(deadline)
        await launched.until_confined()
        # Every clone then starts with the guest's side of a container start
        # done once (imports, crun and its libraries in the page cache).
        await warm_up(channel)
        await _settle(launched.processes["qemu"])
        # The agent now waits for its next request on an open session: the
        # state a clone resumes in, its host reconnected before the load.
        await backend.save(launched, work / "state", SAVE_TIMEOUT_S)
    except TemplateError:
        raise
    except Exception as e:
        raise TemplateError(f"building a template failed: {e}") from e
    finally:
        if channel is not None:
            await channel.close()
        if launched is not None:
            await backend.stop(launched, grace_s=1.0)
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        shutil.rmtree(sdir.path, ignore_errors=True)  # sockets and logs only: nothing mounted
        if jailed is not None:
            cgroup.remove(sdir.id)
            jail.release(cfg.root, jailed.uid, sdir.id)
        sdir.release_ownership()


def jail_for(cfg: Config, sdir: SandboxDir, st: SandboxState) -> Jail | None:
    """A uid of its own for the sandbox's VMM, recorded in its state before
    use (gc finds it after a crash); None when jails are off."""
    if not cfg.security.jail:
        return None
    sec = cfg.security
    st.jail_uid = jail.allocate(cfg.root, sdir.id, sec.uid_base, sec.uid_count)
    sdir.write(st)
    return Jail(st.jail_uid, st.jail_uid, cfg.root)


async def obtain(
    cfg: Config,
    backend: Hypervisor,
    spec: VmSpec,
    timeout_s: float,
    built: list[bool] | None = None,
) -> template.Template:
    """The template ``spec`` is a clone of, built first if there is none."""
    tshape = shape(spec)
    key = template.make_key(backend.machine_identity(tshape), {})

    async def build_it(work: Path) -> None:
        await build(cfg, backend, tshape, work, timeout_s)

    meta = template_meta(cfg, backend, tshape)
    return await template.obtain(cfg, key, meta, build_it, built=built)


async def _settle(qemu: int) -> None:
    """Let the guest's kernel finish what the warm-up left it to do later
    before the save, so that no clone does it.

    A container's end leaves deferred work behind (cgroup and mount
    teardown behind RCU grace periods, workqueue items, timers): ~8 ms of
    guest CPU spread over ~0.25 s after the warm-up returns. Saved with it
    pending, every clone ran it right after its resume, through a
    translation cache that starts empty, on the way to its first answer:
    measured under TCG (medians of 8, seven rounds), restore to agent-ready
    took 94-103 ms with the save at once, 76-87 ms with it 0.15-3 s later.
    Under KVM that work is cheap, and the wait only lengthens a build.
    """
    start = time.monotonic()
    await asyncio.sleep(SETTLE_MIN_S - QUIET_WINDOW_S)
    last = run_ns(qemu)
    while last is not None and time.monotonic() - start < SETTLE_MAX_S:
        await asyncio.sleep(QUIET_WINDOW_S)
        now = run_ns(qemu)
        if now is None or now - last < QUIET_CPU * QUIET_WINDOW_S * 1e9:
            return
        last = now
