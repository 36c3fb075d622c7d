"""deploy/kubernetes: the RuntimeClasses against the Kubernetes API's own
schema (kubernetes-validate bundles it: no cluster needed), and against the
containerd snippet whose handlers they name."""

from __future__ import annotations

import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
#: RuntimeClass is node.k8s.io/v1 since 1.20; check against a current release.
K8S = "1.29"


def runtime_classes() -> list[dict[str, object]]:
    return [yaml.safe_load(p.read_text()) for p in sorted(DEPLOY.glob("runtimeclass-*.yaml"))]


def test_runtime_classes_are_valid_kubernetes_objects() -> None:
    docs = runtime_classes()
    assert {d["metadata"]["name"] for d in docs} == {"cocoon", "cocoon-runc"}  # type: ignore[index]
    for doc in docs:
        kubernetes_validate.validate(doc, K8S, strict=True)


def test_a_misspelt_field_is_caught() -> None:
    """The check above can fail: strict validation refuses unknown fields."""
    doc = runtime_classes()[0]
    doc["overheads"] = doc.pop("overhead")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S, strict=True)


def test_handlers_are_the_containerd_snippets_runtimes() -> None:
    conf = tomllib.loads((DEPLOY / "containerd-cocoon.toml").read_text())
    runtimes = conf["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"]
    handlers = {d["handler"] for d in runtime_classes()}
    assert handlers == set(runtimes)
    assert runtimes["cocoon"]["runtime_type"] == "io.containerd.cocoon.v2"
    assert runtimes["cocoon-runc"]["runtime_type"] == "io.containerd.runc.v2"
    assert runtimes["cocoon-runc"]["options"]["BinaryName"] == "cocoon-runtime"


def pod_fixed_memory_bytes(name: str) -> int:
    """A RuntimeClass's overhead.podFixed memory ("160Mi")."""
    (doc,) = [d for d in runtime_classes() if d["metadata"]["name"] == name]  # type: ignore[index]
    text = str(doc["overhead"]["podFixed"]["memory"])  # type: ignore[index]
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}
    return int(text[:-2]) * units[text[-2:]]


def test_overhead_memory_parses() -> None:
    assert pod_fixed_memory_bytes("cocoon") == 160 << 20
    assert pod_fixed_memory_bytes("cocoon-runc") > pod_fixed_memory_bytes("cocoon")
