"""VM templates on disk: what one is, how it is named, found, trusted and published.

A template is a VM booted once to agent-ready and saved: its RAM in ``ram``
(written through a shared mapping while it ran) and its device state in
``state`` (QEMU's migration stream without RAM, x-ignore-shared). Clones map
``ram`` privately and load ``state``: see ``Sandbox.create``.

One template per everything the saved machine depends on. The key hashes the
hypervisor's own description of the template VM (its whole command line with
per-VM paths left out: kernel, guest image, vCPUs, memory, machine, accelerator,
CPU model, kernel command line, device slots) with the hypervisor binary's
identity and cocoon's protocol version. Anything else that changes gives a new
key, and an old template is simply never chosen again.

Trust: a template is published by renaming a complete build dir into place,
``meta.json`` written (and everything fsynced) first. A build killed half-way
leaves a ``.build-*`` dir nobody reads. A published template whose files do not
match its meta (truncated RAM, a state file with another digest) or whose inputs
are gone is refused with a ``TemplateError`` and removed: the caller warns and
boots cold, and the next start builds a fresh one.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cocoon import __version__
from cocoon.config import Config
from cocoon.errors import StateError, TemplateError
from cocoon.hypervisor.base import file_stamp
from cocoon.protocol.messages import PROTOCOL_VERSION
from cocoon.util.fs import atomic_write, fsync_dir, locked_file

META = "meta.json"
BUILD_PREFIX = ".build-"


def template_mac(slot: int) -> str:
    """The MAC a template's NIC slot has until the clone's agent renames it.

    Locally administered; never on any wire: a clone's NIC gets the sandbox's
    MAC (Identity) before it is brought up.
    """
    return f"02:cc:00:00:00:{slot:02x}"


def templates_dir(cfg: Config) -> Path:
    return Path(cfg.sandbox.template_dir) if cfg.sandbox.template_dir else cfg.data / "templates"


#: How a template is made, where that changes what it saves but no input
#: does: templates made otherwise are stale (never chosen, and swept).
#: 2: the guest settles before the save (``restore._settle``).
MAKING = 2


def make_key(machine: str, extra: dict[str, Any]) -> str:
    h = hashlib.sha256()
    h.update(machine.encode())
    h.update(json.dumps({"protocol": PROTOCOL_VERSION, "cocoon": __version__,
                         "making": MAKING, **extra}, sort_keys=True).encode())  # fmt: skip
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class Template:
    key: str
    path: Path
    meta: dict[str, Any]

    @property
    def ram(self) -> Path:
        return self.path / "ram"

    @property
    def state(self) -> Path:
        return self.path / "state"

    @property
    def empty(self) -> Path:
        """What unused share slots export: an empty, read-only dir."""
        return self.path / "empty"


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def check(t: Template) -> None:
    """Raise TemplateError unless the files are what meta.json says they are."""
    m = t.meta
    if m.get("key") != t.key:
        raise TemplateError(f"template {t.key}: meta.json names another key")
    try:
        ram_size = t.ram.stat().st_size
        state_size = t.state.stat().st_size
    except OSError as e:
        raise TemplateError(f"template {t.key}: {e.strerror}: {e.filename}") from e
    if ram_size != m.get("memory_mib", -1) << 20:
        raise TemplateError(f"template {t.key}: RAM file is {ram_size} bytes, not "
                            f"{m.get('memory_mib')} MiB (truncated?)")  # fmt: skip
    if state_size != m.get("state_bytes") or _digest(t.state) != m.get("state_sha256"):
        raise TemplateError(f"template {t.key}: device state does not match its digest")
    stamps = m.get("stamps")
    if not isinstance(stamps, dict) or m.get("making") != MAKING:
        raise TemplateError(f"template {t.key}: made by an older cocoon (stale)")
    for name, stamp in stamps.items():
        now = file_stamp(name)
        if now == "missing":
            raise TemplateError(f"template {t.key}: {name} is gone (stale)")
        if now != stamp:
            raise TemplateError(f"template {t.key}: {name} changed since (stale)")
    if not t.empty.is_dir():
        raise TemplateError(f"template {t.key}: its empty share dir is missing")


def read(cfg: Config, key: str) -> Template | None:
    """The published template ``key``; None if there is none; TemplateError if it
    is there but cannot be trusted."""
    path = templates_dir(cfg) / key
    try:
        raw = (path / META).read_bytes()
    except FileNotFoundError:
        if path.exists():
            raise TemplateError(f"template {key}: no meta.json") from None
        return None
    except OSError as e:
        raise TemplateError(f"template {key}: {e.strerror}") from e
    try:
        meta = json.loads(raw)
        if not isinstance(meta, dict):
            raise ValueError
    except ValueError as e:
        raise TemplateError(f"template {key}: meta.json is not valid") from e
    t = Template(key, path, meta)
    check(t)
    return t


def listing(cfg: Config) -> list[tuple[str, dict[str, Any], str]]:
    """(key, meta, problem) of every published template ("" = usable)."""
    out: list[tuple[str, dict[str, Any], str]] = []
    d = templates_dir(cfg)
    if not d.is_dir():
        return out
    for p in sorted(d.iterdir()):
        if p.name.startswith(".") or not p.is_dir():
            continue
        meta: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            meta = json.loads((p / META).read_bytes())
        problem = ""
        try:
            read(cfg, p.name)
        except TemplateError as e:
            problem = str(e).split(": ", 1)[-1]
        out.append((p.name, meta if isinstance(meta, dict) else {}, problem))
    return out


def _remove_tree(path: Path) -> None:
    """Templates hold no mounts: a plain tree removal, files made writable first."""
    if not path.exists():
        return
    trash = path.with_name(f"{BUILD_PREFIX}trash-{secrets.token_hex(4)}")
    with contextlib.suppress(FileNotFoundError):
        os.rename(path, trash)  # gone from view at once, even if the removal is cut short
        shutil.rmtree(trash, ignore_errors=True)


def _lock_path(cfg: Config, key: str) -> Path:
    return templates_dir(cfg) / f".{key}.lock"


def remove(cfg: Config, key: str, wait_s: float = 30.0) -> bool:
    """Delete one template (waiting for a build of it to finish); False if absent."""
    d = templates_dir(cfg)
    if not (d / key).exists():
        return False
    with locked_file(_lock_path(cfg, key), wait_s, f"template {key} is being built; retry"):
        existed = (d / key).exists()
        _remove_tree(d / key)
    with contextlib.suppress(OSError):
        _lock_path(cfg, key).unlink()
    return existed


def discard(cfg: Config, key: str) -> None:
    """Remove a template found bad, unless someone is rebuilding it right now."""
    with contextlib.suppress(StateError), locked_file(_lock_path(cfg, key), 0.0, "busy"):
        _remove_tree(templates_dir(cfg) / key)


def sweep(cfg: Config) -> list[str]:
    """Remove build dirs that no live build holds (a builder killed half-way),
    and published templates that can never be used again: stale (QEMU, kernel
    or image changed since: their key is no longer anyone's) or broken."""
    d = templates_dir(cfg)
    removed: list[str] = []
    if not d.is_dir():
        return removed
    for p in d.iterdir():
        if not p.name.startswith(BUILD_PREFIX):
            if not p.name.startswith(".") and p.is_dir() and _unusable(cfg, p.name):
                discard(cfg, p.name)
                if not p.exists():
                    removed.append(p.name)
            continue
        key = p.name[len(BUILD_PREFIX) :].split("-", 1)[0]
        with contextlib.suppress(StateError), locked_file(_lock_path(cfg, key), 0.0, "busy"):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
    return removed


def _unusable(cfg: Config, key: str) -> bool:
    try:
        return read(cfg, key) is None
    except TemplateError:
        return True


#: Boots a template VM whose RAM file lives in the given build dir, and writes
#: its device state there; returns once the VM is gone.
Builder = Callable[[Path], Awaitable[None]]


async def obtain(
    cfg: Config, key: str, meta: dict[str, Any], build: Builder, *, built: list[bool] | None = None
) -> Template:
    """The template ``key``, built first if there is none (once: concurrent
    starts wait on the key's lock for the one that builds it).

    Raises TemplateError when a template exists but is bad (and removes it),
    or when the build fails.
    """
    try:
        t = read(cfg, key)
    except TemplateError:
        discard(cfg, key)
        raise
    if t is not None:
        return t
    d = templates_dir(cfg)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    lock = await _lock(_lock_path(cfg, key), cfg.sandbox.template_wait_s, key)
    try:
        try:
            t = read(cfg, key)
        except TemplateError:
            _remove_tree(d / key)
            raise
        if t is not None:
            return t
        for p in d.glob(f"{BUILD_PREFIX}{key}-*"):  # left by a builder that died
            shutil.rmtree(p, ignore_errors=True)
        work = d / f"{BUILD_PREFIX}{key}-{secrets.token_hex(4)}"
        work.mkdir(mode=0o700)
        try:
            (work / "empty").mkdir(mode=0o555)
            t0 = time.monotonic()
            await build(work)
            ram, state = work / "ram", work / "state"
            for f in (ram, state):
                fd = os.open(f, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.chown(f, 0, 0)  # a jailed builder wrote the RAM file as its own uid
                os.chmod(f, 0o400)
            full = {
                **meta,
                "key": key,
                "created": time.time(),
                "build_s": round(time.monotonic() - t0, 3),
                "state_bytes": state.stat().st_size,
                "state_sha256": _digest(state),
            }
            atomic_write(work / META, json.dumps(full, indent=1, sort_keys=True).encode())
            os.rename(work, d / key)
            fsync_dir(d)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        if built is not None:
            built.append(True)
        t = read(cfg, key)
        assert t is not None
        return t
    finally:
        os.close(lock)


async def _lock(path: Path, timeout_s: float, key: str) -> int:
    """An flock'd fd on ``path``, waited for without blocking the event loop."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                raise TemplateError(
                    f"template {key} is still being built by another process after {timeout_s:g} s"
                ) from None
            await asyncio.sleep(0.05)
