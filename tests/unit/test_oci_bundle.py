"""What an OCI bundle becomes for a VM: shares, rewritten mounts, namespaces, size."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cocoon.errors import BundleError, SandboxError
from cocoon.oci.spec import default_spec
from cocoon.runtime import bundle
from cocoon.sandbox.sandbox import _fits


def make(tmp_path: Path, **extra: object) -> tuple[Path, dict]:  # type: ignore[type-arg]
    (tmp_path / "rootfs").mkdir(parents=True)
    spec = default_spec(["true"])
    spec.update(extra)
    (tmp_path / "config.json").write_text(json.dumps(spec))
    return tmp_path, bundle.load(tmp_path)


def plan(b: Path, spec: dict) -> bundle.BundlePlan:  # type: ignore[type-arg]
    return bundle.plan(b, spec, binds_dir=BINDS, default_vcpus=1, default_mib=256)


BINDS = Path("/run/x/binds/k")


def test_rootfs_and_binds_become_shares(tmp_path: Path) -> None:
    host = tmp_path / "host"
    host.mkdir()
    (host / "hosts").write_text("x")
    (host / "resolv.conf").write_text("y")
    data = tmp_path / "data"
    data.mkdir()
    b, spec = make(tmp_path / "b", mounts=[
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/etc/hosts", "type": "bind", "source": str(host / "hosts"),
         "options": ["rbind", "ro"]},
        {"destination": "/etc/resolv.conf", "type": "bind", "source": str(host / "resolv.conf"),
         "options": ["rbind", "ro"]},
        {"destination": "/data", "source": str(data), "options": ["bind", "rw"]},
        {"destination": "/dev/null", "type": "bind", "source": "/dev/null", "options": ["bind"]},
    ])  # fmt: skip
    p = plan(b, spec)
    tags = {s.tag: (s.path, s.readonly) for s in p.shares}
    # the rootfs is shared read-write (crun makes mount points, then remounts ro);
    # binds are host bind mounts in one more share, read-only ones made so on the host
    assert tags == {"rootfs": ((b / "rootfs").resolve(), False), "binds": (BINDS, False)}
    assert [(x.source, x.target, x.readonly, x.recursive) for x in p.binds] == [
        (str(host / "hosts"), BINDS / "0/hosts", True, True),
        (str(host / "resolv.conf"), BINDS / "1/resolv.conf", True, True),
        (str(data), BINDS / "2/data", False, False),
    ]
    mounts = {m["destination"]: m for m in p.spec["mounts"]}
    # each under its own base name: the container's mountinfo names what was bound
    assert mounts["/etc/hosts"]["source"] == bundle.BINDS_GUEST + "/0/hosts"
    assert mounts["/etc/resolv.conf"]["source"] == bundle.BINDS_GUEST + "/1/resolv.conf"
    assert mounts["/data"]["source"] == bundle.BINDS_GUEST + "/2/data"
    assert ("binds", bundle.BINDS_GUEST, False) in p.guest_mounts
    assert mounts["/dev/null"]["source"] == "/dev/null"  # the guest's own
    assert mounts["/proc"] == {"destination": "/proc", "type": "proc", "source": "proc"}
    # the caller's spec is left as it was
    assert spec["mounts"][1]["source"] == str(host / "hosts")


def test_namespace_paths_and_hooks_stay_on_the_host(tmp_path: Path) -> None:
    b, spec = make(tmp_path, hooks={"prestart": [{"path": "/bin/true"}]})
    spec["linux"]["namespaces"] = [
        {"type": "network", "path": "/proc/self/ns/net"}, {"type": "pid"},
    ]  # fmt: skip
    p = plan(b, spec)
    # the given netns is the VM's (its NICs are plumbed there): the container
    # stays in the guest's network namespace
    assert p.spec["linux"]["namespaces"] == [{"type": "pid"}]
    assert p.netns_path == "/proc/self/ns/net"
    assert [s.tag for s in p.shares] == ["rootfs"] and not p.binds  # no binds, no share
    assert "hooks" not in p.spec and "hooks" in p.original


@pytest.mark.parametrize(
    ("kind", "path", "error"),
    [
        ("uts", "/proc/self/ns/cgroup", "is a cgroup namespace"),
        ("mount", "/proc/self/ns/net", "is a network namespace"),
        ("pid", "/etc/hostname", "is not a namespace"),
        ("ipc", "/no/such/ns", "No such file"),
        ("ipc", "ns/ipc", "absolute"),
        ("bogus", "/proc/self/ns/ipc", "unknown type"),
    ],
)
def test_namespace_paths_must_match_their_type(
    tmp_path: Path, kind: str, path: str, error: str
) -> None:
    """runc and crun refuse a path that is not a namespace of the stated type;
    so do we, although the guest's crun makes a fresh one."""
    b, spec = make(tmp_path)
    spec["linux"]["namespaces"] = [{"type": kind, "path": path}]
    with pytest.raises(BundleError, match=error):
        plan(b, spec)
    for kind, name in (("ipc", "ipc"), ("mount", "mnt"), ("uts", "uts"), ("user", "user")):
        spec["linux"]["namespaces"] = [{"type": kind, "path": f"/proc/self/ns/{name}"}]
        assert plan(b, spec).spec["linux"]["namespaces"] == [{"type": kind}]


