"""Every message of the host<->agent protocol, and its strict decoder.

One module used by both sides (the guest imports it from its read-only image),
so the two can never disagree on a field. Messages are immutable classes with a
``TYPE`` tag; the JSON body of a REQUEST/REPLY frame is ``{"type": ..., **fields}``.

A field's annotation says how it is checked: a plain type (``int``, ``str``,
a list, a message), or a named field type (``ContainerId``, ``Signal``,
``GuestPath``...) that is its plain type plus a rule, listed once in ``KINDS``.
``decode`` checks each field as it reads it (type, string and list length, the
rule), so a message that decodes is valid; ``check()`` applies the same rules
to a message built on this side. It raises ``ValueError`` with a short reason;
nothing from the peer is echoed unbounded.
"""

from __future__ import annotations

import json
import re

from cocoon.protocol import ids
from cocoon.protocol.framing import MAX_FRAME
from cocoon.util import boundedjson

# Not `import typing`/`dataclasses`: in the guest under TCG they cost ~0.2 s of
# boot (dataclasses exec()s generated code per class). A tiny decorator of our
# own does the same for flat message classes; mypy reads it via the stub below.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, ClassVar, dataclass_transform
else:

    def dataclass_transform(**_kw: object):  # type: ignore[no-redef]
        return lambda f: f


#: Bumped on any incompatible change; the host refuses an agent that differs.
PROTOCOL_VERSION = 5

MAX_STR = 64 << 10
MAX_LIST = 4096
MAX_SPEC = (1 << 20) - 4096


def check_id(value: str, what: str) -> None:
    """The single place container/exec ids are validated (they become paths)."""
    if not ids.NAME.fullmatch(value):
        raise ValueError(f"invalid {what} {value[:40]!r}")


def check_range(value: int, lo: int, hi: int, what: str) -> None:
    if not lo <= value <= hi:
        raise ValueError(f"{what} {value} outside [{lo}, {hi}]")


# ----------------------------------------------------------------------------
# Field types. A named one is its plain type to mypy; to the decoder it is the
# plain type plus the rule KINDS gives it, so a field's annotation is its check.
ContainerId = str
ExecId = str
ExecIdOrInit = str  # "" = the container's init
GuestPath = str  # absolute, no "..": it is used as a path in the guest
HostPath = str
OciSpec = str
SmallJson = str
MountKind = str
MountOption = str
Entropy = str
Hostname = str
MachineId = str
MacChange = str  # "TEMPLATE_MAC=MAC"
MacChanges = list[MacChange]
UserName = str
CommandLine = str
IfName = str
Mac = str
Cidr = str
Addresses = list[Cidr]
RouteDest = str  # "default" or a CIDR
Gateway = str  # "" = on-link
NeighborAddress = str
Sysctl = str  # "net.x.y=value"
NetFile = str
StreamId = int
TermSize = int  # 0 = not known (no terminal)
NewTermSize = int
Signal = int
ExitCode = int
Pid = int
Mtu = int

_HEX_RE = re.compile(r"^[0-9a-f]+$")
_DIGITS_RE = re.compile(r"^[0-9]{1,3}$")  # str.isdigit() is true for "²", which int() refuses
_HOSTNAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,62})$")
_SYSCTL_RE = re.compile(r"^net\.[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+){1,6}$")
_IFNAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_IP_RE = re.compile(r"^(?:[0-9]{1,3}(?:\.[0-9]{1,3}){3}|[0-9a-fA-F:.]{2,45})$")


def _check_ifname(name: str) -> None:
    if not _IFNAME_RE.fullmatch(name) or name in (".", ".."):
        raise ValueError("bad interface name")


def _check_mac(mac: str) -> None:
    if not _MAC_RE.fullmatch(mac):
        raise ValueError("bad MAC address")


