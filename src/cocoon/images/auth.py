"""Registry credentials: cocoon's own ``<data_dir>/auth.json`` first, then docker's.

Reading ``~/.docker/config.json`` means a machine where ``docker login`` was
run pulls the same private images with cocoon, no second login. cocoon writes
only its own file (same ``{"auths": {host: {"auth": base64(user:pass)}}}``
shape, mode 0600, atomically) so it never corrupts docker's. Credential
helpers (``credsStore``/``credHelpers``) are not run: executing a program
named in a file is not something a pull should do silently.

Secrets never reach a log line, an error message or a repr.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cocoon.config import Config
from cocoon.errors import ImageError
from cocoon.images.reference import registry_host
from cocoon.util.fs import atomic_write

log = logging.getLogger(__name__)

AUTH_FILE = "auth.json"
#: A credentials file is a few hundred bytes; refuse to parse something absurd.
MAX_AUTH_FILE = 1 << 20


@dataclass(frozen=True)
class Credentials:
    """A username and password (or token) for one registry; the password never prints."""

    username: str
    password: str = field(repr=False)

    def encoded(self) -> str:
        """``base64(user:pass)``: the ``auth`` field of both files, and HTTP Basic."""
        return base64.b64encode(f"{self.username}:{self.password}".encode()).decode()


def auth_file(cfg: Config) -> Path:
    return cfg.data / AUTH_FILE


def docker_config_file() -> Path:
    """docker's own lookup: ``$DOCKER_CONFIG/config.json``, else ``~/.docker/config.json``."""
    d = os.environ.get("DOCKER_CONFIG")
    return Path(d) / "config.json" if d else Path.home() / ".docker" / "config.json"


def _read_auths(path: Path) -> dict[str, Any]:
    """The ``auths`` table of a docker-shaped file; {} if absent, ImageError if broken."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_AUTH_FILE + 1)
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise ImageError(f"cannot read credentials file {path}: {e.strerror}") from e
    if len(data) > MAX_AUTH_FILE:
        raise ImageError(f"credentials file {path} is larger than {MAX_AUTH_FILE} B")
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, ValueError):
        # The message of a JSON error can quote the file, secrets included.
        raise ImageError(f"credentials file {path} is not valid JSON") from None
    auths = obj.get("auths") if isinstance(obj, dict) else None
    if auths is None:
        return {}
    if not isinstance(auths, dict):
        raise ImageError(f"credentials file {path}: auths must be an object")
    return auths


def _entry(entry: Any, path: Path, key: str) -> Credentials | None:
    if not isinstance(entry, dict):
        return None
    encoded = entry.get("auth")
    if isinstance(encoded, str) and encoded:
        try:
            user, sep, password = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            sep = ""
        if not sep or not user:
            raise ImageError(
                f"credentials file {path}: the auth entry for {key[:100]!r} is not "
                "base64 of user:password"
            )
        return Credentials(user, password)
    name, secret = entry.get("username"), entry.get("password")
    if isinstance(name, str) and name and isinstance(secret, str):
        return Credentials(name, secret)
    return None


def _find(path: Path, registry: str) -> Credentials | None:
    for key, entry in _read_auths(path).items():
        # docker tolerates odd keys; so do we, they just never match.
        if _host_or_none(str(key)) == registry:
            creds = _entry(entry, path, str(key))
            if creds:
                log.debug("credentials for %s from %s", registry, path)
                return creds
    return None


def lookup(cfg: Config, registry: str) -> Credentials | None:
    """Credentials for ``registry`` (a host[:port], as in a reference), or None.

    A broken auth.json is an error (cocoon wrote it; something is wrong). A
    broken docker config.json is only a warning, as in the docker CLI: it is
    another tool's file and must not stop pulls of public images.
    """
    host = registry_host(registry)
    creds = _find(auth_file(cfg), host)
    if creds:
        return creds
    try:
        return _find(docker_config_file(), host)
    except ImageError as e:
        log.warning("ignoring docker credentials: %s", e)
        return None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialize read-modify-write of auth.json between concurrent logins."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write_auths(path: Path, auths: dict[str, Any]) -> None:
    data = json.dumps({"auths": auths}, indent=2, sort_keys=True).encode() + b"\n"
    atomic_write(path, data, mode=0o600)


def store(cfg: Config, host: str, creds: Credentials) -> None:
    """Keep ``creds`` for ``host`` in cocoon's auth.json (checked first: ``service.login``)."""
    path = auth_file(cfg)
    with _locked(path):
        auths = _read_auths(path)
        auths[host] = {"auth": creds.encoded()}
        _write_auths(path, auths)
    log.info("stored credentials for %s as %s", host, creds.username)


def logout(cfg: Config, registry: str) -> bool:
    """Forget cocoon's credentials for ``registry``; False if there were none.

    docker's config.json is left alone: ``docker logout`` owns it.
    """
    host = registry_host(registry)
    path = auth_file(cfg)
    if not path.exists():
        return False
    with _locked(path):
        auths = _read_auths(path)
        gone = [k for k in auths if _host_or_none(k) == host]
        for k in gone:
            del auths[k]
        if gone:
            _write_auths(path, auths)
    return bool(gone)


def _host_or_none(key: str) -> str | None:
    try:
        return registry_host(key)
    except ImageError:
        return None
