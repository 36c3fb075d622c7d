"""Who a request is: the admin, or one namespace's holder.

The unix socket is root-only (mode 0600 in the state root), so whoever
connects there is root on this host already: admin, no token. On TCP every
request carries ``Authorization: Bearer <token>``. Tokens are 256 random
bits; only their sha256 is stored. The admin token is made at the first start
and written to ``<state>/admin.token`` (0600); if that file is lost, the next
start makes a new one and revokes the old. The admin issues namespace tokens,
each good for its namespace only.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cocoon.serve.store import Store

PREFIX = "cct_"


@dataclass(frozen=True)
class Principal:
    admin: bool
    #: The namespace a namespace token is for (None for the admin).
    namespace: str | None = None
    token_id: str = ""

    def may(self, namespace: str) -> bool:
        return self.admin or self.namespace == namespace


ADMIN = Principal(admin=True)


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> tuple[str, str, str]:
    """(id, token, its digest)."""
    token = PREFIX + secrets.token_urlsafe(32)
    return "tok-" + secrets.token_hex(6), token, digest(token)


def lookup(store: Store, token: str) -> Principal | None:
    if not token.startswith(PREFIX) or len(token) > 200:
        return None
    t = store.token(digest(token))
    if t is None:
        return None
    return Principal(admin=t.admin, namespace=t.namespace, token_id=t.id)


def ensure_admin_token(store: Store, path: Path) -> bool:
    """The admin token's file, made (0600, never readable by another user on
    the way) with a new token if it is missing. True if a new one was made."""
    if path.exists():
        with contextlib.suppress(OSError):
            os.chmod(path, 0o600)
        token = path.read_text().strip()
        t = store.token(digest(token))
        if t is not None and t.admin:
            return False
    tid, token, dig = new_token()
    tmp = path.with_name(path.name + f".{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, (token + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    store.replace_admin_token(tid, dig)
    os.rename(tmp, path)
    return True
