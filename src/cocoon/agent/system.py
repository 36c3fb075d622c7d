"""Guest-wide facts and actions: clock, mounts, details, cgroup and net stats."""

from __future__ import annotations

import contextlib
import os
import time

from cocoon.agent.session import RemoteError
from cocoon.protocol import messages

CGROUP_ROOT = "/sys/fs/cgroup"
#: The highest uid/gid: (uid_t)-1 means "unchanged" to the kernel.
MAX_ID = 0xFFFFFFFE
CONTAINERS_CGROUP = "cocoon"


def set_clock(time_ns: int) -> None:
    """The guest boots (or resumes from a template) with a stale clock."""
    if time_ns > 0:
        with contextlib.suppress(OSError):
            time.clock_settime_ns(time.CLOCK_REALTIME, time_ns)


def details(agent_version: str) -> messages.GuestDetailsReply:
    u = os.uname()
    mem_kib = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
                break
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    mounts = []
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3:
                mounts.append(f"{parts[1]} {parts[2]}")
    cg = 2 if os.path.exists(f"{CGROUP_ROOT}/cgroup.controllers") else 1
    return messages.GuestDetailsReply(
        kernel_release=u.release,
        kernel_version=u.version,
        machine=u.machine,
        cpus=os.cpu_count() or 1,
        mem_total_kib=mem_kib,
        uptime_s=uptime,
        agent_version=agent_version,
        cgroup_version=cg,
        mounts=mounts[:256],
    )


BLKFLSBUF = 0x1261


def find_block_device(serial: str) -> str:
    """/dev/vdX whose virtio serial is ``serial``: device order is not stable."""
    for name in sorted(os.listdir("/sys/block")):
        if name.startswith("vd") and _read(f"/sys/block/{name}/serial").strip() == serial:
            return f"/dev/{name}"
    raise RemoteError("not_found", f"no block device with serial {serial[:40]!r}")


