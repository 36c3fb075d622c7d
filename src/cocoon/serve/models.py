"""The HTTP API's request and response bodies, checked by pydantic.

The OpenAPI description at /openapi.json is generated from these models, so
what the service documents is what it checks. Unknown fields are refused
(a typo such as ``memmory_mib`` is an error, not a default).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cocoon.serve.runtimes import RUNTIMES

#: Namespace and function names: a DNS label (lower case, digits, inner dashes).
NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
NAME_RE = re.compile(NAME_PATTERN)
ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
MAX_ENV = 64
MAX_ENV_BYTES = 32 << 10


def check_name(kind: str, name: str) -> str:
    if not NAME_RE.match(name):
        raise ValueError(
            f"invalid {kind} name {name[:80]!r}: 1-63 lower-case letters, digits and inner dashes"
        )
    return name


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CodeIn(Strict):
    """Either an archive (``format`` and base64 ``data``) or, for the admin
    only, a host directory (``host_dir``, development)."""

    format: Literal["zip", "tar.gz"] | None = None
    data: str | None = Field(None, description="The archive, base64.")
    host_dir: str | None = Field(None, description="An absolute host path (admin only).")

    @model_validator(mode="after")
    def _one(self) -> CodeIn:
        if (self.data is None) == (self.host_dir is None):
            raise ValueError("code needs either data (with format) or host_dir")
        if self.data is not None and self.format is None:
            raise ValueError("code.format is required with code.data: zip or tar.gz")
        return self


class Settings(Strict):
    """What a version runs with; every field but ``code`` has a default on create."""

    runtime: str | None = Field(None, description=f"One of: {', '.join(RUNTIMES)}.")
    handler: str | None = Field(
        None, min_length=1, max_length=1024,
        description="shell: a file in the code (handler.sh); python: main.handle.",
    )  # fmt: skip
    memory_mib: int | None = Field(None, ge=64, le=8192)
    vcpus: int | None = Field(None, ge=1, le=8)
    timeout_s: float | None = Field(None, gt=0, le=900)
    env: dict[str, str] | None = None
    max_concurrency: int | None = Field(None, ge=1, le=100)
    keep_alive_s: float | None = Field(None, ge=0, le=86400)
    code: CodeIn | None = None

    @field_validator("runtime")
    @classmethod
    def _runtime(cls, v: str | None) -> str | None:
        if v is not None and v not in RUNTIMES:
            raise ValueError(f"unknown runtime {v[:40]!r}: one of {', '.join(RUNTIMES)}")
        return v

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v is None:
            return v
        if len(v) > MAX_ENV:
            raise ValueError(f"at most {MAX_ENV} environment variables")
        for k, val in v.items():
            if not ENV_KEY_RE.match(k) or k.startswith("COCOON_"):
                raise ValueError(f"invalid environment variable name {k[:80]!r}")
            if "\0" in val:
                raise ValueError(f"environment variable {k} holds a NUL byte")
        if sum(len(k) + len(x) for k, x in v.items()) > MAX_ENV_BYTES:
            raise ValueError(f"the environment is over {MAX_ENV_BYTES} B")
        return v


DEFAULTS: dict[str, Any] = {
    "runtime": "shell",
    "memory_mib": 128,
    "vcpus": 1,
    "timeout_s": 30.0,
    "env": {},
    "max_concurrency": 10,
    "keep_alive_s": 300.0,
}


class FunctionIn(Settings):
    name: str = Field(json_schema_extra={"pattern": NAME_PATTERN, "maxLength": 63})
    handler: str = Field(min_length=1, max_length=1024)
    code: CodeIn

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name("function", v)


class NamespaceIn(Strict):
    name: str = Field(json_schema_extra={"pattern": NAME_PATTERN, "maxLength": 63})

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name("namespace", v)


class TriggerIn(Strict):
    """A timer (``cron``) or a chain (``target``: another function of the
    namespace, invoked with this one's result when it ends as ``on`` says)."""

    kind: Literal["timer", "chain"]
    cron: str | None = Field(
        None, max_length=200,
        description="timer: a cron expression in UTC, 5 fields, or 6 with seconds last "
        "(`* * * * * */10`: every 10 s).",
    )  # fmt: skip
    target: str | None = Field(None, description="chain: the function to invoke next.")
    on: Literal["succeeded", "failed", "any"] = "succeeded"

    @model_validator(mode="after")
    def _kind(self) -> TriggerIn:
        from croniter import croniter

        if self.kind == "timer":
            if self.cron is None or self.target is not None:
                raise ValueError("a timer trigger needs cron (and no target)")
            if not croniter.is_valid(self.cron):
                raise ValueError(f"invalid cron expression {self.cron[:80]!r}")
        else:
            if self.target is None or self.cron is not None:
                raise ValueError("a chain trigger needs target (and no cron)")
            check_name("function", self.target)
        return self


class TriggerOut(BaseModel):
    id: str
    namespace: str
    function: str
    kind: Literal["timer", "chain"]
    cron: str | None = None
    target: str | None = None
    on: str | None = None
    created_at: float
    last_fired: float | None = None
    next_fire: float | None = None


class CodeOut(BaseModel):
    kind: Literal["archive", "host_dir"]
    format: str | None = None
    digest: str | None = None
    size: int | None = None
    path: str | None = None


class FunctionOut(BaseModel):
    namespace: str
    name: str
    version: int
    runtime: str
    handler: str
    memory_mib: int
    vcpus: int
    timeout_s: float
    env: dict[str, str]
    max_concurrency: int
    keep_alive_s: float
    code: CodeOut
    created_at: float
    versions: list[int] = []


class InvocationOut(BaseModel):
    id: str
    namespace: str
    function: str
    version: int
    mode: Literal["sync", "async", "http"]
    status: Literal["queued", "running", "succeeded", "failed", "timeout"]
    error: str
    exit_code: int | None
    start_kind: str = Field(
        description="cold (a new instance started), prewarmed (a new instance taken pre-warmed, "
        "the code mounted in) or warm (a free one reused)."
    )
    start_ms: float | None = Field(None, description="From the request to an instance for it.")
    trigger: str = Field("", description="What started it: timer:<id> or chain:<id>.")
    depth: int = Field(0, description="Its place in a chain (0: called directly).")
    result: str | None = Field(None, description="stdout, as UTF-8 (raw bytes: /result).")
    created_at: float
    started_at: float | None
    finished_at: float | None
    duration_ms: float | None
    billed_ms: int | None


class Accepted(BaseModel):
    id: str
    status: str


class TokenOut(BaseModel):
    id: str
    namespace: str | None
    admin: bool
    created_at: float
    token: str | None = Field(None, description="Shown once, when issued.")


class NamespaceOut(BaseModel):
    name: str
    created_at: float


class MeteringOut(BaseModel):
    namespace: str
    function: str
    version: int
    succeeded: int
    failed: int
    timeout: int
    throttled: int
    cold: int
    warm: int
    duration_ms: float
    billed_ms: int
    gb_s: float


class ErrorOut(BaseModel):
    error: str