def test_net_sysctls_go_to_the_vm_when_it_holds_the_network(tmp_path: Path) -> None:
    b, spec = make(tmp_path)
    sysctl = {"net.ipv4.ping_group_range": "0 0", "kernel.shm_rmid_forced": "1"}
    spec["linux"]["sysctl"] = dict(sysctl)
    spec["linux"]["namespaces"] = [{"type": "network", "path": "/proc/self/ns/net"}]
    p = plan(b, spec)
    assert p.net_sysctls == {"net.ipv4.ping_group_range": "0 0"}
    assert p.spec["linux"]["sysctl"] == {"kernel.shm_rmid_forced": "1"}
    # a fresh network namespace in the guest keeps them (crun sets them there)
    spec["linux"]["namespaces"] = [{"type": "network"}]
    spec["linux"]["sysctl"] = dict(sysctl)
    p = plan(b, spec)
    assert p.net_sysctls == {} and p.spec["linux"]["sysctl"] == sysctl


def test_resources_size_the_vm(tmp_path: Path) -> None:
    b, spec = make(tmp_path)
    spec["linux"]["resources"] = {
        "memory": {"limit": 512 << 20}, "cpu": {"quota": 250000, "period": 100000},
    }  # fmt: skip
    p = plan(b, spec)
    assert (p.vcpus, p.memory_mib) == (3, 512 + bundle.VM_OVERHEAD_MIB)
    p = plan(b, bundle.load(b))
    assert (p.vcpus, p.memory_mib) == (1, 0)
    # pinned to CPUs the VM must have (quota alone would give 1)
    spec["linux"]["resources"] = {"cpu": {"quota": 50000, "period": 100000, "cpus": "0,2-3"}}
    assert plan(b, spec).vcpus == 4
    spec["linux"]["resources"] = {"cpu": {"cpus": "0-999"}}
    assert plan(b, spec).vcpus == bundle.MAX_VCPUS
    # kernel memory limits have no cgroup v2 knob: left out, with a warning
    spec["linux"]["resources"] = {"memory": {"limit": 64 << 20, "kernel": 1 << 20, "kernelTCP": 0}}
    p = plan(b, spec)
    assert p.spec["linux"]["resources"]["memory"] == {"limit": 64 << 20}
    assert len(p.warnings) == 2 and "kernelTCP" in p.warnings[1]
    assert spec["linux"]["resources"]["memory"]["kernel"] == 1 << 20  # the caller's copy
    assert [bundle.cpuset_size(c) for c in ("", "0", "1-2", "x", None, "5,1")] == [0, 1, 3, 0, 0, 6]
    # Found by fuzz/targets/oci_bundle.py: "²".isdigit() is true, int("²") a ValueError.
    assert bundle.cpuset_size("0-²") == 0 and bundle.cpuset_size("1,\u0663") == 2


def test_bad_bundles_say_why(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="config.json"):
        bundle.load(tmp_path)
    (tmp_path / "config.json").write_text("{nope")
    with pytest.raises(BundleError, match="not usable JSON"):
        bundle.load(tmp_path)
    b, spec = make(tmp_path / "x", mounts=[{"destination": "/d", "type": "bind",
                                            "source": "/no/such/dir"}])  # fmt: skip
    with pytest.raises(BundleError, match="does not exist"):
        plan(b, spec)
    (b / "rootfs").rmdir()
    with pytest.raises(BundleError, match="rootfs"):
        plan(b, spec)


def write_raw(tmp_path: Path, text: str) -> Path:
    (tmp_path / "rootfs").mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(text)
    return tmp_path


def load_and_plan(b: Path) -> bundle.BundlePlan:
    return plan(b, bundle.load(b))


GOOD = default_spec(["true"])