def _check_cidr(text: str) -> None:
    addr, sep, plen = text.partition("/")
    if not sep or not _IP_RE.fullmatch(addr) or not _DIGITS_RE.fullmatch(plen):
        raise ValueError("bad address/prefix")
    check_range(int(plen), 0, 32 if "." in addr and ":" not in addr else 128, "prefix length")


def _check_guest_path(path: str, what: str) -> None:
    if not path.startswith("/") or "\0" in path or len(path) > 4096:
        raise ValueError(f"{what} must be an absolute path")
    if any(part == ".." for part in path.split("/")):
        raise ValueError(f"{what} must not contain '..'")


def _check_ip(address: str, what: str) -> None:
    if not _IP_RE.fullmatch(address):
        raise ValueError(f"bad {what} address")


def _check_mac_change(pair: str) -> None:
    old, sep, new = pair.partition("=")
    if not sep:
        raise ValueError("macs entries are OLD=NEW")
    _check_mac(old)
    _check_mac(new)


def _check_sysctl(kv: str) -> None:
    key, sep, value = kv.partition("=")
    if not sep or not _SYSCTL_RE.fullmatch(key) or len(value) > 4096 or "\n" in value:
        raise ValueError("bad network sysctl")


def _check_hex(value: str, lo: int, hi: int, error: str) -> None:
    if not lo <= len(value) <= hi or not _HEX_RE.fullmatch(value):
        raise ValueError(error)


def _check_mount_option(opt: str) -> None:
    if "," in opt or len(opt) > 4096:
        raise ValueError("mount option must not contain ','")


def _check_mount_kind(kind: str) -> None:
    if kind not in MOUNT_KINDS:
        raise ValueError(f"unknown mount kind {kind[:20]!r}")


def _check_host_path(path: str, what: str) -> None:
    if not path.startswith("/") or len(path) > 4096:
        raise ValueError(f"{what} must be an absolute path")


def _check_hostname(name: str) -> None:
    if not _HOSTNAME_RE.fullmatch(name):
        raise ValueError("bad hostname")


def _check_exec_id_or_init(value: str) -> None:
    if value:
        check_id(value, "exec id")


def _check_route_dest(dest: str) -> None:
    if dest != "default":
        _check_cidr(dest)


def _check_gateway(gateway: str) -> None:
    if gateway:
        _check_ip(gateway, "gateway")


def _check_small_json(text: str, what: str) -> None:
    if len(text) > MAX_STR:
        raise ValueError(f"{what} too large")


class Kind:
    """A named field type: its plain JSON type (``base``, itself a field type)
    and ``test(value, field name)``, which raises ValueError for a bad value."""

    __slots__ = ("base", "test")

    def __init__(self, base: str, test: Callable[[Any, str], None]) -> None:
        self.base = base
        self.test = test


def _span(lo: int, hi: int, what: str = "") -> Kind:
    """An int in [lo, hi], named ``what`` (else by its field) in the error."""
    return Kind("int", lambda v, name: check_range(v, lo, hi, what or name))


def _at_most(limit: int, error: str, base: str = "str") -> Kind:
    """A string (or a list, given its ``base``) of at most ``limit`` items."""

    def test(value: Any, _name: str) -> None:
        if len(value) > limit:
            raise ValueError(error)

    return Kind(base, test)


def _str(check: Callable[[str], None]) -> Kind:
    return Kind("str", lambda v, _name: check(v))


_TOO_MANY_NET = "too many interfaces, routes or neighbours"

