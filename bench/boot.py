#!/usr/bin/env python3
"""Boot benchmark: QEMU start -> agent ready, idle memory, five at once.

Prints a table. Numbers on these machines vary +-30-40 % run to run (the host
is itself a VM): read medians, and compare within one run.

    python3 bench/boot.py [--runs 10] [--parallel 5]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import tempfile
import time

from memory import pss_kib
from promises import Promises  # bench/memory.py (the script's dir is on sys.path)

from cocoon.config import load
from cocoon.sandbox.sandbox import Sandbox
from cocoon.state import gc


def sandbox_pss_mib(sb: Sandbox) -> float:
    assert sb.launched is not None
    return sum(pss_kib(p) for p in sb.launched.processes.values()) / 1024


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--parallel", type=int, default=5)
    ap.add_argument("--idle-s", type=float, default=3.0, help="settle time before PSS")
    args = ap.parse_args()

    cfg = load()
    # A cold boot: with templates on (the default) this would time a restore,
    # which bench/start.py measures.
    cfg.sandbox.templates = False
    cfg.root_dir = tempfile.mkdtemp(prefix="cocoon-bench-", dir="/run")
    boots: list[float] = []
    for _ in range(args.runs):
        sb = await Sandbox.create(cfg)
        assert sb.boot_s is not None
        boots.append(sb.boot_s)
        await sb.destroy()

    sb = await Sandbox.create(cfg)
    await asyncio.sleep(args.idle_s)
    idle_pss = sandbox_pss_mib(sb)
    accel = sb.state.accel
    await sb.destroy()

    t0 = time.monotonic()
    many = await asyncio.gather(*(Sandbox.create(cfg) for _ in range(args.parallel)))
    wall = time.monotonic() - t0
    await asyncio.sleep(args.idle_s)
    pss_each = [sandbox_pss_mib(s) for s in many]
    par_boots = [s.boot_s or 0.0 for s in many]
    await asyncio.gather(*(s.destroy() for s in many))
    gc.reap(cfg.root, force=True)
    shutil.rmtree(cfg.root_dir, ignore_errors=True)

    print(f"cocoon boot benchmark  accel={accel}  machine={cfg.hypervisor.machine}  "
          f"vcpus={cfg.hypervisor.vcpus}  mem={cfg.hypervisor.memory_mib}MiB")  # fmt: skip
    print(f"{'metric':<44} {'median':>8} {'min':>8} {'max':>8}")
    print(
        f"{'QEMU start -> agent ready (s), n=' + str(len(boots)):<44} "
        f"{statistics.median(boots):>8.3f} {min(boots):>8.3f} {max(boots):>8.3f}"
    )
    print(f"{'idle sandbox host PSS (MiB)':<44} {idle_pss:>8.1f}")
    print(f"{f'{args.parallel} sandboxes at once: wall (s)':<44} {wall:>8.3f}")
    print(
        f"{f'{args.parallel} at once: boot each (s)':<44} {statistics.median(par_boots):>8.3f} "
        f"{min(par_boots):>8.3f} {max(par_boots):>8.3f}"
    )
    print(
        f"{f'{args.parallel} at once: PSS each (MiB)':<44} {statistics.median(pss_each):>8.1f} "
        f"{min(pss_each):>8.1f} {max(pss_each):>8.1f}"
    )
    promises = Promises()
    promises.at_most(
        "cold boot: QEMU start -> agent ready, median", 1.2, "s"
    ).measured = statistics.median(boots)
    promises.at_most("idle cold-booted sandbox, host PSS", 120, "MiB").measured = idle_pss
    promises.finish()


if __name__ == "__main__":
    asyncio.run(main())
