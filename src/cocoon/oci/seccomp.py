"""A spec's seccomp profile compiled to BPF on the host, for crun in the guest.

crun compiles ``linux.seccomp`` with libseccomp at every ``crun create``:
~65 ms in a TCG guest for podman's default profile (1144 instructions over
three architectures), where the host takes a few milliseconds. crun also
takes the compiled filter ready-made, base64 in the annotation
``run.oci.seccomp_bpf_data`` (it then still applies ``linux.seccomp.flags``),
and its ``crun exec`` reuses it. So the host compiles the profile exactly as
crun 1.8 does (the same libseccomp calls in the same order, with the same
libseccomp: the guest's is copied from the host; tests/unit/test_seccomp.py
compares our bytes with the ``seccomp.bpf`` crun itself writes) and the
guest's crun only loads it.

Anything this module does not reproduce exactly is left to crun: a profile
with a notify listener, one whose unknown syscalls must fail, or one crun
would refuse (an unknown action, operator or architecture). ``compiled``
answers None for those and the spec goes to the guest as it was.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import ctypes.util
import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from cocoon.util.fs import atomic_write

ANNOTATION = "run.oci.seccomp_bpf_data"
_FAIL_UNKNOWN = "run.oci.seccomp_fail_unknown_syscall"
_EPERM = 1
_NR_SCMP_ERROR = -1
_EEXIST = 17

_ACTIONS = {
    "ALLOW": 0x7FFF0000,
    "KILL": 0x00000000,
    "KILL_THREAD": 0x00000000,
    "KILL_PROCESS": 0x80000000,
    "TRAP": 0x00030000,
    "LOG": 0x7FFC0000,
    "NOTIFY": 0x7FC00000,
}
#: The actions that carry a value (errno, or the tracer's message).
_WITH_VALUE = {"ERRNO": 0x00050000, "TRACE": 0x7FF00000}
_OPERATORS = {"SCMP_CMP_NE": 1, "SCMP_CMP_LT": 2, "SCMP_CMP_LE": 3, "SCMP_CMP_EQ": 4,
              "SCMP_CMP_GE": 5, "SCMP_CMP_GT": 6, "SCMP_CMP_MASKED_EQ": 7}  # fmt: skip
_MAX_ARGS = 6


class _ArgCmp(ctypes.Structure):
    """libseccomp's struct scmp_arg_cmp."""

    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]  # fmt: skip


class _Unsupported(Exception):
    """What crun would refuse, or what we leave to it."""


#: libseccomp's soname on Debian (and most): loaded by name, no ``ldconfig -p``
#: run to find it (find_library forks it, in every container's monitor).
_SONAME = "libseccomp.so.2"


@functools.cache
def _lib() -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL(_SONAME)
    except OSError:
        name = ctypes.util.find_library("seccomp")
        if name is None:
            return None
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            return None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_arch_resolve_name.restype = ctypes.c_uint32
    lib.seccomp_arch_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_arch_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint, ctypes.POINTER(_ArgCmp)
    ]  # fmt: skip
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.seccomp_version.restype = ctypes.c_void_p
    return lib


def _action(name: object, value: int) -> int:
    if not isinstance(name, str) or not name.startswith("SCMP_ACT_"):
        raise _Unsupported(f"action {name!r}")
    short = name[len("SCMP_ACT_") :]
    if short in _WITH_VALUE:
        return _WITH_VALUE[short] | (value & 0xFFFF)
    if short in _ACTIONS:
        return _ACTIONS[short]
    raise _Unsupported(f"action {name!r}")


def _value(rule: dict[str, Any], key: str, action: object) -> int:
    """An errno for ERRNO and TRACE (EPERM unless given); crun refuses it elsewhere."""
    if key not in rule:
        return _EPERM
    if not isinstance(action, str) or action not in ("SCMP_ACT_ERRNO", "SCMP_ACT_TRACE"):
        raise _Unsupported(f"an errno for {action!r}")
    v = rule[key]
    if not isinstance(v, int):
        raise _Unsupported(f"{key} {v!r}")
    return v


def _compile(profile: dict[str, Any]) -> bytes:
    lib = _lib()
    if lib is None:
        raise _Unsupported("no libseccomp on the host")
    first = profile.get("defaultAction")
    default = _action(first, _value(profile, "defaultErrnoRet", first))
    ctx = lib.seccomp_init(default)
    if not ctx:
        raise _Unsupported("seccomp_init")
    try:
        for arch in profile.get("architectures") or []:
            name = str(arch).removeprefix("SCMP_ARCH_").lower()[:31]
            token = lib.seccomp_arch_resolve_name(name.encode())
            if token == 0:
                raise _Unsupported(f"architecture {arch!r}")
            ret = lib.seccomp_arch_add(ctx, token)
            if ret < 0 and ret != -_EEXIST:
                raise _Unsupported(f"adding architecture {arch!r}")
        for rule in profile.get("syscalls") or []:
            _add_rule(lib, ctx, rule, default)
        fd = os.memfd_create("seccomp-bpf", os.MFD_CLOEXEC)
        try:
            if lib.seccomp_export_bpf(ctx, fd) < 0:
                raise _Unsupported("seccomp_export_bpf")
            size = os.lseek(fd, 0, os.SEEK_END)
            return os.pread(fd, size, 0)
        finally:
            os.close(fd)
    finally:
        lib.seccomp_release(ctx)