def with_(path: str, value: object) -> str:
    """GOOD with the dotted ``path`` set to ``value``, as JSON text."""
    spec = json.loads(json.dumps(GOOD))
    *parents, last = path.split(".")
    node = spec
    for k in parents:
        node = node.setdefault(k, {})
    node[last] = value
    return json.dumps(spec)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        # Issue 19: each of these escaped as a traceback (the exception in the comment).
        (with_("linux", []), "linux must be an object"),  # AttributeError
        (with_("root", "rootfs"), "root must be an object"),  # AttributeError
        (with_("root.path", 5), "root.path must be a path"),  # TypeError
        (with_("mounts", [{"type": "bind", "source": "/x", "options": 7}]), "options must be"),
        (with_("linux.resources.cpu", {"quota": 1, "period": "x"}), "period must be an integer"),
        (with_("linux.resources.cpu.quota", 10**30), "quota must be an integer"),  # Overflow
        (with_("linux.resources.cpu", {"quota": 1, "period": 0.5}), "period must be an integer"),
        (with_("linux.resources.memory.limit", True), "limit must be an integer"),
        (with_("annotations", {"a": 1}), "annotations.a must be a string"),
        (with_("linux.sysctl", {"net.x": []}), r"sysctl.net.x must be a string"),
        (with_("hooks", {"prestart": [{"path": "/bin/true", "timeout": 0}]}), "timeout"),
        (with_("hooks", {"prestart": [{"path": "/bin/\u0000"}]}), "path must be a path"),
        (with_("process.user.uid", -1), r"uid must be an integer in \[0, 4294967294\]"),
        (with_("process.args", "sh -c x"), "process.args must be a list"),
        (with_("linux.namespaces", [{"type": "network", "path": "/x\u0000"}]), "NUL"),
        # Not JSON numbers: ValueError on NaN, OverflowError on infinity downstream.
        (with_("linux.resources.cpu", {"quota": 1, "period": 1}).replace(
            '"period": 1', '"period": NaN'), "NaN is not a JSON number"),
        (with_("linux.resources.cpu", {"quota": 1, "period": 1}).replace(
            '"quota": 1', '"quota": 1e999'), "number out of range"),
        (with_("annotations", {"a": "x"}).replace('"x"', "[" * 2000 + "]" * 2000),
         r"nested \d+ deep"),  # RecursionError
        ("[]", "not an OCI runtime spec"),
    ],
    ids=lambda v: None if len(str(v)) > 60 else str(v),
)  # fmt: skip
def test_hostile_bundles_are_bundle_errors(tmp_path: Path, text: str, why: str) -> None:
    with pytest.raises(BundleError, match=why):
        load_and_plan(write_raw(tmp_path, text))


@pytest.mark.parametrize("path", ["process", "root", "linux", "mounts", "hooks", "annotations"])
def test_null_fields_are_absent(tmp_path: Path, path: str) -> None:
    """JSON null is an absent field (as Go's decoding has it), never None.get(...)."""
    p = load_and_plan(write_raw(tmp_path, with_(path, None)))
    assert p.vcpus == 1


def test_namespace_path_to_a_fifo_does_not_hang(tmp_path: Path) -> None:
    """Opening a FIFO for reading blocks until a writer comes: the path is
    stat()ed first, and only a regular file (as namespace files are) is opened."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    b = write_raw(tmp_path / "b", with_("linux.namespaces", [{"type": "ipc", "path": str(fifo)}]))
    with pytest.raises(BundleError, match="is not a namespace"):
        load_and_plan(b)


def test_a_namespace_path_with_a_lone_surrogate_is_a_bundle_error(tmp_path: Path) -> None:
    """Found by fuzz/targets/oci_bundle.py: JSON's "\\ud800" decodes to a str
    no file name can be (os.stat raised UnicodeEncodeError)."""
    ns = [{"type": "ipc", "path": "/proc/self/ns/\ud800"}]
    b = write_raw(tmp_path, with_("linux.namespaces", ns))
    with pytest.raises(BundleError, match="not valid UTF-8"):
        load_and_plan(b)


def test_a_root_path_too_long_for_the_system_is_a_bundle_error(tmp_path: Path) -> None:
    """Found by fuzz/targets/oci_bundle.py: Path.is_dir() raises ENAMETOOLONG."""
    b = write_raw(tmp_path, with_("root.path", "x" * 5000))
    with pytest.raises(BundleError, match="File name too long"):
        load_and_plan(b)


def test_a_spec_the_agent_channel_cannot_carry_is_refused_at_create(tmp_path: Path) -> None:
    """A 4 MiB config.json is a valid bundle, but its spec must fit one request
    to the agent (messages.MAX_SPEC): past that the monitor died on a FrameError."""
    b = write_raw(tmp_path, with_("annotations", {"big": "x" * (1 << 20)}))
    with pytest.raises(BundleError, match="as the guest gets it, over"):
        load_and_plan(b)
    with pytest.raises(SandboxError, match="more than the 10 B allowed"):
        _fits("x" * 11, 10, "the container's OCI spec")
