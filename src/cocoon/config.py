"""cocoon's configuration: built-in defaults < TOML file < environment < flags.

One file, like Kata's configuration.toml, but every knob has a working default
so no file is needed. Each field's comment says what it costs; `cocoon env`
prints the effective result.

File: ``$COCOON_CONFIG`` or ``/etc/cocoon/config.toml`` (absent is fine).
Environment: ``COCOON_<SECTION>_<KEY>`` (``COCOON_HYPERVISOR_ACCEL=tcg``) and
``COCOON_<KEY>`` for top-level keys (``COCOON_ROOT_DIR``).
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cocoon.errors import ConfigError

DEFAULT_FILE = Path("/etc/cocoon/config.toml")


@dataclass
class HypervisorConfig:
    #: Backend: "qemu" (others are chosen here once they exist).
    backend: str = "qemu"
    qemu_binary: str = "qemu-system-x86_64"
    #: "microvm" boots fastest (no PCI, no firmware); "q35" allows hotplug, ~0.4 s slower.
    machine: str = "microvm"
    #: "auto" probes KVM for real and falls back to TCG; "kvm" or "tcg" force one.
    accel: str = "auto"
    #: TCG translation cache in MiB: QEMU's RSS under TCG grows by what it
    #: translates, up to this. A full cache is flushed whole and everything is
    #: translated again: at 32 a restore, warm-up and one container filled it
    #: (~30 MiB), and starts in a pooled sandbox cost 0.15-0.2 s more at random.
    tcg_tb_size_mib: int = 64
    #: The guest CPU under TCG. Without ERMS/FSRM the guest kernel copies with
    #: plain moves instead of `rep movsb`, which TCG runs a byte per helper
    #: call: TCP through the VM measured 1.1-1.5 -> 2.4-2.8 Gbit/s, boot unchanged
    #: (glibc keeps its AVX2 routines; plain qemu64 made Python 4x slower).
    tcg_cpu: str = "max,-erms,-fsrm"
    #: Default vCPUs and memory per sandbox (a container's limits add to these).
    vcpus: int = 1
    memory_mib: int = 256
    #: Guest kernel and root image; empty = the ones `cocoon guest build` made.
    kernel: str = ""
    image: str = ""
    #: Extra guest kernel parameters, appended last.
    kernel_params: str = ""
    #: Shared file system for host directories: "virtio-fs", "9p" or "none".
    #: virtio-fs costs one virtiofsd per VM; 9p is in-QEMU but slower for small files.
    shared_fs: str = "virtio-fs"
    virtiofsd: str = "/usr/lib/qemu/virtiofsd"
    #: Serves a jailed QEMU's 9p shares (QEMU itself has no file access then).
    virtfs_proxy_helper: str = "/usr/lib/qemu/virtfs-proxy-helper"
    #: Host<->agent channel: "auto" uses vsock where /dev/vhost-vsock exists,
    #: virtio-serial otherwise (one chardev socket per VM, no host module needed).
    channel: str = "auto"
    #: virtio-balloon free page reporting: the guest returns freed memory to the host.
    free_page_reporting: bool = True
    #: Seconds from QEMU start to agent ready before the boot counts as failed.
    boot_timeout_s: float = 30.0
    #: Seconds any single agent request may take (waits on processes excepted).
    agent_timeout_s: float = 30.0
    #: Seconds between liveness pings while the host waits on the guest.
    keepalive_s: float = 5.0


@dataclass
class GuestConfig:
    #: "build": kernel built from Debian's linux-source-6.1 with our fragment.
    #: "debian-cloud": Debian's cloud kernel + its modules (no build; ~1 s slower; no 9p).
    kernel_source: str = "build"
    #: make -j for the kernel build; 0 = number of CPUs.
    build_jobs: int = 0
    #: erofs compression of the guest root image: "none" boots ~70 ms faster under TCG
    #: (no decompression in the guest) at ~20 MB instead of ~12 MB; "lz4" or "lz4hc".
    image_compression: str = "none"


@dataclass
class ImagesConfig:
    #: Registries reached over plain HTTP (and unverified TLS never): only these.
    insecure_registries: list[str] = field(
        default_factory=lambda: ["localhost", "127.0.0.1", "[::1]"]
    )
    #: Layers fetched at once per pull.
    pull_concurrency: int = 4
    #: Caps against decompression bombs and absurd layers (per image, unpacked).
    max_unpacked_bytes: int = 32 << 30
    max_entries: int = 1_000_000
    #: CPU seconds the unpacking thread may spend on one image (waiting for a
    #: download does not count). Real images take a few minutes at most; layers
    #: of nothing but metadata (tiny pax records, sparse maps) parse at ~5 MB/s,
    #: so under the byte cap alone they could cost hours.
    max_unpack_cpu_s: float = 1800.0
    #: Cap on one compressed layer blob.
    max_layer_bytes: int = 16 << 30
    #: Past inflation_floor_bytes, a layer may inflate to at most this many
    #: times its compressed size. Real trees measured 1.3-6.5x in gzip (docs,
    #: binaries, locales, Python, headers); a layer of nothing but empty files
    #: ~55x (gzip) to ~70x (zstd), but such a layer stays under the floor up to
    #: half a million entries. The 11 MiB gzip of 11 GiB of zeros is ~1000x:
    #: at 80x it is refused after ~0.9 GiB of output. Raise it for an image that
    #: really holds big zero-filled files.
    max_inflation_ratio: float = 80.0
    inflation_floor_bytes: int = 512 << 20
    #: Free space kept on the file system of data_dir: an unpack, a blob or an
    #: erofs build that would leave less (the larger of the two; that percentage
    #: of inodes too) is refused, so a hostile image cannot fill the host's disk.
    min_free_bytes: int = 1 << 30
    min_free_percent: float = 5.0


@dataclass
class NetworkConfig:
    #: How a netns veth reaches the VM's tap: "tcfilter" (tc mirred) or "macvtap".
    model: str = "tcfilter"
    #: The default network's bridge and its IPv4 subnet (the bridge takes the first address).
    #: What `cocoon run` gets without --network: "bridge", "none" or "ns:PATH".
    default: str = "bridge"
    bridge: str = "cocoon0"
    #: The bridge's address table: host-global like the bridge itself, so every
    #: cocoon state root on the host shares it.
    state_dir: str = "/run/cocoon-network"
    bridge_subnet: str = "10.213.0.0/16"
    #: vhost-net for the VM's NICs: "auto" where /dev/vhost-net exists, "on", "off".
    vhost: str = "auto"


@dataclass
class SandboxConfig:
    #: Start sandboxes from a template: a VM booted once to agent-ready and
    #: saved, whose RAM every clone maps copy-on-write (~0.1 s and a fraction
    #: of the memory of a cold boot). Off: every sandbox boots its own kernel.
    #: Clones of one template share clean memory pages, a known cross-VM side
    #: channel (CVE-2015-2877): turn this off where tenants must not share any.
    templates: bool = True
    #: Seconds a start waits for another process building the template it needs.
    template_wait_s: float = 120.0
    #: Where templates live ("" = <data_dir>/templates). Each holds its guest's
    #: touched RAM (~70 MiB for 256 MiB): a tmpfs such as /dev/shm keeps clones'
    #: first page-ins off the disk, at the cost of that RAM.
    template_dir: str = ""
    #: Sandboxes starting at once on this host (0 = twice the CPUs); the rest
    #: queue. Starts are CPU-bound: unbounded, they all slow down and time out.
    max_starting: int = 0
    #: Seconds a start may wait in that queue before it fails with "host busy".
    start_queue_s: float = 300.0


@dataclass
class PoolConfig:
    #: Sandboxes `cocoon pool serve` keeps restored and agent-ready per size
    #: class (0 = no pool). Each costs an idle clone's memory (~90 MiB here).
    size: int = 0
    #: Size classes as "VCPUSxMEMORY_MIB", e.g. "2x512" (empty: the default size).
    classes: list[str] = field(default_factory=list)
    #: NICs of each pooled sandbox (0-4): its taps wait in a namespace of the
    #: pool's own and move into the taker's network namespace (CNI's, a CRI
    #: pod's: 1). A start takes a pooled sandbox only with exactly this many
    #: links to connect (none: 0).
    nics: int = 0
    #: The pool server's socket (empty: <root>/pool.sock). A pod's own pool,
    #: the shim fork server's (shim.pool), serves on a socket of its own.
    socket: str = ""


@dataclass
class ShimConfig:
    #: State roots of containerd's shim (`containerd-shim-cocoon-v2`), one per
    #: containerd namespace: <root_dir>/<namespace> (container ids are unique
    #: only within a namespace). A pool for the shim's containers is served on
    #: that root (`cocoon --root /run/cocoon-shim/k8s.io pool serve`).
    root_dir: str = "/run/cocoon-shim"
    #: Pods' VMs the shim's fork server keeps ready, each under the shim
    #: process that will serve its pod (shim.carrier): a pod's processes are
    #: then one tree even with a warm VM. 0: none (a `cocoon pool serve` on
    #: the namespace's root is the shared alternative).
    pool: int = 0
    #: The containerd namespace those pods are in (Kubernetes': k8s.io).
    pool_namespace: str = "k8s.io"
    #: NICs of those pods' VMs (a CRI pod's, on CNI's veth: 1).
    pool_nics: int = 1


@dataclass
class SecurityConfig:
    #: Run each sandbox's QEMU jailed: its own unprivileged uid and gid, its own
    #: mount, ipc, uts and network namespaces and root (only that VM's files),
    #: no capabilities, no_new_privs, QEMU's seccomp sandbox, no core dumps.
    #: Off: QEMU runs as root with the host in view, for debugging only.
    jail: bool = True
    #: The uids (and gids of the same number) jailed sandboxes get, one each:
    #: [uid_base, uid_base + uid_count). No other user of the host may own them.
    uid_base: int = 3_000_000
    uid_count: int = 65536


@dataclass
class ServeConfig:
    """`cocoon serve`, the function service (cocoon.serve)."""

    #: Its unix socket ("" = <root_dir>/serve.sock): root-only (0600), admin.
    socket: str = ""
    #: Also listen on TCP at HOST:PORT ("" = not); every request there needs a
    #: bearer token.
    listen: str = ""
    #: SQLite database, admin token and unpacked code ("" = <data_dir>/serve).
    state_dir: str = ""
    #: A code archive (zip or tar.gz) as uploaded, and unpacked: the caps
    #: against oversized code and decompression bombs.
    max_code_bytes: int = 64 << 20
    max_unpacked_bytes: int = 256 << 20
    max_code_entries: int = 20_000
    #: Past 16 MiB unpacked, an archive may inflate at most this many times its size.
    max_inflation_ratio: float = 50.0
    #: Requests that wait per function version once max concurrency is reached;
    #: past it the answer is 429.
    queue_per_function: int = 64
    #: Bytes of a result (stdout) and of logs (stderr) kept per invocation.
    max_result_bytes: int = 6 << 20
    max_log_bytes: int = 1 << 20
    #: Processes that start instances (each forks a container's monitor).
    launch_workers: int = 4
    #: How an instance gets its code (the three start paths, to measure them):
    #: "mount": a pre-warmed sandbox (a pooled one when `cocoon pool serve`
    #: runs, else a template clone) with the code bound in read-only, no copy;
    #: "copy": the same sandbox, the code copied into the container (tar over
    #: an exec); "cold": a VM booted for it (no template, no pool), the code
    #: shared from its boot.
    start_path: str = "mount"
    #: With start_path "mount" and a warm pool (`cocoon pool serve`): blank
    #: instances kept started per runtime (at the default size), an idle
    #: container with nothing at /code, each taken by one version's first
    #: new instance, which gets its code bound in (0 = none: every new
    #: instance is a container started for it).
    prewarm: int = 1
    #: Shell functions: each instance runs a shell loop (serve/shloop.py)
    #: that forks each invocation's handler, ~10x cheaper under TCG than the
    #: `crun exec` per invocation it replaces (false: an exec per invocation).
    shell_loop: bool = True


@dataclass
class Config:
    #: Runtime state, one dir per sandbox (tmpfs: gone on reboot with the VMs).
    root_dir: str = "/run/cocoon"
    #: Guest assets, images and service metadata (persistent).
    data_dir: str = "/var/lib/cocoon"
    hypervisor: HypervisorConfig = field(default_factory=HypervisorConfig)
    guest: GuestConfig = field(default_factory=GuestConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    images: ImagesConfig = field(default_factory=ImagesConfig)
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    shim: ShimConfig = field(default_factory=ShimConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    @property
    def root(self) -> Path:
        return Path(self.root_dir)

    @property
    def data(self) -> Path:
        return Path(self.data_dir)

    def validate(self) -> None:
        h = self.hypervisor
        _choice("hypervisor.backend", h.backend, ("qemu",))
        _choice("hypervisor.machine", h.machine, ("microvm", "q35"))
        _choice("hypervisor.accel", h.accel, ("auto", "kvm", "tcg"))
        _choice("hypervisor.shared_fs", h.shared_fs, ("virtio-fs", "9p", "none"))
        _choice("hypervisor.channel", h.channel, ("auto", "vsock", "virtio-serial"))
        _choice("guest.kernel_source", self.guest.kernel_source, ("build", "debian-cloud"))
        _choice("guest.image_compression", self.guest.image_compression, ("none", "lz4", "lz4hc"))
        _choice("network.model", self.network.model, ("tcfilter", "macvtap"))
        _choice("network.vhost", self.network.vhost, ("auto", "on", "off"))
        if not 1 <= h.vcpus <= 64:
            raise ConfigError(f"hypervisor.vcpus must be 1..64, not {h.vcpus}")
        if not 64 <= h.memory_mib <= 256 * 1024:
            raise ConfigError(f"hypervisor.memory_mib must be 64..262144, not {h.memory_mib}")
        if not 0 <= h.tcg_tb_size_mib <= 4096:
            raise ConfigError("hypervisor.tcg_tb_size_mib must be 0..4096")
        for name in ("boot_timeout_s", "agent_timeout_s", "keepalive_s"):
            if getattr(h, name) <= 0:
                raise ConfigError(f"hypervisor.{name} must be > 0")
        im = self.images
        if not 1 <= im.pull_concurrency <= 64:
            raise ConfigError("images.pull_concurrency must be 1..64")
        for name in ("max_unpacked_bytes", "max_entries", "max_layer_bytes", "max_unpack_cpu_s"):
            if getattr(im, name) <= 0:
                raise ConfigError(f"images.{name} must be > 0")
        if im.max_inflation_ratio < 10:
            # Real layers inflate up to ~7x: below 10, ordinary images would be refused.
            raise ConfigError("images.max_inflation_ratio must be >= 10")
        if im.inflation_floor_bytes < 0 or im.min_free_bytes < 0:
            raise ConfigError("images.inflation_floor_bytes and min_free_bytes must be >= 0")
        if not 0 <= im.min_free_percent < 100:
            raise ConfigError("images.min_free_percent must be 0..100 (exclusive)")
        if self.sandbox.template_dir and not os.path.isabs(self.sandbox.template_dir):
            raise ConfigError("sandbox.template_dir must be an absolute path")
        if not 0 <= self.pool.size <= 256:
            raise ConfigError("pool.size must be 0..256")
        if not 0 <= self.pool.nics <= 4:
            raise ConfigError("pool.nics must be 0..4")
        if self.pool.socket and not os.path.isabs(self.pool.socket):
            raise ConfigError("pool.socket must be an absolute path (or empty)")
        if not 0 <= self.shim.pool <= 16:
            raise ConfigError("shim.pool must be 0..16")
        if not 0 <= self.shim.pool_nics <= 4:
            raise ConfigError("shim.pool_nics must be 0..4")
        for c in self.pool.classes:
            v, _, m = c.partition("x")
            digits = (v + m).isascii() and v.isdigit() and m.isdigit()  # "²".isdigit() too
            if not (digits and len(c) < 12 and 1 <= int(v) <= 64 and int(m) >= 64):
                raise ConfigError(f"pool.classes: {c!r} is not VCPUSxMEMORY_MIB (e.g. 2x512)")
        if self.sandbox.max_starting < 0 or self.sandbox.start_queue_s <= 0:
            raise ConfigError("sandbox.max_starting must be >= 0, start_queue_s > 0")
        if self.sandbox.template_wait_s <= 0:
            raise ConfigError("sandbox.template_wait_s must be > 0")
        sec = self.security
        if sec.uid_base < 1000 or sec.uid_count < 1 or sec.uid_base + sec.uid_count >= 2**32 - 1:
            raise ConfigError("security.uid_base must be >= 1000 and the range below 2^32-1")
        sv = self.serve
        for name in ("socket", "state_dir"):
            if getattr(sv, name) and not os.path.isabs(getattr(sv, name)):
                raise ConfigError(f"serve.{name} must be an absolute path")
        for name in ("max_code_bytes", "max_unpacked_bytes", "max_code_entries",
                     "queue_per_function", "max_result_bytes", "max_log_bytes"):  # fmt: skip
            if getattr(sv, name) <= 0:
                raise ConfigError(f"serve.{name} must be > 0")
        _choice("serve.start_path", sv.start_path, ("mount", "copy", "cold"))
        if not 0 <= sv.prewarm <= 16:
            raise ConfigError("serve.prewarm must be 0..16")
        if not 1 <= sv.launch_workers <= 64 or sv.max_inflation_ratio < 2:
            raise ConfigError("serve.launch_workers must be 1..64, max_inflation_ratio >= 2")
        for name in ("root_dir", "data_dir"):
            if not os.path.isabs(getattr(self, name)):
                raise ConfigError(f"{name} must be an absolute path")
        if not os.path.isabs(self.shim.root_dir):
            raise ConfigError("shim.root_dir must be an absolute path")

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} = {value!r} is not one of {', '.join(map(repr, allowed))}")


def load(
    path: str | os.PathLike[str] | None = None,
    env: typing.Mapping[str, str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> Config:
    """Build the effective configuration; raise ConfigError naming the bad key."""
    env = os.environ if env is None else env
    cfg = Config()
    file = Path(path) if path else Path(env.get("COCOON_CONFIG") or DEFAULT_FILE)
    explicit = bool(path or env.get("COCOON_CONFIG"))
    if file.exists():
        # Imported here: most hosts have no file, and every cocoon and
        # cocoon-runtime process loads the configuration (~4 ms of each).
        import tomllib

        try:
            data = tomllib.loads(file.read_text())
        except (tomllib.TOMLDecodeError, OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read {file}: {e}") from e
        _apply(cfg, data, str(file))
    elif explicit:
        raise ConfigError(f"config file {file} does not exist")
    _apply_env(cfg, env)
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set(cfg, dotted.split("."), value, "flag")
    cfg.validate()
    return cfg


def _apply(obj: Any, data: dict[str, Any], where: str, prefix: str = "") -> None:
    for key, value in data.items():
        _set(obj, [key], value, where, prefix)


def _set(obj: Any, path: list[str], value: Any, where: str, prefix: str = "") -> None:
    key, rest = path[0], path[1:]
    name = prefix + key
    fields = {f.name: f for f in dataclasses.fields(obj)}
    if key not in fields:
        raise ConfigError(f"{where}: unknown setting {name!r} (see `cocoon env`)")
    hints = typing.get_type_hints(type(obj))
    tp = hints[key]
    current = getattr(obj, key)
    if dataclasses.is_dataclass(current):
        if rest:
            _set(current, rest, value, where, name + ".")
            return
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: [{name}] must be a table")
        _apply(current, value, where, name + ".")
        return
    if rest:
        raise ConfigError(f"{where}: {name} is not a table")
    setattr(obj, key, _convert(tp, value, f"{where}: {name}"))


def _convert(tp: Any, value: Any, what: str) -> Any:
    try:
        if tp is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            if not isinstance(value, bool):
                raise ValueError(value)
            return value
        if tp is int:
            if isinstance(value, bool):
                raise ValueError(value)
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if tp is str:
            if not isinstance(value, str):
                raise ValueError(value)
            return value
        if tp == list[str]:
            if isinstance(value, str):  # from the environment: comma-separated
                return [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError(value)
            return list(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{what}: {value!r} is not a valid {getattr(tp, '__name__', tp)}"
        ) from None
    raise ConfigError(f"{what}: unsupported type")


def _apply_env(cfg: Config, env: typing.Mapping[str, str]) -> None:
    sections = {
        f.name for f in dataclasses.fields(cfg) if dataclasses.is_dataclass(getattr(cfg, f.name))
    }
    for var, value in env.items():
        if not var.startswith("COCOON_") or var == "COCOON_CONFIG":
            continue
        rest = var[len("COCOON_") :].lower()
        section, _, key = rest.partition("_")
        if section in sections and key:
            _set(cfg, [section, key], value, f"${var}")
        elif rest in ("root_dir", "data_dir"):
            _set(cfg, [rest], value, f"${var}")
