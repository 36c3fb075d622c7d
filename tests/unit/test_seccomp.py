"""oci/seccomp: the host's compile of a profile is byte for byte what crun
writes for the same profile (its seccomp.bpf, left in its state dir by
`crun create`), so the guest's crun loads what it would have built itself."""

from __future__ import annotations

import base64
import copy
import json
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest

from cocoon.oci import seccomp

pytestmark = pytest.mark.skipif(
    shutil.which("crun") is None, reason="needs crun (scripts/setup.sh)"
)

ARCHES = ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
#: Every rule shape crun's compiler has a branch for.
EDGES: dict[str, Any] = {
    "defaultAction": "SCMP_ACT_ERRNO",
    "defaultErrnoRet": 38,
    "architectures": ARCHES,
    "syscalls": [
        {
            "names": [
                "read",
                "write",
                "no_such_syscall",
                "exit_group",
                "execve",
                "brk",
                "mmap",
                "munmap",
                "rt_sigreturn",
                "arch_prctl",
                "set_tid_address",
                "exit",
                "getpid",
                "prctl",
                "seccomp",
                "close",
                "fstat",
                "newfstatat",
            ],
            "action": "SCMP_ACT_ALLOW",
        },
        {
            "names": ["personality"],
            "action": "SCMP_ACT_ALLOW",
            "args": [{"index": 0, "value": 0, "op": "SCMP_CMP_EQ"}],
        },
        {
            "names": ["clone"],
            "action": "SCMP_ACT_ALLOW",
            "args": [{"index": 0, "value": 2114060288, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}],
        },
        {
            "names": ["socket"],
            "action": "SCMP_ACT_ALLOW",
            "args": [
                {"index": 0, "value": 40, "op": "SCMP_CMP_NE"},
                {"index": 0, "value": 16, "op": "SCMP_CMP_NE"},
            ],
        },  # one argument twice
        {
            "names": ["kill"],
            "action": "SCMP_ACT_ERRNO",
            "errnoRet": 1,
            "args": [
                {"index": 1, "value": 9, "op": "SCMP_CMP_EQ"},
                {"index": 0, "value": 1, "op": "SCMP_CMP_GT"},
            ],
        },
        {"names": ["ptrace"], "action": "SCMP_ACT_KILL_PROCESS"},
        {"names": ["uname"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38},  # = the default
        {"names": ["getuid"], "action": "SCMP_ACT_TRAP"},
        {"names": ["getgid"], "action": "SCMP_ACT_LOG"},
    ],
}


def crun_bpf(tmp_path: Path, profile: dict[str, Any]) -> bytes:
    """What `crun create` compiles for ``profile`` (on the host, like the guest's crun)."""
    bundle = tmp_path / "bundle"
    (bundle / "rootfs" / "bin").mkdir(parents=True, exist_ok=True)
    shutil.copy("/bin/busybox", bundle / "rootfs" / "bin" / "busybox")
    subprocess.run(["crun", "spec", "--rootless"], cwd=bundle, check=True)
    conf = json.loads((bundle / "config.json").read_text())
    conf["process"]["args"] = ["/bin/busybox", "true"]
    conf["process"]["terminal"] = False
    conf["linux"]["seccomp"] = profile
    (bundle / "config.json").write_text(json.dumps(conf))
    root, cid = tmp_path / "crun", f"sc-{uuid.uuid4().hex[:8]}"
    # Not piped: the container's init inherits crun's stdio and holds it open.
    subprocess.run(["crun", "--root", str(root), "create", "--bundle", str(bundle), cid],
                   check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=60)  # fmt: skip
    try:
        return (root / cid / "seccomp.bpf").read_bytes()
    finally:
        subprocess.run(["crun", "--root", str(root), "delete", "-f", cid], check=False, timeout=60)


def ours(profile: dict[str, Any]) -> bytes:
    spec = seccomp.compiled({"linux": {"seccomp": profile}})
    return base64.b64decode(spec["annotations"][seccomp.ANNOTATION])


def podman_profile() -> dict[str, Any]:
    """The profile podman 4.3 gives a default container (from its own
    containers.conf and seccomp.json, as `podman create` writes it)."""
    out = subprocess.run(["podman", "create", "--network=none", "--rootfs", "/", "true"],
                         check=True, capture_output=True, text=True).stdout.strip()  # fmt: skip
    try:
        conf = subprocess.run(["podman", "init", out], check=False, capture_output=True)
        del conf
        found = list(
            Path("/var/lib/containers/storage/overlay-containers", out).glob("userdata/config.json")
        )
        assert found, "podman wrote no config.json"
        return json.loads(found[0].read_text())["linux"]["seccomp"]  # type: ignore[no-any-return]
    finally:
        subprocess.run(["podman", "rm", "-f", out], check=False, capture_output=True)


def test_every_rule_shape_compiles_as_crun_compiles_it(tmp_path: Path) -> None:
    assert ours(EDGES) == crun_bpf(tmp_path, EDGES)


@pytest.mark.skipif(shutil.which("podman") is None, reason="needs podman (scripts/setup.sh)")
def test_podmans_default_profile_compiles_as_crun_compiles_it(tmp_path: Path) -> None:
    profile = podman_profile()
    assert len(profile["syscalls"]) > 10
    mine = ours(profile)
    assert mine == crun_bpf(tmp_path, profile)
    assert len(mine) > 4000  # hundreds of instructions: a real filter


def test_what_crun_should_handle_is_left_to_it() -> None:
    for profile in (
        {**EDGES, "listenerPath": "/run/l.sock"},
        {**EDGES, "defaultAction": "SCMP_ACT_NONSENSE"},
        {**EDGES, "architectures": ["SCMP_ARCH_VAX"]},
        {**EDGES, "defaultAction": "SCMP_ACT_ALLOW", "defaultErrnoRet": 1},  # crun refuses
    ):
        spec = {"linux": {"seccomp": profile}}
        assert seccomp.compiled(spec) is spec
    strict = {
        "linux": {"seccomp": EDGES},
        "annotations": {"run.oci.seccomp_fail_unknown_syscall": "1"},
    }
    assert seccomp.compiled(strict) is strict
    notify = copy.deepcopy(EDGES)
    notify["syscalls"].append({"names": ["mount"], "action": "SCMP_ACT_NOTIFY"})
    with_notify = {"linux": {"seccomp": notify}}
    assert seccomp.compiled(with_notify) is with_notify  # crun sets up its listener
    plain = {"linux": {}}
    assert seccomp.compiled(plain) is plain


def test_the_spec_is_not_changed_in_place() -> None:
    spec = {"linux": {"seccomp": EDGES}, "annotations": {"a": "b"}}
    before = json.dumps(spec, sort_keys=True)
    out = seccomp.compiled(spec)
    assert json.dumps(spec, sort_keys=True) == before
    assert out["annotations"]["a"] == "b" and seccomp.ANNOTATION in out["annotations"]
