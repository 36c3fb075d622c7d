#!/usr/bin/env python3
"""A function's start, the seeds' table: cold / pre-warmed + copy /
pre-warmed + dynamic mount, for cocoon (`cocoon serve`), crun and runsc, side
by side in one run; then warm invocations (latency, and throughput with 1 and
10 callers).

- **cocoon**: a hello shell function deployed to `cocoon serve`, timed from
  the invoke request to its answer, each run a new function (so a new
  instance): `serve.start_path` = cold (a VM booted for it), copy (a pooled
  sandbox, the code copied into the container) or mount (a pre-warmed
  instance, serve.prewarm: the runtime's container already started in a
  pooled sandbox, the code bound in read-only over its empty /code). A
  `cocoon pool serve` on the same root keeps the sandboxes pre-warmed; each
  run waits until the pool and the service's blanks are refilled.
- **crun, runsc**: OCI bundles through their own command lines (no podman:
  the paths need a container's rootfs on the host). cold: `run` of a bundle
  whose rootfs holds the code; copy: the code copied into a running
  container's rootfs (`sleep`, started before the clock), then `exec` of the
  handler; mount: the code bound into a host dir that a running container
  holds at /code as a slave of its shared mount (`rslave`), then `exec`. gVisor
  takes no mounts into a running sandbox: its mount row is n/a. Its copy row
  runs with `--file-access=shared` (else the sentry does not see new files).
- **podman + crun**, as context (the seeds' rows were all through an engine,
  docker): cold `podman run --rm` with the code as a volume; copy `podman
  cp` into a running container, then `podman exec`; mount a bind into a
  shared host dir the container holds as an `rslave` volume, then `podman
  exec`. The promise is read against the bare crun rows.

Medians of --runs (10) with min/max. Issue 16's targets: pre-warmed +
dynamic mount within 2x of crun's same path; cocoon's cold path no worse
than `cocoon run --rm --no-template busybox true` (a VM booted for one
container) measured in the same run. cocoon's figures are a whole service's
(an HTTP request, its records, an instance started through runtime/, the
handler exec'd in the guest); crun's and runsc's are their command lines'.

Run as root from the checkout while nothing else boots VMs:
    PYTHONPATH=src python3 bench/functions.py [--runs 10]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(CHECKOUT))

from promises import Promises  # noqa: E402 (bench/promises.py: the script's dir is on sys.path)
from tests.servefn import Served, zip_code  # noqa: E402

HANDLER = "echo hello\n"
COCOON = [sys.executable, "-m", "cocoon.cli"]
APPLETS = ("sh", "echo", "cat", "sleep", "true")


def stats(xs: list[float]) -> str:
    return f"{statistics.median(xs):.3f} | {min(xs):.3f} | {max(xs):.3f}"


def rootfs(at: Path, with_code: bool) -> Path:
    """A busybox root (Debian's static busybox), with /code made (and filled)."""
    (at / "bin").mkdir(parents=True)
    shutil.copy("/bin/busybox", at / "bin" / "busybox")
    for a in APPLETS:
        (at / "bin" / a).symlink_to("busybox")
    (at / "code").mkdir()
    (at / "proc").mkdir()
    if with_code:
        (at / "code" / "h.sh").write_text(HANDLER)
    return at


def bundle(at: Path, args: list[str], with_code: bool, hub: Path | None = None) -> Path:
    """A bundle; with ``hub``, its /code is that host dir, a shared mount the
    container holds as a slave (rootfsPropagation and the mount: rslave), so
    that what the host binds into the hub later appears in the container."""
    at.mkdir(parents=True)
    rootfs(at / "rootfs", with_code)
    subprocess.run(["crun", "spec"], cwd=at, check=True)
    conf = json.loads((at / "config.json").read_text())
    conf["process"]["args"] = args
    conf["process"]["terminal"] = False
    if hub is not None:
        hub.mkdir(parents=True)
        subprocess.run(["mount", "--bind", str(hub), str(hub)], check=True)
        subprocess.run(["mount", "--make-shared", str(hub)], check=True)
        conf["linux"]["rootfsPropagation"] = "rslave"
        conf["mounts"].append({"destination": "/code", "type": "bind", "source": str(hub),
                               "options": ["rbind", "rslave", "ro"]})  # fmt: skip
    (at / "config.json").write_text(json.dumps(conf))
    return at


class Peer:
    """crun or runsc through runc's command line."""

    def __init__(self, name: str, work: Path) -> None:
        self.name = name
        self.work = work / name
        self.root = self.work / "state"
        base = [name, "--root", str(self.root)]
        self.cli = [*base, "--network=none", "--file-access=shared"] if name == "runsc" else base
        self.n = 0

    def _id(self) -> str:
        self.n += 1
        return f"f{self.n}"

    def run_out(self, argv: list[str]) -> bytes:
        return subprocess.run(argv, check=True, capture_output=True, timeout=120).stdout

    def cold(self) -> float:
        cid = self._id()
        b = bundle(self.work / cid, ["sh", "/code/h.sh"], with_code=True)
        t = time.monotonic()
        out = self.run_out([*self.cli, "run", "--bundle", str(b), cid])
        took = time.monotonic() - t
        assert out == b"hello\n", out
        subprocess.run([*self.cli, "delete", "--force", cid], capture_output=True)
        return took

    def started(self, propagate: bool) -> tuple[str, Path]:
        """A running container with nothing in /code yet (before the clock)."""
        cid = self._id()
        hub = self.work / f"{cid}-hub" if propagate else None
        b = bundle(self.work / cid, ["sleep", "3600"], with_code=False, hub=hub)
        subprocess.run([*self.cli, "run", "--detach", "--bundle", str(b), cid], check=True,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=120)  # fmt: skip
        return cid, b

    def stop(self, cid: str, b: Path) -> None:
        subprocess.run([*self.cli, "delete", "--force", cid], capture_output=True, timeout=120)
        subprocess.run(["umount", "-R", str(self.work / f"{cid}-hub")], capture_output=True)

    def exec_out(self, cid: str, handler: str = "/code/h.sh") -> bytes:
        return self.run_out([*self.cli, "exec", cid, "sh", handler])

    def copy(self, code: Path) -> float:
        cid, b = self.started(propagate=False)
        try:
            t = time.monotonic()
            shutil.copytree(code, b / "rootfs" / "code", dirs_exist_ok=True)
            out = self.exec_out(cid)
            took = time.monotonic() - t
            assert out == b"hello\n", out
            return took
        finally:
            self.stop(cid, b)

    def mount(self, code: Path) -> float:
        cid, b = self.started(propagate=True)
        try:
            fn = self.work / f"{cid}-hub" / "fn"
            fn.mkdir()
            t = time.monotonic()
            subprocess.run(["mount", "--bind", "-o", "ro", str(code), str(fn)], check=True)
            out = self.exec_out(cid, "/code/fn/h.sh")
            took = time.monotonic() - t
            assert out == b"hello\n", out
            return took
        finally:
            self.stop(cid, b)

    def warm(self, code: Path, n: int) -> list[float]:
        cid, b = self.started(propagate=False)
        try:
            shutil.copytree(code, b / "rootfs" / "code", dirs_exist_ok=True)
            xs = []
            for _ in range(n):
                t = time.monotonic()
                assert self.exec_out(cid) == b"hello\n"
                xs.append(time.monotonic() - t)
            return xs
        finally:
            self.stop(cid, b)


class Podman:
    """The same three paths with crun through podman, an engine as the
    seeds' runc and Kata rows were (through docker): context for the
    bundle rows, which the promise is read against."""

    def __init__(self, work: Path) -> None:
        self.work = work / "podman"
        self.work.mkdir()
        conf = self.work / "containers.conf"
        conf.write_text("[containers]\ndefault_ulimits = []\n")
        self.env = {**os.environ, "CONTAINERS_CONF": str(conf)}
        self.pod = ["podman", "--root", str(self.work / "ps"), "--runroot",
                    str(self.work / "pr"), "--runtime", "crun"]  # fmt: skip
        root = rootfs(self.work / "image", with_code=False)
        with tarfile.open(self.work / "bb.tar", "w") as tf:
            tf.add(root, arcname=".")
        self.out([*self.pod, "import", "-q", str(self.work / "bb.tar"), "localhost/fnbb"])
        self.n = 0

    def out(self, argv: list[str]) -> bytes:
        return subprocess.run(argv, check=True, capture_output=True, timeout=120,
                              env=self.env).stdout  # fmt: skip

    def cold(self, code: Path) -> float:
        t = time.monotonic()
        out = self.out([*self.pod, "run", "--rm", "--network=none", "-v", f"{code}:/code:ro",
                        "localhost/fnbb", "sh", "/code/h.sh"])  # fmt: skip
        took = time.monotonic() - t
        assert out == b"hello\n", out
        return took

    def started(self, hub: Path | None = None) -> str:
        self.n += 1
        name = f"fn{self.n}"
        vol = ["-v", f"{hub}:/code:rslave"] if hub is not None else []
        self.out([*self.pod, "run", "-d", "--network=none", "--name", name, *vol,
                  "localhost/fnbb", "sleep", "3600"])  # fmt: skip
        return name

    def stop(self, name: str) -> None:
        subprocess.run([*self.pod, "rm", "-f", "-t", "0", name], capture_output=True,
                       env=self.env, timeout=120)  # fmt: skip

    def first_call(self, name: str, put: Callable[[], object], handler: str) -> float:
        """The code put where the running container ``name`` sees it, then
        the handler exec'd: timed together."""
        t = time.monotonic()
        put()
        out = self.out([*self.pod, "exec", name, "sh", handler])
        took = time.monotonic() - t
        assert out == b"hello\n", out
        return took

    def copy(self, code: Path) -> float:
        name = self.started()
        try:
            cp = [*self.pod, "cp", f"{code}/.", f"{name}:/code"]
            return self.first_call(name, lambda: self.out(cp), "/code/h.sh")
        finally:
            self.stop(name)

    def mount(self, code: Path) -> float:
        hub = self.work / f"hub{self.n + 1}"
        hub.mkdir()
        subprocess.run(["mount", "--bind", str(hub), str(hub)], check=True)
        subprocess.run(["mount", "--make-shared", str(hub)], check=True)
        name = self.started(hub)
        try:
            fn = hub / "fn"
            fn.mkdir()
            bind = ["mount", "--bind", "-o", "ro", str(code), str(fn)]
            return self.first_call(name, lambda: subprocess.run(bind, check=True), "/code/fn/h.sh")
        finally:
            self.stop(name)
            subprocess.run(["umount", "-R", str(hub)], capture_output=True)

    def reset(self) -> None:
        subprocess.run([*self.pod, "rm", "-af", "-t", "0"], capture_output=True, env=self.env)
        subprocess.run([*self.pod, "system", "reset", "-f"], capture_output=True, env=self.env)


def caller(served: Served) -> Callable[[], None]:
    """One warm invocation of "warm", on a connection of its own (callers run
    in threads)."""

    def call() -> None:
        with served.admin() as c:
            assert c.invoke("default", "warm", b"").content == b"hello\n"

    return call


def percentile(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def throughput(call: Callable[[], None], callers: int, total: int) -> float:
    """Invocations per second with ``callers`` at once, ``total`` in all."""
    left = [total]
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                if left[0] == 0:
                    return
                left[0] -= 1
            call()

    t = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(callers)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return total / (time.monotonic() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--warm", type=int, default=100, help="warm invocations for p50/p99")
    args = ap.parse_args()
    for tool in ("crun", "runsc"):
        if not shutil.which(tool):
            raise SystemExit(f"needs {tool}: run scripts/setup.sh")
    promises = Promises()
    p_mount = promises.at_most("pre-warmed + dynamic mount, cocoon / crun", 2.0, "x")
    p_cold = promises.at_most("cold function start / `cocoon run --rm --no-template`", 1.0, "x")
    work = Path(tempfile.mkdtemp(prefix="cocoon-fnbench-"))
    root = Path(tempfile.mkdtemp(prefix="cocoon-fnbench-", dir="/run"))
    code = work / "code"
    code.mkdir()
    (code / "h.sh").write_text(HANDLER)
    blob = zip_code({"h.sh": HANDLER})
    coc = [*COCOON, "--root", str(root)]
    pool = subprocess.Popen([*coc, "pool", "serve", "--size", "2"], stderr=subprocess.DEVNULL)
    r: dict[str, list[float]] = {}
    try:
        deadline = time.monotonic() + 120
        while not (root / "pool.sock").exists():
            assert time.monotonic() < deadline, "the pool server did not start"
            time.sleep(0.1)

        def settle() -> None:
            subprocess.run([*coc, "pool", "fill"], check=True, stdout=subprocess.DEVNULL)

        for path in ("cold", "copy", "mount"):
            served = Served(root, work / f"state-{path}", {"COCOON_SERVE_START_PATH": path})
            served.start()
            try:
                with served.admin() as c:
                    for i in range(args.runs):
                        if path == "mount":
                            served.prewarmed()
                        settle()
                        name = f"{path}{i}"
                        c.create("default", {"name": name, "handler": "h.sh", "code": blob,
                                             "keep_alive_s": 600})  # fmt: skip
                        t = time.monotonic()
                        resp = c.invoke("default", name, b"")
                        took = time.monotonic() - t
                        assert resp.status_code == 200 and resp.content == b"hello\n", resp.headers
                        kind = "prewarmed" if path == "mount" else "cold"
                        assert resp.headers["x-cocoon-start"] == kind, resp.headers
                        r.setdefault(f"cocoon {path}", []).append(took)
                        c.delete("default", name)
                    if path == "mount":
                        warm = {"name": "warm", "handler": "h.sh", "code": blob,
                                "keep_alive_s": 600, "max_concurrency": 4}  # fmt: skip
                        c.create("default", warm)
                        c.invoke("default", "warm", b"")
                        call = caller(served)

                        xs = []
                        for _ in range(args.warm):
                            t = time.monotonic()
                            call()
                            xs.append(time.monotonic() - t)
                        r["cocoon warm"] = xs
                        r["cocoon rate 1"] = [throughput(call, 1, 50)]
                        r["cocoon rate 10"] = [throughput(call, 10, 100)]
            finally:
                served.stop()
        # The cold path's yardstick: a container in a VM booted for it, as
        # `cocoon run` starts one with templates off (its own root: no pool).
        run_argv = [*COCOON, "--root", str(root / "plain"), "run", "--rm", "--no-template",
                    "--network", "none", "busybox", "true"]  # fmt: skip
        for _ in range(args.runs):
            t = time.monotonic()
            subprocess.run(run_argv, check=True)
            r.setdefault("cocoon run", []).append(time.monotonic() - t)
        for name in ("crun", "runsc"):
            peer = Peer(name, work)
            for _ in range(args.runs):
                r.setdefault(f"{name} cold", []).append(peer.cold())
                r.setdefault(f"{name} copy", []).append(peer.copy(code))
                if name == "crun":
                    r.setdefault(f"{name} mount", []).append(peer.mount(code))
            xs = peer.warm(code, args.warm)
            r[f"{name} warm"] = xs
        pm = Podman(work)
        try:
            for _ in range(args.runs):
                r.setdefault("podman cold", []).append(pm.cold(code))
                r.setdefault("podman copy", []).append(pm.copy(code))
                r.setdefault("podman mount", []).append(pm.mount(code))
        finally:
            pm.reset()
    finally:
        pool.terminate()
        pool.wait(timeout=60)
        subprocess.run([*coc, "gc"], capture_output=True)
        for mp in sorted(_mounts_under(work), key=len, reverse=True):
            subprocess.run(["umount", "-l", mp], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)

    print(f"\nfunction start, hello (s; medians of {args.runs}, min, max; TCG)")
    print("| path | cocoon | min | max | crun | min | max | runsc | min | max | cocoon / crun |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for path, label in (("cold", "cold start"), ("copy", "pre-warmed + copy"),
                        ("mount", "pre-warmed + dynamic mount")):  # fmt: skip
        ours, crun = r[f"cocoon {path}"], r[f"crun {path}"]
        runsc = stats(r[f"runsc {path}"]) if f"runsc {path}" in r else "n/a | | "
        ratio = statistics.median(ours) / statistics.median(crun)
        print(f"| {label} | {stats(ours)} | {stats(crun)} | {runsc} | {ratio:.2f}x |")
    print(f"| `cocoon run --rm --no-template busybox true` (the cold yardstick) | "
          f"{stats(r['cocoon run'])} | | | | | | | |")  # fmt: skip
    print("\nthe same through an engine: podman with crun (s; context, not the promise's peer)")
    print("| path | cocoon | podman + crun | min | max | cocoon / podman + crun |")
    print("|---|---|---|---|---|---|")
    for path, label in (("cold", "cold start"), ("copy", "pre-warmed + copy"),
                        ("mount", "pre-warmed + dynamic mount")):  # fmt: skip
        ours, theirs = r[f"cocoon {path}"], r[f"podman {path}"]
        ratio = statistics.median(ours) / statistics.median(theirs)
        print(f"| {label} | {statistics.median(ours):.3f} | {stats(theirs)} | {ratio:.2f}x |")
    print(f"\nwarm invocation latency ({args.warm} in a row, s)")
    print("| | p50 | p99 |\n|---|---|---|")
    for who in ("cocoon", "crun", "runsc"):
        xs = r[f"{who} warm"]
        print(f"| {who} | {percentile(xs, 50):.3f} | {percentile(xs, 99):.3f} |")
    print(f"\ncocoon invocations/s: 1 caller {r['cocoon rate 1'][0]:.1f}, "
          f"10 callers {r['cocoon rate 10'][0]:.1f} (max concurrency 4)")  # fmt: skip
    p_mount.measured = statistics.median(r["cocoon mount"]) / statistics.median(r["crun mount"])
    p_cold.measured = statistics.median(r["cocoon cold"]) / statistics.median(r["cocoon run"])
    promises.finish()


def _mounts_under(path: Path) -> list[str]:
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mp = line.split()[4]
        if mp.startswith(str(path)):
            out.append(mp)
    return out


if __name__ == "__main__":
    main()
