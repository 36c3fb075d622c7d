"""An OCI bundle's config.json as ``cocoon-runtime create`` reads it: parsed and
checked (runtime/bundle.py ``load``), planned for a VM and for a pod member
(``plan``, ``plan_member``), and turned into the container's record and
annotations (runtime/ocicreate.py). Nothing is mounted or started: that needs root
and a VM, and decodes nothing."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from cocoon.errors import BundleError
from cocoon.oci.spec import default_spec
from cocoon.runtime import bundle, ocicreate, pods

EXPECTED: tuple[type[BaseException], ...] = (BundleError,)


def run(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        b = Path(tmp) / "bundle"
        (b / "rootfs").mkdir(parents=True)
        (b / "config.json").write_bytes(data)
        spec = bundle.load(b)
        p = bundle.plan(b, spec, binds_dir=Path(tmp) / "binds", default_vcpus=1, default_mib=256)
        ocicreate.container_config("fuzz", p)
        pods.role(ocicreate.annotations_of(spec))
        bundle.plan_member(b, spec, Path(tmp) / "pod", "k")


def seeds() -> list[bytes]:
    podman = default_spec(["sh", "-c", "echo hi"], env=["PATH=/bin", "container=podman"])
    podman["mounts"] += [
        {"destination": "/etc/hosts", "type": "bind", "source": "/etc/hosts",
         "options": ["bind", "rprivate", "ro"]},
        {"destination": "/data", "type": "bind", "source": "/tmp", "options": ["rbind"]},
    ]  # fmt: skip
    podman["linux"].update({
        "namespaces": [{"type": "network", "path": "/proc/self/ns/net"}, {"type": "pid"},
                       {"type": "ipc", "path": "/proc/self/ns/ipc"}],
        "sysctl": {"net.ipv4.ping_group_range": "0 0", "kernel.msgmax": "8192"},
        "resources": {"memory": {"limit": 536870912, "swap": 536870912, "kernel": 1},
                      "cpu": {"quota": 150000, "period": 100000, "cpus": "0-3", "shares": 1024},
                      "pids": {"limit": 2048}},
        "seccomp": {"defaultAction": "SCMP_ACT_ERRNO", "architectures": ["SCMP_ARCH_X86_64"],
                    "syscalls": [{"names": ["read", "write"], "action": "SCMP_ACT_ALLOW",
                                  "args": [{"index": 0, "value": 1, "op": "SCMP_CMP_EQ"}]}]},
    })  # fmt: skip
    podman["hooks"] = {
        "prestart": [{"path": "/usr/bin/true", "args": ["true", "x"], "env": ["A=1"],
                      "timeout": 5}],
        "poststop": [{"path": "/usr/bin/true"}],
    }  # fmt: skip
    podman["annotations"] = {
        "io.kubernetes.cri.container-type": "sandbox",
        "io.kubernetes.cri.sandbox-id": "abc",
    }
    podman["process"]["user"] = {"uid": 1000, "gid": 1000, "additionalGids": [10]}
    podman["root"] = {"path": "rootfs", "readonly": True}
    return [json.dumps(default_spec(["true"])).encode(), json.dumps(podman, indent=1).encode()]