KINDS: dict[str, Kind] = {
    "ContainerId": _str(lambda v: check_id(v, "container id")),
    "ExecId": _str(lambda v: check_id(v, "exec id")),
    "ExecIdOrInit": _str(_check_exec_id_or_init),
    "GuestPath": Kind("str", _check_guest_path),
    "HostPath": Kind("str", _check_host_path),
    "OciSpec": _at_most(MAX_SPEC, "spec too large"),
    "SmallJson": Kind("str", _check_small_json),
    "MountKind": _str(_check_mount_kind),
    "MountOption": _str(_check_mount_option),
    "Entropy": _str(lambda v: _check_hex(v, 64, 1024, "entropy must be 32-512 bytes of hex")),
    "Hostname": _str(_check_hostname),
    "MachineId": _str(lambda v: _check_hex(v, 32, 32, "machine_id must be 32 hex digits")),
    "MacChange": _str(_check_mac_change),
    "MacChanges": _at_most(16, "too many NICs", "list[MacChange]"),
    "UserName": _at_most(256, "process_info field too long"),
    "CommandLine": _at_most(4096, "process_info field too long"),
    "IfName": _str(_check_ifname),
    "Mac": _str(_check_mac),
    "Cidr": _str(_check_cidr),
    "Addresses": _at_most(64, "too many addresses", "list[Cidr]"),
    "RouteDest": _str(_check_route_dest),
    "Gateway": _str(_check_gateway),
    "NeighborAddress": _str(lambda v: _check_ip(v, "neighbour")),
    "Sysctl": _str(_check_sysctl),
    "NetFile": _at_most(64 << 10, "network file too large"),
    "NetInterfaces": _at_most(16, _TOO_MANY_NET, "list[NetInterface]"),
    "NetRoutes": _at_most(256, _TOO_MANY_NET, "list[NetRoute]"),
    "NetNeighbors": _at_most(256, _TOO_MANY_NET, "list[NetNeighbor]"),
    "StreamId": _span(0, 0xFFFFFFFF, "stream id"),
    "TermSize": _span(0, 10000),
    "NewTermSize": _span(1, 10000),
    "Signal": _span(0, 64, "signal"),
    "ExitCode": _span(0, 255, "exit code"),
    "Pid": _span(1, 1 << 22, "pid"),
    "Mtu": _span(68, 65535, "mtu"),
}


class Message:
    """Immutable message; ``FIELDS`` is (name, type) in declaration order."""

    TYPE: ClassVar[str]
    FIELDS: ClassVar[tuple[tuple[str, str], ...]] = ()
    #: The field names and "type": what a body may hold (``_build``).
    NAMES: ClassVar[frozenset[str]] = frozenset({"type"})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        names = [n for n, _ in self.FIELDS]
        if len(args) > len(names):
            raise TypeError(f"{self.TYPE}: too many arguments")
        values = dict(zip(names, args, strict=False))
        for k, v in kwargs.items():
            if k not in names or k in values:
                raise TypeError(f"{self.TYPE}: bad argument {k}")
            values[k] = v
        for n in names:
            if n not in values:
                raise TypeError(f"{self.TYPE}: missing argument {n}")
            object.__setattr__(self, n, values[n])

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{self.TYPE} is immutable")

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and all(
            getattr(self, n) == getattr(other, n) for n, _ in self.FIELDS
        )

    def __hash__(self) -> int:
        return hash((self.TYPE, *(repr(getattr(self, n)) for n, _ in self.FIELDS)))

    def __repr__(self) -> str:
        inner = ", ".join(f"{n}={getattr(self, n)!r}" for n, _ in self.FIELDS)
        return f"{type(self).__name__}({inner})"

    def check(self) -> None:
        """Every field against its type's rule, nested messages too: for a
        message built on this side (``decode`` checks each field as it reads it)."""
        for name, tp in self.FIELDS:
            _verify(tp, getattr(self, name), name)
        self.relate()

    def relate(self) -> None:
        """Rules between fields; overridden where one field constrains another."""


REGISTRY: dict[str, type[Message]] = {}


