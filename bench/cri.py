#!/usr/bin/env python3
"""Pods through containerd's CRI plugin, the way kubelet starts them: runc,
the runc shim + cocoon-runtime, and cocoon's shim v2, side by side in one run.

The node is the CRI acceptance tests' (tests/compat/cri/node.py: containerd
1.6 with the CRI plugin and the three runtime handlers, Debian's CNI bridge
on a private /24, images from a local registry). For each run and handler,
in turn:

1. pod start: RunPodSandbox + CreateContainer + StartContainer of a busybox
   `sleep`, until ContainerStatus says running (the image pulled once before);
2. the pod's host processes and their PSS: what is in the pod's host cgroup
   (kubelet's) and the shims serving the pod, with their descendants;
3. pod removal: StopContainer + StopPodSandbox + RemovePodSandbox.

Medians of --runs (10) with min/max, and issue 17's targets: pod start
through the shim v2 <= 5x runc's, no slower than the runc shim +
cocoon-runtime, one host process tree per pod. gVisor is not in the run:
Debian's runsc package ships no containerd shim (containerd-shim-runsc-v1).

Run as root, from the checkout, while nothing else boots VMs:

    COCOON_DATA_DIR=... PYTHONPATH=src python3 bench/cri.py [--runs 10] [--pool] [--fork-server]

``--pool``: a warm pool of VMs with the pods' NIC for each VM handler;
``--fork-server``: the shim's fork server (each pod's shim forked from a
process that has the library imported). With both, the shim's pool is the
fork server's own (shim.pool: each pod's VM waits under the shim process
that will serve the pod, shim.carrier), so a pod's processes stay one tree;
otherwise it is a `cocoon pool serve` on the handler's state root, whose VMs
stay that server's children (the pod's processes are then more than one
tree: the shim's, and the VM's under the pool server).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(CHECKOUT))  # the tests' node and client

from memory import pss_kib  # noqa: E402 (bench/memory.py: the script's dir is on sys.path)
from tests.compat.conftest import image_archive_of  # noqa: E402
from tests.compat.cri import api_pb2 as api  # noqa: E402
from tests.compat.cri.node import (  # noqa: E402
    NAMESPACE,
    VM_MIB,
    Env,
    Pod,
    carriers_ready,
    create,
    fork_server,
    node,
    remove_cgroups,
    roots,
    run_pod,
    shims,
    with_descendants,
)

HANDLERS = ("runc", "cocoon-runtime", "cocoon")


def pod_processes(e: Env, pod: Pod) -> set[int]:
    """The pod's host processes: its cgroup's (every process the runtime put
    there) and the shims serving it (their command lines name the sandbox,
    or their forks do), with all their descendants."""
    found: set[int] = set()
    top = Path("/sys/fs/cgroup/memory") / pod.cgroup.lstrip("/")
    for procs in top.rglob("cgroup.procs"):
        found |= {int(p) for p in procs.read_text().split()}
    for pid in shims(e):
        with contextlib.suppress(OSError):
            if pod.id.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.add(pid)
    return with_descendants(found)


def one_pod(e: Env, handler: str, image: str, i: int) -> dict[str, float]:
    t0 = time.monotonic()
    pod = run_pod(e, handler, f"bench-{handler}-{i}")
    cid = create(e, pod, "app", image, ["sleep", "100000"])
    while True:
        st = e.cri.rt("ContainerStatus", api.ContainerStatusRequest(container_id=cid)).status
        if st.state == api.CONTAINER_RUNNING:
            break
        if time.monotonic() - t0 > 300:
            raise SystemExit(f"{handler}: the pod's container is not running after 300 s: {st}")
        time.sleep(0.01)
    start = time.monotonic() - t0
    procs = pod_processes(e, pod)
    pss = sum(pss_kib(p) for p in procs) / 1024
    tops = roots(procs)  # (while they live)
    t1 = time.monotonic()
    e.cri.rt("StopContainer", api.StopContainerRequest(container_id=cid, timeout=0), 120)
    e.cri.rt("StopPodSandbox", api.StopPodSandboxRequest(pod_sandbox_id=pod.id), 120)
    e.cri.rt("RemovePodSandbox", api.RemovePodSandboxRequest(pod_sandbox_id=pod.id), 120)
    removal = time.monotonic() - t1
    deadline = time.monotonic() + 60
    while pod_processes(e, pod) and time.monotonic() < deadline:  # the next run starts clean
        time.sleep(0.1)
    return {"start": start, "remove": removal, "procs": len(procs), "trees": len(tops),
            "pss": pss}  # fmt: skip


@contextlib.contextmanager
def pools(e: Env, on: bool, carriers: bool) -> Iterator[Callable[[], None]]:
    """With ``on``, a pool server on each VM handler's state root (the shim's
    <shim root>/k8s.io, unless the fork server's ``carriers`` pool it,
    cocoon-runtime's --root), stopped after; yields what refills them before
    a start (a no-op without)."""
    if not on:
        yield lambda: None
        return
    cocoon = [sys.executable, "-m", "cocoon.cli"]
    roots = e.vm_roots()
    if carriers:
        roots = [r for r in roots if r != e.containerd.shim_root / NAMESPACE]
    # the pods' size (the node's VM_MIB) and NIC (CNI's veth)
    env = {**os.environ, "COCOON_HYPERVISOR_MEMORY_MIB": str(VM_MIB)}
    servers = [subprocess.Popen([*cocoon, "--root", str(r), "pool", "serve", "--size", "1",
                                 "--nics", "1"], stderr=subprocess.DEVNULL, env=env)
               for r in roots]  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not all((r / "pool.sock").exists() for r in roots):
            if time.monotonic() > deadline:
                raise SystemExit("the pool servers did not start")
            time.sleep(0.1)

        def settle() -> None:
            for r in roots:
                subprocess.run([*cocoon, "--root", str(r), "pool", "fill"], check=True,
                               stdout=subprocess.DEVNULL, env=env)  # fmt: skip
            deadline = time.monotonic() + 120
            while carriers and carriers_ready(e) < 1:
                if time.monotonic() > deadline:
                    raise SystemExit("the fork server's pod VM is not ready after 120 s")
                time.sleep(0.1)

        yield settle
    finally:
        for p in servers:
            p.terminate()
        for p in servers:
            p.wait(timeout=60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--handlers", default=",".join(HANDLERS))
    ap.add_argument(
        "--pool",
        action="store_true",
        help="a warm pool (`cocoon pool serve --nics 1`) on each VM handler's state root",
    )
    ap.add_argument(
        "--fork-server",
        action="store_true",
        help="the shim's fork server (`containerd-shim-cocoon-v2 fork-server`)",
    )
    args = ap.parse_args()
    handlers = [h for h in args.handlers.split(",") if h]
    if unknown := set(handlers) - set(HANDLERS):
        raise SystemExit(f"unknown handlers: {sorted(unknown)} (known: {', '.join(HANDLERS)})")
    work = Path(tempfile.mkdtemp(prefix="cocoon-bench-cri-"))
    results: dict[str, list[dict[str, float]]] = {h: [] for h in handlers}
    try:
        with (
            node(image_archive_of(work), work) as e,
            pools(e, args.pool, carriers=args.fork_server) as settle,
            fork_server(e, pool=1 if args.pool else 0)
            if args.fork_server
            else contextlib.nullcontext(),
        ):
            first = run_pod(e, "runc", "bench-pull")
            image = e.cri.pull(e.busybox, first.config)
            e.cri.rt("StopPodSandbox", api.StopPodSandboxRequest(pod_sandbox_id=first.id))
            e.cri.rt("RemovePodSandbox", api.RemovePodSandboxRequest(pod_sandbox_id=first.id))
            for i in range(args.runs):
                for h in handlers:  # interleaved: the host's noise falls on all alike
                    settle()
                    results[h].append(one_pod(e, h, image, i))
                    print(f"run {i + 1}/{args.runs} {h}: {results[h][-1]}", file=sys.stderr)
    finally:
        remove_cgroups()
        shutil.rmtree(work, ignore_errors=True)
    report(results, args.runs)


def report(results: dict[str, list[dict[str, float]]], runs: int) -> None:
    def med(h: str, k: str) -> float:
        return statistics.median(r[k] for r in results[h])

    def span(h: str, k: str) -> str:
        xs = [r[k] for r in results[h]]
        return f"{statistics.median(xs):.3f} ({min(xs):.3f}-{max(xs):.3f})"

    print(f"\nPods through containerd's CRI plugin, medians of {runs} (min-max):")
    print("| handler | pod start s | pod removal s | host processes | trees | host PSS MiB |")
    print("|---|---|---|---|---|---|")
    for h in results:
        print(f"| {h} | {span(h, 'start')} | {span(h, 'remove')} | {med(h, 'procs'):.0f} | "
              f"{med(h, 'trees'):.0f} | {med(h, 'pss'):.1f} |")  # fmt: skip
    print("gVisor: not measured (Debian's runsc ships no containerd shim)")
    targets = []
    if {"cocoon", "runc"} <= results.keys():
        r = med("cocoon", "start") / med("runc", "start")
        targets.append(("pod start, shim v2 / runc <= 5x", f"{r:.1f}x", r <= 5))
    if {"cocoon", "cocoon-runtime"} <= results.keys():
        r = med("cocoon", "start") / med("cocoon-runtime", "start")
        targets.append(("pod start, shim v2 / runc shim + cocoon-runtime <= 1x", f"{r:.2f}x",
                        r <= 1))  # fmt: skip
    if "cocoon" in results:
        n = med("cocoon", "trees")
        targets.append(("shim v2: one host process tree per pod", f"{n:.0f}", n == 1))
    print("\nIssue 17's targets:")
    for name, got, met in targets:
        print(f"| {name} | {got} | {'met' if met else 'MISSED'} |")


if __name__ == "__main__":
    main()
