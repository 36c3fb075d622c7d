"""The OCI distribution client: manifests, configs and layers into the blob store.

A registry is an untrusted server on an untrusted network. So: every byte it
sends is checked against a digest before it is stored (the BlobStore refuses
anything else), every document is size-capped before it is read, plain HTTP
is spoken only to registries the configuration names, credentials go only to
the registry's own origin (never to the blob storage it redirects to), and
every wait has a timeout. A pull that dies, for any reason, leaves only
verified blobs plus partial files in the ingest dir that the next pull resumes
with an HTTP Range request.

The protocol is the OCI distribution spec (docker's registry v2 API): ``GET
/v2/<name>/manifests/<reference>`` and ``GET /v2/<name>/blobs/<digest>``, with
the ``WWW-Authenticate`` challenge (Bearer token or Basic) on the first 401.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import socket
import ssl
import sys
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING

import httpcore
import httpx

import cocoon
from cocoon.config import Config
from cocoon.errors import ImageError
from cocoon.images import auth
from cocoon.images.auth import Credentials
from cocoon.images.blobs import BlobStore, BlobWriter
from cocoon.images.manifest import (
    DEFAULT_PLATFORM,
    DOCKER_LIST,
    DOCKER_MANIFEST,
    INDEX_TYPES,
    MANIFEST_TYPES,
    MAX_CONFIG,
    MAX_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    Platform,
    media_type_of,
    parse_config,
    parse_index,
    parse_manifest,
)
from cocoon.images.reference import DOCKER_HUB, DOCKER_HUB_API, Reference, parse
from cocoon.util import boundedjson

if TYPE_CHECKING:  # rich is imported only for a terminal (_Bars)
    from rich.progress import Progress, TaskID

log = logging.getLogger(__name__)

#: Bytes per socket read of a response body (httpcore's default is 64 KiB).
READ_BYTES = 256 << 10
#: A registry that accepts no TCP connection in this long is down, not slow.
CONNECT_TIMEOUT_S = 15.0
#: Longest silence inside one response (a stalled CDN); the whole layer may take longer.
READ_TIMEOUT_S = 60.0
#: Tries per request on connection errors and 429/5xx, with backoff doubling from BACKOFF_S.
ATTEMPTS = 3
BACKOFF_S = 0.5
MAX_REDIRECTS = 5
#: Registry error bodies and token responses are small; a huge one is hostile.
MAX_ERROR_BODY = 64 << 10
MAX_TOKEN_RESPONSE = 1 << 20
MAX_TOKEN = 64 << 10

ACCEPT = ", ".join((OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST))
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
REDIRECT_STATUS = frozenset({301, 302, 303, 307, 308})
USER_AGENT = f"cocoon/{cocoon.__version__}"

# httpcore reads a response 64 KiB at a time, and every read goes through h11,
# httpcore and httpx in Python: for layer bodies 256 KiB reads cut the CPU of a
# download by a fifth. A class attribute of httpcore's HTTP/1.1 connection.
if getattr(httpcore.AsyncHTTP11Connection, "READ_NUM_BYTES", 0) < READ_BYTES:
    httpcore.AsyncHTTP11Connection.READ_NUM_BYTES = READ_BYTES

_CHALLENGE_PARAM = re.compile(r'\s*([A-Za-z0-9_-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]*)\s*,?')
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


@dataclass(frozen=True)
class PulledImage:
    """What a pull leaves in the blob store, for the image store to unpack.

    ``manifest_digest`` is the platform's image manifest (the thing that is
    unpacked); ``index_digest`` is the index it was picked from, if any (the
    digest ``docker pull`` prints for multi-platform images).
    """

    reference: str
    manifest_digest: str
    manifest_media_type: str
    config_digest: str
    layers: list[Descriptor]
    platform: Platform
    index_digest: str | None = None


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


def _netloc(url: httpx.URL) -> str:
    host = f"[{url.host}]" if ":" in url.host else url.host
    return f"{host}:{url.port}" if url.port else host


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    default = {"http": 80, "https": 443}.get(url.scheme)
    return (url.scheme, url.host, url.port or default)


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="..",service="..",scope=".."`` -> ("bearer", {...}).

    Quoted values may hold commas (``scope="repository:a:pull,push"``), so
    this is a tokenizer, not a split on ",".
    """
    scheme, _, rest = header.strip().partition(" ")
    params: dict[str, str] = {}
    pos = 0
    while pos < len(rest):
        m = _CHALLENGE_PARAM.match(rest, pos)
        if not m or m.end() == pos:
            break
        value = m.group(2)
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        params[m.group(1).lower()] = value
        pos = m.end()
    return scheme.lower(), params


