"""A Kubernetes node without kubelet: containerd's CRI plugin, CNI, a registry.

What ``tests/compat/test_cri.py`` and ``bench/cri.py`` share: containerd
(Debian's 1.6, its own root, state, socket and config, the CRI plugin on)
with three runtime handlers, ``cocoon`` (cocoon's shim v2), ``cocoon-runtime``
(containerd's runc shim with ``BinaryName`` = this checkout's cocoon-runtime)
and ``runc`` (the reference); Debian's CNI bridge plugin on a private /24 of
its own (no masquerade, no route beyond it; conf and IPAM state in private
dirs); a local docker-registry on 127.0.0.1 holding the busybox image and a
pause image made of it, which containerd pulls over plain HTTP (nothing comes
from outside); and kubelet's calls (``run_pod``, ``create``) made as kubelet
makes them, its pod cgroup first.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from cocoon.config import load
from cocoon.runtime.busybox import busybox_rootfs
from cocoon.state import gc
from tests.compat.conftest import Containerd, oci_archive, runtime_bin
from tests.compat.cri import api_pb2 as api
from tests.compat.cri.client import Cri
from tests.images.servers import Registry

NAMESPACE = "k8s.io"  # the CRI plugin's containerd namespace


BRIDGE = "cocoon-cri0"


SUBNET = "10.231.7"  # .0/24: the bridge's, on this host only


CNI_BIN = Path("/usr/lib/cni")  # Debian's containernetworking-plugins


#: The pod cgroups this test makes, as kubelet's cgroupfs driver would.
CGROUP_ROOT = "cocoon-cri-test"


#: The pod VM's memory: the default 256 MiB leaves too little beside the
#: tests' 100 MiB allocation (kubelet would size it from the RuntimeClass
#: overhead).
VM_MIB = 512


@dataclass
class Env:
    containerd: Containerd
    cri: Cri
    registry: Registry
    busybox: str  # the image as kubelet names it
    runc_roots: dict[str, Path]  # handler -> its runc shim's state root
    base: Path

    def vm_roots(self) -> list[Path]:
        """Where the VM handlers keep state (their sandboxes' processes name it)."""
        # (the runc shim gives its runtime ``--root <Root>/<namespace>``)
        runc_path = self.runc_roots["cocoon-runtime"] / NAMESPACE
        return [self.containerd.shim_root / NAMESPACE, runc_path]


def _cri_config(
    sandbox_image: str, registry: str, cni_conf: Path, runc_roots: dict[str, Path], runtime: Path
) -> str:
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    runtimes = f"{cri}.containerd.runtimes"
    return f"""
[{cri}]
  sandbox_image = "{sandbox_image}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  disable_apparmor = true
  restrict_oom_score_adj = true
[{cri}.containerd]
  default_runtime_name = "runc"
[{runtimes}.runc]
  runtime_type = "io.containerd.runc.v2"
[{runtimes}.runc.options]
  Root = "{runc_roots["runc"]}"
[{runtimes}.cocoon-runtime]
  runtime_type = "io.containerd.runc.v2"
[{runtimes}.cocoon-runtime.options]
  BinaryName = "{runtime}"
  Root = "{runc_roots["cocoon-runtime"]}"
[{runtimes}.cocoon]
  runtime_type = "io.containerd.cocoon.v2"
[{cri}.cni]
  bin_dir = "{CNI_BIN}"
  conf_dir = "{cni_conf}"
  max_conf_num = 1
[{cri}.registry.mirrors."{registry}"]
  endpoint = ["http://{registry}"]
"""


def _cni_conf(conf_dir: Path, ipam_dir: Path) -> None:
    conf = {
        "cniVersion": "0.4.0",
        "name": "cocoon-cri-test",
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": True,
                "ipMasq": False,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": f"{SUBNET}.0/24"}]],
                    "dataDir": str(ipam_dir),
                },
            }
        ],
    }
    conf_dir.mkdir(parents=True)
    (conf_dir / "10-cocoon-cri-test.conflist").write_text(json.dumps(conf))


def push_archive(archive: Path, dest: str) -> None:
    """``skopeo copy oci-archive:... docker://dest`` (the helper's layout form,
    as an archive)."""
    policy = archive.parent / "policy.json"
    policy.write_text('{"default": [{"type": "insecureAcceptAnything"}]}')
    argv = ["skopeo", "--policy", str(policy), "copy", "--quiet", "--dest-tls-verify=false",
            f"oci-archive:{archive}", f"docker://{dest}"]  # fmt: skip
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def _pids_naming(*needles: bytes) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv = (d / "cmdline").read_bytes()
        except OSError:
            continue
        if all(n in argv for n in needles):
            out.append(int(d.name))
    return out


def shims(e: Env) -> list[int]:
    """Every shim (cocoon's or runc's) serving our containerd, and anything
    forked from cocoon's shim (its monitors carry its command line)."""
    return _pids_naming(b"containerd", b"-address\0" + str(e.containerd.sock).encode())


