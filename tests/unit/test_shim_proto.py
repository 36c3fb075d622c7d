"""The shim's committed protobuf modules are what protoc makes of its .proto files.

They are committed (an install needs no code generator), so a .proto edited
without regenerating would ship stale code: this test regenerates them with
grpcio-tools' protoc and mypy-protobuf and compares byte for byte. To
regenerate: ``python -m grpc_tools.protoc -I src --python_out=src --mypy_out=src
src/cocoon/shim/proto/*.proto``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
PROTO = SRC / "cocoon" / "shim" / "proto"


def test_generated_modules_are_current(tmp_path: Path) -> None:
    tree = tmp_path / "src"
    (tree / "cocoon" / "shim").mkdir(parents=True)
    shutil.copytree(PROTO, tree / "cocoon" / "shim" / "proto")
    for old in (tree / "cocoon" / "shim" / "proto").glob("*_pb2.py*"):
        old.unlink()
    protos = sorted(str(p.relative_to(tree)) for p in (tree / "cocoon/shim/proto").glob("*.proto"))
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
    made = sorted(p.name for p in (tree / "cocoon/shim/proto").glob("*_pb2.py*"))
    committed = sorted(p.name for p in PROTO.glob("*_pb2.py*"))
    assert made == committed
    for name in made:
        fresh = (tree / "cocoon/shim/proto" / name).read_bytes()
        assert fresh == (PROTO / name).read_bytes(), f"{name} is stale: regenerate it"


def test_events_carry_containerds_type_names() -> None:
    """An event's Any type URL is its full name, which containerd looks up."""
    from cocoon.shim.proto import events_pb2, metrics_pb2

    assert events_pb2.TaskExit.DESCRIPTOR.full_name == "containerd.events.TaskExit"
    assert metrics_pb2.Metrics.DESCRIPTOR.full_name == "io.containerd.cgroups.v2.Metrics"