def _printable(text: str, limit: int = 200) -> str:
    """A registry's words, made safe for one line of a terminal."""
    clean = "".join(c if c.isprintable() else "?" for c in text)
    return clean[:limit] + ("..." if len(clean) > limit else "")


def _reason(e: BaseException) -> str:
    """Why a connection failed, in a few words (the exception chain holds the OSError)."""
    if isinstance(e, httpx.ConnectTimeout):
        return f"no connection within {CONNECT_TIMEOUT_S:g} s"
    if isinstance(e, httpx.ReadTimeout):
        return f"no data for {READ_TIMEOUT_S:g} s"
    if isinstance(e, httpx.TimeoutException):
        return "timed out"
    seen: set[int] = set()
    x: BaseException | None = e
    while x is not None and id(x) not in seen:
        seen.add(id(x))
        if isinstance(x, ssl.SSLCertVerificationError):
            return f"TLS certificate not trusted ({_printable(x.verify_message or str(x), 120)})"
        if isinstance(x, ssl.SSLError):
            return f"TLS handshake failed ({_printable(x.reason or str(x), 120)})"
        if isinstance(x, socket.gaierror):
            return "host name not found"
        if isinstance(x, OSError) and x.errno:
            return os.strerror(x.errno).lower()
        x = x.__cause__ or x.__context__
    if isinstance(e, httpx.RemoteProtocolError):
        return "the registry closed the connection"
    return _printable(str(e), 120) or type(e).__name__


def _is_tls(e: BaseException) -> bool:
    x: BaseException | None = e
    for _ in range(10):
        if x is None:
            return False
        if isinstance(x, ssl.SSLError):
            return True
        x = x.__cause__ or x.__context__
    return False


def _first_image_error(group: BaseExceptionGroup[BaseException]) -> ImageError | None:
    for e in group.exceptions:
        if isinstance(e, ImageError):
            return e
        if isinstance(e, BaseExceptionGroup):
            inner = _first_image_error(e)
            if inner:
                return inner
    return None


@contextlib.contextmanager
def _about(prefix: str) -> Iterator[None]:
    """Say which pull and which blob an error from the store or the parser is about."""
    try:
        yield
    except ImageError as e:
        raise ImageError(f"{prefix}: {e}") from None


async def _read_bounded(resp: httpx.Response, limit: int, what: str) -> bytes:
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
        host = _netloc(resp.request.url)
        raise ImageError(
            f"connection to {host} broke while reading the {what}: {_reason(e)}"
        ) from None
    return bytes(buf)


def error_detail(body: bytes) -> str:
    """``CODE: message`` of a distribution error body (one line, printable), or ""."""
    try:
        doc = boundedjson.loads(body, max_bytes=MAX_ERROR_BODY)
    except boundedjson.JSONError:
        return ""
    errors = doc.get("errors") if isinstance(doc, dict) else None
    first = errors[0] if isinstance(errors, list) and errors else None
    if not isinstance(first, dict):
        return ""
    code, message = first.get("code", ""), first.get("message", "")
    words = [x for x in (code, message) if isinstance(x, str) and x]
    return _printable(": ".join(words))


def token_of(body: bytes) -> str | None:
    """The bearer token of a token server's JSON answer, if it holds a usable one."""
    try:
        doc = boundedjson.loads(body, max_bytes=MAX_TOKEN_RESPONSE)
    except boundedjson.JSONError:
        return None
    token = (doc.get("token") or doc.get("access_token")) if isinstance(doc, dict) else None
    if (
        not isinstance(token, str)
        or not token
        or len(token) > MAX_TOKEN
        or not all(33 <= ord(c) < 127 for c in token)
    ):
        return None
    return token


class _RangeRefused(Exception):
    """The registry would not resume a partial blob: fetch it from byte 0."""


