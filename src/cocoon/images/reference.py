"""Image references (``busybox``, ``ghcr.io/o/r@sha256:...``), parsed the way docker does.

A reference is typed by users and copied from web pages, so it is validated
here, once, with the grammar of the distribution spec: a name that passes
becomes part of a URL path, a file name in the store and a log line, and must
not be able to smuggle anything into any of them. Short names are completed
as docker does (``busybox`` is ``docker.io/library/busybox:latest``) so the
same words pull the same image in both tools.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cocoon.errors import ImageError
from cocoon.images.blobs import check_digest

DOCKER_HUB = "docker.io"
#: Where docker.io's distribution API actually answers.
DOCKER_HUB_API = "registry-1.docker.io"
#: Spellings of Docker Hub found in references and in ~/.docker/config.json.
DOCKER_HUB_ALIASES = frozenset(
    {DOCKER_HUB, "index.docker.io", DOCKER_HUB_API, "registry.hub.docker.com"}
)
DEFAULT_TAG = "latest"
#: The distribution spec's limit on a repository name, domain included.
MAX_NAME = 255

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_COMPONENT_RE = re.compile(rf"^{_COMPONENT}$")
_DOMAIN_LABEL = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_RE = re.compile(
    rf"^(?:{_DOMAIN_LABEL}(?:\.{_DOMAIN_LABEL})*|\[[0-9a-fA-F:.]+\])(?::[0-9]{{1,5}})?$"
)
_TAG_RE = re.compile(r"^[\w][\w.-]{0,127}$", re.ASCII)


@dataclass(frozen=True)
class Reference:
    """A fully qualified image reference: registry, repository, tag and/or digest.

    ``tag`` is None only when the user gave a digest alone; a bare name gets
    ``latest``, as in docker.
    """

    domain: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        """``domain/repository``: the image without tag or digest."""
        return f"{self.domain}/{self.repository}"

    @property
    def api_host(self) -> str:
        """The host[:port] serving the distribution API (Docker Hub's differs)."""
        return DOCKER_HUB_API if self.domain == DOCKER_HUB else self.domain

    @property
    def reference(self) -> str:
        """What goes in ``/v2/<repo>/manifests/<reference>``: digest wins over tag."""
        if self.digest:
            return self.digest
        return self.tag or DEFAULT_TAG

    @property
    def canonical(self) -> str:
        """``docker.io/library/busybox:latest``: one spelling per image, for storage."""
        return self.name + self._suffix()

    @property
    def familiar(self) -> str:
        """``busybox:latest``: the short form docker prints, for people."""
        name = self.name
        if self.domain == DOCKER_HUB:
            name = self.repository.removeprefix("library/")
        return name + self._suffix()

    def _suffix(self) -> str:
        out = f":{self.tag}" if self.tag else ""
        return out + (f"@{self.digest}" if self.digest else "")

    def __str__(self) -> str:
        return self.canonical


def _bad(text: str, why: str) -> ImageError:
    return ImageError(f"invalid image reference {text[:300]!r}: {why}")


def parse(text: str) -> Reference:
    """Parse and normalize ``[domain/]path[:tag][@digest]``; ImageError on anything else.

    The domain is the first component only if it looks like one (has ``.`` or
    ``:``, or is ``localhost``), which is docker's rule: ``user/app`` is a Docker
    Hub repository, ``localhost:5000/app`` is not.
    """
    if not text or len(text) > 1024 or text != text.strip():
        raise _bad(text, "empty, too long or surrounded by spaces")
    rest, at, digest = text.partition("@")
    if at:
        try:
            check_digest(digest)
        except ImageError:
            raise _bad(text, "digest must be sha256:<64 lowercase hex>") from None
    tag: str | None = None
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:
        rest, tag = rest[:colon], rest[colon + 1 :]
        if not _TAG_RE.match(tag):
            raise _bad(text, "tag must match [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
    first, sep, path = rest.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        domain = first
        if not _DOMAIN_RE.match(domain):
            raise _bad(text, f"registry {domain[:100]!r} is not a valid host[:port]")
        domain = domain.lower()
        if domain in DOCKER_HUB_ALIASES:
            domain = DOCKER_HUB
    else:
        domain, path = DOCKER_HUB, rest
    components = path.split("/")
    for c in components:
        if not _COMPONENT_RE.match(c):
            if c.lower() != c and _COMPONENT_RE.match(c.lower()):
                raise _bad(text, "repository names must be lowercase")
            raise _bad(text, f"bad repository component {c[:100]!r}")
    if domain == DOCKER_HUB and len(components) == 1:
        path = "library/" + path
    if len(domain) + 1 + len(path) > MAX_NAME:
        raise _bad(text, f"name longer than {MAX_NAME} characters")
    if tag is None and not digest:
        tag = DEFAULT_TAG
    return Reference(domain, path, tag, digest or None)


def registry_host(text: str) -> str:
    """Normalize a registry as typed to ``cocoon login`` (``https://index.docker.io/v1/``).

    Also used for the keys of docker's config.json, which are written in all
    of these spellings, so that both sides compare equal.
    """
    host = text.strip()
    for scheme in ("https://", "http://"):
        if host.lower().startswith(scheme):
            host = host[len(scheme) :]
    host = host.split("/", 1)[0]
    if not host or not _DOMAIN_RE.match(host):
        raise ImageError(f"invalid registry {text[:200]!r}: want host[:port], e.g. ghcr.io")
    host = host.lower()
    return DOCKER_HUB if host in DOCKER_HUB_ALIASES else host
