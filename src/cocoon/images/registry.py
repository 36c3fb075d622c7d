"""The OCI distribution client: manifests, configs and layers into the blob store.

A registry is an untrusted server on an untrusted network. So: every byte it
sends is checked against a digest before it is stored (the BlobStore refuses
anything else), every document is size-capped before it is read, and the
rules of the connection itself (plain HTTP only to listed registries,
credentials only to the registry's origin, timeouts, bounded retries) are
registry_http.py's. A pull that dies, for any reason, leaves only verified
blobs plus partial files in the ingest dir that the next pull resumes with an
HTTP Range request.

The protocol is the OCI distribution spec (docker's registry v2 API): ``GET
/v2/<name>/manifests/<reference>`` and ``GET /v2/<name>/blobs/<digest>``, with
the ``WWW-Authenticate`` challenge (Bearer token or Basic, registry_auth.py)
on the first 401. Failures are worded by registry_errors.py, progress is
progress.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING

import httpx

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
from cocoon.images.progress import Bars
from cocoon.images.reference import Reference, parse
from cocoon.images.registry_auth import Authenticator
from cocoon.images.registry_errors import about, first_image_error, printable, reason
from cocoon.images.registry_http import RETRY_STATUS, Transport, read_bounded

if TYPE_CHECKING:
    from rich.progress import TaskID

log = logging.getLogger(__name__)

ACCEPT = ", ".join((OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST))

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


class _RangeRefused(Exception):
    """The registry would not resume a partial blob: fetch it from byte 0."""


class RegistryClient:
    """One registry, one repository scope: what a pull asks of it, over one
    Transport (connections, redirects, retries) and one Authenticator.

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
        self.http = Transport(cfg, domain)
        self.auth = Authenticator(self.http, credentials, repository)

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.http.aclose()

    def _authorization(self) -> str | None:
        """Read at every hop: another download may have renewed the token meanwhile."""
        return self.auth.authorization

    def url(self, path: str) -> httpx.URL:
        """``/v2/<repository>/<path>``: the repository was validated by reference.parse."""
        return self.http.base.join(f"{self.repository}/{path}")

    async def request(
        self, method: str, url: httpx.URL, headers: dict[str, str] | None = None
    ) -> httpx.Response:
        """A streamed response, or ImageError; the caller closes it (``await resp.aclose()``).

        Retries connection errors and 429/5xx (bounded, one count for both),
        answers the first 401 with the authentication challenge and tries once
        more, turns 401/403 that remain into an auth error. Other 4xx are
        returned for the caller to name: 404 means different things for a tag
        and a blob.
        """
        retry = self.http.retry()
        reauthenticated = False
        while True:
            sent = self.auth.authorization
            resp = await self.http.send(
                lambda: self.http.follow(method, url, headers or {}, self._authorization),
                retry,
                lambda e: self.http.unreachable(e, url),
                what=f"{method} {url}",
            )
            at_registry = self.http.at_registry(resp.request.url)
            if resp.status_code == 401 and at_registry:
                challenge = resp.headers.get("www-authenticate", "")
                await resp.aclose()
                if reauthenticated:
                    raise self.auth.denied()
                await self.auth.answer(challenge, sent)
                reauthenticated = True
                continue
            if resp.status_code == 403 and at_registry:
                await resp.aclose()
                raise self.auth.denied()
            if resp.status_code in RETRY_STATUS:
                if retry.again():
                    await resp.aclose()
                    await retry.wait()
                    continue
                detail = await self.http.error_detail(resp)
                raise ImageError(
                    f"registry {self.domain}: {detail} (tried {retry.count} times); try again later"
                )
            return resp

    async def check_login(self) -> None:
        """``GET /v2/`` with our credentials: succeeds only if they are accepted."""
        self.auth.logging_in = True
        if not self.auth.credentials:
            raise ImageError("login needs a username and password")
        resp = await self.request("GET", self.http.base)
        try:
            if resp.status_code != 200:
                detail = await self.http.error_detail(resp)
                raise ImageError(f"login to {self.domain}: {detail}")
        finally:
            await resp.aclose()
        if self.auth.authorization is None:
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
                detail = await self.http.error_detail(resp)
                if detail.startswith("NAME_UNKNOWN"):
                    raise ImageError(f"{what}: repository unknown (no such image)")
                kind = "digest" if digest else "tag"
                raise ImageError(f"{what}: manifest unknown (no such {kind})")
            if resp.status_code != 200:
                detail = await self.http.error_detail(resp)
                raise ImageError(f"{what}: registry answered {detail}")
            with about(what):
                data = await read_bounded(resp, MAX_MANIFEST, "manifest")
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
                f"{what}: manifest digest mismatch: registry says {printable(header, 80)}, "
                f"content is {got}"
            )
        with about(what):
            mt = media_type_of(data)
        return data, mt, got

    async def config_blob(self, d: Descriptor, what: str) -> bytes:
        """The image config: held in memory, so size-capped (MAX_CONFIG) and verified."""
        if d.size > MAX_CONFIG:
            raise ImageError(f"{what}: image config is {d.size} B, more than {MAX_CONFIG} B")
        resp = await self.request("GET", self.url(f"blobs/{d.digest}"))
        try:
            if resp.status_code != 200:
                detail = await self.http.error_detail(resp)
                raise ImageError(
                    f"{what}: image config {d.digest[:19]}: registry answered {detail}"
                )
            with about(what):
                data = await read_bounded(resp, d.size, "image config")
        finally:
            await resp.aclose()
        got = "sha256:" + hashlib.sha256(data).hexdigest()
        if got != d.digest or len(data) != d.size:
            raise ImageError(
                f"{what}: image config digest mismatch: expected {d.digest}, content is {got}"
            )
        return data

    # -- layers -------------------------------------------------------------

    async def fetch_blob(self, store: BlobStore, d: Descriptor, bars: Bars, what: str) -> None:
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
        retry = self.http.retry()
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
                more = retry.again()
                log.debug("%s: %s after %d B (attempt %d)", label, reason(e), w.offset, retry.count)
                if not more:
                    raise ImageError(
                        f"registry {self.domain}: download of {label} broke off "
                        f"({reason(e)}) at {w.offset} of {d.size} B; "
                        "run the pull again to resume"
                    ) from None
                await retry.wait()
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
        self, d: Descriptor, w: BlobWriter, bars: Bars, task: TaskID | None, what: str
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
                await self.http.error_detail(resp)
                raise ImageError(f"{what}: layer {d.digest} is missing from the registry")
            if w.offset and resp.status_code in (200, 416):
                raise _RangeRefused  # ignored or refused: start over
            if resp.status_code == 206:
                m = _CONTENT_RANGE.match(resp.headers.get("content-range", ""))
                if not m or int(m.group(1)) != w.offset:
                    raise _RangeRefused
            elif resp.status_code != 200:
                detail = await self.http.error_detail(resp)
                raise ImageError(f"{what}: layer {d.digest[:19]}: registry answered {detail}")
            bars.set(task, w.offset)
            # Raw bytes: a transport Content-Encoding would otherwise be undone and
            # change what is hashed; the digest decides either way.
            async for chunk in resp.aiter_raw():
                with about(f"{what}: layer {d.digest[:19]}"):
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

        with Bars(progress) as bars:
            try:
                async with asyncio.TaskGroup() as tg:
                    for d in unique:
                        tg.create_task(one(d))
            except BaseExceptionGroup as group:
                first = first_image_error(group)
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
            with about(what):
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
            with about(what):
                d = parse_index(data).select(platform or DEFAULT_PLATFORM)
            if d.media_type and d.media_type not in MANIFEST_TYPES:
                raise ImageError(
                    f"{what}: the {platform or DEFAULT_PLATFORM} entry is "
                    f"{printable(d.media_type, 80)}, not an image manifest"
                )
            index_digest, chosen = digest, d.platform
            data, media_type, digest = await self._by_digest(store, d.digest, what, d.size)
        if media_type not in MANIFEST_TYPES:
            raise ImageError(f"{what}: unsupported manifest type {printable(media_type, 80)}")
        with about(what):
            manifest = parse_manifest(data)
        c = manifest.config
        if store.has(c.digest):
            with about(what):
                config_bytes = store.read(c.digest, MAX_CONFIG)
        else:
            config_bytes = await self.config_blob(c, what)
            store.put(c.digest, config_bytes)
        with about(what):
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
            raise ImageError(f"pull {ref.familiar}: {reason(e)}") from None