def _add_rule(lib: ctypes.CDLL, ctx: int, rule: dict[str, Any], default: int) -> None:
    """One entry of ``syscalls``, as crun adds it: skipped if its action is the
    default; one rule per name, with all its argument checks, or, when two
    checks name the same argument (libseccomp cannot AND those), one rule per
    check; unknown names skipped."""
    action = _action(rule.get("action"), _value(rule, "errnoRet", rule.get("action")))
    if action == default:
        return
    args = rule.get("args")
    cmps = (_ArgCmp * _MAX_ARGS)()
    n, repeated, seen = 0, False, [0] * _MAX_ARGS
    if args is not None:
        for a in args[:_MAX_ARGS]:
            index = a.get("index")
            if not isinstance(index, int) or not 0 <= index < _MAX_ARGS:
                raise _Unsupported(f"argument index {index!r}")
            seen[index] += 1
            repeated = repeated or seen[index] > 1
        for n, a in enumerate(args[:_MAX_ARGS], start=1):
            op = _OPERATORS.get(a.get("op"))
            if op is None:
                raise _Unsupported(f"operator {a.get('op')!r}")
            cmps[n - 1] = _ArgCmp(a["index"], op, int(a.get("value", 0)), int(a.get("valueTwo", 0)))
    for name in rule.get("names") or []:
        nr = lib.seccomp_syscall_resolve_name(str(name).encode())
        if nr == _NR_SCMP_ERROR:
            continue
        if args is None or not repeated:
            ret = lib.seccomp_rule_add_array(ctx, action, nr, n, cmps)
            if ret < 0:
                raise _Unsupported(f"rule for {name!r}")
            continue
        for r in range(n):
            if lib.seccomp_rule_add_array(ctx, action, nr, 1, ctypes.byref(cmps[r])) < 0:
                raise _Unsupported(f"rule for {name!r}")


@functools.lru_cache(maxsize=16)
def _compiled_b64(profile_json: str, cache: Path | None) -> str | None:
    """The filter, from ``cache`` (a root-only dir) when it was compiled
    before: podman's default profile takes ~15 ms to compile on the host,
    for every container, and a container's monitor is a process of its own."""
    key = hashlib.sha256(f"{_lib_version()}\n{profile_json}".encode()).hexdigest()
    hit = cache / f"{key}.bpf" if cache is not None else None
    with contextlib.suppress(OSError):
        if hit is not None:
            return base64.b64encode(hit.read_bytes()).decode()
    try:
        bpf = _compile(json.loads(profile_json))
    except (_Unsupported, ValueError, TypeError, KeyError, OverflowError, AttributeError):
        return None
    if hit is not None:
        with contextlib.suppress(OSError):
            hit.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            atomic_write(hit, bpf, durable=False, mode=0o600)
    return base64.b64encode(bpf).decode()


def _lib_version() -> str:
    """libseccomp's version: a newer one may compile the same profile differently."""
    lib = _lib()
    if lib is None:
        return ""
    ptr = lib.seccomp_version()
    v = ctypes.cast(ptr, ctypes.POINTER(ctypes.c_uint * 3)).contents
    return ".".join(str(x) for x in v)


def compiled(spec: dict[str, Any], cache: Path | None = None) -> dict[str, Any]:
    """``spec`` with its seccomp profile compiled into the annotation crun
    loads instead of compiling (a new dict; ``spec`` is left alone), or
    ``spec`` itself when there is nothing to do or crun should do it.
    ``cache``: a root-only dir to keep compiled filters in."""
    linux = spec.get("linux")
    profile = linux.get("seccomp") if isinstance(linux, dict) else None
    annotations = spec.get("annotations") or {}
    if not isinstance(profile, dict) or not isinstance(annotations, dict):
        return spec
    if ANNOTATION in annotations or annotations.get(_FAIL_UNKNOWN, "0") != "0":
        return spec
    if profile.get("listenerPath") or "SCMP_ACT_NOTIFY" in json.dumps(profile):
        return spec
    b64 = _compiled_b64(json.dumps(profile, sort_keys=True), cache)
    if b64 is None:
        return spec
    return {**spec, "annotations": {**annotations, ANNOTATION: b64}}