@dataclass_transform(frozen_default=True)
def message(cls: type) -> type:
    """Register cls under its TYPE and record its annotated fields."""
    fields = tuple(
        (name, tp)
        for name, tp in cls.__dict__.get("__annotations__", {}).items()
        if not str(tp).startswith("ClassVar")
    )
    cls.FIELDS = fields  # type: ignore[attr-defined]
    cls.NAMES = frozenset(name for name, _ in fields) | {"type"}  # type: ignore[attr-defined]
    if cls.TYPE in REGISTRY:  # type: ignore[attr-defined]
        raise RuntimeError(f"duplicate message type {cls.TYPE}")  # type: ignore[attr-defined]
    REGISTRY[cls.TYPE] = cls  # type: ignore[attr-defined]
    return cls


# ----------------------------------------------------------------------------
# Requests (host -> agent) and their replies.


@message
class Hello(Message):
    """First request on a channel: versions must match; carries host time.

    The guest has no trustworthy clock after boot or snapshot restore, so the
    host's wall clock rides along and the agent sets it.
    """

    TYPE = "hello"
    protocol_version: int
    time_ns: int


@message
class Identity(Message):
    """Make this guest a machine of its own before any user code runs.

    Sent after every Hello. A sandbox restored from a template shares the
    template's kernel RNG state, hostname and machine-id with every other
    clone: without this, two tenants would read the same /dev/urandom bytes.
    """

    TYPE = "identity"
    #: Host entropy (hex), mixed into the guest's pool and then a forced reseed.
    entropy: Entropy
    hostname: Hostname
    machine_id: MachineId  # 32 lowercase hex digits
    #: "TEMPLATE_MAC=MAC": a NIC restored from a template still has the
    #: template's MAC; the agent gives it the sandbox's (QEMU follows the guest).
    macs: MacChanges


@message
class HelloReply(Message):
    TYPE = "hello_reply"
    protocol_version: int
    agent_version: str
    kernel_release: str


@message
class Ping(Message):
    TYPE = "ping"


@message
class Ok(Message):
    TYPE = "ok"


@message
class GuestDetails(Message):
    TYPE = "guest_details"


@message
class GuestDetailsReply(Message):
    TYPE = "guest_details_reply"
    kernel_release: str
    kernel_version: str
    machine: str
    cpus: int
    mem_total_kib: int
    uptime_s: float
    agent_version: str
    cgroup_version: int
    mounts: list[str]


MOUNT_KINDS = ("block", "virtiofs", "9p", "tmpfs", "overlay", "bind")


@message
class Mount(Message):
    """Mount something in the guest.

    ``source`` by kind: block = the disk's serial (the agent finds /dev/vdX by
    it, so the host never guesses device order); virtiofs/9p = the tag; tmpfs =
    ignored; overlay = ignored, ``options`` carry lowerdir/upperdir/workdir;
    bind = a guest path.
    """

    TYPE = "mount"
    kind: MountKind
    source: str
    target: GuestPath
    fstype: str
    options: list[MountOption]
    readonly: bool


@message
class Unmount(Message):
    TYPE = "unmount"
    target: GuestPath


@message
class StdioSpec(Message):
    """Stream ids the host allocated for one process (0 = not connected)."""

    TYPE = "stdio"
    stdin: StreamId
    stdout: StreamId
    stderr: StreamId
    terminal: bool
    rows: TermSize
    cols: TermSize


@message
class CreateContainer(Message):
    """Create (not start) a container with crun in the guest.

    ``spec_json`` is the OCI config.json; its root.path is replaced by
    ``rootfs``, a guest path the host mounted first.
    """

    TYPE = "create_container"
    container_id: ContainerId
    rootfs: GuestPath
    spec_json: OciSpec
    stdio: StdioSpec


@message
class ProcessStarted(Message):
    TYPE = "process_started"
    pid: int


@message
class StartContainer(Message):
    TYPE = "start_container"
    container_id: ContainerId


@message
class ExecProcess(Message):
    """Run an extra process in a container; ``process_json`` is an OCI process."""

    TYPE = "exec_process"
    container_id: ContainerId
    exec_id: ExecId
    process_json: SmallJson
    stdio: StdioSpec