class _Bars:
    """One rich progress bar per layer, on stderr, only on a terminal (STYLE: never stdout)."""

    def __init__(self, enabled: bool) -> None:
        self._p: Progress | None = None
        if enabled and sys.stderr.isatty():
            # rich only here: ~30 ms of imports that a pull without a terminal never needs.
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TransferSpeedColumn,
            )

            self._p = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                console=Console(stderr=True),
            )

    def __enter__(self) -> _Bars:
        if self._p:
            self._p.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._p:
            self._p.stop()

    def add(self, label: str, total: int, completed: int = 0) -> TaskID | None:
        return self._p.add_task(label, total=total, completed=completed) if self._p else None

    def set(self, task: TaskID | None, completed: int) -> None:
        if self._p and task is not None:
            self._p.update(task, completed=completed)


class RegistryClient:
    """One registry, one repository scope: auth state, retries and redirects in one place.

    Use as ``async with RegistryClient(cfg, "ghcr.io", creds, repository="o/r")``;
    the HTTP connection pool lives as long as the block.
    """

    def __init__(
        self,
        cfg: Config,
        domain: str,
        credentials: Credentials | None = None,
        *,
        repository: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.domain = domain
        self.repository = repository
        self.credentials = credentials
        self.secure = not is_insecure(cfg, domain)
        host = DOCKER_HUB_API if domain == DOCKER_HUB else domain
        self.base = httpx.URL(f"{'https' if self.secure else 'http'}://{host}/v2/")
        self.attempts = ATTEMPTS
        self.backoff_s = BACKOFF_S
        self._authorization: str | None = None
        self._scheme = ""
        self._auth_lock = asyncio.Lock()
        self._logging_in = False
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
            follow_redirects=False,  # followed by hand: see _follow
            headers={"User-Agent": USER_AGENT},
            verify=verify,
        )

    def _client_for(self, url: httpx.URL) -> httpx.AsyncClient:
        if self._plain and url.scheme != "http":
            if self._https is None:
                self._https = self._client(True)
            return self._https
        return self._http

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._http.aclose()
        if self._https is not None:
            await self._https.aclose()

    # -- errors -------------------------------------------------------------

    def _login_hint(self) -> str:
        return f"run `cocoon login {self.domain}`"

    def _auth_required(self) -> ImageError:
        return ImageError(f"authentication required: {self._login_hint()}")

    def _rejected(self) -> ImageError:
        user = self.credentials.username if self.credentials else ""
        if self._logging_in:
            return ImageError(f"login to {self.domain} failed: wrong username or password")
        return ImageError(
            f"unauthorized: {self.domain} rejected the credentials of {user!r}; "
            + self._login_hint()
        )

    def _denied(self) -> ImageError:
        if not self.credentials:
            return self._auth_required()
        if self._scheme == "basic":
            return self._rejected()
        return ImageError(
            f"access denied to {self.domain}/{self.repository or ''} for "
            f"{self.credentials.username!r}: no such repository, or no pull permission"
        )

    def _unreachable(self, e: BaseException, url: httpx.URL) -> ImageError:
        where = self.domain if _origin(url) == _origin(self.base) else _netloc(url)
        msg = f"registry {where} unreachable: {_reason(e)}"
        if url.scheme == "https" and _is_tls(e):
            msg += f"; if it serves plain HTTP, add {where} to images.insecure_registries"
        return ImageError(msg)

    async def _error_detail(self, resp: httpx.Response) -> str:
        """``CODE: message`` of a distribution error body, or the HTTP status."""
        detail = ""
        try:
            detail = error_detail(await _read_bounded(resp, MAX_ERROR_BODY, "error body"))
        except (ImageError, httpx.HTTPError):
            pass
        finally:
            await resp.aclose()
        return detail or f"HTTP {resp.status_code}"

    # -- transport ----------------------------------------------------------

    def url(self, path: str) -> httpx.URL:
        """``/v2/<repository>/<path>``: the repository was validated by reference.parse."""
        return self.base.join(f"{self.repository}/{path}")

    def _check_scheme(self, url: httpx.URL) -> None:
        if url.scheme == "https":
            return
        if url.scheme == "http" and is_insecure(self.cfg, _netloc(url)):
            return
        raise ImageError(
            f"registry {self.domain} sent us to {_printable(str(url.copy_with(query=None)), 120)}: "
            f"only https (or plain HTTP to images.insecure_registries) is allowed"
        )

    async def _follow(self, method: str, url: httpx.URL, headers: dict[str, str]) -> httpx.Response:
        """Send, following redirects by hand.

        By hand because the rules are ours: the Authorization header goes only
        to the registry's origin (a blob CDN must not see our token), Range
        survives the hop, and no hop may drop to plain HTTP unless that host
        is an insecure registry.
        """
        for _ in range(MAX_REDIRECTS + 1):
            self._check_scheme(url)
            h = dict(headers)
            if self._authorization and _origin(url) == _origin(self.base):
                h["Authorization"] = self._authorization
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

    async def _backoff(self, attempt: int) -> None:
        await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1))

    async def request(
        self, method: str, url: httpx.URL, headers: dict[str, str] | None = None
    ) -> httpx.Response:
        """A streamed response, or ImageError; the caller closes it (``await resp.aclose()``).

        Retries connection errors and 429/5xx (bounded), answers the first 401
        with the authentication challenge and tries once more, turns 401/403
        that remain into an auth error. Other 4xx are returned for the caller
        to name: 404 means different things for a tag and a blob.
        """
        attempt = 0
        reauthenticated = False
        while True:
            sent = self._authorization
            try:
                resp = await self._follow(method, url, headers or {})
            except httpx.TransportError as e:
                attempt += 1
                log.debug("%s %s: %s (attempt %d)", method, url, _reason(e), attempt)
                # A TLS failure is a configuration problem: retrying cannot fix it.
                if attempt >= self.attempts or _is_tls(e):
                    raise self._unreachable(e, url) from None
                await self._backoff(attempt)
                continue
            at_registry = _origin(resp.request.url) == _origin(self.base)
            if resp.status_code == 401 and at_registry:
                challenge = resp.headers.get("www-authenticate", "")
                await resp.aclose()
                if reauthenticated:
                    raise self._denied()
                await self._authenticate(challenge, sent)
                reauthenticated = True
                continue
            if resp.status_code == 403 and at_registry:
                await resp.aclose()
                raise self._denied()
            if resp.status_code in RETRY_STATUS:
                attempt += 1
                if attempt < self.attempts:
                    await resp.aclose()
                    await self._backoff(attempt)
                    continue
                detail = await self._error_detail(resp)
                raise ImageError(
                    f"registry {self.domain}: {detail} (tried {attempt} times); try again later"
                )
            return resp

    # -- authentication -----------------------------------------------------

    async def _authenticate(self, challenge: str, sent: str | None) -> None:
        """Answer a 401: fetch a Bearer token or use Basic credentials, once per stale header.

        The lock makes concurrent layer downloads that hit an expired token at
        the same time fetch one new token, not one each.
        """
        async with self._auth_lock:
            if self._authorization != sent:
                return  # another task answered this challenge meanwhile
            scheme, params = parse_challenge(challenge)
            self._scheme = scheme
            if not scheme:
                raise self._denied()  # a 401 without a challenge: nothing to answer
            if scheme == "basic":
                if not self.credentials:
                    raise self._auth_required()
                header = "Basic " + self.credentials.encoded()
                if sent == header:
                    raise self._rejected()
                self._authorization = header
            elif scheme == "bearer":
                self._authorization = "Bearer " + await self._fetch_token(params)
            else:
                raise ImageError(
                    f"registry {self.domain} wants authentication scheme "
                    f"{_printable(scheme, 40)!r}, which cocoon does not speak (Bearer, Basic)"
                )

    async def _fetch_token(self, params: dict[str, str]) -> str:
        """GET <realm>?service=..&scope=.. (Basic auth if we have credentials) -> token."""
        realm = params.get("realm", "")
        try:
            url = httpx.URL(realm)
        except httpx.InvalidURL:
            url = httpx.URL()
        if url.scheme not in ("http", "https") or not url.host:
            raise ImageError(
                f"registry {self.domain} named no usable token realm ({_printable(realm, 100)!r})"
            )
        # The realm gets our password: never over plain HTTP to a host nobody listed.
        self._check_scheme(url)
        query: dict[str, str] = {}
        if "service" in params:
            query["service"] = params["service"]
        scope = params.get("scope") or (
            f"repository:{self.repository}:pull" if self.repository else ""
        )
        if scope:
            query["scope"] = scope
        headers = {"Accept": "application/json"}
        if self.credentials:
            headers["Authorization"] = "Basic " + self.credentials.encoded()
        url = url.copy_merge_params(query)
        attempt = 0
        while True:
            try:
                http = self._client_for(url)
                resp = await http.send(http.build_request("GET", url, headers=headers), stream=True)
                break
            except httpx.TransportError as e:
                attempt += 1
                if attempt >= self.attempts:
                    raise ImageError(
                        f"token server {_netloc(url)} of registry {self.domain} unreachable: "
                        + _reason(e)
                    ) from None
                await self._backoff(attempt)
        try:
            if resp.status_code in (401, 403):
                raise self._rejected() if self.credentials else self._auth_required()
            if resp.status_code != 200:
                detail = await self._error_detail(resp)
                raise ImageError(f"token server {_netloc(url)} of {self.domain}: {detail}")
            body = await _read_bounded(resp, MAX_TOKEN_RESPONSE, "token response")
        finally:
            await resp.aclose()
        token = token_of(body)
        if token is None:
            raise ImageError(f"token server {_netloc(url)} of {self.domain} sent no usable token")
        return token

    async def check_login(self) -> None:
        """``GET /v2/`` with our credentials: succeeds only if they are accepted."""
        self._logging_in = True
        if not self.credentials:
            raise ImageError("login needs a username and password")
        resp = await self.request("GET", self.base)
        try:
            if resp.status_code != 200:
                detail = await self._error_detail(resp)
                raise ImageError(f"login to {self.domain}: {detail}")
        finally:
            await resp.aclose()
        if self._authorization is None:
            log.info("%s needs no credentials; storing them anyway", self.domain)

    # -- documents ----------------------------------------------------------

    async def manifest(
        self, reference: str, what: str, *, digest: str | None = None, size: int | None = None
    ) -> tuple[bytes, str, str]:
        """(bytes, media type, digest) of a manifest or index, verified.

        By digest, the bytes must hash to it. By tag, they must hash to the
        Docker-Content-Digest header if the registry sent one (a cheap check
        that the tag resolved to what the registry thinks it did).
        """
        resp = await self.request("GET", self.url(f"manifests/{reference}"), {"Accept": ACCEPT})
        try:
            if resp.status_code == 404:
                detail = await self._error_detail(resp)
                if detail.startswith("NAME_UNKNOWN"):
                    raise ImageError(f"{what}: repository unknown (no such image)")
                kind = "digest" if digest else "tag"
                raise ImageError(f"{what}: manifest unknown (no such {kind})")
            if resp.status_code != 200:
                detail = await self._error_detail(resp)
                raise ImageError(f"{what}: registry answered {detail}")
            with _about(what):
                data = await _read_bounded(resp, MAX_MANIFEST, "manifest")
        finally:
            await resp.aclose()
        got = "sha256:" + hashlib.sha256(data).hexdigest()
        if digest and got != digest:
            raise ImageError(
                f"{what}: manifest digest mismatch: expected {digest}, content is {got}"
            )
        if size is not None and len(data) != size:
            raise ImageError(f"{what}: manifest is {len(data)} B, its descriptor says {size} B")
        header = resp.headers.get("docker-content-digest", "")
        if header.startswith("sha256:") and header != got:
            raise ImageError(
                f"{what}: manifest digest mismatch: registry says {_printable(header, 80)}, "
                f"content is {got}"
            )
        with _about(what):
            mt = media_type_of(data)
        return data, mt, got

    async def config_blob(self, d: Descriptor, what: str) -> bytes:
        """The image config: held in memory, so size-capped (MAX_CONFIG) and verified."""
        if d.size > MAX_CONFIG:
            raise ImageError(f"{what}: image config is {d.size} B, more than {MAX_CONFIG} B")
        resp = await self.request("GET", self.url(f"blobs/{d.digest}"))
        try:
            if resp.status_code != 200:
                detail = await self._error_detail(resp)
                raise ImageError(
                    f"{what}: image config {d.digest[:19]}: registry answered {detail}"
                )
            with _about(what):
                data = await _read_bounded(resp, d.size, "image config")
        finally:
            await resp.aclose()
        got = "sha256:" + hashlib.sha256(data).hexdigest()
        if got != d.digest or len(data) != d.size:
            raise ImageError(
                f"{what}: image config digest mismatch: expected {d.digest}, content is {got}"
            )
        return data

    # -- layers -------------------------------------------------------------

    async def fetch_blob(self, store: BlobStore, d: Descriptor, bars: _Bars, what: str) -> None:
        """Stream one layer into the store, resuming a partial left by an earlier pull.

        Transport errors mid-body are retried (bounded) from where the bytes
        stopped; a resumed blob that fails verification is fetched once more
        from zero, since the bad bytes may be the old partial's.
        """
        if store.has(d.digest):
            bars.add(f"{d.digest[7:19]} exists", d.size, d.size)
            return
        label = f"layer {d.digest[:19]}"
        task: TaskID | None = None
        attempt = 0
        from_zero = False
        while True:
            w = store.writer(d.digest, d.size)
            resumed = w.offset > 0
            if task is None:
                task = bars.add(d.digest[7:19], d.size, w.offset)
            try:
                await self._download(d, w, bars, task, what)
            except _RangeRefused:
                w.abort(keep_partial=False)  # only the bytes we can hash from zero count
                if from_zero:
                    raise ImageError(f"{what}: {label}: registry keeps refusing it") from None
                from_zero = True
                bars.set(task, 0)
                continue
            except httpx.TransportError as e:
                w.abort()
                attempt += 1
                log.debug("%s: %s after %d B (attempt %d)", label, _reason(e), w.offset, attempt)
                if attempt >= self.attempts:
                    raise ImageError(
                        f"registry {self.domain}: download of {label} broke off "
                        f"({_reason(e)}) at {w.offset} of {d.size} B; "
                        "run the pull again to resume"
                    ) from None
                await self._backoff(attempt)
                continue
            except BaseException:
                w.abort()  # cancelled by a sibling's failure or Ctrl-C: keep it for a resume
                raise
            try:
                # fsync + rename off the event loop: the other layers keep downloading.
                await asyncio.to_thread(w.commit)
            except ImageError as e:
                if resumed and not from_zero:
                    log.info("%s: resumed blob failed verification; fetching it again", label)
                    from_zero = True
                    bars.set(task, 0)
                    continue
                raise ImageError(f"{what}: {label}: {e}") from None
            return

    async def _download(
        self, d: Descriptor, w: BlobWriter, bars: _Bars, task: TaskID | None, what: str
    ) -> None:
        """Append the rest of the blob to ``w``; _RangeRefused if the resume was refused."""
        if w.offset >= d.size:
            return  # complete partial: only its verification is left
        headers = {"Accept-Encoding": "identity"}
        if w.offset:
            headers["Range"] = f"bytes={w.offset}-"
        resp = await self.request("GET", self.url(f"blobs/{d.digest}"), headers)
        try:
            if resp.status_code == 404:
                await self._error_detail(resp)
                raise ImageError(f"{what}: layer {d.digest} is missing from the registry")
            if w.offset and resp.status_code in (200, 416):
                raise _RangeRefused  # ignored or refused: start over
            if resp.status_code == 206:
                m = _CONTENT_RANGE.match(resp.headers.get("content-range", ""))
                if not m or int(m.group(1)) != w.offset:
                    raise _RangeRefused
            elif resp.status_code != 200:
                detail = await self._error_detail(resp)
                raise ImageError(f"{what}: layer {d.digest[:19]}: registry answered {detail}")
            bars.set(task, w.offset)
            # Raw bytes: a transport Content-Encoding would otherwise be undone and
            # change what is hashed; the digest decides either way.
            async for chunk in resp.aiter_raw():
                with _about(f"{what}: layer {d.digest[:19]}"):
                    w.write(chunk)
                bars.set(task, w.offset)
        finally:
            await resp.aclose()

    async def fetch_layers(
        self, store: BlobStore, layers: list[Descriptor], progress: bool, what: str
    ) -> None:
        """All layers at once, at most ``images.pull_concurrency`` in flight.

        The first failure cancels the rest (each keeps its partial for the
        next pull) and is raised alone, as one line.
        """
        sem = asyncio.Semaphore(self.cfg.images.pull_concurrency)
        unique = list({d.digest: d for d in layers}.values())

        async def one(d: Descriptor) -> None:
            async with sem:
                await self.fetch_blob(store, d, bars, what)

        with _Bars(progress) as bars:
            try:
                async with asyncio.TaskGroup() as tg:
                    for d in unique:
                        tg.create_task(one(d))
            except BaseExceptionGroup as group:
                first = _first_image_error(group)
                if first is None:
                    raise
                raise first from None

    async def _by_digest(
        self, store: BlobStore, digest: str, what: str, size: int | None = None
    ) -> tuple[bytes, str, str]:
        """A manifest named by digest: from the store if there (it was verified), else fetched.

        So pulling by digest an image that is complete in the store needs no network.
        """
        if store.has(digest):
            with _about(what):
                data = store.read(digest, MAX_MANIFEST)
                return data, media_type_of(data), digest
        data, media_type, got = await self.manifest(digest, what, digest=digest, size=size)
        store.put(got, data)
        return data, media_type, got

    async def pull(
        self, store: BlobStore, ref: Reference, platform: Platform | None, progress: bool
    ) -> PulledImage:
        pulled = await self.resolve(store, ref, platform)
        await self.fetch_layers(store, pulled.layers, progress, f"pull {ref.familiar}")
        log.info(
            "pulled %s (%s, %d layers)", ref.canonical, pulled.manifest_digest, len(pulled.layers)
        )
        return pulled

    async def resolve(
        self, store: BlobStore, ref: Reference, platform: Platform | None
    ) -> PulledImage:
        """Manifest (through the index, if any) and config into ``store``, verified and
        checked; the layers are left to fetch_layers."""
        what = f"pull {ref.familiar}"
        if ref.digest:
            data, media_type, digest = await self._by_digest(store, ref.digest, what)
        else:
            data, media_type, digest = await self.manifest(ref.reference, what)
            store.put(digest, data)
        index_digest: str | None = None
        chosen: Platform | None = None
        if media_type in INDEX_TYPES:
            with _about(what):
                d = parse_index(data).select(platform or DEFAULT_PLATFORM)
            if d.media_type and d.media_type not in MANIFEST_TYPES:
                raise ImageError(
                    f"{what}: the {platform or DEFAULT_PLATFORM} entry is "
                    f"{_printable(d.media_type, 80)}, not an image manifest"
                )
            index_digest, chosen = digest, d.platform
            data, media_type, digest = await self._by_digest(store, d.digest, what, d.size)
        if media_type not in MANIFEST_TYPES:
            raise ImageError(f"{what}: unsupported manifest type {_printable(media_type, 80)}")
        with _about(what):
            manifest = parse_manifest(data)
        c = manifest.config
        if store.has(c.digest):
            with _about(what):
                config_bytes = store.read(c.digest, MAX_CONFIG)
        else:
            config_bytes = await self.config_blob(c, what)
            store.put(c.digest, config_bytes)
        with _about(what):
            config = parse_config(config_bytes)
        got = chosen or Platform(config.os, config.architecture)
        if platform and (config.os, config.architecture) != (platform.os, platform.architecture):
            raise ImageError(
                f"{what}: image is for {config.os}/{config.architecture}, not {platform}"
            )
        if len(config.diff_ids) != len(manifest.layers):
            raise ImageError(
                f"{what}: manifest has {len(manifest.layers)} layers but the config lists "
                f"{len(config.diff_ids)} diff_ids"
            )
        cap = self.cfg.images.max_layer_bytes
        for layer in manifest.layers:
            if layer.size > cap:
                raise ImageError(
                    f"{what}: layer {layer.digest[:19]} is {layer.size} B, more than "
                    f"images.max_layer_bytes = {cap}"
                )
        return PulledImage(
            reference=ref.canonical,
            manifest_digest=digest,
            manifest_media_type=media_type,
            config_digest=c.digest,
            layers=list(manifest.layers),
            platform=got,
            index_digest=index_digest,
        )


