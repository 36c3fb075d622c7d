"""The QEMU backend: one qemu-system process per VM, one virtiofsd per share."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from cocoon.config import HypervisorConfig
from cocoon.errors import HypervisorError
from cocoon.hypervisor import cgroup
from cocoon.hypervisor.base import (
    Launched,
    Nic,
    RecordFn,
    Share,
    TemplateMemory,
    VmSpec,
    file_stamp,
)
from cocoon.hypervisor.jail import NPROC, SECCOMP, Plan, give, under_tini
from cocoon.hypervisor.qemu import cmdline, sharejail
from cocoon.hypervisor.qemu.qmp import Qmp
from cocoon.hypervisor.sealed import template_ram_fd
from cocoon.util.proc import alive, start_time

SOCKET_WAIT_S = 5.0
#: A VMM's PATH when its caller has none.
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: fdset ids of the disks given to a running VM's slots (QMP add-fd).
FDSET_BASE = 100
_IGNORE_SHARED = {"capabilities": [{"capability": "x-ignore-shared", "state": True}]}
#: What virtfs-proxy-helper needs to serve the guest's files with their
#: owners (it chroots into the share itself): nothing else survives.
PROXY_CAPS = {"chown", "dac_override", "dac_read_search", "fowner", "fsetid", "setgid", "setuid",
              "mknod", "sys_chroot"}  # fmt: skip


def proxy_launch(share: Share, program: list[str]) -> tuple[list[str], Callable[[], None]]:
    """How the file server ``program`` of a jailed VM's 9p ``share`` is
    started: (argv, the jail its child enters before the exec). tini, then
    it, in a pid namespace whose pid 1 it is; network, IPC and UTS namespaces
    of its own (its mount namespace always is); only PROXY_CAPS in its
    bounding set and sharejail's seccomp filter."""
    setup = sharejail.child_setup(str(share.path), readonly=share.readonly, isolate=True,
                                  slave=share.propagate, pid_ns=True, seccomp=True,
                                  caps=PROXY_CAPS)  # fmt: skip
    return under_tini(program), setup