@message
class SignalProcess(Message):
    """exec_id "" means the container's init; ``all`` signals every process."""

    TYPE = "signal_process"
    container_id: ContainerId
    exec_id: ExecIdOrInit
    signal: Signal
    all: bool


@message
class WaitProcess(Message):
    TYPE = "wait_process"
    container_id: ContainerId
    exec_id: ExecIdOrInit


@message
class ProcessExited(Message):
    """``exit_code`` follows the shell: 128+N when killed by signal N."""

    TYPE = "process_exited"
    exit_code: ExitCode
    signal: Signal
    oom_killed: bool


@message
class ResizeTty(Message):
    TYPE = "resize_tty"
    container_id: ContainerId
    exec_id: ExecIdOrInit
    rows: NewTermSize
    cols: NewTermSize


@message
class DeleteContainer(Message):
    TYPE = "delete_container"
    container_id: ContainerId


@message
class ListProcesses(Message):
    TYPE = "list_processes"
    container_id: ContainerId


@message
class ProcessList(Message):
    TYPE = "process_list"
    pids: list[int]


@message
class AddContainer(Message):
    """Host-only (cocoon-runtime -> a pod's monitor): create a further container
    in the pod's running VM. ``record_dir`` is its record on the host (the
    monitor writes its state there); ``rootfs`` a guest path. Never sent to the agent."""

    TYPE = "add_container"
    record_dir: HostPath
    container_id: ContainerId
    rootfs: GuestPath
    tty: bool


@message
class PauseContainer(Message):
    """Freeze every process of the container (its cgroup), as `runc pause`."""

    TYPE = "pause_container"
    container_id: ContainerId


@message
class ResumeContainer(Message):
    TYPE = "resume_container"
    container_id: ContainerId


@message
class UpdateResources(Message):
    """New cgroup limits (an OCI ``linux.resources`` object) for a running container."""

    TYPE = "update_resources"
    container_id: ContainerId
    resources_json: SmallJson


@message
class Top(Message):
    """The container's processes with owner, CPU time and command line (docker top)."""

    TYPE = "top"
    container_id: ContainerId


@message
class ProcessInfo(Message):
    """One row of ``top``: guest pid, user name (or uid), CPU ms, command line."""

    TYPE = "process_info"
    pid: Pid
    user: UserName
    cpu_ms: int
    command: CommandLine


@message
class TopReply(Message):
    TYPE = "top_reply"
    processes: list[ProcessInfo]


@message
class Attach(Message):
    """Host-only (client -> container monitor): stream the main process's stdio
    on the client's streams; a monitor waiting for its first client starts the
    container now. Never sent to the agent."""

    TYPE = "attach"
    stdio: StdioSpec
    bind: bool  # the client stands for the init: its end kills the container


@message
class Stats(Message):
    TYPE = "stats"
    container_id: ContainerId


@message
class NetStats(Message):
    TYPE = "net_stats"
    name: str
    rx_bytes: int
    rx_packets: int
    tx_bytes: int
    tx_packets: int


@message
class StatsReply(Message):
    """Read from the container's cgroup (v2) and the guest's interfaces."""

    TYPE = "stats_reply"
    cpu_usage_us: int
    memory_bytes: int
    memory_limit_bytes: int
    pids: int
    io_read_bytes: int
    io_write_bytes: int
    net: list[NetStats]
    #: From memory.stat: what containerd's CRI turns into a container's RSS
    #: (anon), working set (usage less inactive_file) and page faults.
    memory_anon_bytes: int
    memory_file_bytes: int
    memory_inactive_file_bytes: int
    memory_pgfault: int
    memory_pgmajfault: int


@message
class Shutdown(Message):
    """Sync and power off; the reply is sent before the guest goes down."""

    TYPE = "shutdown"


# ----------------------------------------------------------------------------
# ERROR frame body.


