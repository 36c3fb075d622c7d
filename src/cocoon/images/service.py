"""What the CLI verbs call: reference in, image record out (pull, find, load).

The one place that knows how a typed name maps to a stored image: names are
canonicalized by ``reference.parse`` (``busybox`` is
``docker.io/library/busybox:latest``); anything that does not parse as a
reference is tried as an image id (prefix).
"""

from __future__ import annotations

import logging
from pathlib import Path

from cocoon.config import Config
from cocoon.errors import ImageError
from cocoon.images import reference
from cocoon.images.manifest import Platform
from cocoon.images.store import Image, ImageStore

log = logging.getLogger(__name__)


def canonical(text: str) -> str | None:
    try:
        return reference.parse(text).canonical
    except ImageError:
        return None


def find(store: ImageStore, text: str) -> Image | None:
    """The stored image ``text`` names (tag, name@digest, or id prefix), or None."""
    for key in (canonical(text), text):
        if key is None:
            continue
        try:
            return store.resolve(key)
        except ImageError:
            continue
    return None


async def pull(cfg: Config, text: str, platform: str | None = None, progress: bool = True) -> Image:
    """Fetch ``text``'s image and build its block image, layers unpacked as they arrive."""
    from cocoon.images import registry  # httpx & co. only when a pull really happens

    ref = reference.parse(text)
    store = ImageStore(cfg)
    plat = Platform.parse(platform) if platform else None
    async with registry.connect(cfg, ref) as client:
        pulled = await client.resolve(store.blobs, ref, plat)
        fetch = client.fetch_layers(store.blobs, pulled.layers, progress, f"pull {ref.familiar}")
        tags = [ref.name + f":{ref.tag}"] if ref.tag else []
        repo_digest = f"{ref.name}@{pulled.index_digest or pulled.manifest_digest}"
        img = await store.add_pulled(
            pulled.manifest_digest, fetch, tags, repo_digests=[repo_digest]
        )
    log.info("pulled %s (%s, %d layers)", ref.canonical, img.manifest_digest, len(img.layers))
    return img


async def get(
    cfg: Config, text: str, *, policy: str = "missing", platform: str | None = None
) -> Image:
    """The image for `run`: from the store, pulled if missing (or always, or never)."""
    store = ImageStore(cfg)
    have = find(store, text)
    if policy == "never" or (policy == "missing" and have is not None):
        if have is None:
            raise ImageError(f"image {text} is not in the store and --pull=never was given")
        return have
    try:
        return await pull(cfg, text, platform)
    except ImageError as e:
        if have is None:
            raise ImageError(f"image {text} is not here and cannot be pulled: {e}") from e
        raise


def load(cfg: Config, path: Path) -> list[Image]:
    from cocoon.images import archive

    return archive.load(ImageStore(cfg), path)


async def login(cfg: Config, registry: str, username: str, password: str) -> str:
    """Check the credentials against ``registry``'s /v2/ endpoint, then store them.

    Verifying first (as ``docker login`` does) turns a typo into an error now,
    not into a confusing "unauthorized" at the next pull. Returns the
    normalized registry name the credentials are stored under.
    """
    from cocoon.images import auth  # (credentials: a login's, not every run's)
    from cocoon.images.auth import Credentials
    from cocoon.images.registry import RegistryClient  # httpx & co.: only a real login

    host = reference.registry_host(registry)
    if not username or ":" in username:
        raise ImageError("username must be non-empty and must not contain ':'")
    creds = Credentials(username, password)
    async with RegistryClient(cfg, host, creds) as client:
        await client.check_login()
    auth.store(cfg, host, creds)
    return host
