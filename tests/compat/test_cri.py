"""CRI acceptance, the kubelet way: containerd 1.6's CRI plugin over its gRPC API.

containerd (Debian's 1.6, its own root, state, socket and config, the CRI
plugin on) gets three runtime handlers: ``cocoon`` (cocoon's shim v2),
``cocoon-runtime`` (containerd's runc shim with ``BinaryName`` = this
checkout's cocoon-runtime) and ``runc`` (the reference). Pods are networked by
Debian's CNI plugins (a bridge on a private /24 of its own, no masquerade, no
route beyond it; the conf and IPAM state in private dirs). Images come from a
local docker-registry on 127.0.0.1 (the busybox tree the other tests use, and
a pause image made of it), which containerd pulls from over plain HTTP:
nothing is pulled from outside.

The test client (``tests/compat/cri``) makes kubelet's calls in kubelet's
order. Each handler's pod boots one VM (none for runc). After every test: no
shim, QEMU or virtiofsd process, network namespace, mount or pod cgroup left.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from cocoon.config import load
from cocoon.runtime.busybox import busybox_rootfs
from cocoon.state import gc
from cocoon.util.fs import mount_points_under
from tests.compat.conftest import Containerd, oci_archive, runtime_bin
from tests.compat.cri import api_pb2 as api
from tests.compat.cri.client import Cri
from tests.images.servers import Registry, require

pytestmark = [pytest.mark.vm, pytest.mark.timeout(600)]

NAMESPACE = "k8s.io"  # the CRI plugin's containerd namespace
BRIDGE = "cocoon-cri0"
SUBNET = "10.231.7"  # .0/24: the bridge's, on this host only
CNI_BIN = Path("/usr/lib/cni")  # Debian's containernetworking-plugins
#: The pod cgroups this test makes, as kubelet's cgroupfs driver would.
CGROUP_ROOT = "cocoon-cri-test"
#: What a container allocates and its working set must show.
ALLOC = 100 << 20
#: The pod VM's memory: the default 256 MiB leaves too little beside ALLOC
#: (kubelet would size it from the RuntimeClass overhead).
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


@pytest.fixture(scope="module")
def env(image_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    require("containerd", "docker-registry", "skopeo")
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
        work = tmp_path_factory.mktemp("cri-images")
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


def push_archive(archive: Path, dest: str) -> None:
    """``skopeo copy oci-archive:... docker://dest`` (the helper's layout form,
    as an archive)."""
    policy = archive.parent / "policy.json"
    policy.write_text('{"default": [{"type": "insecureAcceptAnything"}]}')
    argv = ["skopeo", "--policy", str(policy), "copy", "--quiet", "--dest-tls-verify=false",
            f"oci-archive:{archive}", f"docker://{dest}"]  # fmt: skip
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


# -- what a test leaves -------------------------------------------------------


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


def netns() -> set[str]:
    d = Path("/run/netns")
    return {p.name for p in d.iterdir()} if d.is_dir() else set()


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


@pytest.fixture
def clean(env: Env) -> Iterator[None]:
    """After the test: every pod gone through the CRI, and nothing left of them."""
    nets = netns()
    yield
    for pod in env.cri.rt("ListPodSandbox", api.ListPodSandboxRequest()).items:
        with contextlib.suppress(grpc.RpcError):
            env.cri.rt("StopPodSandbox", api.StopPodSandboxRequest(pod_sandbox_id=pod.id))
            env.cri.rt("RemovePodSandbox", api.RemovePodSandboxRequest(pod_sandbox_id=pod.id))
    deadline = time.monotonic() + 30
    while True:
        procs, vms = shims(env), vm_processes(env)
        if not procs and not vms:
            break
        if time.monotonic() > deadline:
            for pid in procs:  # leave nothing for the next test
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            for root in env.vm_roots():
                gc.reap(root, force=True)
            remove_cgroups()
            logged = (env.base / "containerd.log").read_text(errors="replace")[-6000:]
            pytest.fail(f"left behind: shims {procs}, VM processes {vms}, in the pods' cgroups "
                        f"{cgroup_members()}; containerd:\n{logged}")  # fmt: skip
        time.sleep(0.2)
    assert not mount_points_under(env.containerd.run), "mounts left in containerd's state"
    assert not mount_points_under(env.base), "mounts left in containerd's root"
    assert not netns() - nets, f"network namespaces left: {netns() - nets}"
    # the runtime removes its containers' cgroups, kubelet the pods'
    left = sorted({d.name for top in cgroups() for d in top.glob("pod*/*") if d.is_dir()})
    members = cgroup_members()
    remove_cgroups()
    assert not left, f"container cgroups left in the pods' cgroups: {left}, holding {members}"
    assert not cgroups(), f"pod cgroups left: {cgroups()}"


# -- kubelet's calls ----------------------------------------------------------


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


def exec_sync(e: Env, cid: str, *argv: str) -> api.ExecSyncResponse:
    req = api.ExecSyncRequest(container_id=cid, cmd=list(argv), timeout=60)
    reply: api.ExecSyncResponse = e.cri.rt("ExecSync", req, 90)
    return reply


def status(e: Env, cid: str) -> api.ContainerStatus:
    reply = e.cri.rt("ContainerStatus", api.ContainerStatusRequest(container_id=cid))
    st: api.ContainerStatus = reply.status
    return st


def stats(e: Env, cid: str) -> api.ContainerStats:
    st: api.ContainerStats = e.cri.rt(
        "ContainerStats", api.ContainerStatsRequest(container_id=cid)
    ).stats
    return st


def until(what: str, check, timeout: float = 60):  # type: ignore[no-untyped-def]
    """``check()``'s first true value, polled; fails saying ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except (OSError, grpc.RpcError, AssertionError) as err:
            last = err
        time.sleep(0.3)
    pytest.fail(f"{what}: still {last!r} after {timeout:.0f} s")


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
    children: dict[int, list[int]] = {}
    for d in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            ppid = int(d.joinpath("stat").read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = set(), [p for p in tops if p]
    while todo:
        p = todo.pop()
        if p not in out:
            out.add(p)
            todo += children.get(p, [])
    return out


def _in_cgroup(pid: int, parent: str) -> bool:
    """Whether ``pid`` is below ``parent`` in every hierarchy it is in."""
    lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    return all(line.split(":", 2)[2].startswith(parent + "/") for line in lines)


HOST_BOOT_ID = Path("/proc/sys/kernel/random/boot_id").read_text()


@pytest.mark.parametrize("handler", ["runc", "cocoon-runtime", "cocoon"])
def test_a_pod_the_kubelet_way(env: Env, clean: None, handler: str) -> None:
    """One pod, two containers, every call kubelet makes on the way, checked
    against what each call should have done; runc is the reference."""
    e = env
    pod = run_pod(e, handler, f"pod-{handler}")
    st = e.cri.rt("PodSandboxStatus", api.PodSandboxStatusRequest(pod_sandbox_id=pod.id)).status
    assert st.state == api.SANDBOX_READY and st.runtime_handler == handler, st
    ip = st.network.ip
    assert ip.startswith(f"{SUBNET}."), f"no pod IP from CNI: {st}"

    image = e.cri.pull(e.busybox, pod.config)
    assert image.startswith("sha256:"), image
    # (web's sh is its PID 1, which gets SIGTERM only by a trap)
    web = create(e, pod, "web", image, ["sh", "-c",
        "echo hello-from-pod > /tmp/index.html; echo started; echo to-stderr >&2; "
        "httpd -f -p 8080 -h /tmp & trap 'kill $!; exit 0' TERM; wait"])  # fmt: skip
    mem = create(e, pod, "mem", image, ["awk",
        f'BEGIN {{ s = sprintf("%{ALLOC}s", ""); print "allocated"; fflush(); '
        'system("sleep 100000") }'])  # fmt: skip

    # the pod IP, from the host, to a server in the pod
    page = until("the pod's server from the host", lambda: urllib.request.urlopen(
        f"http://{ip}:8080/index.html", timeout=5).read())  # fmt: skip
    assert page == b"hello-from-pod\n"
    ping = ["busybox", "ping", "-c", "1", "-W", "10", ip]
    r = subprocess.run(ping, capture_output=True, timeout=30)
    assert r.returncode == 0, r.stdout

    # ListContainers, ContainerStatus, the log where kubelet asked for it
    listed = e.cri.rt("ListContainers", api.ListContainersRequest(
        filter=api.ContainerFilter(pod_sandbox_id=pod.id))).containers  # fmt: skip
    assert {(c.id, c.metadata.name, c.state) for c in listed} == {
        (web, "web", api.CONTAINER_RUNNING), (mem, "mem", api.CONTAINER_RUNNING)}  # fmt: skip
    s = status(e, web)
    assert (s.state, s.metadata.name, s.log_path) == (
        api.CONTAINER_RUNNING, "web", str(pod.logs / "web/0.log"))  # fmt: skip
    repo = e.busybox.rsplit(":", 1)[0]
    assert s.started_at > 0 and s.image_ref.startswith(f"{repo}@sha256:"), s
    log = until("the CRI log", lambda: (lines := (pod.logs / "web/0.log").read_text().splitlines())
                and len(lines) >= 2 and lines)  # fmt: skip
    assert sorted(line.split(" ", 1)[1] for line in log) == [
        "stderr F to-stderr", "stdout F started"]  # fmt: skip

    # ExecSync: output, code; the two containers share localhost and the VM
    r = exec_sync(e, web, "sh", "-c", "echo out; echo err >&2; exit 3")
    assert (r.stdout, r.stderr, r.exit_code) == (b"out\n", b"err\n", 3)
    r = exec_sync(e, mem, "wget", "-qO-", "http://127.0.0.1:8080/index.html")
    assert (r.stdout, r.exit_code) == (b"hello-from-pod\n", 0), r.stderr
    boots = {exec_sync(e, c, "cat", "/proc/sys/kernel/random/boot_id").stdout for c in (web, mem)}
    assert len(boots) == 1, boots
    if handler == "runc":
        assert boots == {HOST_BOOT_ID.encode()}
    else:
        assert boots != {HOST_BOOT_ID.encode()}, "a VM handler's container runs on the host"
        assert len(qemus(e)) == 1, "the pod's two containers are not in one VM"
        # the pod's host processes in the pod's host cgroup, in every hierarchy
        # (the runc shim is containerd's, not the pod's: only cocoon's shim)
        ours = set(vm_processes(e)) | pod_tree(e)
        ours |= set(shims(e)) if handler == "cocoon" else set()
        names = {Path(f"/proc/{p}/comm").read_text().strip() for p in ours}
        assert {"qemu-system-x86", "python"} <= names, names  # the monitor, its file servers
        for pid in ours:
            assert _in_cgroup(pid, pod.cgroup), (pid, Path(f"/proc/{pid}/cmdline").read_bytes())

    # stats: the container that allocated shows it, the idle one does not.
    # Not through the runc shim: it reads the host cgroup of the process
    # cocoon-runtime names as the container (its stand-in), not the guest's,
    # which is why the shim v2 exists (issue 17); the figures are only listed.
    until("mem's allocation", lambda: "allocated" in (pod.logs / "mem/0.log").read_text())
    true_stats = handler != "cocoon-runtime"
    if true_stats:
        ws = until("mem's working set", lambda: (
            v := stats(e, mem).memory.working_set_bytes.value) >= ALLOC and v)  # fmt: skip
        idle = stats(e, web)
        assert idle.memory.working_set_bytes.value < ALLOC // 2, (ws, idle)
        assert idle.cpu.usage_core_nano_seconds.value > 0, idle
    pods = e.cri.rt("ListPodSandboxStats", api.ListPodSandboxStatsRequest(
        filter=api.PodSandboxStatsFilter(id=pod.id))).stats  # fmt: skip
    assert [p.attributes.id for p in pods] == [pod.id], pods
    by_name = {c.attributes.metadata.name: c for c in pods[0].linux.containers}
    assert set(by_name) == {"web", "mem"}, pods
    if true_stats:
        assert by_name["mem"].memory.working_set_bytes.value >= ALLOC, by_name["mem"]
    # the pod's own cgroup (kubelet's), where the pod's host processes are
    assert pods[0].linux.memory.working_set_bytes.value >= ALLOC, pods[0].linux.memory

    # UpdateContainerResources: the new limit, in the container's cgroup (and
    # as the stats read it back)
    limit = 400 << 20
    new = api.LinuxContainerResources(memory_limit_in_bytes=limit)
    e.cri.rt("UpdateContainerResources",
             api.UpdateContainerResourcesRequest(container_id=mem, linux=new))  # fmt: skip
    # (the guest's cgroup v2 tree, whole; the host's v1 memory controller, the
    # container's own cgroup at its root)
    r = exec_sync(e, mem, "sh", "-c",
        "f=/sys/fs/cgroup$(sed -n 's/^0:://p' /proc/self/cgroup)/memory.max; "
        "cat $f 2>/dev/null || cat /sys/fs/cgroup/memory/memory.limit_in_bytes")  # fmt: skip
    assert r.stdout == f"{limit}\n".encode(), r
    if true_stats:
        m = stats(e, mem).memory
        assert m.available_bytes.value + m.working_set_bytes.value == limit, m

    # StopContainer (SIGTERM, then SIGKILL at the timeout), RemoveContainer
    e.cri.rt("StopContainer", api.StopContainerRequest(container_id=web, timeout=10), 60)
    s = status(e, web)
    assert s.state == api.CONTAINER_EXITED and s.finished_at >= s.started_at, s
    assert (s.exit_code, s.reason) == (0, "Completed"), s  # the trap, not the timeout
    e.cri.rt("RemoveContainer", api.RemoveContainerRequest(container_id=web))
    listed = e.cri.rt("ListContainers", api.ListContainersRequest(
        filter=api.ContainerFilter(pod_sandbox_id=pod.id))).containers  # fmt: skip
    assert [c.id for c in listed] == [mem]
    # the pod lives on without it
    r = exec_sync(e, mem, "true")
    assert r.exit_code == 0

    # StopPodSandbox ends the rest, RemovePodSandbox removes it
    e.cri.rt("StopPodSandbox", api.StopPodSandboxRequest(pod_sandbox_id=pod.id), 120)
    st = e.cri.rt("PodSandboxStatus", api.PodSandboxStatusRequest(pod_sandbox_id=pod.id)).status
    assert st.state == api.SANDBOX_NOTREADY, st
    assert status(e, mem).state == api.CONTAINER_EXITED
    e.cri.rt("RemovePodSandbox", api.RemovePodSandboxRequest(pod_sandbox_id=pod.id), 120)
    assert not e.cri.rt("ListPodSandbox", api.ListPodSandboxRequest()).items


def _sleeper_pod(e: Env, name: str) -> tuple[Pod, str]:
    pod = run_pod(e, "cocoon", name)
    image = e.cri.pull(e.busybox, pod.config)
    return pod, create(e, pod, "sleeper", image, ["sleep", "100000"])


def _remove(e: Env, pod: Pod) -> None:
    e.cri.rt("StopPodSandbox", api.StopPodSandboxRequest(pod_sandbox_id=pod.id), 120)
    e.cri.rt("RemovePodSandbox", api.RemovePodSandboxRequest(pod_sandbox_id=pod.id), 120)
    assert not e.cri.rt("ListPodSandbox", api.ListPodSandboxRequest()).items


def _pod_state(e: Env, pod: Pod) -> int:
    req = api.PodSandboxStatusRequest(pod_sandbox_id=pod.id)
    state: int = e.cri.rt("PodSandboxStatus", req).status.state
    return state


def test_a_killed_vm_ends_the_pods_containers(env: Env, clean: None) -> None:
    """kill -9 of the pod's QEMU: its containers exit (SIGKILL's 137, reason
    Error, as kubelet reads a crash), the sandbox is no longer ready, and the
    pod's removal leaves nothing."""
    e = env
    pod, cid = _sleeper_pod(e, "pod-killed-vm")
    (qemu,) = qemus(e)
    os.kill(qemu, signal.SIGKILL)
    s = until(
        "the container's exit", lambda: (s := status(e, cid)).state == api.CONTAINER_EXITED and s
    )
    assert (s.exit_code, s.reason) == (137, "Error"), s
    until("the sandbox's end", lambda: _pod_state(e, pod) == api.SANDBOX_NOTREADY)
    _remove(e, pod)


def test_a_killed_shim_is_a_dead_pod(env: Env, clean: None) -> None:
    """kill -9 of the pod's shim: containerd sees its tasks dead (the shim's
    containers die with it), and the pod's removal cleans up after it."""
    e = env
    pod, cid = _sleeper_pod(e, "pod-killed-shim")
    # the shim serving the pod's socket (its monitors are its forks: skip them)
    monitors = set()
    for st in (e.containerd.shim_root / NAMESPACE).glob("oci/*/state.json"):
        with contextlib.suppress(OSError, ValueError):
            monitors.add(int(json.loads(st.read_bytes()).get("monitor_pid") or 0))
    (shim,) = [p for p in shims(e) if p not in monitors]
    os.kill(shim, signal.SIGKILL)
    s = until(
        "the container's exit", lambda: (s := status(e, cid)).state == api.CONTAINER_EXITED and s
    )
    assert s.exit_code != 0 and s.reason == "Error", s
    until("the sandbox's end", lambda: _pod_state(e, pod) == api.SANDBOX_NOTREADY)
    _remove(e, pod)