def vm_processes(e: Env) -> dict[int, str]:
    out: dict[int, str] = {}
    for root in e.vm_roots():
        out.update(gc.processes_naming(root))
    return out


def cgroups() -> list[Path]:
    return [p for p in Path("/sys/fs/cgroup").glob(f"*/{CGROUP_ROOT}") if p.is_dir()]


def make_pod_cgroup(path: str) -> None:
    """The pod's cgroup in every v1 hierarchy, made before RunPodSandbox as
    kubelet's cgroupfs driver makes it (containerd reads the pod's stats there)."""
    for top in Path("/sys/fs/cgroup").iterdir():
        if top.name == "unified" or not (top / "cgroup.procs").exists():
            continue
        d = top / path.lstrip("/")
        d.mkdir(parents=True, exist_ok=True)
        if top.name == "cpuset":  # an empty cpuset takes no task: inherit the root's
            for f in ("cpuset.cpus", "cpuset.mems"):
                for sub in (d.parent, d):
                    if not (sub / f).read_text().strip():
                        (sub / f).write_text((top / f).read_text())


def cgroup_members() -> dict[str, str]:
    """What is left in the pods' memory cgroups: cgroup -> the names of its processes."""
    out = {}
    for procs in Path("/sys/fs/cgroup/memory", CGROUP_ROOT).rglob("cgroup.procs"):
        names = []
        for pid in procs.read_text().split():
            with contextlib.suppress(OSError):
                names.append(f"{pid}:{Path(f'/proc/{pid}/comm').read_text().strip()}")
        if names:
            out[str(procs.parent)] = " ".join(names)
    return out


def remove_cgroups() -> None:
    """Remove the pod cgroups, deepest first (kubelet's part: the runtime
    removes only its containers')."""
    for top in cgroups():
        for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            with contextlib.suppress(OSError):
                d.rmdir()
        with contextlib.suppress(OSError):
            top.rmdir()


@dataclass
class Pod:
    id: str
    config: api.PodSandboxConfig
    logs: Path  # the pod's log directory, as kubelet makes it

    @property
    def cgroup(self) -> str:
        return self.config.linux.cgroup_parent


#: What kubelet asks of a pod without shareProcessNamespace or hostNetwork:
#: the pod's network and IPC, a PID namespace per container.
KUBELET_NAMESPACES = api.NamespaceOption(network=api.POD, pid=api.CONTAINER, ipc=api.POD)


def run_pod(e: Env, handler: str, name: str) -> Pod:
    """RunPodSandbox as kubelet asks it: metadata, hostname, a log directory it
    made, the pod's cgroup (cgroupfs driver), the handler."""
    uid = str(uuid.uuid4())
    logs = e.base / "pods" / f"cocoontest_{name}_{uid}"
    logs.mkdir(parents=True)
    parent = f"/{CGROUP_ROOT}/pod{uid}"
    make_pod_cgroup(parent)
    cfg = api.PodSandboxConfig(
        metadata=api.PodSandboxMetadata(name=name, uid=uid, namespace="cocoontest"),
        hostname=name,
        log_directory=str(logs),
        labels={"io.kubernetes.pod.name": name},
        linux=api.LinuxPodSandboxConfig(
            cgroup_parent=parent,
            security_context=api.LinuxSandboxSecurityContext(namespace_options=KUBELET_NAMESPACES),
        ),
    )
    req = api.RunPodSandboxRequest(config=cfg, runtime_handler=handler)
    return Pod(e.cri.rt("RunPodSandbox", req, 300).pod_sandbox_id, cfg, logs)


def create(e: Env, pod: Pod, name: str, image: str, argv: list[str]) -> str:
    """CreateContainer + StartContainer, the log at ``<name>/0.log`` below the
    pod's log directory (kubelet's layout)."""
    cfg = api.ContainerConfig(
        metadata=api.ContainerMetadata(name=name),
        image=api.ImageSpec(image=image),
        command=argv[:1],
        args=argv[1:],
        log_path=f"{name}/0.log",
        labels={"io.kubernetes.container.name": name},
        linux=api.LinuxContainerConfig(
            security_context=api.LinuxContainerSecurityContext(namespace_options=KUBELET_NAMESPACES)
        ),
    )
    req = api.CreateContainerRequest(pod_sandbox_id=pod.id, config=cfg, sandbox_config=pod.config)
    cid: str = e.cri.rt("CreateContainer", req, 300).container_id
    e.cri.rt("StartContainer", api.StartContainerRequest(container_id=cid), 300)
    return cid


