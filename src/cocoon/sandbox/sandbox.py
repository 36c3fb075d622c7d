"""One sandbox: a VM, its agent channel, its state dir, and what runs inside.

States: creating -> running -> stopping -> (dir removed). The state dir is made
and the intent written before any process starts, every process is recorded
right after it is spawned, and the owner holds ``owner.lock`` for the whole
life: so whatever dies when, ``cocoon gc`` finds and reaps what is left.

A guest that breaks the protocol, goes silent or dies turns into one
``GuestError`` and the sandbox is torn down: a guest that misbehaved once is
never trusted again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from cocoon import network as net
from cocoon.config import Config
from cocoon.errors import CocoonError, GuestError, HypervisorError, SandboxError, TemplateError
from cocoon.guestassets.cache import resolve
from cocoon.hypervisor import accel, cgroup, jail
from cocoon.hypervisor.base import (
    AGENT_VSOCK_PORT,
    Disk,
    Hypervisor,
    Launched,
    Layout,
    Nic,
    Share,
    VmSpec,
)
from cocoon.hypervisor.qemu.backend import QemuBackend
from cocoon.hypervisor.qemu.cmdline import slot_serial
from cocoon.log import teardown_step
from cocoon.oci import seccomp
from cocoon.protocol import messages
from cocoon.sandbox import poolclient, restore, template
from cocoon.sandbox.channel import AgentChannel, Timeout
from cocoon.sandbox.process import Process
from cocoon.sandbox.spec import SandboxSpec
from cocoon.sandbox.template import template_mac
from cocoon.state.gc import release_host, remove_dir
from cocoon.state.store import ProcessRecord, SandboxDir, SandboxState
from cocoon.storage import hub
from cocoon.storage import scratch as scratch_files
from cocoon.storage.scratch import ScratchDisk
from cocoon.util.proc import cpu_seconds, runnable, start_time

M = TypeVar("M", bound=messages.Message)
CONSOLE_TAIL = 300
#: The tag of a pooled sandbox's hub, its first share (storage/hub.py).
HUB_TAG = "cocoon-hub"
#: A boot that never got the CPU fails at this many times its CPU budget in wall time.
WALL_FACTOR = 4
PROGRESS_POLL_S = 0.05

log = logging.getLogger(__name__)


def _warn(text: str) -> None:
    """A start's warning (a template refused, a pool failed), for whoever runs us."""
    log.warning(text)


def new_id() -> str:
    return secrets.token_hex(6)


def backend_for(cfg: Config) -> Hypervisor:
    """The configured hypervisor backend (QEMU is the only one so far)."""
    return QemuBackend(cfg.hypervisor)


def choose_channel(setting: str) -> str:
    """vsock where the host has vhost-vsock (or when forced), virtio-serial otherwise."""
    if setting == "vsock" or (setting == "auto" and os.path.exists("/dev/vhost-vsock")):
        return "vsock"
    return "virtio-serial"


#: Pooled sandboxes' QEMUs: refills queue behind live starts, not beside them.
POOL_NICE = 10


@contextlib.contextmanager
def spawning_nice(nice: int) -> Iterator[None]:
    """Processes started in the block get ``nice``; the caller keeps its own
    (on Linux a thread's niceness is its own, and children inherit it)."""
    if not nice:
        yield
        return
    old = os.getpriority(os.PRIO_PROCESS, 0)
    os.setpriority(os.PRIO_PROCESS, 0, nice)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, 0, old)


def renice_all(pid: int, nice: int) -> None:
    """Every thread of ``pid`` (setpriority on a pid changes its first thread only)."""
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, ValueError):
                os.setpriority(os.PRIO_PROCESS, int(tid), nice)


def pool_fit(cfg: Config, want: SandboxSpec) -> int | None:
    """The NIC count of a warm pool's sandbox that fits ``want`` (empty disk
    slots, host directories only through its hub: storage/hub.py; NICs only
    as taps moved into namespaces given by path: network.pool_nics); None:
    none fits. Counting a namespace's links runs ``ip``: asked only where a
    pool server may answer."""
    if want.init is not None or cfg.hypervisor.machine != "microvm":
        return None
    if want.shares and cfg.hypervisor.shared_fs == "none":
        return None
    if choose_channel(cfg.hypervisor.channel) != "virtio-serial":
        return None
    every = [*want.disks, *(Disk(s.serial, Path("/"), readonly=False) for s in want.scratch)]
    if not Layout().fits(every, 0, 0) or not poolclient.serving(cfg):
        return None
    if want.network is None:
        return 0
    return net.pool_nics(want.network)