async def pull(
    cfg: Config,
    store: BlobStore,
    ref: str | Reference,
    platform: Platform | None = None,
    progress: bool = True,
) -> PulledImage:
    """Get ``ref``'s manifest, config and layers into ``store``, all verified.

    ``platform`` picks from a multi-platform index (default linux/amd64); for
    a single-platform image it must match if given. Credentials come from
    ``auth.lookup`` (cocoon's auth.json, then docker's config.json).
    """
    r = ref if isinstance(ref, Reference) else parse(ref)
    async with connect(cfg, r) as client:
        return await client.pull(store, r, platform, progress)


@contextlib.asynccontextmanager
async def connect(cfg: Config, ref: Reference) -> AsyncIterator[RegistryClient]:
    """A client for ``ref``'s registry and repository, with the credentials
    ``auth.lookup`` finds (cocoon's auth.json, then docker's config.json)."""
    creds = auth.lookup(cfg, ref.domain)
    async with RegistryClient(cfg, ref.domain, creds, repository=ref.repository) as client:
        try:
            yield client
        except httpx.HTTPError as e:
            # Every expected failure is mapped where it happens; this is the layer
            # edge, so that an unforeseen one (a broken Content-Encoding) is one line too.
            raise ImageError(f"pull {ref.familiar}: {_reason(e)}") from None