@contextlib.contextmanager
def fork_server(e: Env, pool: int = 0) -> Iterator[subprocess.Popen[bytes]]:
    """The shim's fork server for our containerd (shim.forkserver), run as
    containerd runs the shim (this checkout's, its environment), stopped
    after; with ``pool``, that many pods' VMs kept ready (shim.carrier)."""
    shim = e.containerd.base / "bin" / "containerd-shim-cocoon-v2"
    env = {**os.environ, "COCOON_SHIM_ROOT_DIR": str(e.containerd.shim_root),
           "COCOON_HYPERVISOR_MEMORY_MIB": str(VM_MIB), "COCOON_SHIM_POOL": str(pool)}  # fmt: skip
    p = subprocess.Popen([str(shim), "-address", str(e.containerd.sock), "fork-server"],
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not list(e.containerd.shim_root.glob("forks-*.sock")):
            assert p.poll() is None and time.monotonic() < deadline, "no fork server"
            time.sleep(0.05)
        yield p
    finally:
        p.terminate()
        try:
            _, err = p.communicate(timeout=30)
        except subprocess.TimeoutExpired as e:
            p.kill()  # what it leaves, the clean fixture ends
            p.wait()
            tail = (e.stderr or b"").decode(errors="replace")[-2000:]
            raise AssertionError(f"the fork server did not stop in 30 s: {tail}") from None
        assert p.returncode == 0, err.decode(errors="replace")[-2000:]


def carriers_ready(e: Env) -> int:
    """How many of the fork server's pods' VMs are ready (0 while it has none
    or does not answer)."""
    from cocoon.config import load
    from cocoon.shim import forkserver

    cfg = load(env={"COCOON_SHIM_ROOT_DIR": str(e.containerd.shim_root)})
    try:
        return forkserver.status(cfg, str(e.containerd.sock))["ready"]
    except (OSError, ValueError, KeyError):
        return 0


def qemus(e: Env) -> list[int]:
    return [p for p, _ in vm_processes(e).items()
            if Path(f"/proc/{p}/comm").read_text().startswith("qemu")]  # fmt: skip


def pod_tree(e: Env) -> set[int]:
    """The VM handlers' monitors and everything they started (QEMU, virtiofsd,
    the 9p servers)."""
    tops: set[int] = set()
    for root in e.vm_roots():
        for st in root.glob("oci/*/state.json"):
            with contextlib.suppress(OSError, ValueError):
                tops.add(int(json.loads(st.read_bytes()).get("monitor_pid") or 0))
    return with_descendants({p for p in tops if p})


def parent(pid: int) -> int:
    """``pid``'s parent (0 when it is gone)."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def roots(pids: set[int]) -> set[int]:
    """The tops of the process trees ``pids`` make: those whose parent is not one of them."""
    return {p for p in pids if parent(p) not in pids and Path(f"/proc/{p}").exists()}


def with_descendants(pids: set[int]) -> set[int]:
    """``pids`` and every process below them."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            ppid = int(d.joinpath("stat").read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = set(), list(pids)
    while todo:
        p = todo.pop()
        if p not in out:
            out.add(p)
            todo += children.get(p, [])
    return out


@contextlib.contextmanager
def node(image_archive: Path, work: Path) -> Iterator[Env]:
    """The node up (registry fed, containerd's CRI answering ``v1``), torn
    down after; ``image_archive`` is ``conftest.oci_archive``'s busybox."""
    assert (CNI_BIN / "bridge").exists(), "containernetworking-plugins is not installed"
    routes = subprocess.run(["ip", "route"], capture_output=True, text=True).stdout
    assert f"{SUBNET}." not in routes, f"{SUBNET}.0/24 is in use on this host: {routes}"
    base = Path(tempfile.mkdtemp(prefix="cocoon-cri-"))
    run = Path(tempfile.mkdtemp(prefix="ctd-cri-", dir="/run"))
    registry = Registry(base / "registry")
    registry.start()
    c: Containerd | None = None
    cri: Cri | None = None
    try:
        # the pause image: the same tree, asleep (what the sandbox container runs)
        shutil.copytree(busybox_rootfs(load()), work / "rootfs", symlinks=True)
        (work / "rootfs").chmod(0o755)
        pause = oci_archive(work / "rootfs", work / "pause.tar", name="cocoon.test/pause:1",
                            cmd=("sleep", "2147483647"))  # fmt: skip
        push_archive(image_archive, f"{registry.host}/cocoon/busybox:1")
        push_archive(pause, f"{registry.host}/cocoon/pause:1")
        runc_roots = {h: run / f"runc-{h}" for h in ("runc", "cocoon-runtime")}
        _cni_conf(base / "cni", base / "ipam")
        config = _cri_config(
            f"{registry.host}/cocoon/pause:1", registry.host, base / "cni", runc_roots,
            runtime_bin(base / "rtbin"),
        )  # fmt: skip
        c = Containerd(base, run, cri=config, env={"COCOON_HYPERVISOR_MEMORY_MIB": str(VM_MIB)})
        cri = Cri(str(c.sock))
        deadline = time.monotonic() + 30
        while True:  # the CRI plugin serves once its own start is done
            try:
                v = cri.version()
                break
            except grpc.RpcError:
                assert time.monotonic() < deadline, (base / "containerd.log").read_text()[-3000:]
                time.sleep(0.2)
        assert v.runtime_api_version == "v1", v
        yield Env(c, cri, registry, f"{registry.host}/cocoon/busybox:1", runc_roots, base)
    finally:
        if cri:
            cri.close()
        if c:
            c.stop()
        registry.kill()
        subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True, check=False)
        shutil.rmtree(run, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)
