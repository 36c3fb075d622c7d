"""`cocoon metrics`: the node's Prometheus text, parsed with the client
library's own parser and checked against a container of known usage."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cocoon.config import Config
from tests.unit.test_deploy import pod_fixed_memory_bytes
from tests.vm.conftest import cocoon, ok

pytestmark = [pytest.mark.vm, pytest.mark.timeout(300)]

MIB = 1 << 20


def samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def of(found: dict[str, list[tuple[dict[str, str], float]]], metric: str, **want: str) -> float:
    hits = [v for lab, v in found.get(metric, []) if all(lab.get(k) == x for k, x in want.items())]
    assert len(hits) == 1, (metric, want, found.get(metric))
    return hits[0]


def test_metrics_match_a_container_of_known_usage(
    cfg: Config, busybox: None, tmp_path: Path
) -> None:
    # Only this test's root: not the shim namespaces other tests may be using.
    env = {"COCOON_SHIM_ROOT_DIR": str(tmp_path)}
    # 48 MiB in the container's /dev/shm (tmpfs: charged to its cgroup), then idle.
    script = "head -c 50331648 /dev/zero > /dev/shm/fill && echo filled && sleep 600"
    cid = ok(cocoon(cfg, "run", "-d", "--name", "metered", "busybox",
                    "sh", "-c", script)).strip()  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while b"filled" not in cocoon(cfg, "logs", "metered").stdout:
            assert time.monotonic() < deadline, "the container never filled its memory"
            time.sleep(0.2)
        found = samples(ok(cocoon(cfg, "metrics", "--once", env=env)))
        lab = {"id": cid, "name": "metered"}
        assert of(found, "cocoon_containers", status="running") == 1
        assert of(found, "cocoon_container_stats_up", **lab) == 1
        assert of(found, "cocoon_container_memory_bytes", **lab) >= 48 * MIB
        assert of(found, "cocoon_container_pids", **lab) >= 1
        assert of(found, "cocoon_container_cpu_seconds_total", **lab) > 0
        assert 0 < of(found, "cocoon_container_start_seconds", **lab) < 60
        sid = [lab2["sandbox"] for lab2, _ in found["cocoon_container_pids"]][0]
        assert of(found, "cocoon_sandboxes", status="running") == 1
        qemu = of(found, "cocoon_sandbox_host_pss_bytes", sandbox=sid, process="qemu")
        assert qemu > 48 * MIB  # the guest's pages the container touched live in QEMU
        assert of(found, "cocoon_sandbox_host_pss_bytes", sandbox=sid, process="owner") > MIB
        assert of(found, "cocoon_sandbox_host_cpu_seconds_total", sandbox=sid, process="qemu") > 0
        # What the sandbox costs the host beyond the container's own memory is
        # the overhead deploy/kubernetes's RuntimeClass declares (its shim
        # stands for the monitor here; the margin covers the shim's own).
        host = sum(
            v for lab2, v in found["cocoon_sandbox_host_pss_bytes"] if lab2["sandbox"] == sid
        )
        own = of(found, "cocoon_container_memory_bytes", **lab)
        assert host - own < pod_fixed_memory_bytes("cocoon") - 16 * MIB, (host, own)

        # The same over HTTP, as Prometheus scrapes it.
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        srv = subprocess.Popen([sys.executable, "-m", "cocoon.cli", "--root", str(cfg.root),
                                "metrics", "--listen", f"127.0.0.1:{port}"],
                               stderr=subprocess.PIPE, env={**os.environ, **env})  # fmt: skip
        try:
            assert srv.stderr is not None and b"serving" in srv.stderr.readline()
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
                again = samples(r.read().decode())
            assert of(again, "cocoon_container_memory_bytes", **lab) >= 48 * MIB
        finally:
            srv.terminate()
            assert srv.wait(timeout=10) == 0
    finally:
        ok(cocoon(cfg, "rm", "-f", "metered"))
    after = samples(ok(cocoon(cfg, "metrics", "--once", env=env)))
    assert "cocoon_container_memory_bytes" not in after
    assert not after.get("cocoon_sandboxes")
