"""The local image store: verified blobs in, one read-only erofs image per image out.

Layout under ``<data_dir>/images/``::

    blobs/            BlobStore: manifests, configs, layers (by digest)
    erofs/<hex>.erofs the image's root file system, one block image per config digest
    index.json        the records: tags, digests, layers, size, platform
    lock              flock'd around every change of index.json
    tmp/              staging dirs (0700), one per add in progress

An image's id is its config digest (as docker's), so the same image pulled
through different manifests (gzip here, zstd there) is one image and one erofs.

Crash safety, in the order add() works: layers are unpacked into a fresh
staging dir and mkfs.erofs writes into it; only then, under the lock, is the
erofs renamed into ``erofs/`` and the record written (atomic_write). A crash
before the rename leaves a staging dir, which the next add() or gc() deletes
(its flock is no longer held); a crash between rename and record leaves an
erofs that the retry reuses (a renamed erofs is always complete) and gc()
deletes if nobody retries. Readers (list, resolve) take no lock: index.json is
only ever replaced whole.

A pull goes through add_pulled(): the same steps, but the layers are unpacked
into the staging dir while the registry client is still writing their blobs
(BlobStore.follow), and mkfs, rename and record wait until every blob is
committed, i.e. verified. So what is published was built from verified bytes
only, as with add().

The slow part (unpack + mkfs) runs without the lock, so a long add does not
block ``images``/``rmi``/``tag``. The price: a concurrent remove() may delete
a shared layer blob that an add in flight still needs; that add then fails
with "not in the store" and a re-pull fixes it.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import fcntl
import hashlib
import inspect
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cocoon.config import Config
from cocoon.errors import ImageError, StateError
from cocoon.images import erofs
from cocoon.images.blobs import BlobFile, BlobRestarted, BlobStore, check_digest
from cocoon.images.decompress import OpenedLayer, open_layer
from cocoon.images.guard import WriteGuard
from cocoon.images.manifest import (
    MAX_CONFIG,
    MAX_MANIFEST,
    Descriptor,
    ImageConfig,
    Manifest,
    parse_config,
    parse_manifest,
)
from cocoon.util.fs import atomic_write, fsync_dir, locked_file
from cocoon.util.proc import run

if TYPE_CHECKING:
    from cocoon.images.layers import Budget

log = logging.getLogger(__name__)

INDEX_VERSION = 1
#: Shortest id prefix resolve() accepts (docker's short id).
MIN_ID_PREFIX = 12
LOCK_TIMEOUT_S = 60.0
#: mkfs.erofs writes ~1 GB/s uncompressed; an hour covers any sane image.
MKFS_TIMEOUT_S = 3600.0
#: erofs block size. Chunk-based files (mkfs --chunksize) keep holes (a sparse
#: file's, or the zero blocks the unpacker left unwritten) out of the image,
#: but lose tail packing (a block per file at worst) and cost mkfs.erofs 1.5
#: 3-7x its time (it hashes every chunk: /usr/bin, 495 MiB, 0.6 -> 4.6 s).
#: So only an image whose holes outweigh both its data and a block per entry
#: is built so: ordinary images hold far fewer zero blocks than data (ELF
#: padding: 3 MiB in /usr/bin), and stay in the plain, faster form.
EROFS_BLOCK = 4096
#: How often the erofs image being written is written back (see _mkfs).
WRITE_BEHIND_S = 0.04
#: A staging dir not yet locked (crash right after mkdtemp) is stale after this.
STALE_STAGING_S = 600.0
NEW_STAGING = ".new-"
#: What a tag or repo digest may look like here; the grammar proper is reference.py's.
REF_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@+-]{0,511}$")
_HEX_PREFIX_RE = re.compile(rf"^(?:sha256:)?([a-f0-9]{{{MIN_ID_PREFIX},64}})$")


@dataclass(frozen=True)
class Layer:
    digest: str
    media_type: str
    size: int
    compression: str
    diff_id: str


@dataclass
class Image:
    """One record of index.json."""

    #: The config digest, "sha256:<hex>".
    id: str
    manifest_digest: str
    media_type: str
    repo_tags: list[str]
    repo_digests: list[str]
    #: From the image config (RFC 3339), "" if it has none.
    created: str
    #: Bytes of the erofs image: what the image costs on disk beside its blobs.
    size: int
    layers: list[Layer]
    platform: str
    #: Absolute path of the erofs image (recomputed on load, never trusted from disk).
    erofs: str
    #: Every blob this image keeps alive: its manifests, config and layers.
    blobs: list[str] = field(default_factory=list)
    added_at: float = 0.0

    @property
    def short_id(self) -> str:
        return self.id[7:19]

    @classmethod
    def from_json(cls, raw: dict[str, Any], erofs_dir: Path) -> Image:
        hex_ = check_digest(raw["id"])
        layers = [Layer(**x) for x in raw["layers"]]
        img = cls(
            id=raw["id"],
            manifest_digest=raw["manifest_digest"],
            media_type=raw["media_type"],
            repo_tags=list(raw["repo_tags"]),
            repo_digests=list(raw["repo_digests"]),
            created=raw["created"],
            size=int(raw["size"]),
            layers=layers,
            platform=raw["platform"],
            erofs=str(erofs_dir / f"{hex_}.erofs"),
            blobs=list(raw.get("blobs", [])),
            added_at=float(raw.get("added_at", 0.0)),
        )
        for s in (img.manifest_digest, *img.blobs, *(x.digest for x in layers)):
            check_digest(s)
        if not all(isinstance(t, str) for t in (*img.repo_tags, *img.repo_digests)):
            raise TypeError("tags must be strings")
        return img


@dataclass(frozen=True)
class ImageInspect:
    """What `cocoon image inspect` shows: the record and the parsed config."""

    image: Image
    config: ImageConfig


@dataclass
class RemoveResult:
    """What remove() did, in docker's words: untagged refs, deleted image ids."""

    untagged: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def check_ref(ref: str) -> str:
    if not REF_RE.match(ref):
        raise ImageError(f"invalid image reference {ref[:100]!r}")
    return ref


