#!/usr/bin/env python3
"""Cold start: `cocoon run --rm busybox true` beside `crun run` of the same
busybox root file system on the host, medians of 10 in one run, plus the host
memory (PSS) one running container costs each way.

crun refuses this kind of host ("cgroups in hybrid mode") while the cgroup v2
mount still holds the hugetlb controller; like MACHINE-NOTES says, the script
mounts hugetlb as its own v1 hierarchy first (and says so) when that is needed.

    python3 bench/run.py [--runs 10]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from memory import pss_kib, tree_pss_mib  # bench/memory.py (the script dir is on sys.path)
from promises import Promises

from cocoon.config import Config, load
from cocoon.runtime.busybox import busybox_rootfs
from cocoon.runtime.records import ContainerStore
from cocoon.state import gc


def make_crun_ready() -> None:
    unified = Path("/sys/fs/cgroup/unified/cgroup.controllers")
    if unified.exists() and "hugetlb" in unified.read_text().split():
        hp = Path("/sys/fs/cgroup/hugetlb")
        if not hp.is_dir() or not os.path.ismount(hp):
            hp.mkdir(exist_ok=True)
            subprocess.run(["mount", "-t", "cgroup", "-o", "hugetlb", "none", str(hp)], check=True)
            print("(mounted the hugetlb cgroup v1 hierarchy so crun accepts this hybrid host)")


def bundle(work: Path, rootfs: Path, args: list[str]) -> Path:
    b = work / "bundle"
    if b.exists():
        shutil.rmtree(b)
    b.mkdir()
    shutil.copytree(rootfs, b / "rootfs", symlinks=True)
    subprocess.run(["crun", "spec"], cwd=b, check=True)
    spec = json.loads((b / "config.json").read_text())
    spec["process"].update(args=args, terminal=False)
    (b / "config.json").write_text(json.dumps(spec))
    return b


def timed(argv: list[str], **kw: object) -> float:
    t0 = time.monotonic()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, **kw)  # type: ignore[call-overload]
    return time.monotonic() - t0


#: A cold boot: with templates on (the default) `run` restores a clone, which
#: bench/start.py measures beside the peers.
COLD = {**os.environ, "COCOON_SANDBOX_TEMPLATES": "false"}


def cfg_for(root: str) -> Config:
    c = load()
    c.root_dir = root
    return c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args()
    if not shutil.which("crun"):
        raise SystemExit("crun not found: run scripts/setup.sh")
    make_crun_ready()
    cfg = load()
    root = tempfile.mkdtemp(prefix="cocoon-runbench-", dir="/run")
    work = Path(tempfile.mkdtemp(prefix="cocoon-runbench-"))
    cli = [sys.executable, "-m", "cocoon.cli", "--root", root]
    try:
        b = bundle(work, busybox_rootfs(cfg), ["true"])
        ours, peer = [], []
        for i in range(args.runs):
            ours.append(timed([*cli, "run", "--rm", "busybox", "true"], env=COLD))
            peer.append(timed(["crun", "run", "--bundle", str(b), f"bench-{os.getpid()}-{i}"]))

        # Memory of one running container, each way: cocoon's is its monitor
        # (the host process that owns the VM) with QEMU under it; no CLI stays.
        run = subprocess.run(
            [*cli, "run", "-d", "busybox", "sleep", "60"], check=True, capture_output=True
        )
        cid = run.stdout.decode().strip()
        time.sleep(3)
        monitor = ContainerStore(cfg_for(root)).resolve(cid).state().monitor_pid
        ours_pss = tree_pss_mib(monitor)
        monitor_pss = pss_kib(monitor) / 1024
        subprocess.run([*cli, "rm", "-f", cid], check=True, capture_output=True)
        b = bundle(work, busybox_rootfs(cfg), ["sleep", "30"])
        cid = f"bench-{os.getpid()}-mem"
        c = subprocess.Popen(["crun", "run", "--bundle", str(b), cid])
        time.sleep(1)
        crun_pss = tree_pss_mib(c.pid)
        subprocess.run(["crun", "kill", cid, "KILL"], check=False)
        c.wait()
        subprocess.run(["crun", "delete", "--force", cid], check=False)

        accel = json.loads((Path(root) / "accel.json").read_text()).get("kvm_usable")
        print(
            f"cold start, busybox `true` (median of {args.runs}; accel={'kvm' if accel else 'tcg'})"
        )
        print(f"{'runtime':<36} {'median s':>9} {'min':>7} {'max':>7}")
        for name, xs in (("cocoon run --rm (VM per container)", ours), ("crun run (host)", peer)):
            print(f"{name:<36} {statistics.median(xs):>9.3f} {min(xs):>7.3f} {max(xs):>7.3f}")
        print(f"ratio cocoon / crun: {statistics.median(ours) / statistics.median(peer):.1f}")
        print("host PSS of one running container (monitor + VM, or crun's container process):")
        print(f"  cocoon {ours_pss:.1f} MiB (monitor {monitor_pss:.1f})   crun {crun_pss:.1f} MiB")
        promises = Promises()
        cold = promises.at_most("`cocoon run --rm busybox true`, cold boot, median", 2.0, "s")
        cold.measured = statistics.median(ours)
        promises.finish()
    finally:
        gc.reap(Path(root), force=True)
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