def forget_cached(dev: str) -> None:
    """Drop the device's page cache before mounting it (BLKFLSBUF).

    A disk slot of a template was probed at the template's boot (partition
    scan), so the clone's cache may hold the template's empty blocks for a
    device whose backing file is now an image: the first superblock read must
    come from the real disk.
    """
    import fcntl  # only on this path: keeps it out of the boot's imports

    try:
        fd = os.open(dev, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise RemoteError("mount_failed", f"{dev}: {e.strerror}") from None
    try:
        fcntl.ioctl(fd, BLKFLSBUF)
    except OSError as e:
        raise RemoteError("mount_failed", f"{dev}: flushing its cache: {e.strerror}") from None
    finally:
        os.close(fd)


def mount_args(m: messages.Mount) -> tuple[str, str, list[str]]:
    """(source, file-system type, options) of a Mount request, as mount(2) wants them."""
    opts = list(m.options)
    if m.readonly:
        opts.append("ro")
    if m.kind == "block":
        src = find_block_device(m.source)
        forget_cached(src)
        return src, m.fstype, opts
    if m.kind == "virtiofs":
        return m.source, "virtiofs", opts
    if m.kind == "9p":
        return m.source, "9p", ["trans=virtio", "version=9p2000.L", "msize=524288",
                                "cache=mmap", *opts]  # fmt: skip
    if m.kind == "tmpfs":
        return "tmpfs", "tmpfs", opts
    if m.kind == "overlay":
        for o in m.options:
            if o.startswith(("upperdir=", "workdir=")):
                os.makedirs(o.split("=", 1)[1], exist_ok=True)
        return "overlay", "overlay", opts
    # bind: the flags must come first (no data), ro needs a remount after
    return m.source, "", ["bind", *[o for o in opts if o != "ro"]]


def container_cgroup(container_id: str) -> str:
    return f"{CGROUP_ROOT}/{CONTAINERS_CGROUP}/{container_id}"


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read(1 << 20)
    except OSError:
        return ""


def _read_int(path: str) -> int:
    text = _read(path).strip()
    if text == "max" or not text:
        return 0
    try:
        return int(text.split()[0])
    except ValueError:
        return 0


def _read_kv(path: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in _read(path).splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            out[parts[0]] = int(parts[1])
    return out


def oom_kills(container_id: str) -> int:
    return _read_kv(container_cgroup(container_id) + "/memory.events").get("oom_kill", 0)


def cgroup_pids(container_id: str) -> list[int]:
    pids: list[int] = []
    for dirpath, _, files in os.walk(container_cgroup(container_id)):
        if "cgroup.procs" in files:
            pids += [int(x) for x in _read(dirpath + "/cgroup.procs").split() if x.isdigit()]
    return sorted(set(pids))[: messages.MAX_LIST]


def process_table(container_id: str, rootfs: str) -> list[messages.ProcessInfo]:
    """``docker top`` rows, user names from the container's own /etc/passwd."""
    names = {
        row[2]: row[0][:256]
        for row in _table(rootfs.rstrip("/") + "/etc/passwd")
        if len(row) >= 3 and row[2].isdigit()
    }
    tick_ms = 1000 // (os.sysconf("SC_CLK_TCK") or 100)
    rows = []
    for pid in cgroup_pids(container_id):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read(4096).rstrip(b"\0").split(b"\0")
            stat = _read(f"/proc/{pid}/stat")
            status = _read(f"/proc/{pid}/status")
        except OSError:
            continue  # exited meanwhile
        # comm may hold spaces and parens: the fields after the last ")" are fixed.
        fields = stat.rpartition(")")[2].split()
        if len(fields) < 13:
            continue
        cpu_ms = (int(fields[11]) + int(fields[12])) * tick_ms
        uid = ""
        for line in status.splitlines():
            if line.startswith("Uid:"):
                uid = (line.split()[1:2] or [""])[0]
        command = " ".join(a.decode(errors="replace") for a in argv if a)
        if not command:  # a kernel thread or a zombie: show its name like ps does
            command = "[" + stat.partition("(")[2].rpartition(")")[0][:64] + "]"
        rows.append(messages.ProcessInfo(pid, names.get(uid, uid), cpu_ms, command[:4096]))
    return rows


def stats(container_id: str) -> messages.StatsReply:
    cg = container_cgroup(container_id)
    rd = wr = 0
    for line in _read(cg + "/io.stat").splitlines():
        for field in line.split()[1:]:
            k, _, v = field.partition("=")
            if k == "rbytes" and v.isdigit():
                rd += int(v)
            elif k == "wbytes" and v.isdigit():
                wr += int(v)
    net = []
    for name in sorted(os.listdir("/sys/class/net")):
        if name == "lo":
            continue
        st = f"/sys/class/net/{name}/statistics/"
        net.append(
            messages.NetStats(
                name=name,
                rx_bytes=_read_int(st + "rx_bytes"),
                rx_packets=_read_int(st + "rx_packets"),
                tx_bytes=_read_int(st + "tx_bytes"),
                tx_packets=_read_int(st + "tx_packets"),
            )
        )
    mem = _read_kv(cg + "/memory.stat")
    return messages.StatsReply(
        cpu_usage_us=_read_kv(cg + "/cpu.stat").get("usage_usec", 0),
        memory_bytes=_read_int(cg + "/memory.current"),
        memory_limit_bytes=_read_int(cg + "/memory.max"),
        pids=_read_int(cg + "/pids.current"),
        io_read_bytes=rd,
        io_write_bytes=wr,
        net=net,
        memory_anon_bytes=mem.get("anon", 0),
        memory_file_bytes=mem.get("file", 0),
        memory_inactive_file_bytes=mem.get("inactive_file", 0),
        memory_pgfault=mem.get("pgfault", 0),
        memory_pgmajfault=mem.get("pgmajfault", 0),
    )


def _table(path: str) -> list[list[str]]:
    """Rows of a colon-separated file (passwd, group); bounded, garbage-tolerant."""
    rows = []
    for line in _read(path).splitlines()[:100000]:
        if line and not line.startswith("#"):
            rows.append(line.split(":"))
    return rows


def _id(text: str) -> int:
    """A uid/gid written in ASCII digits and in range, else -1. (str.isdigit() is
    true for "²", which int() refuses, and for other scripts' digits.)"""
    if text.isascii() and text.isdigit() and len(text) <= 10 and int(text) <= MAX_ID:
        return int(text)
    return -1


def resolve_user(rootfs: str, process: dict[str, object]) -> None:
    """Turn ``process.user.username`` ("name|uid[:group|gid]", docker's -u) into the
    numeric uid/gid/additionalGids crun needs, from the container's own
    /etc/passwd and /etc/group (the container's, not the guest's: it is the
    image that defines its users). The key is removed either way."""
    user = process.get("user")
    if not isinstance(user, dict):
        return
    spec = user.pop("username", None)
    if not isinstance(spec, str) or not spec:
        return
    name, _, group = spec.partition(":")
    base = rootfs.rstrip("/")
    # Read through the rootfs path: a hostile image's symlinked /etc/passwd can
    # only point inside the guest, which holds nothing of another tenant.
    passwd = _table(base + "/etc/passwd")
    uid = gid = -1
    uname = ""
    for row in passwd:
        if len(row) >= 4 and (row[0] == name or row[2] == name):
            uid, gid, uname = _id(row[2]), _id(row[3]), row[0]
            if uid >= 0 and gid >= 0:
                break
            uid = gid = -1
    if uid < 0:
        uid, gid = _id(name), 0
        if uid < 0:
            raise RemoteError("invalid", f"user {name[:64]!r} not found in the image's /etc/passwd")
    groups = _table(base + "/etc/group")
    if group:
        gid = next(
            (_id(r[2]) for r in groups if len(r) >= 3 and group in (r[0], r[2]) and _id(r[2]) >= 0),
            _id(group),
        )
        if gid < 0:
            raise RemoteError("invalid", f"group {group[:64]!r} not found in /etc/group")
    extra = sorted(
        {_id(r[2]) for r in groups if len(r) >= 4 and uname and uname in r[3].split(",")}
        - {gid, -1}
    )
    user["uid"], user["gid"] = uid, gid
    if extra:
        user["additionalGids"] = extra
