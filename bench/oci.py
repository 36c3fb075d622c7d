#!/usr/bin/env python3
"""OCI runtime benchmark: crun vs cocoon-runtime, side by side in one run.

1. create + start + wait + delete of a busybox bundle running `true` (the
   bench is the subreaper, like containerd's shim, and reaps the container's
   host process: crun's init, cocoon's stand-in);
2. `podman run --rm` of the same tree imported as an image;
3. host memory (PSS) of cocoon's stand-in process for one running container
   (what conmon/the shim see as the container), and of its monitor + VM.

Medians of --runs (10) with min/max.

    python3 bench/oci.py [--runs 10]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
from pathlib import Path

from memory import pss_kib  # bench/memory.py (the script's dir is on sys.path)

from cocoon.config import load
from cocoon.runtime.busybox import busybox_rootfs

PR_SET_CHILD_SUBREAPER = 36


def installed(script: str) -> str:
    """The console script itself, not a version manager's shim in front of it
    (pyenv's costs ~0.35 s per call, and podman calls the runtime 4-5 times)."""
    own = Path(sysconfig.get_path("scripts")) / script
    return str(own) if own.exists() else shutil.which(script) or script


def make_crun_ready() -> None:
    """crun refuses this host's hybrid cgroups until hugetlb is its own v1 hierarchy."""
    hp = Path("/sys/fs/cgroup/hugetlb")
    if Path("/sys/fs/cgroup/memory").is_dir() and not hp.is_dir():
        subprocess.run(["mkdir", "-p", str(hp)], check=False)
    if hp.is_dir() and subprocess.run(["mountpoint", "-q", str(hp)]).returncode != 0:
        subprocess.run(["mount", "-t", "cgroup", "-o", "hugetlb", "none", str(hp)], check=False)


def bundle(work: Path, rootfs: Path, args: list[str]) -> Path:
    b = work / "bundle"
    shutil.rmtree(b, ignore_errors=True)
    b.mkdir()
    shutil.copytree(rootfs, b / "rootfs", symlinks=True)
    (b / "rootfs").chmod(0o755)
    subprocess.run(["crun", "spec"], cwd=b, check=True)
    spec = json.loads((b / "config.json").read_text())
    spec["process"].update(args=args, terminal=False)
    (b / "config.json").write_text(json.dumps(spec))
    return b


def lifecycle(rt: list[str], b: Path, cid: str) -> float:
    """create, start, reap the container's host process, delete: seconds."""
    t0 = time.monotonic()
    pidfile = b / f"{cid}.pid"
    subprocess.run([*rt, "create", "--bundle", str(b), "--pid-file", str(pidfile), cid],
                   check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)  # fmt: skip
    pid = int(pidfile.read_text())
    subprocess.run([*rt, "start", cid], check=True)
    os.waitpid(pid, 0)  # ours as subreaper
    subprocess.run([*rt, "delete", cid], check=True)
    return time.monotonic() - t0


def timed(argv: list[str]) -> float:
    t0 = time.monotonic()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - t0


def row(name: str, xs: list[float]) -> str:
    return f"{name:<44} {statistics.median(xs):>8.3f} {min(xs):>7.3f} {max(xs):>7.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args()
    ours = installed("cocoon-runtime")
    if not shutil.which(ours) or not shutil.which("crun") or not shutil.which("podman"):
        raise SystemExit("needs cocoon-runtime, crun and podman: run scripts/setup.sh")
    make_crun_ready()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    work = Path(tempfile.mkdtemp(prefix="cocoon-ocibench-"))
    root = Path(tempfile.mkdtemp(prefix="cocoon-ocibench-", dir="/run"))
    rootfs = busybox_rootfs(load())
    crun = ["crun", "--root", str(root / "crun")]
    coc = [ours, "--root", str(root / "cocoon")]
    pod = ["podman", "--root", str(work / "ps"), "--runroot", str(work / "pr"),
           "--storage-driver", "vfs", "--cgroup-manager", "cgroupfs",
           "--events-backend", "file"]  # fmt: skip
    try:
        b = bundle(work, rootfs, ["true"])
        life: dict[str, list[float]] = {"crun": [], "cocoon-runtime": []}
        for i in range(args.runs):
            life["crun"].append(lifecycle(crun, b, f"c{i}"))
            life["cocoon-runtime"].append(lifecycle(coc, b, f"o{i}"))

        # No default ulimits: CAP_SYS_RESOURCE is not in this host's bounding set,
        # so crun fails to raise RLIMIT_NOFILE (MACHINE-NOTES); the same for both.
        conf = work / "containers.conf"
        conf.write_text("[containers]\ndefault_ulimits = []\n")
        os.environ["CONTAINERS_CONF"] = str(conf)
        tar = work / "busybox.tar"
        with tarfile.open(tar, "w") as t:
            t.add(b / "rootfs", arcname=".", filter=lambda ti: ti)
        subprocess.run([*pod, "import", "-q", str(tar), "localhost/bb"], check=True,
                       stdout=subprocess.DEVNULL)  # fmt: skip
        podrun: dict[str, list[float]] = {"crun": [], "cocoon-runtime": []}
        for _ in range(args.runs):
            for name, rt in (("crun", "crun"), ("cocoon-runtime", ours)):
                podrun[name].append(timed([*pod, "--runtime", rt, "run", "--rm",
                                           "--network=none",
                                           "localhost/bb", "true"]))  # fmt: skip

        # Memory of one running container's host processes.
        b = bundle(work, rootfs, ["sleep", "60"])
        pidfile = b / "mem.pid"
        subprocess.run([*coc, "create", "--bundle", str(b), "--pid-file", str(pidfile), "mem"],
                       check=True, stdin=subprocess.DEVNULL)  # fmt: skip
        subprocess.run([*coc, "start", "mem"], check=True)
        time.sleep(3)
        standin = int(pidfile.read_text())
        state = json.loads((root / "cocoon" / "oci" / "mem" / "state.json").read_text())
        monitor = state["monitor_pid"]
        kids = subprocess.run(["pgrep", "-P", str(monitor)], capture_output=True, text=True)
        vm = sum(pss_kib(int(p)) for p in kids.stdout.split()) / 1024
        standin_pss = pss_kib(standin) / 1024
        monitor_pss = pss_kib(monitor) / 1024
        subprocess.run([*coc, "delete", "--force", "mem"], check=True)
        os.waitpid(standin, 0)

        print(f"OCI runtimes, busybox `true` (median of {args.runs}, seconds; accel: TCG here)")
        print(f"{'':<44} {'median':>8} {'min':>7} {'max':>7}")
        for name in ("crun", "cocoon-runtime"):
            print(row(f"create+start+wait+delete  {name}", life[name]))
        for name in ("crun", "cocoon-runtime"):
            print(row(f"podman run --rm           {name}", podrun[name]))
        ratio = statistics.median(life["cocoon-runtime"]) / statistics.median(life["crun"])
        print(f"ratio cocoon-runtime / crun (lifecycle): {ratio:.1f}")
        print("host PSS of one running container under cocoon-runtime:")
        print(f"  stand-in {standin_pss:.1f} MiB   monitor {monitor_pss:.1f} MiB   "
              f"VM (QEMU + virtiofsd) {vm:.1f} MiB")  # fmt: skip
    finally:
        subprocess.run([*coc, "delete", "--force", "mem"], capture_output=True, check=False)
        subprocess.run([*pod, "rm", "-af"], capture_output=True, check=False)
        subprocess.run([*pod, "system", "reset", "-f"], capture_output=True, check=False)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
