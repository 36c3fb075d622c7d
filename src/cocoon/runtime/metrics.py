"""The node's numbers for Prometheus (`cocoon metrics`), as kata-monitor gives
Kata's: what each container uses inside its guest, and what each sandbox costs
the host.

The guest's figures come from its agent (the container's cgroup and the
guest's interfaces, through the container's monitor), so they are the
container's own, not a VM's worth of overhead. The host's figures are read
from /proc for the processes each sandbox recorded (QEMU, tini, its file
servers) and its owner (the monitor, or the shim): PSS, so that pages shared
between clones of one template are split among them, and CPU time. Every
scrape reads afresh; nothing is cached between scrapes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from cocoon.errors import CocoonError
from cocoon.protocol import messages
from cocoon.runtime.container import Container
from cocoon.runtime.records import ContainerConfig, ContainerDir, ContainerState
from cocoon.runtime.status import Status
from cocoon.state.store import SandboxDir, list_ids
from cocoon.util.proc import alive

#: One guest's answer may take this long; a scrape must not hang on one VM.
STATS_TIMEOUT_S = 2.0
_TICKS = os.sysconf("SC_CLK_TCK")
_CONTAINER = ["id", "name", "sandbox"]


@dataclass
class _Seen:
    """One container as a scrape found it."""

    dir: ContainerDir
    config: ContainerConfig
    state: ContainerState
    status: Status
    stats: messages.StatsReply | None = None


def node_roots(cfg_root: Path, shim_root: Path, extra: Iterable[Path]) -> list[Path]:
    """The state roots one node's metrics cover: cocoon's, every containerd
    namespace the shim serves (``<shim.root_dir>/<namespace>``), and ``extra``
    (cocoon-runtime's --root, which only its callers know)."""
    shims = []
    with contextlib.suppress(OSError):
        shims = sorted(p for p in shim_root.iterdir() if p.is_dir())
    return list(dict.fromkeys([cfg_root, *shims, *extra]))


def container_dirs(root: Path) -> Iterator[ContainerDir]:
    """Every container record under a state root: `cocoon`'s (containers/)
    and `cocoon-runtime`'s or the shim's (oci/)."""
    for kind in ("containers", "oci"):
        base = root / kind
        with contextlib.suppress(OSError):
            for name in sorted(os.listdir(base)):
                if (base / name / "config.json").is_file():
                    yield ContainerDir(base, name)


class NodeCollector(Collector):
    """A Prometheus collector over the state roots ``roots``."""

    def __init__(self, roots: Iterable[Path]) -> None:
        self.roots = list(dict.fromkeys(roots))

    def collect(self) -> Iterator[Metric]:
        seen = self._containers()
        asyncio.run(_ask_guests([s for s in seen if s.status == Status.RUNNING]))
        yield from _container_metrics(seen)
        yield from _sandbox_metrics(self.roots)

    def _containers(self) -> list[_Seen]:
        out = []
        for root in self.roots:
            for d in container_dirs(root):
                with contextlib.suppress(CocoonError, OSError, ValueError):
                    out.append(_Seen(d, d.config(), d.state(), d.status()))
        return out


async def _ask_guests(running: list[_Seen]) -> None:
    async def one(s: _Seen) -> None:
        with contextlib.suppress(CocoonError, OSError, TimeoutError):
            async with asyncio.timeout(STATS_TIMEOUT_S):
                client = await Container(s.dir).connect()
                try:
                    s.stats = await client.stats()
                finally:
                    await client.close()

    await asyncio.gather(*(one(s) for s in running))


def _container_metrics(seen: list[_Seen]) -> Iterator[Metric]:
    count = GaugeMetricFamily("cocoon_containers", "Containers by status.", labels=["status"])
    for status, n in sorted(Counter(s.status.value for s in seen).items()):
        count.add_metric([status], n)
    yield count
    up = GaugeMetricFamily(
        "cocoon_container_stats_up",
        "1 if the running container's guest answered this scrape's stats request.",
        labels=_CONTAINER,
    )
    start = GaugeMetricFamily(
        "cocoon_container_start_seconds",
        "Its sandbox's start: QEMU start (or taken from a pool) to agent-ready.",
        labels=[*_CONTAINER, "kind"],
    )
    cpu = CounterMetricFamily(
        "cocoon_container_cpu_seconds", "CPU time of the container's cgroup in its guest.",
        labels=_CONTAINER,
    )  # fmt: skip
    mem = GaugeMetricFamily(
        "cocoon_container_memory_bytes", "Memory charged to the container's cgroup in its guest.",
        labels=_CONTAINER,
    )  # fmt: skip
    limit = GaugeMetricFamily(
        "cocoon_container_memory_limit_bytes", "The container's memory limit (0: none).",
        labels=_CONTAINER,
    )  # fmt: skip
    pids = GaugeMetricFamily("cocoon_container_pids", "Its processes.", labels=_CONTAINER)
    rd = CounterMetricFamily("cocoon_container_blkio_read_bytes", "Block reads.", labels=_CONTAINER)
    wr = CounterMetricFamily(
        "cocoon_container_blkio_write_bytes", "Block writes.", labels=_CONTAINER
    )
    net = [*_CONTAINER, "interface"]
    rx = CounterMetricFamily("cocoon_container_network_receive_bytes", "Received.", labels=net)
    tx = CounterMetricFamily("cocoon_container_network_transmit_bytes", "Sent.", labels=net)
    for s in seen:
        if s.status != Status.RUNNING:
            continue
        lab = [s.config.id, s.config.name, s.state.sandbox_id]
        up.add_metric(lab, 1 if s.stats is not None else 0)
        if s.state.boot_s:
            kind = "template" if s.state.template else "cold"
            start.add_metric([*lab, kind], s.state.boot_s)
        st = s.stats
        if st is None:
            continue
        cpu.add_metric(lab, st.cpu_usage_us / 1e6)
        mem.add_metric(lab, st.memory_bytes)
        limit.add_metric(lab, st.memory_limit_bytes)
        pids.add_metric(lab, st.pids)
        rd.add_metric(lab, st.io_read_bytes)
        wr.add_metric(lab, st.io_write_bytes)
        for nic in st.net:
            rx.add_metric([*lab, nic.name], nic.rx_bytes)
            tx.add_metric([*lab, nic.name], nic.tx_bytes)
    yield from (up, start, cpu, mem, limit, pids, rd, wr, rx, tx)


def _sandbox_metrics(roots: list[Path]) -> Iterator[Metric]:
    count = GaugeMetricFamily("cocoon_sandboxes", "Sandboxes (VMs) by status.", labels=["status"])
    pss = GaugeMetricFamily(
        "cocoon_sandbox_host_pss_bytes",
        "Host memory of a sandbox's process (PSS: pages shared between clones split).",
        labels=["sandbox", "process"],
    )
    cpu = CounterMetricFamily(
        "cocoon_sandbox_host_cpu_seconds", "Host CPU time of a sandbox's process.",
        labels=["sandbox", "process"],
    )  # fmt: skip
    statuses: Counter[str] = Counter()
    for root in roots:
        for sid in list_ids(root):
            try:
                st = SandboxDir(root, sid).read()
            except (CocoonError, OSError, ValueError):
                continue
            statuses[st.status] += 1
            procs = {k: (r.pid, r.start_time) for k, r in st.processes.items()}
            procs["owner"] = (st.owner_pid, None)
            for name, (pid, started) in sorted(procs.items()):
                if not alive(pid, started):
                    continue
                kib, ticks = _pss_kib(pid), _cpu_ticks(pid)
                if kib is not None:
                    pss.add_metric([sid, name], kib * 1024)
                if ticks is not None:
                    cpu.add_metric([sid, name], ticks / _TICKS)
    for status, n in sorted(statuses.items()):
        count.add_metric([status], n)
    yield from (count, pss, cpu)


def _pss_kib(pid: int) -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return None


def _cpu_ticks(pid: int) -> int | None:
    """utime + stime (fields 14 and 15 of /proc/PID/stat, after the comm)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    return None
