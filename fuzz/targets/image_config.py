"""Image configs (images/manifest.py ``parse_config``) and what ``cocoon run``
and ``cocoon stop`` make of them: the container's spec (entrypoint, env,
user) and the stop signal."""

from __future__ import annotations

import json

from cocoon.errors import ImageError, StateError, UsageError
from cocoon.images.manifest import parse_config
from cocoon.runtime.lifecycle import parse_signal
from cocoon.runtime.run import RunOptions, build_spec

#: UsageError: an image with no command at all; StateError: a bad StopSignal.
EXPECTED: tuple[type[BaseException], ...] = (ImageError, StateError, UsageError)


def run(data: bytes) -> None:
    config = parse_config(data)
    build_spec(config, RunOptions())
    build_spec(config, RunOptions(args=["sh"], env=["A=1"], workdir="/w"))
    if config.stop_signal:
        parse_signal(config.stop_signal)


def seeds() -> list[bytes]:
    docs = [
        {"architecture": "amd64", "os": "linux", "created": "2024-01-01T00:00:00Z",
         "config": {"Entrypoint": ["/bin/sh", "-c"], "Cmd": ["echo hi"], "Env": ["PATH=/bin"],
                    "WorkingDir": "/app", "User": "1000:1000", "StopSignal": "SIGQUIT",
                    "ExposedPorts": {"80/tcp": {}}, "Volumes": {"/data": {}},
                    "Labels": {"a": "b"}},
         "rootfs": {"type": "layers", "diff_ids": ["sha256:" + "a" * 64]},
         "history": [{"created_by": "ADD x /"}]},
        {"config": {"Cmd": ["sh"], "User": "app", "StopSignal": "9"}, "rootfs": {}},
        {"config": None, "rootfs": None},
    ]  # fmt: skip
    return [json.dumps(d).encode() for d in docs]
