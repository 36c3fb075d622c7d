"""The shim's committed protobuf modules are what protoc makes of its .proto files.

They are committed (an install needs no code generator), so a .proto edited
without regenerating would ship stale code: this test regenerates them with
grpcio-tools' protoc and mypy-protobuf and compares byte for byte. To
regenerate: ``python -m grpc_tools.protoc -I src --python_out=src --mypy_out=src
src/cocoon/shim/proto/*.proto``, and the tests' CRI client's from the checkout's
root: ``python -m grpc_tools.protoc -I . --python_out=. --mypy_out=.
tests/compat/cri/*.proto``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("base", "pkg"),
    [
        (ROOT / "src", "cocoon/shim/proto"),  # the shim's wire
        (ROOT, "tests/compat/cri"),  # the CRI client of tests/compat/test_cri.py
    ],
)
def test_generated_modules_are_current(tmp_path: Path, base: Path, pkg: str) -> None:
    tree = tmp_path / "tree"
    (tree / pkg).parent.mkdir(parents=True)
    shutil.copytree(base / pkg, tree / pkg, ignore=shutil.ignore_patterns("*_pb2.py*", "*.py"))
    protos = sorted(str(p.relative_to(tree)) for p in (tree / pkg).glob("*.proto"))
    assert protos
    # mypy-protobuf's plugin, beside this interpreter (or on PATH)
    plugin = Path(sys.executable).parent / "protoc-gen-mypy"
    found = str(plugin) if plugin.exists() else shutil.which("protoc-gen-mypy")
    assert found, "protoc-gen-mypy (mypy-protobuf) is not installed: run scripts/setup.sh"
    r = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", ".", f"--plugin=protoc-gen-mypy={found}",
         "--python_out=.", "--mypy_out=.", *protos],
        cwd=tree, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    made = sorted(p.name for p in (tree / pkg).glob("*_pb2.py*"))
    committed = sorted(p.name for p in (base / pkg).glob("*_pb2.py*"))
    assert made == committed
    for name in made:
        fresh = (tree / pkg / name).read_bytes()
        assert fresh == (base / pkg / name).read_bytes(), f"{pkg}/{name} is stale: regenerate it"


def test_events_carry_containerds_type_names() -> None:
    """An event's Any type URL is its full name, which containerd looks up."""
    from cocoon.shim.proto import events_pb2, metrics_pb2

    assert events_pb2.TaskExit.DESCRIPTOR.full_name == "containerd.events.TaskExit"
    assert metrics_pb2.Metrics.DESCRIPTOR.full_name == "io.containerd.cgroups.v2.Metrics"