async def _move_in(
    host_join: asyncio.Future[None] | None,
    under: str,
    sandbox_id: str,
    pids: list[int],
    *,
    jailed: bool,
    guest_mib: int,
) -> None:
    """A pooled VM's processes into the taker's host cgroup, after the taker
    itself (one RCU grace period for both, not two)."""
    if host_join is not None:
        await host_join
    await asyncio.to_thread(
        cgroup.move_into, under, sandbox_id, pids, jailed=jailed, nproc=jail.NPROC,
        guest_mib=guest_mib,
    )  # fmt: skip


def _take_pooled(cfg: Config, want: SandboxSpec) -> poolclient.Taken | None:
    nics = pool_fit(cfg, want)
    if nics is None:
        return None
    return poolclient.take(
        cfg, want.vcpus or cfg.hypervisor.vcpus, want.memory_mib or cfg.hypervisor.memory_mib, nics
    )


def choose_accel(cfg: Config) -> str:
    return accel.choose(cfg.hypervisor.accel, accel.cached_probe(cfg.root / "accel.json"))[0]


def vm_spec(
    cfg: Config,
    sid: str,
    workdir: Path,
    accel_name: str,
    *,
    vcpus: int | None = None,
    memory_mib: int | None = None,
    disks: list[Disk] | None = None,
    shares: list[Share] | None = None,
    nics: list[tuple[str, int]] | None = None,
    init: list[str] | None = None,
) -> VmSpec:
    """The VM a sandbox asks for, from the configuration and the request."""
    assets = resolve(cfg)
    vhost = cfg.network.vhost == "on" or (
        cfg.network.vhost == "auto" and os.path.exists("/dev/vhost-net")
    )
    return VmSpec(
        id=sid,
        workdir=workdir,
        kernel=assets.kernel,
        image=assets.image,
        initrd=assets.initrd,
        vcpus=vcpus or cfg.hypervisor.vcpus,
        memory_mib=memory_mib or cfg.hypervisor.memory_mib,
        accel=accel_name,
        kernel_params=cfg.hypervisor.kernel_params.split(),
        disks=disks or [],
        shares=shares or [],
        nics=[Nic(mac, fd, vhost) for mac, fd in (nics or [])],
        shared_fs=cfg.hypervisor.shared_fs,
        init=init,
        free_page_reporting=cfg.hypervisor.free_page_reporting,
        channel=choose_channel(cfg.hypervisor.channel),
        # Guest CIDs are host-global: a random one, QEMU refuses a taken one.
        vsock_cid=3 + secrets.randbelow(0x7FFFFFF0),
    )


async def ensure_template(
    cfg: Config,
    *,
    vcpus: int | None = None,
    memory_mib: int | None = None,
    nics: int = 0,
    host_dirs: bool = False,
) -> tuple[template.Template, bool]:
    """The template for sandboxes of this size (built now if missing); True if
    built. ``host_dirs``: the one with share slots (restore.layout)."""
    spec = vm_spec(
        cfg, "template", Path("/@"), choose_accel(cfg), vcpus=vcpus, memory_mib=memory_mib,
        nics=[(template_mac(i), -1) for i in range(nics)],
        shares=[Share("template", Path("/@"))] if host_dirs else [],
    )  # fmt: skip
    if why := restore.unfit(cfg, spec):
        raise TemplateError(f"no template for {why}")
    built: list[bool] = []
    t = await restore.obtain(cfg, backend_for(cfg), spec, cfg.hypervisor.boot_timeout_s, built)
    return t, bool(built)


def console_tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_bytes()[-8192:].decode(errors="replace")
    except OSError:
        return ""
    kept = [ln.strip() for ln in text.splitlines() if ln.strip()][-lines:]
    return " | ".join(kept)[-CONSOLE_TAIL:]


