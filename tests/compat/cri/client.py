"""kubelet's side of the CRI: a gRPC client of containerd's CRI plugin.

Calls go by their method path (``/runtime.v1.RuntimeService/RunPodSandbox``)
with the messages of ``api.proto``; no generated service stubs are needed.
"""

from __future__ import annotations

from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from tests.compat.cri import api_pb2 as api

R = TypeVar("R", bound=Message)

RUNTIME = "runtime.v1.RuntimeService"
IMAGES = "runtime.v1.ImageService"


class Cri:
    """One channel to the CRI socket; each call a unary RPC with a deadline."""

    def __init__(self, sock: str) -> None:
        self.channel = grpc.insecure_channel(f"unix://{sock}")

    def close(self) -> None:
        self.channel.close()

    def call(
        self, service: str, method: str, req: Message, reply: type[R], timeout: float = 120
    ) -> R:
        rpc = self.channel.unary_unary(
            f"/{service}/{method}",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=reply.FromString,
        )
        out: R = rpc(req, timeout=timeout)
        return out

    def rt(self, method: str, req: Message, timeout: float = 120) -> Any:
        """A RuntimeService call; the reply type is the method's name + Response."""
        reply = getattr(api, f"{method}Response")
        return self.call(RUNTIME, method, req, reply, timeout)

    def pull(self, image: str, sandbox: api.PodSandboxConfig) -> str:
        req = api.PullImageRequest(image=api.ImageSpec(image=image), sandbox_config=sandbox)
        return self.call(IMAGES, "PullImage", req, api.PullImageResponse, 300).image_ref

    def version(self) -> api.VersionResponse:
        return self.rt("Version", api.VersionRequest(version="v1"), 10)  # type: ignore[no-any-return]
