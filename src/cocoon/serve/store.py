"""The function service's state: one SQLite database under the state dir.

Namespaces, tokens (their sha256 only), functions and their immutable
versions, invocations (input, result, logs, timings) and the instances the
service started (so that a restart after a crash removes them). WAL journal
and one transaction per change: a change is all there or not at all, and a
``kill -9`` loses no committed one (a commit is in the WAL file, the
kernel's, before it returns). ``synchronous=FULL`` besides (each commit
fsync'd: the power may go too), but for the records only the running
service needs, on a call's path (a synchronous call's queued state, any
call's running state, an instance's row): those commit ``NORMAL``, without
the fsync (0.3 ms to 4 ms each here, under a VM's load), made durable by
the next FULL commit, at the latest the invocation's end. Power lost before
that loses them, and with them nothing a caller was told: a synchronous
call got no answer, an asynchronous one's queued record was fsync'd, the
instances were VMs on that host. Every call comes
from the service's event loop thread (each is a few SQLite statements, well
under a millisecond); the lock only guards against a thread that forgets so.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cocoon.errors import StateError

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS namespaces (name TEXT PRIMARY KEY, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY,
    hash TEXT NOT NULL UNIQUE,
    namespace TEXT REFERENCES namespaces(name) ON DELETE CASCADE,
    admin INTEGER NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS functions (
    namespace TEXT NOT NULL REFERENCES namespaces(name),
    name TEXT NOT NULL,
    latest INTEGER NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (namespace, name)
);
CREATE TABLE IF NOT EXISTS versions (
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    spec TEXT NOT NULL,
    code TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (namespace, name, version),
    FOREIGN KEY (namespace, name) REFERENCES functions(namespace, name) ON DELETE CASCADE
);
CREATE TABLE IF NOT EXISTS invocations (
    id TEXT PRIMARY KEY,
    namespace TEXT NOT NULL,
    function TEXT NOT NULL,
    version INTEGER NOT NULL,
    mode TEXT NOT NULL,
    status TEXT NOT NULL,
    error TEXT NOT NULL DEFAULT '',
    exit_code INTEGER,
    start_kind TEXT NOT NULL DEFAULT '',
    start_ms REAL,
    trigger TEXT NOT NULL DEFAULT '',
    depth INTEGER NOT NULL DEFAULT 0,
    instance TEXT NOT NULL DEFAULT '',
    input BLOB,
    result BLOB,
    logs BLOB,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    duration_ms REAL,
    billed_ms INTEGER
);
CREATE INDEX IF NOT EXISTS invocations_by_function
    ON invocations (namespace, function, created_at);
CREATE TABLE IF NOT EXISTS triggers (
    id TEXT PRIMARY KEY,
    namespace TEXT NOT NULL,
    function TEXT NOT NULL,
    kind TEXT NOT NULL,
    spec TEXT NOT NULL,
    created_at REAL NOT NULL,
    last_fired REAL,
    FOREIGN KEY (namespace, function) REFERENCES functions(namespace, name) ON DELETE CASCADE
);
CREATE TABLE IF NOT EXISTS metering (
    namespace TEXT NOT NULL,
    function TEXT NOT NULL,
    version INTEGER NOT NULL,
    succeeded INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    timeout INTEGER NOT NULL DEFAULT 0,
    throttled INTEGER NOT NULL DEFAULT 0,
    cold INTEGER NOT NULL DEFAULT 0,
    warm INTEGER NOT NULL DEFAULT 0,
    duration_ms REAL NOT NULL DEFAULT 0,
    billed_ms INTEGER NOT NULL DEFAULT 0,
    gb_s REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (namespace, function, version)
);
CREATE TABLE IF NOT EXISTS instances (
    container_id TEXT PRIMARY KEY,
    namespace TEXT NOT NULL,
    function TEXT NOT NULL,
    version INTEGER NOT NULL,
    created_at REAL NOT NULL
);
"""

#: Invocation statuses; the first two are "not finished".
QUEUED, RUNNING = "queued", "running"
SUCCEEDED, FAILED, TIMEOUT = "succeeded", "failed", "timeout"
UNFINISHED = (QUEUED, RUNNING)
#: Start kinds: a new instance started for the invocation (cold), or taken
#: pre-warmed with the code mounted in (metered as cold: a new instance), or
#: a free one reused (warm).
COLD, PREWARMED, WARM = "cold", "prewarmed", "warm"


@dataclass(frozen=True)
class Version:
    namespace: str
    name: str
    version: int
    spec: dict[str, Any]
    code: dict[str, Any]
    created_at: float


@dataclass(frozen=True)
class Token:
    id: str
    namespace: str | None
    admin: bool
    created_at: float