class Sandbox:
    def __init__(self, cfg: Config, sdir: SandboxDir, state: SandboxState) -> None:
        self.cfg = cfg
        self.dir = sdir
        self.state = state
        self.backend = backend_for(cfg)
        self.launched: Launched | None = None
        self.channel: AgentChannel | None = None
        self.boot_s: float | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._destroyed = False
        #: CIDRs of the guest's NICs (the first is the container's address).
        self.addresses: list[str] = []
        #: A clone's shares are 9p slots: the caller's tag -> the slot's tag.
        self.share_tags: dict[str, str] = {}
        #: Started for a warm pool: its QEMU runs niced until someone takes it.
        self.pooled = False
        #: A pooled sandbox's disks sit in slots named before they came: serial -> slot's.
        self.disk_serials: dict[str, str] = {}
        #: A pooled sandbox's shares, bound into its hub: the caller's tag -> guest path.
        self.hub_shares: dict[str, str] = {}
        #: Host directories it may write: the guest flushes them before it is stopped.
        self.writes_host_dirs = False
        #: A pooled sandbox's namespace holding its NICs' taps (-1: none).
        self.taps_netns_fd = -1
        self._synced = False

    @property
    def id(self) -> str:
        return self.dir.id

    # -- lifecycle ----------------------------------------------------------

    @classmethod
    async def create(
        cls,
        cfg: Config,
        spec: SandboxSpec | None = None,
        *,
        warn: Callable[[str], None] | None = None,
        host_join: asyncio.Future[None] | None = None,
    ) -> Sandbox:
        """Start a VM and wait for its agent; on any failure nothing is left behind.

        ``host_join``: the caller joining ``spec.host_cgroup`` itself, in a
        thread (its first write to a v1 cgroup.procs waits ~15-20 ms for an
        RCU grace period). A VM of its own is started only once that is done
        (its processes are born in the cgroup); a pooled VM's processes are
        moved in after it, beside the guest's first steps, and the sandbox is
        returned once they are in.

        The VM is taken from a warm pool where one fits, else a clone of a
        template where ``spec.template`` (default: ``sandbox.templates``)
        allows and the request fits one (``restore.unfit``); the template is
        built on first need. A template that is bad or fails to restore costs
        one ``warn`` line and a cold boot, never the sandbox.

        ``spec.scratch`` disks are created here (recorded in the state first,
        so gc finds them after a crash) and deleted by ``destroy``.
        """
        want = spec or SandboxSpec()
        use_template = cfg.sandbox.templates if want.template is None else want.template
        if use_template and not want.pooled:
            got = await asyncio.to_thread(_take_pooled, cfg, want)
            if got is not None:
                try:
                    return await cls._adopt(cfg, got, want, host_join)
                except CocoonError as e:  # a pooled sandbox is a shortcut, never a failure
                    (warn or _warn)(f"pooled sandbox {got.sandbox_id} failed ({e}); "
                                    "starting one from the template")  # fmt: skip
        if host_join is not None:
            await host_join
        return await cls._start(cfg, want, use_template, warn or _warn)

    @classmethod
    async def _start(
        cls, cfg: Config, want: SandboxSpec, use_template: bool, warn: Callable[[str], None]
    ) -> Sandbox:
        """A sandbox of its own: a template's clone, or a cold boot."""
        shares, network = want.shares, want.network
        accel_name = choose_accel(cfg)
        sdir = SandboxDir(cfg.root, want.sandbox_id or new_id())
        sdir.create()
        sdir.take_ownership()
        st = SandboxState(
            id=sdir.id,
            hypervisor=cfg.hypervisor.backend,
            accel=accel_name,
            annotations=dict(want.annotations),
        )
        sdir.write(st)
        sb = cls(cfg, sdir, st)
        sb.pooled = want.pooled
        sb.writes_host_dirs = any(not s.readonly for s in shares)
        if shares and cfg.hypervisor.shared_fs == "none":
            await sb.destroy()
            raise SandboxError("host directories need hypervisor.shared_fs = virtio-fs or 9p")
        attached: net.Attachment | None = None
        nics: list[tuple[str, int]] = []  # a pooled sandbox's taps
        try:
            scratch_disks = sb._make_scratch(want.scratch)
            if want.pooled and cfg.hypervisor.shared_fs != "none":
                shares = [sb._make_hub()]
            if want.pooled and want.pool_nics:
                st.network["pool_nics"] = want.pool_nics
                sdir.write(st)
                sb.taps_netns_fd, fds = net.plumb.pool_taps(want.pool_nics)
                nics = [(template_mac(i), fd) for i, fd in enumerate(fds)]
            elif network is not None:
                attached = net.attach(
                    cfg, sdir.id, network, st.network, lambda: sdir.write(st), sdir.path
                )
                sb.addresses = attached.addresses
        except BaseException:
            await sb.destroy()
            raise
        spec = vm_spec(
            cfg,
            sdir.id,
            sdir.path,
            accel_name,
            vcpus=want.vcpus,
            memory_mib=want.memory_mib,
            disks=[*want.disks, *scratch_disks],
            shares=list(shares),
            nics=nics or (list(attached.nics) if attached else []),
            init=want.init,
        )
        spec.cgroup = want.host_cgroup
        try:
            spec.jail = restore.jail_for(cfg, sdir, st)
        except BaseException:
            if attached is not None:
                attached.close_fds()
            _close_all(nics)
            await sb.destroy()
            raise
        timeout = want.boot_timeout_s or cfg.hypervisor.boot_timeout_s
        try:
            try:
                restored = use_template and await sb._restore(spec, timeout, warn)
                if not restored:
                    await sb._boot(spec, timeout)
            finally:
                if attached is not None:
                    attached.close_fds()  # QEMU has them: the taps now live as long as it does
                _close_all(nics)
            await sb._identify([n.mac for n in spec.nics] if restored else [])
            if attached is not None:
                await sb.call(attached.message, messages.Ok)
        except BaseException as e:
            qemu_said = sb._qemu_exit_reason()
            await sb.destroy()
            if qemu_said:
                raise HypervisorError(f"sandbox {sdir.id}: QEMU exited: {qemu_said}") from e
            if isinstance(e, GuestError):
                raise GuestError(f"sandbox {sdir.id} failed to boot: {e}") from e
            raise
        return sb

    async def _boot(self, spec: VmSpec, timeout_s: float) -> None:
        t0 = time.monotonic()
        deadline = t0 + timeout_s
        self.launched = self.backend.launch(spec, self._record)
        self._watch_task = asyncio.get_running_loop().create_task(self._watch_vm())
        if spec.channel == "vsock":
            self.channel = await AgentChannel.connect_vsock(
                spec.vsock_cid,
                AGENT_VSOCK_PORT,
                deadline=deadline,
                agent_timeout_s=self.cfg.hypervisor.agent_timeout_s,
            )
        else:
            self.channel = await AgentChannel.connect(
                self.launched.agent_socket,
                deadline=deadline,
                agent_timeout_s=self.cfg.hypervisor.agent_timeout_s,
            )
        await self._until_ready(self.channel.handshake(t0 + WALL_FACTOR * timeout_s), timeout_s)
        await self.launched.until_confined()
        self.boot_s = time.monotonic() - t0
        self.channel.start_keepalive(self.cfg.hypervisor.keepalive_s)
        self.state.status = "running"
        self.dir.write(self.state)

    @classmethod
    async def _adopt(
        cls,
        cfg: Config,
        got: poolclient.Taken,
        want: SandboxSpec,
        host_join: asyncio.Future[None] | None = None,
    ) -> Sandbox:
        """Take over a pooled sandbox: its owner lock and its open agent channel
        arrive as fds (the agent never sees its host change); its empty disk
        slots get this sandbox's disks; its NICs' taps (in the pool's
        namespace, whose fd arrives too) move into this sandbox's network
        namespaces, and the guest gives its NICs their MACs."""
        sdir = SandboxDir(cfg.root, got.sandbox_id)
        sdir.adopt_ownership(got.owner_fd)
        try:
            st = sdir.read()
        except BaseException:
            poolclient.close_fds([got.channel_fd, *([got.netns_fd] if got.netns_fd >= 0 else [])])
            sdir.release_ownership()  # unreadable: gc reaps it
            raise
        st.owner_pid = os.getpid()
        st.annotations.pop("cocoon.pool", None)
        st.annotations.update(want.annotations)
        sdir.write(st)
        sb = cls(cfg, sdir, st)
        sb.taps_netns_fd = got.netns_fd
        timeout = want.boot_timeout_s or cfg.hypervisor.boot_timeout_s
        moving: asyncio.Task[None] | None = None
        try:
            sb.launched = Launched(
                {k: r.pid for k, r in st.processes.items()},
                sdir.file("agent.sock"),
                sdir.file("qmp.sock"),
                sdir.file("console.log"),
            )
            for pid in sb.launched.processes.values():  # the pool ran them niced
                renice_all(pid, 0)
            if want.host_cgroup:  # the pool ran them in its cgroups: in, beside what follows
                pids = list(sb.launched.processes.values())
                moving = asyncio.get_running_loop().create_task(
                    _move_in(host_join, want.host_cgroup, sdir.id, pids, jailed=st.jail_uid != 0,
                             guest_mib=want.memory_mib or cfg.hypervisor.memory_mib)
                )  # fmt: skip
            t0 = time.monotonic()
            sb.channel = await AgentChannel.from_fd(
                got.channel_fd, agent_timeout_s=cfg.hypervisor.agent_timeout_s
            )
            sb._watch_task = asyncio.get_running_loop().create_task(sb._watch_vm())
            made = sb._make_scratch(want.scratch)
            attached = None
            if want.network is not None:
                taps = None
                if sb.taps_netns_fd >= 0:
                    path = f"/proc/{os.getpid()}/fd/{sb.taps_netns_fd}"
                    taps = net.plumb.PoolTaps(path, int(st.network.get("pool_nics") or 0))
                attached = net.attach(cfg, sdir.id, want.network, st.network,
                                      lambda: sdir.write(st), sdir.path, taps)  # fmt: skip
            sb._close_taps_netns()
            await sb._until_ready(sb.channel.handshake(t0 + WALL_FACTOR * timeout), timeout)
            if attached is not None and attached.nics:  # its NICs' MACs: the veths'
                await sb._identify([mac for mac, _ in attached.nics])
            ro = [d for d in want.disks if d.readonly]
            rw = [d for d in [*want.disks, *made] if not d.readonly]
            first_rw = Layout().ro_disks
            for slot, d in [*enumerate(ro), *((first_rw + i, d) for i, d in enumerate(rw))]:
                await sb.backend.attach_disk(sb.launched, slot, d.path, d.readonly)
                sb.disk_serials[d.serial] = slot_serial(slot)
            if want.shares:
                await sb._fill_hub(want.shares)
            sb.boot_s = time.monotonic() - t0
            sb.channel.start_keepalive(cfg.hypervisor.keepalive_s)
            st.status = "running"
            sdir.write(st)
            if attached is not None:
                await sb.call(attached.message, messages.Ok)
            if moving is not None:
                await moving
        except BaseException:
            if moving is not None:  # (a thread: it cannot be stopped, only waited for)
                with contextlib.suppress(Exception):
                    await asyncio.shield(moving)
            await sb.destroy()
            raise
        return sb

    async def _fill_hub(self, shares: Sequence[Share]) -> None:
        """Bind the caller's host directories into the hub, and mount it in the
        guest: each share is then a bind of the hub's dir (``mount``)."""
        if not self.state.hub:
            raise SandboxError("this pooled sandbox has no hub for host directories")
        path = Path(self.state.hub)
        for n, sh in enumerate(shares):
            self.hub_shares[sh.tag] = hub.attach(path, n, sh.path, sh.readonly)
        self.writes_host_dirs = any(not sh.readonly for sh in shares)
        mount = messages.Mount("9p", Layout.share_tag(0), hub.GUEST_DIR, "", [], False)
        await self.call(mount, messages.Ok)

    async def let_go(self) -> list[int]:
        """Stop owning this sandbox without ending it (a pool handing it out):
        returns the fds of its owner lock, of its open agent channel and, if
        it has NICs, of the namespace holding their taps."""
        assert self.channel is not None
        chan = await self.channel.detach()
        self.channel = None
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._watch_task
        self._destroyed = True  # this object never touches the VM again
        taps, self.taps_netns_fd = self.taps_netns_fd, -1
        return [self.dir.hand_over_ownership(), chan, *([taps] if taps >= 0 else [])]

    def _close_taps_netns(self) -> None:
        """Let go of the pool's namespace of taps (it ends once it holds none)."""
        if self.taps_netns_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.taps_netns_fd)
            self.taps_netns_fd = -1

    def reclaim(self, owner_fd: int) -> None:
        """Own again a sandbox ``let_go`` gave up that nobody took (to destroy it)."""
        self.dir.adopt_ownership(owner_fd)
        self._destroyed = False

    async def _restore(self, spec: VmSpec, timeout_s: float, warn: Callable[[str], None]) -> bool:
        """Start as a clone of the template ``spec`` fits; False: boot cold instead."""
        if restore.unfit(self.cfg, spec):
            return False
        try:
            t = await restore.obtain(self.cfg, self.backend, spec, timeout_s)
        except TemplateError as e:
            warn(f"{e}; booting without a template")
            return False
        key = t.key
        t0 = time.monotonic()
        deadline = t0 + timeout_s
        try:
            with spawning_nice(POOL_NICE if self.pooled else 0):
                self.launched = self.backend.launch(
                    restore.clone_spec(spec, t.ram, t.empty), self._record
                )
            self._watch_task = asyncio.get_running_loop().create_task(self._watch_vm())
            self.channel = await AgentChannel.connect(
                self.launched.agent_socket,
                deadline=deadline,
                agent_timeout_s=self.cfg.hypervisor.agent_timeout_s,
            )
            # Connected before the load: the agent's session never sees its
            # host leave. The hello is sent now too: QEMU hands it to the
            # guest once the load is done and it runs.
            hello = asyncio.ensure_future(self.channel.handshake(t0 + WALL_FACTOR * timeout_s))
            try:
                await self.backend.restore(self.launched, t.state, timeout_s)
            except BaseException:
                hello.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await hello
                raise
            await self._until_ready(hello, timeout_s)
            await self.launched.until_confined()
        except (CocoonError, OSError) as e:
            await self._abandon_vm()
            template.discard(self.cfg, key)
            warn(f"template {key} failed to restore ({e}); removed it, booting without one")
            return False
        self.boot_s = time.monotonic() - t0
        self.share_tags = {sh.tag: Layout.share_tag(i) for i, sh in enumerate(spec.shares)}
        self.channel.start_keepalive(self.cfg.hypervisor.keepalive_s)
        self.state.template = key
        self.state.status = "running"
        self.dir.write(self.state)
        return True

    async def _abandon_vm(self) -> None:
        """Kill a VM that failed to come up, keeping the sandbox (and its network)."""
        if self.channel is not None:
            await self.channel.close()
            self.channel = None
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._watch_task
            self._watch_task = None
        if self.launched is not None:
            await self.backend.stop(self.launched, grace_s=0.5)
            self.launched = None
        self.state.processes.clear()
        self.dir.write(self.state)

    async def _identify(self, nic_macs: list[str]) -> None:
        """Entropy, hostname, machine-id and (for a clone: ``nic_macs``, in
        slot order) NIC MACs of its own, before any user code runs in the
        guest. Sent again when a pooled sandbox with NICs is taken: its NICs
        get the taker's MACs, and the guest fresh entropy once more."""
        macs = [f"{template_mac(i)}={mac}" for i, mac in enumerate(nic_macs)]
        await self.call(
            messages.Identity(secrets.token_hex(64), self.id[:63], secrets.token_hex(16), macs),
            messages.Ok,
        )

    async def _until_ready(self, hello: Awaitable[M], budget_s: float) -> M:
        """Wait for the agent's hello, judging the guest by its progress.

        On a loaded host (TCG starts sharing two cores) wall time says little.
        The boot's clock runs with the CPU time QEMU got, plus the wall time
        that passed while the host had a core to spare (so a guest that
        idles instead of answering still fails in ``budget_s``); it fails when
        that clock passes ``budget_s``, or after WALL_FACTOR times that in wall
        time whatever happened.
        """
        assert self.launched is not None
        qemu = self.launched.processes["qemu"]
        cpus = os.cpu_count() or 1
        last_cpu = cpu_seconds(qemu) or 0.0
        last = time.monotonic()
        progress = 0.0
        task = asyncio.ensure_future(hello)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=PROGRESS_POLL_S)
                if done:
                    return task.result()
                now, cpu = time.monotonic(), cpu_seconds(qemu) or last_cpu
                progress += cpu - last_cpu
                if runnable() <= cpus:
                    progress += max(0.0, (now - last) - (cpu - last_cpu))
                last, last_cpu = now, cpu
                if progress > budget_s:
                    if self.channel is not None:
                        self.channel.session.close("the boot made no progress")
                    raise GuestError(f"guest agent did not answer boot within {budget_s:g} s")
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    def _make_hub(self) -> Share:
        """A pooled sandbox's hub, its first share (recorded first: gc removes it)."""
        path = hub.hub_dir(self.cfg.root, self.id)
        self.state.hub = str(path)
        self.dir.write(self.state)
        hub.create(path)
        return Share(HUB_TAG, path, propagate=True)

    def _make_scratch(self, scratch: Sequence[ScratchDisk]) -> list[Disk]:
        if not scratch:
            return []
        d = scratch_files.scratch_dir(self.cfg.data, self.id)
        self.state.scratch_dir = str(d)
        self.dir.write(self.state)  # intent before the files: gc removes them after a crash
        scratch_files.make_dir(d, self.cfg.root)
        out = []
        for i, s in enumerate(scratch):
            path = d / f"{i}{scratch_files.IMAGE_SUFFIX}"
            scratch_files.create(path, s.size_bytes)
            out.append(Disk(s.serial, path, readonly=False))
        return out

    def _qemu_exit_reason(self) -> str:
        """QEMU's own last words if it died (bad option, missing file), else ""."""
        if self.launched is None or not self.backend.exited(self.launched.processes["qemu"]):
            return ""
        log = self.dir.file("qemu.log")
        with contextlib.suppress(OSError):
            lines = log.read_text(errors="replace").strip().splitlines()
            if lines:
                return lines[-1][:300]
        return ""

    def _record(self, name: str, pid: int) -> None:
        self.state.processes[name] = ProcessRecord(pid, start_time(pid))
        self.dir.write(self.state)

    async def _watch_vm(self) -> None:
        """Turn the VM process's death into an immediate, explained channel failure."""
        assert self.launched is not None
        qemu = self.launched.processes["qemu"]
        while not self.backend.exited(qemu):
            await asyncio.sleep(0.05)
        if self.channel is not None and not self._destroyed and not self._synced:
            tail = console_tail(self.launched.console_log)
            self.channel.session.close("the VM exited" + (f" (console: {tail})" if tail else ""))

    async def sync_host_dirs(self) -> None:
        """Have the guest sync and power off if it may hold writes to host
        directories (once): after this, the host sees all of them. Any other
        guest is stopped at once by ``destroy``: its disks are read-only or
        deleted with it, and right after a container's exit the guest is busy
        tearing its namespaces down (~60 ms under TCG before the agent would
        even read the request)."""
        if self._synced or not self.writes_host_dirs or self.channel is None:
            return
        self._synced = True  # the VM's exit that follows is ours, not news
        if self.channel.session.closed is None:
            left = "what the guest had not yet synced to host directories"
            with teardown_step(log, f"syncing sandbox {self.id}", left, level=logging.INFO):
                await self.channel.call(messages.Shutdown(), messages.Ok, timeout_s=2.0)

    async def destroy(self) -> None:
        """Stop the VM and remove every trace; safe to call twice or after a crash."""
        if self._destroyed:
            return
        self._destroyed = True
        left = "its state.json saying it runs, until gc finds its processes gone"
        with teardown_step(log, f"marking sandbox {self.id} stopping", left, level=logging.INFO):
            self.state.status = "stopping"
            self.dir.write(self.state)
        if self.channel is not None:
            await self.sync_host_dirs()
            await self.channel.close()
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._watch_task
        if self.launched is not None:
            await self.backend.stop(self.launched, grace_s=3.0)
        self._close_taps_netns()
        try:
            release_host(self.state, self.cfg.root)
            remove_dir(self.dir.path)
        finally:
            self.dir.release_ownership()

    async def __aenter__(self) -> Sandbox:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.destroy()

    # -- calls --------------------------------------------------------------

    async def call(
        self,
        msg: messages.Message,
        expect: type[M],
        *,
        timeout_s: float | None | Timeout = Timeout.AGENT,
    ) -> M:
        """Call the agent; a GuestError tears the sandbox down before it propagates."""
        if self.channel is None or self._destroyed:
            raise SandboxError(f"sandbox {self.id} is not running")
        try:
            return await self.channel.call(msg, expect, timeout_s=timeout_s)
        except GuestError as e:
            if self._destroyed:  # we are stopping it ourselves: not the guest's doing
                raise SandboxError(f"sandbox {self.id} is shutting down") from None
            died = await self._vm_death()
            await self.destroy()
            if died:
                why = f"sandbox {self.id}: the VM exited unexpectedly ({died}); torn down"
                raise GuestError(why) from e
            raise GuestError(f"sandbox {self.id}: {e}; the sandbox was torn down") from e

    async def _vm_death(self) -> str:
        """Why QEMU is gone, if it is (a channel reset can beat the watcher to it)."""
        if self.launched is None:
            return ""
        qemu = self.launched.processes["qemu"]
        for _ in range(20):  # the socket may break a moment before the exit is reaped
            if self.backend.exited(qemu):
                break
            await asyncio.sleep(0.005)
        else:
            return ""
        how = self.backend.exit_reason(qemu) or "QEMU exited"
        if how.startswith("killed"):  # from outside: the guest's last words are beside the point
            return f"QEMU was {how}"
        tail = self._qemu_exit_reason() or console_tail(self.launched.console_log)
        return f"QEMU {how}" + (f"; console: {tail}" if tail else "")

    async def ping(self) -> None:
        await self.call(messages.Ping(), messages.Ok)

    async def details(self) -> messages.GuestDetailsReply:
        return await self.call(messages.GuestDetails(), messages.GuestDetailsReply)

    async def mount(
        self,
        kind: str,
        source: str,
        target: str,
        *,
        fstype: str = "",
        options: Sequence[str] = (),
        readonly: bool = False,
    ) -> None:
        if kind in ("virtiofs", "9p") and source in self.hub_shares:
            kind, source, fstype, options = "bind", self.hub_shares[source], "", ()
        if kind == "block" and source in self.disk_serials:
            source = self.disk_serials[source]  # a pooled sandbox's disk slot
        if kind in ("virtiofs", "9p") and source in self.share_tags:
            kind, source = "9p", self.share_tags[source]  # a clone's share slot
        await self.call(
            messages.Mount(kind, source, target, fstype, list(options), readonly), messages.Ok
        )

    async def _launch(
        self,
        container_id: str,
        exec_id: str,
        make: Callable[[messages.StdioSpec], messages.Message],
        stdin: bool,
        tty: bool,
        rows: int,
        cols: int,
    ) -> Process:
        """Open the process's streams, send the request ``make`` builds, wrap the result.

        Streams are registered before the request goes out (the host refuses
        DATA on streams it does not know) and dropped if the process never started.
        """
        assert self.channel is not None
        stdio, sin, sout, serr = self.channel.open_stdio(stdin, tty, rows, cols)
        try:
            reply = await self.call(
                make(stdio),
                messages.ProcessStarted,
                timeout_s=max(60.0, self.cfg.hypervisor.agent_timeout_s),
            )
        except BaseException:
            for s in (sout, serr):
                if s is not None and self.channel is not None:
                    self.channel.session.close_in(s.chan)
            raise
        return Process(self, container_id, exec_id, reply.pid, sin, sout, serr)

    async def create_container(
        self,
        container_id: str,
        rootfs: str,
        spec: dict[str, Any],
        *,
        stdin: bool = False,
        tty: bool = False,
        rows: int = 24,
        cols: int = 80,
    ) -> Process:
        """crun create in the guest; the container's init waits for ``start_container``.
        A seccomp profile is compiled here, not by the guest's crun (oci/seccomp.py)."""
        spec = seccomp.compiled(spec, self.cfg.data / "seccomp")
        body = _fits(json.dumps(spec), messages.MAX_SPEC, "the container's OCI spec")
        return await self._launch(
            container_id,
            "",
            lambda stdio: messages.CreateContainer(container_id, rootfs, body, stdio),
            stdin, tty, rows, cols,
        )  # fmt: skip

    async def start_container(self, container_id: str) -> None:
        await self.call(messages.StartContainer(container_id), messages.Ok)

    async def exec(
        self,
        container_id: str,
        exec_id: str,
        process: dict[str, Any],
        *,
        stdin: bool = False,
        tty: bool = False,
        rows: int = 24,
        cols: int = 80,
    ) -> Process:
        """A further process in a running container (crun exec in the guest)."""
        body = _fits(json.dumps(process), messages.MAX_STR, "the process spec")
        return await self._launch(
            container_id,
            exec_id,
            lambda stdio: messages.ExecProcess(container_id, exec_id, body, stdio),
            stdin, tty, rows, cols,
        )  # fmt: skip

    async def delete_container(self, container_id: str) -> None:
        await self.call(messages.DeleteContainer(container_id), messages.Ok)

    async def stats(self, container_id: str) -> messages.StatsReply:
        return await self.call(messages.Stats(container_id), messages.StatsReply)

    async def list_processes(self, container_id: str) -> list[int]:
        return (await self.call(messages.ListProcesses(container_id), messages.ProcessList)).pids

    def release(self, proc: Process) -> None:
        """Forget a finished process's output streams: a long-lived sandbox
        running many execs would otherwise hit the session's stream limit."""
        if self.channel is not None:
            for s in (proc.stdout, proc.stderr):
                if s is not None:
                    self.channel.session.close_in(s.chan)

    async def top(self, container_id: str) -> list[messages.ProcessInfo]:
        return (await self.call(messages.Top(container_id), messages.TopReply)).processes


def _close_all(nics: list[tuple[str, int]]) -> None:
    for _, fd in nics:
        with contextlib.suppress(OSError):
            os.close(fd)
    nics.clear()


def _fits(body: str, limit: int, what: str) -> str:
    """A request body the agent will take: it refuses a larger one as a protocol
    violation (and past a frame's size it cannot even be sent)."""
    if len(body) > limit:
        raise SandboxError(f"{what} is {len(body)} B of JSON, more than the {limit} B allowed")
    return body