def host_tsc_khz() -> int | None:
    """The TSC frequency the guest sees under TCG is the host's.

    Passing it as ``tsc_early_khz`` skips PIT calibration, which hangs 10-25 %
    of TCG boots on these machines (MACHINE-NOTES).
    """
    try:
        return int(Path("/sys/devices/system/cpu/cpu0/tsc_freq_khz").read_text())
    except (OSError, ValueError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return int(float(line.split(":")[1]) * 1000)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _opened(stack: contextlib.ExitStack, path: str, flags: int) -> int:
    try:
        fd = os.open(path, flags | os.O_CLOEXEC)
    except OSError as e:
        raise HypervisorError(f"cannot open {path} for a jailed QEMU: {e.strerror}") from e
    stack.callback(os.close, fd)
    return fd


def _confine(dirs: list[str], pids: list[int]) -> concurrent.futures.Future[None]:
    """Move a jailed VMM (tini and QEMU) into its sandbox's cgroups, in a
    thread, beside its start.

    Not in the jail's child before its exec: on a cgroup v1 host each move
    waits for an RCU grace period (~8 ms here, one per hierarchy), and done
    there it delayed every start by that much. What QEMU allocates before the
    move (its libraries, the first of its heap) stays charged where it was,
    a few MiB: v1 moves no charges. No guest code of a tenant runs before the
    sandbox waits for this to be done (``Launched.confined``)."""
    done: concurrent.futures.Future[None] = concurrent.futures.Future()

    def run() -> None:
        try:
            cgroup.enter(dirs, pids)
        except BaseException as e:  # noqa: BLE001 - handed to whoever waits
            done.set_exception(e)
        else:
            done.set_result(None)

    threading.Thread(target=run, name="cgroup-enter", daemon=True).start()
    return done


def _mem_fd(spec: VmSpec) -> int:
    t = spec.template
    if t is None or not str(t.path).startswith("/proc/self/fd/"):
        return -1
    return int(str(t.path).rsplit("/", 1)[1])


def kernel_cmdline(spec: VmSpec, machine: str) -> str:
    params = [
        "console=ttyS0",
        "root=/dev/vda",
        "rootfstype=erofs",
        "ro",
        # A guest panic must end QEMU (with -no-reboot), not hang or reboot.
        "panic=-1",
        "reboot=t",
        "quiet",
        "8250.nr_uarts=1",
        "cryptomgr.notests",
        "random.trust_cpu=on",
    ]
    if machine == "microvm":
        params.append("pci=off")
    if spec.accel == "tcg":
        khz = host_tsc_khz()
        if khz:
            params += [f"tsc_early_khz={khz}", "tsc=reliable"]
    if spec.channel == "vsock":
        params.append("cocoon.channel=vsock")
    if spec.init:
        params.append(f"init={spec.init[0]}")
    params += spec.kernel_params
    if spec.init and len(spec.init) > 1:
        params.append("--")
        params += [f'"{a}"' if " " in a else a for a in spec.init[1:]]
    return " ".join(params)


class QemuBackend:
    name = "qemu"

    def __init__(self, cfg: HypervisorConfig) -> None:
        self.cfg = cfg
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        #: A jailed QEMU's pid -> its tini's, the child we started and reap.
        self._via: dict[int, int] = {}

    def machine_identity(self, spec: VmSpec) -> str:
        """Everything a saved VM of ``spec`` depends on: its command line with
        the per-VM paths and fds left out, and the identity of the QEMU binary
        and of every file the guest booted from (a template's key hashes this)."""
        wd = Path("/@")
        norm = dataclasses.replace(
            spec,
            id="@",
            workdir=wd,
            nics=[Nic(n.mac, -1, n.vhost) for n in spec.nics],
            template=TemplateMemory(wd / "ram", True, wd / "empty"),
        )
        argv = cmdline.build(
            norm,
            qemu=self.cfg.qemu_binary,
            machine=self.cfg.machine,
            cmdline=kernel_cmdline(norm, self.cfg.machine),
            sockets={"qmp": wd / "qmp.sock", "agent": wd / "agent.sock"},
            console_log=wd / "console.log",
            tb_size_mib=self.cfg.tcg_tb_size_mib,
            tcg_cpu=self.cfg.tcg_cpu,
        )
        stamps = [f"{f}:{file_stamp(f)}" for f in self.machine_files(spec)]
        return "\0".join([*argv, *stamps])

    def machine_files(self, spec: VmSpec) -> list[str]:
        """The files a saved VM of ``spec`` was made from: QEMU, kernel, image."""
        files = [shutil.which(self.cfg.qemu_binary) or self.cfg.qemu_binary,
                 str(spec.kernel), str(spec.image)]  # fmt: skip
        return files + ([str(spec.initrd)] if spec.initrd is not None else [])

    def launch(self, spec: VmSpec, record: RecordFn) -> Launched:
        wd = spec.workdir
        sockets = {"qmp": wd / "qmp.sock", "agent": wd / "agent.sock"}
        console = wd / "console.log"
        procs: dict[str, int] = {}
        try:
            if spec.shared_fs == "virtio-fs" and spec.layout is None:
                for i, share in enumerate(spec.shares):
                    sock = wd / f"virtiofsd{i}.sock"
                    sockets[f"virtiofsd{i}"] = sock
                    argv = [
                        self.cfg.virtiofsd,
                        f"--socket-path={sock}",
                        "-o", f"source={share.path}",
                        "-o", "cache=auto",
                        # Its own mount, pid and network namespaces, pivoted
                        # into the share, under its built-in seccomp filter.
                        "-o", "sandbox=namespace",
                        # Of the capabilities it keeps to serve the guest's
                        # files with their owners, not file capabilities: a
                        # guest must not mint privileged binaries on the host.
                        "-o", "modcaps=-setfcap",
                        "-o", "log_level=err",
                    ]  # fmt: skip
                    ro = None
                    if share.readonly:
                        # The guest is untrusted and virtiofsd has no read-only
                        # option: the host kernel refuses the writes instead.
                        ro = sharejail.child_setup(str(share.path), readonly=True)
                    pid = self._spawn(argv, wd / f"virtiofsd{i}.log", setup=ro)
                    procs[f"virtiofsd{i}"] = pid
                    record(f"virtiofsd{i}", pid)
                for i in range(len(spec.shares)):
                    self._wait_socket(
                        sockets[f"virtiofsd{i}"], procs[f"virtiofsd{i}"], f"virtiofsd{i}"
                    )
            qemu = shutil.which(self.cfg.qemu_binary) or self.cfg.qemu_binary
            with contextlib.ExitStack() as opened:
                fds: dict[str, int] = {}
                jail = None
                proxies: dict[int, int] = {}
                if (
                    spec.jail is not None
                    and spec.shares
                    and (spec.layout is not None or spec.shared_fs == "9p")
                ):
                    proxies = self._proxies(spec, record, procs, fds, opened)
                if spec.jail is not None:
                    spec, jail = self.jail_plan(spec, sockets, console, fds, opened)
                argv = cmdline.build(
                    spec,
                    qemu=qemu,
                    machine=self.cfg.machine,
                    cmdline=kernel_cmdline(spec, self.cfg.machine),
                    sockets=sockets,
                    console_log=console,
                    tb_size_mib=self.cfg.tcg_tb_size_mib,
                    tcg_cpu=self.cfg.tcg_cpu,
                    socket_fds=fds,
                )
                (wd / "qemu.argv").write_text("\0".join(argv))
                passed = (
                    [n.fd for n in spec.nics]
                    + [n.vhost_fd for n in spec.nics if n.vhost_fd >= 0]
                    + list(fds.values())
                )
                setup = None
                if jail is not None:
                    argv = jail.argv([*argv, "-sandbox", SECCOMP])
                    setup = jail.child_setup()
                    passed += [fd for fd in [_mem_fd(spec)] if fd >= 0]
                with _huge_pages(spec.accel != "tcg"):
                    pid = self._spawn(argv, wd / "qemu.log", pass_fds=passed, setup=setup)
                procs["qemu"] = pid
                record("qemu", pid)
            confined = None
            if jail is not None:
                # The host tracks QEMU itself (CPU time, renice, kill) and
                # keeps tini, its parent outside its pid namespace, as "jail".
                procs["jail"] = pid
                record("jail", pid)
                self._record_exec(procs, record, "qemu", pid, qemu, wd / "qemu.log", "jailed QEMU")
                if jail.cgroups:
                    confined = _confine(jail.cgroups, [pid, procs["qemu"]])
            else:
                self._wait_socket(sockets["qmp"], pid, "QEMU")
            for i, tini in proxies.items():  # started before QEMU, so up by now
                self._record_exec(procs, record, f"9pproxy{i}", tini, self.cfg.virtfs_proxy_helper,
                                  wd / f"9pproxy{i}.log", f"9p file server {i}")  # fmt: skip
        except BaseException:
            for pid in procs.values():
                self._kill(pid)
            raise
        return Launched(procs, sockets["agent"], sockets["qmp"], console, confined)

    def jail_plan(
        self,
        spec: VmSpec,
        sockets: dict[str, Path],
        console: Path,
        fds: dict[str, int],
        opened: contextlib.ExitStack,
    ) -> tuple[VmSpec, Plan]:
        """What a jailed QEMU is given instead of opening it: its listening
        sockets, vhost devices and template RAM as fds; its files bound at
        their own paths in a root of their own (hypervisor.jail)."""
        jail = spec.jail
        assert jail is not None
        wd = spec.workdir
        (wd / "jail").mkdir(mode=0o755, exist_ok=True)
        plan = Plan(jail.uid, jail.gid, wd / "jail", kvm=spec.accel == "kvm")
        plan.cgroups = [str(p) for p in cgroup.create(spec.id, spec.memory_mib, NPROC, spec.cgroup)]
        for name in ("qmp", "agent"):
            if name == "agent" and spec.channel == "vsock":
                continue
            s = opened.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
            sockets[name].unlink(missing_ok=True)
            s.bind(str(sockets[name]))
            s.listen(8)
            fds[name] = s.fileno()
        if spec.channel == "vsock":
            fds["vsock"] = _opened(opened, "/dev/vhost-vsock", os.O_RDWR)
        for name, path in sockets.items():  # virtiofsd is up: QEMU gets a connection
            if name.startswith("virtiofsd"):
                s = opened.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
                s.connect(str(path))
                fds[name] = s.fileno()
        console.touch(mode=0o600)
        give(console, jail)  # the guest's console, written by QEMU
        plan.rw.append(str(console))
        plan.ro += [str(spec.kernel), str(spec.image)]
        if spec.initrd is not None:
            plan.ro.append(str(spec.initrd))
        for d in spec.disks:
            if not d.readonly:
                give(d.path, jail)
            (plan.ro if d.readonly else plan.rw).append(str(d.path))
        nics = []
        for n in spec.nics:
            vfd = _opened(opened, "/dev/vhost-net", os.O_RDWR) if n.vhost else -1
            nics.append(dataclasses.replace(n, vhost_fd=vfd))
        spec = dataclasses.replace(spec, nics=nics)
        t = spec.template
        if t is not None:
            plan.ro.append(str(t.empty_dir))
            if t.saving:  # the template's builder writes the RAM file, nothing else
                t.path.touch(mode=0o600)
                give(t.path, jail)
                plan.rw.append(str(t.path))
            else:  # a clone maps a sealed copy: it can write no page of anyone's
                mem = template_ram_fd(jail.state_root, t.path)
                opened.callback(os.close, mem)
                spec = dataclasses.replace(
                    spec, template=dataclasses.replace(t, path=Path(f"/proc/self/fd/{mem}"))
                )
        return spec, plan

    def _proxies(
        self,
        spec: VmSpec,
        record: RecordFn,
        procs: dict[str, int],
        fds: dict[str, int],
        opened: contextlib.ExitStack,
    ) -> dict[int, int]:
        """One virtfs-proxy-helper per 9p share of a jailed VM: it does the
        file access QEMU no longer can, over a socketpair (QEMU's end goes in
        ``fds``), as root (the guest's files keep their owners on the host)
        but jailed (sharejail.child_setup): own mount, network, IPC, UTS and pid
        namespaces, the share bound nosuid and nodev (and read-only for a
        read-only share: QEMU's readonly=on alone is a request from the
        process the jail assumes compromised), only PROXY_CAPS in its bounding
        set, no_new_privs, seccomp; it chroots into the share itself.

        Each is recorded as ``9pjail<i>``, its tini (our child) until the
        helper's exec: share index -> tini's pid."""
        helper = self.cfg.virtfs_proxy_helper
        if not os.access(helper, os.X_OK):
            raise HypervisorError(f"{helper} missing: a jailed VM's 9p shares need it "
                                  "(apt-get install qemu-system-common)")  # fmt: skip
        tinis: dict[int, int] = {}
        for i, share in enumerate(spec.shares):
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            ours = opened.enter_context(a)
            theirs = opened.enter_context(b)
            argv, setup = proxy_launch(share, [helper, "-n", "-f", str(theirs.fileno()),
                                               "-p", str(share.path)])  # fmt: skip
            pid = self._spawn(argv, spec.workdir / f"9pproxy{i}.log", pass_fds=[theirs.fileno()],
                              setup=setup)  # fmt: skip
            procs[f"9pjail{i}"] = tinis[i] = pid
            record(f"9pjail{i}", pid)
            fds[f"9p{i}"] = ours.fileno()
        return tinis

    def _record_exec(
        self,
        procs: dict[str, int],
        record: RecordFn,
        name: str,
        tini: int,
        program: str,
        log: Path,
        what: str,
    ) -> None:
        """Record as ``name`` the process ``tini`` (our child) forks into its
        pid namespace, once it is ``program``: the host tracks it itself (CPU
        time, renice, kill) and reaps it through its tini."""
        procs[name] = pid = self._wait_exec(tini, program, log, what)
        record(name, pid)
        self._via[pid] = tini

    def _wait_exec(self, pid: int, program: str, log: Path, what: str) -> int:
        """Until the launcher's child (tini's, in the new pid namespace) is
        ``program``; its host pid."""
        deadline = time.monotonic() + SOCKET_WAIT_S
        real = os.path.realpath(program)
        while True:
            with contextlib.suppress(OSError, ValueError):
                kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
                if kids and os.readlink(f"/proc/{kids[0]}/exe") == real:
                    return int(kids[0])
            if self._exited(pid):
                tail = ""
                with contextlib.suppress(OSError, IndexError):
                    tail = log.read_text(errors="replace").strip().splitlines()[-1]
                raise HypervisorError(f"{what} exited at start: {tail[:300] or 'no output'}")
            if time.monotonic() > deadline:
                raise HypervisorError(f"{what} did not start within {SOCKET_WAIT_S:g} s")
            time.sleep(0.002)

    def _spawn(
        self,
        argv: list[str],
        log: Path,
        pass_fds: list[int] | None = None,
        setup: Callable[[], None] | None = None,
    ) -> int:
        """Start ``argv`` in a session of its own, output to ``log``;
        ``setup`` (a jail) runs in the child before the exec.

        With nothing of the caller's environment but ``PATH``: QEMU and the
        file servers need none of it, and the jail treats them as the
        guest's first foothold on the host, which must not find the user's
        tokens and credentials (a registry password, a cloud key) there."""
        env = {"PATH": os.environ.get("PATH", DEFAULT_PATH)}
        with open(log, "wb") as out:
            try:
                p = subprocess.Popen(
                    argv,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    pass_fds=pass_fds or (),
                    preexec_fn=setup,
                )
            except FileNotFoundError:
                raise HypervisorError(f"{argv[0]} not found: run `cocoon check`") from None
        self._children[p.pid] = p
        return p.pid

    def _exited(self, pid: int) -> bool:
        p = self._children.get(pid)
        if p is not None:
            return p.poll() is not None
        return not alive(pid, None)

    def _wait_socket(self, path: Path, pid: int, what: str) -> None:
        deadline = time.monotonic() + SOCKET_WAIT_S
        while not path.exists():
            if self._exited(pid):
                log = path.parent / ("qemu.log" if what == "QEMU" else f"{what}.log")
                tail = ""
                with contextlib.suppress(OSError):
                    tail = log.read_text(errors="replace").strip().splitlines()[-1][:300]
                raise HypervisorError(f"{what} exited at start: {tail or 'no output'}")
            if time.monotonic() > deadline:
                raise HypervisorError(
                    f"{what} did not create {path.name} within {SOCKET_WAIT_S:g} s"
                )
            time.sleep(0.002)

    async def save(self, launched: Launched, state: Path, timeout_s: float) -> None:
        """Write the device state of a template VM to ``state``; its RAM is
        already in the template's memory file (mapped shared), so with
        x-ignore-shared no page goes through the stream. QEMU stops the guest
        at the end and stays stopped."""
        q = await Qmp.connect(launched.control_socket)
        try:
            await q.execute("migrate-set-capabilities", _IGNORE_SHARED)
            # An fd, not exec: a QEMU under seccomp's spawn=deny cannot run cat.
            fd = os.open(state, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                await q.execute("getfd", {"fdname": "tplstate"}, fds=[fd])
            finally:
                os.close(fd)
            await q.execute("migrate", {"uri": "fd:tplstate"})
            await self._migration_done(q, launched, timeout_s, "saving the template")
        finally:
            q.close()

    async def restore(self, launched: Launched, state: Path, timeout_s: float) -> None:
        """Load ``state`` into a VM started with ``-incoming defer`` over its
        template's RAM, and let it run.

        The commands go at once, without waiting for each reply: QMP's
        socket exists before QEMU's main loop runs, so they are there when it
        does. QEMU starts the guest itself at the end of the load (no ``-S``)."""
        fd = os.open(state, os.O_RDONLY | os.O_CLOEXEC)
        q = None
        try:
            try:
                q, _ = await Qmp.pipelined(launched.control_socket, [
                    ("migrate-set-capabilities", _IGNORE_SHARED, []),
                    ("getfd", {"fdname": "tplstate"}, [fd]),
                    ("migrate-incoming", {"uri": "fd:tplstate"}, []),
                ], timeout_s=timeout_s)  # fmt: skip
            finally:
                os.close(fd)
            deadline = time.monotonic() + timeout_s
            while True:
                status = (await q.execute("query-status"))["status"]
                if status == "running":
                    return
                if status in ("paused", "postmigrate", "prelaunch"):
                    await q.execute("cont")
                    return
                if status != "inmigrate":
                    raise HypervisorError(f"restoring the template left the VM {status}")
                if time.monotonic() > deadline:
                    raise HypervisorError(f"restoring the template took over {timeout_s:g} s")
                await asyncio.sleep(0.001)
        except HypervisorError as e:
            if self._exited(launched.processes["qemu"]):
                tail = ""
                with contextlib.suppress(OSError):
                    log = launched.control_socket.parent / "qemu.log"
                    tail = log.read_text(errors="replace").strip().splitlines()[-1][:300]
                raise HypervisorError(f"QEMU exited while restoring: {tail or e}") from e
            raise
        finally:
            if q is not None:
                q.close()

    async def attach_disk(self, launched: Launched, slot: int, path: Path, readonly: bool) -> None:
        """Give a running VM's empty disk slot ``path`` as its backing file.

        The guest never read the slot (it was empty when the VM became a pooled
        sandbox), so nothing it cached is stale; it keeps the slot's capacity.
        """
        node = f"disk{slot}"
        q = await Qmp.connect(launched.control_socket)
        try:
            # As an fd: a jailed QEMU could not open the path (nor see it).
            fd = os.open(path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
            try:
                added = await q.execute("add-fd", {"fdset-id": FDSET_BASE + slot}, fds=[fd])
            finally:
                os.close(fd)
            fdset = f"/dev/fdset/{added['fdset-id']}"
            new = {"driver": "file", "node-name": f"{node}-att", "filename": fdset,
                   "read-only": readonly}  # fmt: skip
            await q.execute("blockdev-add", new)
            await q.execute("blockdev-reopen", {"options": [
                {"driver": "raw", "node-name": node, "file": f"{node}-att", "read-only": readonly}
            ]})  # fmt: skip
            await q.execute("blockdev-del", {"node-name": f"{node}-file"})
        finally:
            q.close()

    async def _migration_done(
        self, q: Qmp, launched: Launched, timeout_s: float, what: str
    ) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            info = await q.execute("query-migrate")
            status = info.get("status", "")
            if status == "completed":
                return
            if status in ("failed", "cancelled"):
                raise HypervisorError(f"{what}: {info.get('error-desc', status)}")
            if time.monotonic() > deadline:
                raise HypervisorError(f"{what} took over {timeout_s:g} s")
            await asyncio.sleep(0.005)

    async def stop(self, launched: Launched, grace_s: float) -> None:
        qemu = launched.processes.get("qemu")
        if qemu is not None and not self._exited(qemu):
            # No monitor yet, or none answering (a start stopped early): QEMU
            # ends on SIGTERM as on `quit`, with no grace to wait out.
            if not await self._quit(launched.control_socket):
                self._terminate(qemu)
            await self._wait_gone([qemu], grace_s)
        # virtiofsd exits once QEMU hangs up; give it a moment, then insist.
        await self._wait_gone(list(launched.processes.values()), 1.0)
        for pid in launched.processes.values():
            self._kill(pid)

    async def _wait_gone(self, pids: list[int], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while any(not self._exited(p) for p in pids) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    @staticmethod
    async def _quit(control: Path) -> bool:
        """Whether QEMU's monitor took a `quit`."""
        if not control.exists():
            return False
        try:
            q = await Qmp.connect(control, timeout_s=1.0)
        except Exception:
            return False
        try:
            await q.execute("quit", timeout_s=1.0)
            return True
        except Exception:
            return False
        finally:
            q.close()

    def _popen(self, pid: int) -> subprocess.Popen[bytes] | None:
        """The child we started for ``pid`` (a jailed QEMU's is its tini)."""
        return self._children.get(pid) or self._children.get(self._via.get(pid, -1))

    def _terminate(self, pid: int) -> None:
        """SIGTERM to a VMM we started (a jailed one's tini passes it on).
        Another process's is left to the grace and ``_kill``: only a
        child's pid cannot have been reused."""
        p = self._popen(pid)
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGTERM)

    def _kill(self, pid: int) -> None:
        p = self._children.pop(pid, None)
        if p is not None:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=5)
            return
        st = start_time(pid)
        if st is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def child(self, pid: int) -> subprocess.Popen[bytes] | None:
        """Our Popen of ``pid`` if we started it: whoever keeps it must reap it."""
        return self._children.get(pid)

    def exited(self, pid: int) -> bool:
        return self._exited(pid)

    def exit_reason(self, pid: int) -> str:
        """How a child we started ended ("" if running or not ours): for the one
        line that tells a user their VM was killed rather than their code failing.
        A jailed QEMU's end is its tini's exit status (128 + N: signal N)."""
        p = self._popen(pid)
        if p is None or p.poll() is None:
            return ""
        code = p.returncode
        if pid in self._via and code > 128:
            code = 128 - code
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            return f"killed by {name}"
        return f"exit status {code}"


PR_SET_THP_DISABLE = 41


@contextlib.contextmanager
def _huge_pages(allowed: bool) -> Iterator[None]:
    """Processes started in the block may use transparent huge pages or not
    (PR_SET_THP_DISABLE: inherited by children, kept across exec; this
    process's own setting is put back after).

    Under TCG QEMU asks huge pages for its translation cache, and its BIOS
    ROM block is one: a clone's cache (~28 MiB used) took 30 MiB in whole
    2 MiB pages and the 64 KiB ROM a zeroed 2 MiB page, 3.4 MiB of PSS per
    clone in all, measured, with no change in start time or in a CPU-bound
    container's run time. Under KVM they stay on: an anonymous guest RAM (a
    cold boot's) in huge pages costs the guest fewer nested page walks."""
    if allowed:
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0) != 0:  # pre-3.15 kernels: no such knob
        yield
        return
    try:
        yield
    finally:
        libc.prctl(PR_SET_THP_DISABLE, 0, 0, 0, 0)