class Store:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.RLock()
        try:
            self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self.db.execute("PRAGMA busy_timeout=5000")
            with self.transaction():
                for stmt in SCHEMA.split(";"):
                    if stmt.strip():
                        self.db.execute(stmt)
                row = self.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
                if row is None:
                    self.db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
                elif row["value"] != str(SCHEMA_VERSION):
                    raise StateError(
                        f"{path}: schema version {row['value']}, this cocoon knows "
                        f"{SCHEMA_VERSION}: use the cocoon that wrote it"
                    )
        except sqlite3.Error as e:
            raise StateError(f"cannot open the service database {path}: {e}") from e
        with contextlib.suppress(OSError):
            os.chmod(path, 0o600)

    def close(self) -> None:
        with self._lock:
            self.db.close()

    @contextlib.contextmanager
    def transaction(self, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One atomic change: BEGIN IMMEDIATE (writers queue, no upgrade
        deadlock), COMMIT on success, ROLLBACK on any exception. Not
        ``durable``: committed without an fsync (safe from kill -9, not
        from a power cut; see the module's docstring)."""
        with self._lock:
            if not durable:
                self.db.execute("PRAGMA synchronous=NORMAL")
            try:
                self.db.execute("BEGIN IMMEDIATE")
                try:
                    yield self.db
                except BaseException:
                    self.db.execute("ROLLBACK")
                    raise
                self.db.execute("COMMIT")
            finally:
                if not durable:
                    self.db.execute("PRAGMA synchronous=FULL")

    def query(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self.db.execute(sql, args).fetchall()

    # -- meta ----------------------------------------------------------------

    def meta(self, key: str) -> str | None:
        rows = self.query("SELECT value FROM meta WHERE key=?", (key,))
        return str(rows[0]["value"]) if rows else None

    def set_meta(self, key: str, value: str) -> None:
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    # -- namespaces and tokens -----------------------------------------------

    def namespaces(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.query("SELECT * FROM namespaces ORDER BY name")]

    def has_namespace(self, name: str) -> bool:
        return bool(self.query("SELECT 1 FROM namespaces WHERE name=?", (name,)))

    def add_namespace(self, name: str) -> bool:
        """False if it exists."""
        with self.transaction() as db:
            cur = db.execute("INSERT OR IGNORE INTO namespaces VALUES (?, ?)", (name, time.time()))
            return cur.rowcount == 1

    def remove_namespace(self, name: str) -> None:
        """Only an empty one (its tokens go with it)."""
        with self.transaction() as db:
            if db.execute("SELECT 1 FROM functions WHERE namespace=?", (name,)).fetchone():
                raise StateError(f"namespace {name} still has functions: remove them first")
            db.execute("DELETE FROM namespaces WHERE name=?", (name,))

    def add_token(self, tid: str, digest: str, namespace: str | None, admin: bool) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT INTO tokens VALUES (?, ?, ?, ?, ?)",
                (tid, digest, namespace, int(admin), time.time()),
            )

    def token(self, digest: str) -> Token | None:
        rows = self.query("SELECT * FROM tokens WHERE hash=?", (digest,))
        if not rows:
            return None
        r = rows[0]
        return Token(r["id"], r["namespace"], bool(r["admin"]), r["created_at"])

    def tokens(self, namespace: str | None = None) -> list[Token]:
        sql, args = "SELECT * FROM tokens ORDER BY created_at", ()  # type: tuple[str, tuple[Any, ...]]
        if namespace is not None:
            sql, args = "SELECT * FROM tokens WHERE namespace=? ORDER BY created_at", (namespace,)
        return [
            Token(r["id"], r["namespace"], bool(r["admin"]), r["created_at"])
            for r in self.query(sql, args)
        ]

    def remove_token(self, tid: str) -> bool:
        with self.transaction() as db:
            return db.execute("DELETE FROM tokens WHERE id=?", (tid,)).rowcount == 1

    def replace_admin_token(self, tid: str, digest: str) -> None:
        """The one admin token: any older one is revoked in the same transaction."""
        with self.transaction() as db:
            db.execute("DELETE FROM tokens WHERE admin=1")
            db.execute("INSERT INTO tokens VALUES (?, ?, NULL, 1, ?)", (tid, digest, time.time()))

    # -- functions and versions ----------------------------------------------

    def _version(self, r: sqlite3.Row) -> Version:
        return Version(
            r["namespace"],
            r["name"],
            r["version"],
            json.loads(r["spec"]),
            json.loads(r["code"]),
            r["created_at"],
        )

    def functions(self, namespace: str) -> list[Version]:
        """Each function's latest version."""
        rows = self.query(
            "SELECT v.* FROM functions f JOIN versions v ON v.namespace=f.namespace "
            "AND v.name=f.name AND v.version=f.latest WHERE f.namespace=? ORDER BY f.name",
            (namespace,),
        )
        return [self._version(r) for r in rows]

    def version(self, namespace: str, name: str, version: int | None = None) -> Version | None:
        """A version of a function (its latest by default); None if there is none."""
        if version is None:
            rows = self.query(
                "SELECT v.* FROM functions f JOIN versions v ON v.namespace=f.namespace "
                "AND v.name=f.name AND v.version=f.latest WHERE f.namespace=? AND f.name=?",
                (namespace, name),
            )
        else:
            rows = self.query(
                "SELECT * FROM versions WHERE namespace=? AND name=? AND version=?",
                (namespace, name, version),
            )
        return self._version(rows[0]) if rows else None

    def versions(self, namespace: str, name: str) -> list[Version]:
        rows = self.query(
            "SELECT * FROM versions WHERE namespace=? AND name=? ORDER BY version",
            (namespace, name),
        )
        return [self._version(r) for r in rows]

    def add_version(
        self, namespace: str, name: str, spec: dict[str, Any], code: dict[str, Any], *, new: bool
    ) -> Version | None:
        """A function's next version (its first with ``new``); None if ``new``
        and it exists, or not ``new`` and it does not."""
        now = time.time()
        with self.transaction() as db:
            row = db.execute(
                "SELECT latest FROM functions WHERE namespace=? AND name=?", (namespace, name)
            ).fetchone()
            if (row is None) != new:
                return None
            version = 1 if row is None else row["latest"] + 1
            if row is None:
                db.execute(
                    "INSERT INTO functions VALUES (?, ?, 1, ?, ?)", (namespace, name, now, now)
                )
            else:
                db.execute(
                    "UPDATE functions SET latest=?, updated_at=? WHERE namespace=? AND name=?",
                    (version, now, namespace, name),
                )
            db.execute(
                "INSERT INTO versions VALUES (?, ?, ?, ?, ?, ?)",
                (namespace, name, version, json.dumps(spec), json.dumps(code), now),
            )
        return Version(namespace, name, version, spec, code, now)

    def remove_function(self, namespace: str, name: str) -> list[Version] | None:
        """Remove a function with its versions and invocations; the versions
        it had, or None if there was no such function."""
        with self.transaction() as db:
            gone = [
                self._version(r)
                for r in db.execute(
                    "SELECT * FROM versions WHERE namespace=? AND name=?", (namespace, name)
                ).fetchall()
            ]
            cur = db.execute(
                "DELETE FROM functions WHERE namespace=? AND name=?", (namespace, name)
            )
            if cur.rowcount == 0:
                return None
            db.execute(
                "DELETE FROM invocations WHERE namespace=? AND function=?", (namespace, name)
            )
            # Chains into it end with it (its own triggers cascade).
            db.execute(
                "DELETE FROM triggers WHERE namespace=? AND kind='chain' "
                "AND json_extract(spec, '$.target')=?",
                (namespace, name),
            )
        return gone

    def code_in_use(self, code: dict[str, Any]) -> bool:
        return bool(self.query("SELECT 1 FROM versions WHERE code=? LIMIT 1", (json.dumps(code),)))

    # -- invocations -----------------------------------------------------------

    def add_invocation(
        self,
        iid: str,
        v: Version,
        mode: str,
        status: str,
        payload: bytes | None,
        *,
        trigger: str = "",
        depth: int = 0,
        durable: bool = True,
    ) -> None:
        with self.transaction(durable=durable) as db:
            db.execute(
                "INSERT INTO invocations (id, namespace, function, version, mode, status, "
                "input, created_at, trigger, depth) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (iid, v.namespace, v.name, v.version, mode, status, payload, time.time(),
                 trigger, depth),
            )  # fmt: skip

    # -- triggers --------------------------------------------------------------

    def add_trigger(
        self, tid: str, namespace: str, function: str, kind: str, spec: dict[str, Any]
    ) -> dict[str, Any] | None:
        """None if the function is gone."""
        with self.transaction() as db:
            if not db.execute(
                "SELECT 1 FROM functions WHERE namespace=? AND name=?", (namespace, function)
            ).fetchone():
                return None
            db.execute(
                "INSERT INTO triggers VALUES (?, ?, ?, ?, ?, ?, NULL)",
                (tid, namespace, function, kind, json.dumps(spec), time.time()),
            )
        return self.trigger(namespace, tid)

    def _trigger(self, r: sqlite3.Row) -> dict[str, Any]:
        return {**dict(r), "spec": json.loads(r["spec"])}

    def trigger(self, namespace: str, tid: str) -> dict[str, Any] | None:
        rows = self.query("SELECT * FROM triggers WHERE namespace=? AND id=?", (namespace, tid))
        return self._trigger(rows[0]) if rows else None

    def triggers(
        self, namespace: str | None = None, function: str | None = None, kind: str | None = None
    ) -> list[dict[str, Any]]:
        sql, args = "SELECT * FROM triggers WHERE 1", []  # type: tuple[str, list[Any]]
        for col, val in (("namespace", namespace), ("function", function), ("kind", kind)):
            if val is not None:
                sql += f" AND {col}=?"
                args.append(val)
        return [self._trigger(r) for r in self.query(sql + " ORDER BY created_at", tuple(args))]

    def remove_trigger(self, namespace: str, function: str, tid: str) -> bool:
        with self.transaction() as db:
            cur = db.execute(
                "DELETE FROM triggers WHERE namespace=? AND function=? AND id=?",
                (namespace, function, tid),
            )
            return cur.rowcount == 1

    def fired(self, tid: str, at: float) -> bool:
        """A timer's firing, recorded before it fires (a crash then skips it
        rather than firing twice). False if the trigger is gone."""
        with self.transaction() as db:
            cur = db.execute("UPDATE triggers SET last_fired=? WHERE id=?", (at, tid))
            return cur.rowcount == 1

    def update_invocation(self, iid: str, *, durable: bool = True, **fields: Any) -> None:
        cols = ", ".join(f"{k}=?" for k in fields)
        with self.transaction(durable=durable) as db:
            db.execute(f"UPDATE invocations SET {cols} WHERE id=?", (*fields.values(), iid))

    def finish_invocation(
        self, iid: str, v: Version, fields: dict[str, Any], *, kind: str, gb_s: float
    ) -> None:
        """An invocation's end and its metering, in one transaction: a crash
        keeps both or neither. ``fields["status"]`` "throttled" counts a 429
        (the invocation itself is recorded failed)."""
        status = fields["status"]
        column = {"succeeded": "succeeded", "failed": "failed", "timeout": "timeout"}
        col = column.get(status, "throttled")
        if col == "throttled":
            fields = {**fields, "status": FAILED}
        cols = ", ".join(f"{k}=?" for k in fields)
        key = (v.namespace, v.name, v.version)
        with self.transaction() as db:
            db.execute(f"UPDATE invocations SET {cols} WHERE id=?", (*fields.values(), iid))
            db.execute(
                "INSERT INTO metering (namespace, function, version) VALUES (?, ?, ?) "
                "ON CONFLICT DO NOTHING",
                key,
            )
            db.execute(
                f"UPDATE metering SET {col}={col}+1, cold=cold+?, warm=warm+?, "
                "duration_ms=duration_ms+?, billed_ms=billed_ms+?, gb_s=gb_s+? "
                "WHERE namespace=? AND function=? AND version=?",
                (
                    int(kind in (COLD, PREWARMED)),
                    int(kind == "warm"),
                    fields.get("duration_ms") or 0.0,
                    fields.get("billed_ms") or 0,
                    gb_s,
                    *key,
                ),
            )

    def metering(self, namespace: str | None = None) -> list[dict[str, Any]]:
        """Per function version; a removed function's rows stay (they were billed)."""
        sql, args = "SELECT * FROM metering", ()  # type: tuple[str, tuple[Any, ...]]
        if namespace is not None:
            sql, args = "SELECT * FROM metering WHERE namespace=?", (namespace,)
        return [dict(r) for r in self.query(sql + " ORDER BY namespace, function, version", args)]

    def invocation(self, namespace: str, iid: str) -> dict[str, Any] | None:
        rows = self.query("SELECT * FROM invocations WHERE namespace=? AND id=?", (namespace, iid))
        return dict(rows[0]) if rows else None

    def invocations(self, namespace: str, function: str, limit: int) -> list[dict[str, Any]]:
        rows = self.query(
            "SELECT * FROM invocations WHERE namespace=? AND function=? "
            "ORDER BY created_at DESC LIMIT ?",
            (namespace, function, limit),
        )
        return [dict(r) for r in rows]

    def fail_unfinished(self, reason: str) -> int:
        """Invocations a previous run of the service left queued or running:
        failed, with ``reason``. Their count."""
        with self.transaction() as db:
            cur = db.execute(
                "UPDATE invocations SET status=?, error=?, finished_at=? "
                f"WHERE status IN ({','.join('?' * len(UNFINISHED))})",
                (FAILED, reason, time.time(), *UNFINISHED),
            )
            return cur.rowcount

    # -- instances ---------------------------------------------------------------

    def add_instance(self, container_id: str, v: Version, *, durable: bool = True) -> None:
        with self.transaction(durable=durable) as db:
            db.execute(
                "INSERT OR REPLACE INTO instances VALUES (?, ?, ?, ?, ?)",
                (container_id, v.namespace, v.name, v.version, time.time()),
            )

    def remove_instance(self, container_id: str) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM instances WHERE container_id=?", (container_id,))

    def instances(self) -> list[str]:
        return [r["container_id"] for r in self.query("SELECT container_id FROM instances")]
