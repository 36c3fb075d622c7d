"""HTTP to one registry: its clients, redirects by hand, bounded bodies, and the one retry loop.

A registry is an untrusted server on an untrusted network: plain HTTP is
spoken only to registries the configuration names, no redirect may drop to
plain HTTP elsewhere, credentials go only to the registry's own origin (never
to the blob storage it redirects to), every body that is read whole is
size-capped before it is read, and every wait has a timeout. A connection
failure is retried a bounded number of times with backoff, in one place
(``Transport.send``), with the attempts of a request counted by one ``Retry``.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import urllib.request
from collections.abc import Awaitable, Callable

import httpcore
import httpx

import cocoon
from cocoon.config import Config
from cocoon.errors import ImageError
from cocoon.images.reference import DOCKER_HUB, DOCKER_HUB_API
from cocoon.images.registry_errors import (
    CONNECT_TIMEOUT_S,
    MAX_ERROR_BODY,
    READ_TIMEOUT_S,
    error_detail,
    is_tls,
    printable,
    reason,
)

log = logging.getLogger(__name__)

#: Bytes per socket read of a response body (httpcore's default is 64 KiB).
READ_BYTES = 256 << 10
#: Tries per request on connection errors and 429/5xx, with backoff doubling from BACKOFF_S.
ATTEMPTS = 3
BACKOFF_S = 0.5
MAX_REDIRECTS = 5

RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
REDIRECT_STATUS = frozenset({301, 302, 303, 307, 308})
USER_AGENT = f"cocoon/{cocoon.__version__}"

# httpcore reads a response 64 KiB at a time, and every read goes through h11,
# httpcore and httpx in Python: for layer bodies 256 KiB reads cut the CPU of a
# download by a fifth. A class attribute of httpcore's HTTP/1.1 connection.
if getattr(httpcore.AsyncHTTP11Connection, "READ_NUM_BYTES", 0) < READ_BYTES:
    httpcore.AsyncHTTP11Connection.READ_NUM_BYTES = READ_BYTES


def _split_host(domain: str) -> tuple[str, str]:
    """``host[:port]`` -> (host, port or ""), IPv6 literals kept in brackets."""
    if domain.startswith("["):
        end = domain.find("]")
        host, rest = domain[: end + 1], domain[end + 1 :]
        return host, rest[1:] if rest.startswith(":") else ""
    host, _, port = domain.partition(":")
    return host, port


def is_insecure(cfg: Config, domain: str) -> bool:
    """Whether ``domain`` (host[:port]) may be spoken to over plain HTTP.

    An entry without a port allows every port of that host, as in docker's
    ``insecure-registries``; with a port, only that one.
    """
    domain = domain.lower()
    host, _ = _split_host(domain)
    for entry in cfg.images.insecure_registries:
        e = entry.strip().lower().removeprefix("http://").rstrip("/")
        if e in (domain, host):
            return True
    return False


def netloc(url: httpx.URL) -> str:
    host = f"[{url.host}]" if ":" in url.host else url.host
    return f"{host}:{url.port}" if url.port else host


def origin(url: httpx.URL) -> tuple[str, str, int | None]:
    default = {"http": 80, "https": 443}.get(url.scheme)
    return (url.scheme, url.host, url.port or default)


async def read_bounded(resp: httpx.Response, limit: int, what: str) -> bytes:
    """The whole body, refusing (before reading it) anything above ``limit``."""
    length = resp.headers.get("content-length", "")
    # isascii: str.isdigit() is true for "²" (a latin-1 header byte), which int() refuses;
    # so it does 5,000 digits (the interpreter's limit), and 20 are already too many.
    if length.isascii() and length.isdigit() and (len(length) > 19 or int(length) > limit):
        raise ImageError(f"{what} is {length[:24]} B, more than the {limit} B allowed")
    buf = bytearray()
    try:
        async for chunk in resp.aiter_bytes():
            buf += chunk
            if len(buf) > limit:
                raise ImageError(f"{what} is more than the {limit} B allowed")
    except httpx.TransportError as e:
        host = netloc(resp.request.url)
        raise ImageError(
            f"connection to {host} broke while reading the {what}: {reason(e)}"
        ) from None
    return bytes(buf)


class Retry:
    """The attempts of one request (or one blob's body), with backoff doubling
    between them: every retry of a pull counts and waits the same way."""

    def __init__(self, attempts: int, backoff_s: float) -> None:
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.count = 0

    def again(self) -> bool:
        """Count a failed attempt; whether another one is allowed."""
        self.count += 1
        return self.count < self.attempts

    async def wait(self) -> None:
        await asyncio.sleep(self.backoff_s * 2 ** (self.count - 1))


class Transport:
    """The HTTP clients of one registry (``domain``), and the rules every request follows."""

    def __init__(self, cfg: Config, domain: str) -> None:
        self.cfg = cfg
        self.domain = domain
        self.secure = not is_insecure(cfg, domain)
        host = DOCKER_HUB_API if domain == DOCKER_HUB else domain
        self.base = httpx.URL(f"{'https' if self.secure else 'http'}://{host}/v2/")
        self.attempts = ATTEMPTS
        self.backoff_s = BACKOFF_S
        # Plain HTTP to an insecure registry needs no CA bundle: loading certifi's
        # costs ~35 ms. Its client gets a context with no CA at all (so an https
        # URL sent there would fail closed); a redirect or token realm on https
        # gets a verifying client, made when first needed. With proxies from the
        # environment (which may be https) everything goes the verifying way.
        self._plain = not self.secure and not urllib.request.getproxies()
        self._http = self._client(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT) if self._plain else True)
        self._https: httpx.AsyncClient | None = None

    @staticmethod
    def _client(verify: ssl.SSLContext | bool) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            timeout=httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S),
            follow_redirects=False,  # followed by hand: see follow
            headers={"User-Agent": USER_AGENT},
            verify=verify,
        )

    def _client_for(self, url: httpx.URL) -> httpx.AsyncClient:
        if self._plain and url.scheme != "http":
            if self._https is None:
                self._https = self._client(True)
            return self._https
        return self._http

    async def aclose(self) -> None:
        await self._http.aclose()
        if self._https is not None:
            await self._https.aclose()

    def retry(self) -> Retry:
        return Retry(self.attempts, self.backoff_s)

    def at_registry(self, url: httpx.URL) -> bool:
        """Whether ``url`` is the registry's own origin (the only one our credentials go to)."""
        return origin(url) == origin(self.base)

    def check_scheme(self, url: httpx.URL) -> None:
        if url.scheme == "https":
            return
        if url.scheme == "http" and is_insecure(self.cfg, netloc(url)):
            return
        raise ImageError(
            f"registry {self.domain} sent us to {printable(str(url.copy_with(query=None)), 120)}: "
            f"only https (or plain HTTP to images.insecure_registries) is allowed"
        )

    def unreachable(self, e: BaseException, url: httpx.URL) -> ImageError:
        where = self.domain if self.at_registry(url) else netloc(url)
        msg = f"registry {where} unreachable: {reason(e)}"
        if url.scheme == "https" and is_tls(e):
            msg += f"; if it serves plain HTTP, add {where} to images.insecure_registries"
        return ImageError(msg)

    async def error_detail(self, resp: httpx.Response) -> str:
        """``CODE: message`` of a distribution error body, or the HTTP status; closes ``resp``."""
        detail = ""
        try:
            detail = error_detail(await read_bounded(resp, MAX_ERROR_BODY, "error body"))
        except (ImageError, httpx.HTTPError):
            pass
        finally:
            await resp.aclose()
        return detail or f"HTTP {resp.status_code}"

    async def get(self, url: httpx.URL, headers: dict[str, str]) -> httpx.Response:
        """One GET, streamed, no redirect followed (a token realm's answer)."""
        http = self._client_for(url)
        return await http.send(http.build_request("GET", url, headers=headers), stream=True)

    async def follow(
        self,
        method: str,
        url: httpx.URL,
        headers: dict[str, str],
        authorization: Callable[[], str | None],
    ) -> httpx.Response:
        """Send, following redirects by hand.

        By hand because the rules are ours: the Authorization header goes only
        to the registry's origin (a blob CDN must not see our token), Range
        survives the hop, and no hop may drop to plain HTTP unless that host
        is an insecure registry.
        """
        for _ in range(MAX_REDIRECTS + 1):
            self.check_scheme(url)
            h = dict(headers)
            token = authorization()
            if token and self.at_registry(url):
                h["Authorization"] = token
            http = self._client_for(url)
            resp = await http.send(http.build_request(method, url, headers=h), stream=True)
            location = resp.headers.get("location")
            if resp.status_code not in REDIRECT_STATUS or not location:
                return resp
            await resp.aclose()
            try:
                url = url.join(location)
            except httpx.InvalidURL:
                raise ImageError(f"registry {self.domain} sent a malformed redirect") from None
            if resp.status_code == 303:
                method = "GET"
            log.debug("redirected to %s", url.copy_with(query=None))
        raise ImageError(f"registry {self.domain}: more than {MAX_REDIRECTS} redirects")

    async def send(
        self,
        attempt: Callable[[], Awaitable[httpx.Response]],
        retry: Retry,
        unreachable: Callable[[httpx.TransportError], ImageError],
        *,
        what: str,
        tls_is_final: bool = True,
    ) -> httpx.Response:
        """``attempt()``'s response, retrying connection failures as ``retry`` allows;
        ``unreachable(e)`` is raised when it allows no more."""
        while True:
            try:
                return await attempt()
            except httpx.TransportError as e:
                more = retry.again()
                log.debug("%s: %s (attempt %d)", what, reason(e), retry.count)
                # A TLS failure is a configuration problem: retrying cannot fix it.
                if not more or (tls_is_final and is_tls(e)):
                    raise unreachable(e) from None
                await retry.wait()
