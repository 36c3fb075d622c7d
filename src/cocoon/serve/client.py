"""The function service's client: what `cocoon fn` (and the tests) speak.

The unix socket by default (root-only, so no token); a URL and a bearer
token for TCP. An answer of 4xx/5xx is a ServiceError with the service's one
line; no answer at all is ServiceUnreachable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from cocoon.errors import ServiceError, ServiceUnreachable

#: A synchronous invocation waits for the function: no read timeout then.
TIMEOUT = httpx.Timeout(60.0, connect=5.0)


class Client:
    def __init__(self, *, socket: Path | None = None, url: str = "", token: str = "") -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if url:
            self.where = url
            self.http = httpx.Client(base_url=url, headers=headers, timeout=TIMEOUT)
        else:
            assert socket is not None
            self.where = str(socket)
            # No TLS on a unix socket: without verify=False httpx still builds
            # its default SSL context (certifi's bundle), ~17 ms of every
            # client here, i.e. of every `cocoon fn` command.
            transport = httpx.HTTPTransport(uds=str(socket), verify=False)
            self.http = httpx.Client(
                base_url="http://cocoon", transport=transport, headers=headers, timeout=TIMEOUT
            )

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(
        self, method: str, path: str, *, ok: tuple[int, ...] = (), **kw: Any
    ) -> httpx.Response:
        """The answer; ServiceError unless 2xx or one of ``ok``."""
        try:
            r = self.http.request(method, path, **kw)
        except httpx.TransportError as e:
            raise ServiceUnreachable(
                f"cannot reach the function service at {self.where}: {e or e.__class__.__name__}"
                " (is `cocoon serve` running?)"
            ) from None
        if r.is_success or r.status_code in ok:
            return r
        try:
            text = str(r.json()["error"])
        except (ValueError, KeyError, TypeError):
            text = r.text[:500] or r.reason_phrase
        raise ServiceError(f"{text} (HTTP {r.status_code})")

    def json(self, method: str, path: str, **kw: Any) -> Any:
        return self.request(method, path, **kw).json()

    # -- the API's verbs -------------------------------------------------------

    def create(self, ns: str, body: dict[str, Any]) -> dict[str, Any]:
        r: dict[str, Any] = self.json("POST", f"/v1/namespaces/{ns}/functions", json=body)
        return r

    def update(self, ns: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        r: dict[str, Any] = self.json("PUT", f"/v1/namespaces/{ns}/functions/{name}", json=body)
        return r

    def get(self, ns: str, name: str) -> dict[str, Any]:
        r: dict[str, Any] = self.json("GET", f"/v1/namespaces/{ns}/functions/{name}")
        return r

    def functions(self, ns: str) -> list[dict[str, Any]]:
        r: list[dict[str, Any]] = self.json("GET", f"/v1/namespaces/{ns}/functions")
        return r

    def delete(self, ns: str, name: str) -> None:
        self.request("DELETE", f"/v1/namespaces/{ns}/functions/{name}")

    def invoke(
        self, ns: str, name: str, payload: bytes, *, mode: str = "sync", version: int | None = None
    ) -> httpx.Response:
        """The answer of a sync invocation: 200, or 502/504 with the failure in
        its X-Cocoon-* headers; of an async one, 202 with the id."""
        params: dict[str, Any] = {"mode": mode}
        if version is not None:
            params["version"] = version
        return self.request(
            "POST",
            f"/v1/namespaces/{ns}/functions/{name}/invoke",
            content=payload,
            params=params,
            ok=(502, 504),
            timeout=httpx.Timeout(None, connect=5.0),
        )

    def invocation(self, ns: str, iid: str) -> dict[str, Any]:
        r: dict[str, Any] = self.json("GET", f"/v1/namespaces/{ns}/invocations/{iid}")
        return r

    def invocations(self, ns: str, name: str, limit: int = 20) -> list[dict[str, Any]]:
        r: list[dict[str, Any]] = self.json(
            "GET", f"/v1/namespaces/{ns}/functions/{name}/invocations", params={"limit": limit}
        )
        return r

    def logs(self, ns: str, iid: str) -> str:
        return self.request("GET", f"/v1/namespaces/{ns}/invocations/{iid}/logs").text

    def result(self, ns: str, iid: str) -> bytes:
        return self.request("GET", f"/v1/namespaces/{ns}/invocations/{iid}/result").content