@message
class ErrorReply(Message):
    """``code`` is a short machine word (e.g. "not_found", "crun_failed")."""

    TYPE = "error"
    code: str
    message: str


@message
class NetInterface(Message):
    """One guest NIC, found by its MAC (QEMU gave it the host link's), renamed and addressed."""

    TYPE = "net_interface"
    name: IfName
    mac: Mac
    mtu: Mtu
    addresses: Addresses  # CIDRs, IPv4 or IPv6


@message
class NetRoute(Message):
    TYPE = "net_route"
    dest: RouteDest
    gateway: Gateway
    device: IfName


@message
class NetNeighbor(Message):
    TYPE = "net_neighbor"
    address: NeighborAddress
    mac: Mac
    device: IfName


NetInterfaces = list[NetInterface]
NetRoutes = list[NetRoute]
NetNeighbors = list[NetNeighbor]


@message
class ConfigureNetwork(Message):
    """Give the guest's NICs the host links' identity, and the container its
    hosts/resolv.conf/hostname files (written under a guest dir; "" = none)."""

    TYPE = "configure_network"
    interfaces: NetInterfaces
    routes: NetRoutes
    neighbors: NetNeighbors
    hosts: NetFile
    resolv: NetFile
    hostname: NetFile
    #: "net.x.y=value": the VM's network namespace is the container's, so the
    #: spec's net.* sysctls are set there rather than in a namespace of its own.
    sysctls: list[Sysctl]

    def relate(self) -> None:
        names = {i.name for i in self.interfaces}
        if len(names) != len(self.interfaces):
            raise ValueError("duplicate interface name")
        for dev in [r.device for r in self.routes] + [n.device for n in self.neighbors]:
            if dev not in names:
                raise ValueError("route or neighbour on an unknown interface")


# ----------------------------------------------------------------------------
# Codec.


#: Made once, not per message as ``json.dumps`` with arguments would (see
#: ``boundedjson._DECODER``).
_ENCODER = json.JSONEncoder(separators=(",", ":"))


def _c_encoder() -> Any:
    """The encoder's C core, made once (``JSONEncoder.encode`` makes one per
    call): no cycle check (a message's plain form is fresh dicts and lists
    of scalars), NaN written as ``json.dumps`` writes it."""
    make = getattr(json.encoder, "c_make_encoder", None)  # untyped in typeshed
    if make is None:
        return None
    # cycle markers (none), default, string encoder, indent, key and item
    # separators, sort_keys, skipkeys, allow_nan
    args = (None, _ENCODER.default, json.encoder.encode_basestring_ascii, None, ":", ",")
    return make(*args, False, False, True)


_C_ENCODER = _c_encoder()


def encode(msg: Message) -> bytes:
    body = {"type": msg.TYPE}
    body.update(_to_plain(msg))
    if _C_ENCODER is None:
        return _ENCODER.encode(body).encode()
    return "".join(_C_ENCODER(body, 0)).encode()


def _to_plain(msg: Message) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, _ in msg.FIELDS:
        v = getattr(msg, name)
        if isinstance(v, Message):
            v = _to_plain(v)
        elif isinstance(v, list):
            v = [_to_plain(x) if isinstance(x, Message) else x for x in v]
        out[name] = v
    return out


def decode(payload: bytes, expect: tuple[type[Message], ...] | None = None) -> Message:
    """Parse and fully validate one message body; raise ValueError if anything is off."""
    try:
        body = boundedjson.loads(payload, max_bytes=MAX_FRAME, max_depth=MAX_NESTING)
    except boundedjson.JSONError as e:
        raise ValueError(f"message body: {e}") from None
    if not isinstance(body, dict):
        raise ValueError("message is not an object")
    tag = body.pop("type", None)
    if not isinstance(tag, str) or tag not in REGISTRY:
        raise ValueError(f"unknown message type {str(tag)[:40]!r}")
    cls = REGISTRY[tag]
    if expect is not None and cls not in expect:
        names = "/".join(c.TYPE for c in expect)
        raise ValueError(f"expected {names}, got {tag}")
    return _build(cls, body)


