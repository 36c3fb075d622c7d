"""runtime.hostcgroup: the spec's cgroupsPath as a path, and a real join and removal."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from cocoon.errors import OciError
from cocoon.runtime import hostcgroup


def test_cgroupfs_and_systemd_paths() -> None:
    assert hostcgroup.resolve("") == ""
    assert hostcgroup.resolve("/") == ""
    assert hostcgroup.resolve("/kubepods/besteffort/pod1/abc") == "kubepods/besteffort/pod1/abc"
    assert hostcgroup.resolve("kubepods-besteffort-pod1.slice:cri-containerd:abc") == (
        "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1.slice/"
        "cri-containerd-abc.scope"
    )
    assert hostcgroup.resolve("system.slice:libpod:x") == "system.slice/libpod-x.scope"
    assert hostcgroup.resolve(":libpod:x") == "system.slice/libpod-x.scope"


@pytest.mark.parametrize(
    "bad",
    ["/a/../b", "/a//b", "/a/./b", "a:b", "a:b:c:d", "notaslice:p:n", "a--b.slice:p:n",
     "a/b.slice:p:n"],
)  # fmt: skip
def test_what_is_refused(bad: str) -> None:
    with pytest.raises(OciError):
        hostcgroup.resolve(bad)


@pytest.mark.skipif(os.geteuid() != 0, reason="moves a process between host cgroups: root only")
def test_a_process_joins_every_hierarchy_and_the_cgroup_goes() -> None:
    """A child joins the cgroup in every hierarchy (a v1 cpuset filled in),
    goes back home, and the cgroup is removed, its parent kept."""
    rel = f"cocoon-unit-{uuid.uuid4().hex[:8]}/pod/sandbox"
    code = (
        "from cocoon.runtime import hostcgroup as h; import sys\n"
        "home = h.current(); h.enter(sys.argv[1])\n"
        "mine = h.current(); print(all(v == sys.argv[1] for v in mine.values()), len(mine))\n"
        "h.restore(home); print(h.current() == home)\n"
    )
    src = Path(hostcgroup.__file__).parents[2]
    try:
        r = subprocess.run([sys.executable, "-c", code, rel], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(src)}, timeout=30)  # fmt: skip
        assert r.returncode == 0, r.stderr
        joined, restored = r.stdout.split("\n")[:2]
        assert joined == f"True {len(hostcgroup.hierarchies())}" and restored == "True", r.stdout
        hostcgroup.remove(rel, wait_s=2)
        for top in hostcgroup.hierarchies():
            assert not (top / rel).exists() and (top / rel).parent.is_dir()
    finally:
        for top in hostcgroup.hierarchies():
            for d in (top / rel, (top / rel).parent, (top / rel).parent.parent):
                if d.is_dir():
                    d.rmdir()