def repository_of(ref: str) -> str:
    """The repository part of "repo:tag" or "repo@digest" (a port's colon is not a tag's)."""
    if "@" in ref:
        return ref.split("@", 1)[0]
    i = ref.rfind(":")
    return ref[:i] if i > ref.rfind("/") else ref


class ImageStore:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.root = cfg.data / "images"
        self.erofs_dir = self.root / "erofs"
        self.tmp_dir = self.root / "tmp"
        self.index_path = self.root / "index.json"
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o755)
            self.blobs = BlobStore(
                self.root / "blobs", WriteGuard.from_config(cfg.images, str(self.root))
            )
            self.erofs_dir.mkdir(exist_ok=True, mode=0o755)
            # 0700: staging trees hold setuid files and whatever else a layer
            # brings; no host user may reach them.
            self.tmp_dir.mkdir(exist_ok=True, mode=0o700)
            os.chmod(self.tmp_dir, 0o700)
        except OSError as e:
            raise StateError(f"cannot set up the image store in {self.root}: {e}") from e

    # -- index ---------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        busy = (
            f"the image store is locked by another cocoon command "
            f"for {LOCK_TIMEOUT_S:g} s ({self.root / 'lock'})"
        )
        with locked_file(self.root / "lock", LOCK_TIMEOUT_S, busy):
            yield

    def _load(self) -> dict[str, Image]:
        try:
            data = self.index_path.read_bytes()
        except FileNotFoundError:
            return {}
        try:
            raw = json.loads(data)
            if raw.get("version") != INDEX_VERSION:
                raise ValueError(f"unknown version {raw.get('version')!r}")
            images = [Image.from_json(x, self.erofs_dir) for x in raw["images"]]
        except (ValueError, TypeError, KeyError, AttributeError, ImageError) as e:
            raise StateError(
                f"{self.index_path} is corrupt ({e}); move it away and re-pull the images"
            ) from e
        return {img.id: img for img in images}

    def _save(self, images: dict[str, Image]) -> None:
        doc = {"version": INDEX_VERSION, "images": [asdict(images[k]) for k in sorted(images)]}
        atomic_write(self.index_path, json.dumps(doc, indent=1, sort_keys=True).encode())

    def erofs_path(self, image_id: str) -> Path:
        return self.erofs_dir / f"{check_digest(image_id)}.erofs"

    # -- queries -------------------------------------------------------------

    def list(self) -> list[Image]:
        """All images, newest first (by config creation time, then by when they came)."""
        return sorted(self._load().values(), key=lambda i: (i.created, i.added_at), reverse=True)

    def resolve(self, ref: str) -> Image:
        """By tag (exactly as stored), repo digest, id, manifest digest or id prefix (12+ hex)."""
        return self._find(self._load(), ref)

    @staticmethod
    def _find(images: dict[str, Image], ref: str) -> Image:
        for img in images.values():
            if ref in img.repo_tags or ref in img.repo_digests:
                return img
        m = _HEX_PREFIX_RE.match(ref)
        if m:
            h = m.group(1)
            found = [img for img in images.values() if img.id[7:].startswith(h)]
            if len(h) == 64:
                found += [
                    img
                    for img in images.values()
                    if img.manifest_digest == f"sha256:{h}" and img not in found
                ]
            if len(found) == 1:
                return found[0]
            if len(found) > 1:
                raise ImageError(f"image id prefix {h} is ambiguous: give more digits")
        raise ImageError(f"no such image: {ref[:100]!r}")

    def inspect(self, ref: str) -> ImageInspect:
        img = self.resolve(ref)
        return ImageInspect(img, parse_config(self.blobs.read(img.id, MAX_CONFIG)))

    # -- changes -------------------------------------------------------------

    def _check(
        self,
        manifest_digest: str,
        manifest_bytes: bytes,
        config_bytes: bytes,
        tags: Sequence[str],
        repo_digests: Sequence[str] | None,
    ) -> tuple[Manifest, ImageConfig, Sequence[str]]:
        """Manifest and config parsed and matched to their digests, tags checked."""
        if _sha256(manifest_bytes) != manifest_digest:
            raise ImageError(f"manifest bytes do not match {manifest_digest}")
        mf = parse_manifest(manifest_bytes)
        if _sha256(config_bytes) != mf.config.digest:
            raise ImageError(f"image config does not match the manifest's {mf.config.digest}")
        config = parse_config(config_bytes)
        if len(config.diff_ids) != len(mf.layers):
            raise ImageError(
                f"image config lists {len(config.diff_ids)} diff_ids "
                f"for {len(mf.layers)} layers in the manifest"
            )
        for t in tags:
            check_ref(t)
        if repo_digests is None:
            repo_digests = [f"{repository_of(t)}@{manifest_digest}" for t in tags]
        for r in repo_digests:
            check_ref(r)
        return mf, config, repo_digests

    def _check_layers(self, mf: Manifest) -> None:
        for i, d in enumerate(mf.layers):
            try:
                size = self.blobs.path(d.digest).stat().st_size
            except FileNotFoundError:
                raise ImageError(
                    f"layer {i + 1} ({d.digest}) is not in the blob store: pull it first"
                ) from None
            if size != d.size:
                raise ImageError(f"layer {d.digest} is {size} B, the manifest says {d.size} B")

    def add(
        self,
        manifest_digest: str,
        manifest_bytes: bytes,
        config_bytes: bytes,
        tags: Sequence[str] = (),
        *,
        repo_digests: Sequence[str] | None = None,
    ) -> Image:
        """Record an image whose layer blobs are already in the blob store; build its erofs.

        ``tags`` are canonical references ("docker.io/library/busybox:latest");
        a tag moves from whatever image had it. ``repo_digests`` default to
        "<repo of each tag>@<manifest_digest>"; a registry client that resolved
        a tag through an index passes "<repo>@<index digest>" instead, as docker
        shows. Idempotent: adding an image that is there only merges tags.
        """
        mf, config, repo_digests = self._check(
            manifest_digest, manifest_bytes, config_bytes, tags, repo_digests
        )
        self._check_layers(mf)
        self.blobs.put(manifest_digest, manifest_bytes)
        self.blobs.put(mf.config.digest, config_bytes)

        final = self.erofs_path(mf.config.digest)
        with self._locked():
            if final.is_file():
                return self._record(manifest_digest, mf, config, tags, repo_digests, final)
        with self._staging(mf.config.digest) as staging:
            built = self._build(mf, config, staging)
            return self._publish(built, manifest_digest, mf, config, tags, repo_digests)

    async def add_pulled(
        self,
        manifest_digest: str,
        fetch: Awaitable[None],
        tags: Sequence[str] = (),
        *,
        repo_digests: Sequence[str] | None = None,
    ) -> Image:
        """add(), for an image whose manifest and config are in the blob store and
        whose layers ``fetch`` is bringing: each layer is unpacked (by a thread)
        while it arrives, instead of after the last one did.

        Nothing counts before ``fetch`` succeeds: the tree is unpacked into a
        staging dir as always, and mkfs, the rename into ``erofs/`` and the
        record come only once every blob is committed, i.e. verified. If
        ``fetch`` fails its error is raised (the unpacker is stopped first); if
        a blob had to be fetched again from byte 0 while it was being read,
        the layers are unpacked again from the verified blobs.
        """
        try:
            manifest_bytes = self.blobs.read(manifest_digest, MAX_MANIFEST)
            mf = parse_manifest(manifest_bytes)
            config_bytes = self.blobs.read(mf.config.digest, MAX_CONFIG)
            mf, config, repo_digests = self._check(
                manifest_digest, manifest_bytes, config_bytes, tags, repo_digests
            )
        except BaseException:
            if inspect.iscoroutine(fetch):
                fetch.close()  # never started: no "never awaited" warning
            raise
        final = self.erofs_path(mf.config.digest)
        with self._locked():
            built_already = final.is_file()
        if built_already:
            await fetch
            return self.add(
                manifest_digest, manifest_bytes, config_bytes, tags, repo_digests=repo_digests
            )
        stop = threading.Event()
        with self._staging(mf.config.digest) as staging:
            rootfs = staging / "rootfs"
            rootfs.mkdir(mode=0o755)

            def unpack_arriving() -> Budget:
                return self._unpack(mf, config, rootfs, lambda d: self.blobs.follow(d.digest, stop))

            unpacking = asyncio.ensure_future(asyncio.to_thread(unpack_arriving))
            try:
                await fetch
            except BaseException:
                stop.set()
                self.blobs.wake_followers()
                # Its error, if any, follows from the fetch's; it must be out of the
                # staging dir before that is removed.
                with contextlib.suppress(Exception):
                    await asyncio.shield(unpacking)
                raise
            try:
                budget = await unpacking
            except BlobRestarted:
                log.info("a layer was fetched again while unpacked: unpacking again")
                _rmtree(rootfs)
                rootfs.mkdir(mode=0o755)
                budget = self._unpack(mf, config, rootfs, lambda d: self.blobs.path(d.digest))
            self._check_layers(mf)
            built = self._mkfs(mf, staging, budget)
            return self._publish(built, manifest_digest, mf, config, tags, repo_digests)

    def _publish(
        self,
        built: Path,
        manifest_digest: str,
        mf: Manifest,
        config: ImageConfig,
        tags: Sequence[str],
        repo_digests: Sequence[str],
    ) -> Image:
        """Under the lock: the built erofs renamed into place (unless a concurrent add
        won), then the record."""
        final = self.erofs_path(mf.config.digest)
        with self._locked():
            if not final.is_file():
                os.replace(built, final)
                fsync_dir(final.parent)
            return self._record(manifest_digest, mf, config, tags, repo_digests, final)

    def _record(
        self,
        manifest_digest: str,
        mf: Manifest,
        config: ImageConfig,
        tags: Sequence[str],
        repo_digests: Sequence[str],
        erofs: Path,
    ) -> Image:
        """Under the lock: create or update the record, move the tags, save."""
        images = self._load()
        image_id = mf.config.digest
        blobs = [manifest_digest, image_id, *(d.digest for d in mf.layers)]
        img = images.get(image_id)
        if img is None:
            img = Image(
                id=image_id,
                manifest_digest=manifest_digest,
                media_type=mf.media_type,
                repo_tags=[],
                repo_digests=[],
                created=config.created,
                size=erofs.stat().st_size,
                layers=[
                    Layer(d.digest, d.media_type, d.size, d.compression, diff)
                    for d, diff in zip(mf.layers, config.diff_ids, strict=True)
                ],
                platform=f"{config.os}/{config.architecture}",
                erofs=str(erofs),
                added_at=time.time(),
            )
            images[image_id] = img
        img.blobs += [b for b in dict.fromkeys(blobs) if b not in img.blobs]
        for t in tags:
            self._move_tag(images, img, t)
        img.repo_digests += [r for r in dict.fromkeys(repo_digests) if r not in img.repo_digests]
        self._save(images)
        return img

    @staticmethod
    def _move_tag(images: dict[str, Image], img: Image, tag: str) -> None:
        for other in images.values():
            if other is not img and tag in other.repo_tags:
                other.repo_tags.remove(tag)  # the old image stays, untagged (docker's <none>)
        if tag not in img.repo_tags:
            img.repo_tags.append(tag)

    def tag(self, ref: str, new_tag: str) -> Image:
        check_ref(new_tag)
        with self._locked():
            images = self._load()
            img = self._find(images, ref)
            self._move_tag(images, img, new_tag)
            self._save(images)
            return img

    def remove(self, ref: str, force: bool = False) -> RemoveResult:
        """Untag ``ref``; delete the image once no tag is left, or when named by id.

        As docker: by id, an image with several tags is refused unless
        ``force``. Deleting drops the record first, then its erofs and the
        blobs no other image uses (a crash in between leaves only files gc()
        removes).
        """
        res = RemoveResult()
        with self._locked():
            images = self._load()
            img = self._find(images, ref)
            if ref in img.repo_tags:
                img.repo_tags.remove(ref)
                res.untagged.append(ref)
                repo = repository_of(ref)
                kept_repos = {repository_of(t) for t in img.repo_tags}
                for r in list(img.repo_digests):
                    if repository_of(r) == repo and repo not in kept_repos:
                        img.repo_digests.remove(r)
                        res.untagged.append(r)
                if img.repo_tags:
                    self._save(images)
                    return res
            else:
                if len(img.repo_tags) > 1 and not force:
                    raise ImageError(
                        f"image {img.short_id} has {len(img.repo_tags)} tags "
                        f"({', '.join(img.repo_tags[:3])}): remove them by tag, or force"
                    )
                res.untagged += img.repo_tags + img.repo_digests
            del images[img.id]
            self._save(images)
            res.deleted.append(img.id)
            in_use = {b for other in images.values() for b in other.blobs}
            for b in img.blobs:
                if b not in in_use:
                    self.blobs.remove(b)
            self.erofs_path(img.id).unlink(missing_ok=True)
        return res

    def gc(self) -> builtins.list[Path]:
        """Delete what crashed commands left: stale staging dirs, erofs images nobody records."""
        removed = self._clean_staging()
        with self._locked():
            known = {img.id[7:] for img in self._load().values()}
            for p in self.erofs_dir.iterdir():
                if p.name.removesuffix(".erofs") not in known:
                    p.unlink(missing_ok=True)
                    removed.append(p)
            # atomic_write's temp files: only ever written under this lock.
            for p in self.root.glob(f".{self.index_path.name}.*"):
                p.unlink(missing_ok=True)
                removed.append(p)
        return removed

    # -- building ------------------------------------------------------------

    def _clean_staging(self) -> builtins.list[Path]:
        """Staging dirs whose owner died: their flock is free (or never got made)."""
        removed: builtins.list[Path] = []
        for d in self.tmp_dir.iterdir():
            try:
                if d.name.startswith(NEW_STAGING):  # not yet locked by its owner: age decides
                    if time.time() - d.lstat().st_mtime > STALE_STAGING_S:
                        _rmtree(d)
                        removed.append(d)
                    continue
                fd = os.open(d / "lock", os.O_RDWR | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # an add in progress
            finally:
                os.close(fd)  # releases the lock we may have taken
            _rmtree(d)
            removed.append(d)
        return removed

    @contextlib.contextmanager
    def _staging(self, image_id: str) -> Iterator[Path]:
        """A private 0700 dir under tmp/, flock'd while we use it, removed after.

        It is made under a ".new-" name and renamed once its lock is held, so a
        concurrent _clean_staging never sees it unlocked.
        """
        self._clean_staging()
        new = Path(tempfile.mkdtemp(prefix=f"{NEW_STAGING}{image_id[7:19]}-", dir=self.tmp_dir))
        fd = os.open(new / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        d = new
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            d = new.with_name(new.name.removeprefix(NEW_STAGING))
            os.rename(new, d)
            yield d
        finally:
            _rmtree(d)
            os.close(fd)

    def _build(self, mf: Manifest, config: ImageConfig, staging: Path) -> Path:
        """Unpack every layer in order (diff_ids verified), then mkfs.erofs; the image path."""
        rootfs = staging / "rootfs"
        rootfs.mkdir(mode=0o755)
        budget = self._unpack(mf, config, rootfs, lambda d: self.blobs.path(d.digest))
        return self._mkfs(mf, staging, budget)

    def _unpack(
        self,
        mf: Manifest,
        config: ImageConfig,
        rootfs: Path,
        open_blob: Callable[[Descriptor], Path | BlobFile],
    ) -> Budget:
        """Apply the layers in order onto rootfs; what they used of the image's budget."""
        # (the unpacker, zstandard and all: only where an image is added, not
        # in every `cocoon` command that reads the store)
        from cocoon.images.layers import Budget, unpack_layer

        budget = Budget.from_config(self.cfg.images, str(self.root))
        n = len(mf.layers)

        def what(i: int) -> str:
            return f"layer {i + 1}/{n} ({mf.layers[i].digest[:19]})"

        def opened(i: int) -> OpenedLayer | None:
            if i >= n:
                return None
            d = mf.layers[i]
            return open_layer(open_blob(d), d.compression, what(i), size=d.size)

        nxt = opened(0)
        for i, (d, diff_id) in enumerate(zip(mf.layers, config.diff_ids, strict=True)):
            cur = nxt
            assert cur is not None
            try:
                # The next layer is opened now: a gzip one inflates (its own
                # thread) while this one is applied.
                nxt = opened(i + 1)
            except BaseException:
                cur.close()
                raise
            try:
                unpack_layer(cur, d.compression, rootfs, budget, diff_id=diff_id, what=what(i))
            except BaseException:
                if nxt is not None:
                    nxt.close()
                raise
        return budget

    def _mkfs(self, mf: Manifest, staging: Path, budget: Budget) -> Path:
        """The erofs of staging/rootfs in staging/image.erofs, fsync'd: the image path.

        mkfs.erofs builds it, unless the unpacker found what mkfs.erofs 1.5
        gets wrong (budget.mkfs_unfit): then cocoon's own writer (erofs.py).
        The image is made here first (mkfs.erofs opens it without O_TRUNC) so that
        a thread can write it back while mkfs still writes (fdatasync every
        WRITE_BEHIND_S): the fsync that must precede the rename into erofs/
        then has little left to do (mkfs + fsync ~0.22 -> ~0.19 s for 100 MB).
        """
        rootfs = staging / "rootfs"
        out = staging / "image.erofs"
        what = f"image {mf.config.digest[7:19]}"
        # The UUID comes from the image id, so rebuilding gives the same superblock UUID.
        fs_uuid = uuid.UUID(hex=mf.config.digest[7:39])
        argv = ["mkfs.erofs", "--quiet", f"-U{fs_uuid}"]
        own = _own_writer(budget)
        chunked = not own and _chunked(budget)
        if chunked:
            argv.append(f"--chunksize={EROFS_BLOCK}")  # holes stay out of the image
        fd = os.open(out, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            # Roughly what the image will take: the stream's bytes (headers for
            # inodes), holes included unless chunked (cocoon's writer keeps them
            # as holes of the image file). Refused before mkfs fills the disk.
            need = budget.bytes - (budget.holes if chunked or own else 0)
            budget.guard.check_room(fd, need, what)
            done = threading.Event()

            def write_behind() -> None:
                while not done.wait(WRITE_BEHIND_S):
                    with contextlib.suppress(OSError):  # the last fsync below reports
                        os.fdatasync(fd)

            behind = threading.Thread(target=write_behind, name="erofs-write-behind")
            behind.start()
            try:
                # Ownership, modes (setuid included), xattrs and mtimes come from the tree.
                if own:
                    log.info("%s holds %s, which mkfs.erofs 1.5 gets wrong", what, own)
                    erofs.build(rootfs, fd, fs_uuid, what)
                else:
                    run(
                        [*argv, str(out), str(rootfs)],
                        timeout_s=MKFS_TIMEOUT_S,
                        error=ImageError,
                        env=_mkfs_env(),
                    )
            finally:
                done.set()
                behind.join()
            os.fsync(fd)
            os.fchmod(fd, 0o644)
        finally:
            os.close(fd)
        return out


def _mkfs_env() -> dict[str, str]:
    """Ours, without SOURCE_DATE_EPOCH: set (as in many build environments), it
    makes mkfs.erofs clamp every mtime of the image to it."""
    return {k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"}


def _own_writer(budget: Budget) -> str:
    """Why the image is written by erofs.py instead of mkfs.erofs ("": it is not)."""
    return budget.mkfs_unfit


def _chunked(budget: Budget) -> bool:
    """Whether to build chunk-based erofs files: see EROFS_BLOCK."""
    data = budget.bytes - budget.holes
    return budget.holes > max(EROFS_BLOCK * budget.entries, data)


def _rmtree(path: Path) -> None:
    """Remove a staging tree; it may hold anything a layer made, never followed out."""
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(path)