def _build(cls: type[Message], body: Any) -> Message:
    if not isinstance(body, dict):
        raise ValueError(f"{cls.TYPE}: not an object")
    if not cls.NAMES.issuperset(body):
        extra = sorted(set(body) - cls.NAMES)
        raise ValueError(f"{cls.TYPE}: unexpected field {extra[0][:40]!r}")
    # Built field by field, not through ``__init__``'s checks of its
    # arguments (each field is checked here): less code on the path of
    # every message, whose first run in a template's clone TCG translates.
    msg = object.__new__(cls)
    for name, tp in cls.FIELDS:
        if name not in body:
            raise ValueError(f"{cls.TYPE}: missing field {name}")
        object.__setattr__(msg, name, _coerce(tp, body[name], f"{cls.TYPE}.{name}"))
    msg.relate()
    return msg


_CLASSES: dict[str, type[Message]] = {}


def _coerce(tp: str, value: Any, where: str) -> Any:
    """Check ``value`` against the annotation string ``tp`` (flat types only)."""
    kind = KINDS.get(tp)
    if kind is not None:
        value = _coerce(kind.base, value, where)
        kind.test(value, where.rpartition(".")[2])
        return value
    if tp == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected bool")
        return value
    if tp == "int":
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{where}: expected int")
        if not -(1 << 63) <= value < (1 << 64):
            raise ValueError(f"{where}: int out of range")
        return value
    if tp == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{where}: expected number")
        if not -1e300 < value < 1e300:  # an int beyond a float's range overflows float()
            raise ValueError(f"{where}: number out of range")
        return float(value)
    if tp == "str":
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected string")
        if len(value) > MAX_SPEC:
            raise ValueError(f"{where}: string too long")
        return value
    if tp.startswith("list[") and tp.endswith("]"):
        if not isinstance(value, list):
            raise ValueError(f"{where}: expected list")
        if len(value) > MAX_LIST:
            raise ValueError(f"{where}: list too long")
        item = tp[5:-1]
        return [_coerce(item, v, where) for v in value]
    cls = _message_class(tp)
    if isinstance(value, dict):
        value = {k: v for k, v in value.items() if k != "type"}
    return _build(cls, value)


def _verify(tp: str, value: Any, name: str) -> None:
    """The rules of ``tp`` over a value already of its type (``Message.check``)."""
    kind = KINDS.get(tp)
    if kind is not None:
        _verify(kind.base, value, name)
        kind.test(value, name)
    elif tp.startswith("list[") and tp.endswith("]"):
        for v in value:
            _verify(tp[5:-1], v, name)
    elif tp not in ("bool", "int", "float", "str"):
        value.check()


def _message_class(name: str) -> type[Message]:
    cls = _CLASSES.get(name)
    if cls is None:
        for c in REGISTRY.values():
            _CLASSES[c.__name__] = c
        cls = _CLASSES.get(name)
    if cls is None:
        raise TypeError(f"unsupported field type {name}")
    return cls


def _nesting(tp: str) -> int:
    """How deep a field of annotation ``tp`` nests in JSON (a list or message adds one)."""
    if tp in KINDS:
        return _nesting(KINDS[tp].base)
    if tp.startswith("list[") and tp.endswith("]"):
        return 1 + _nesting(tp[5:-1])
    if tp in ("bool", "int", "float", "str"):
        return 0
    cls = _message_class(tp)
    return 1 + max((_nesting(t) for _, t in cls.FIELDS), default=0)


#: The deepest a valid message nests (ConfigureNetwork: 4): decode refuses
#: anything deeper before parsing it, since no message of the schema can be.
MAX_NESTING = max(_nesting(c.__name__) for c in REGISTRY.values())
