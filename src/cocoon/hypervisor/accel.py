"""Is KVM really usable here? Probe it, never trust the /dev/kvm node.

On these machines /dev/kvm is a nested PVM host (the ``kvm_pvm`` module): it
opens fine, answers KVM_GET_API_VERSION, and then a normal guest kernel hangs
or dies with an emulation failure. So the probe (1) looks for kvm_pvm, (2) runs
a few real-mode instructions in a throwaway VM through the raw KVM ioctls, in
a child process with a deadline, and only then says "kvm".
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import fcntl
import json
import mmap
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

from cocoon.errors import HypervisorError
from cocoon.util.proc import run

KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM = 0xAE01
KVM_GET_VCPU_MMAP_SIZE = 0xAE04
KVM_CREATE_VCPU = 0xAE41
KVM_SET_USER_MEMORY_REGION = 0x4020AE46
KVM_RUN = 0xAE80
KVM_GET_REGS = 0x8090AE81
KVM_SET_REGS = 0x4090AE82
KVM_GET_SREGS = 0x8138AE83
KVM_SET_SREGS = 0x4138AE84
KVM_EXIT_IO = 2
KVM_EXIT_HLT = 5
PROBE_TIMEOUT_S = 5.0
#: mov al, 0x2a ; out 0x10, al ; hlt
PROBE_CODE = bytes([0xB0, 0x2A, 0xE6, 0x10, 0xF4])


@dataclass(frozen=True)
class AccelReport:
    kvm_usable: bool
    reason: str
    pvm_host: bool


def _run_probe_vm() -> str:
    """In the probe child: run PROBE_CODE in a real-mode vCPU; return 'ok' or why not."""
    kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    if fcntl.ioctl(kvm, KVM_GET_API_VERSION) != 12:
        return "unexpected KVM API version"
    vm = fcntl.ioctl(kvm, KVM_CREATE_VM, 0)
    mem = mmap.mmap(-1, 0x1000, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mem[: len(PROBE_CODE)] = PROBE_CODE
    addr = ctypes.addressof(ctypes.c_char.from_buffer(mem))
    region = struct.pack("=IIQQQ", 0, 0, 0, 0x1000, addr)
    fcntl.ioctl(vm, KVM_SET_USER_MEMORY_REGION, region)
    vcpu = fcntl.ioctl(vm, KVM_CREATE_VCPU, 0)
    run_size = fcntl.ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE)
    run = mmap.mmap(vcpu, run_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    sregs = bytearray(312)
    fcntl.ioctl(vcpu, KVM_GET_SREGS, sregs)
    struct.pack_into("=Q", sregs, 0, 0)  # cs.base = 0
    struct.pack_into("=H", sregs, 12, 0)  # cs.selector = 0
    fcntl.ioctl(vcpu, KVM_SET_SREGS, bytes(sregs))
    regs = bytearray(144)
    fcntl.ioctl(vcpu, KVM_GET_REGS, regs)
    struct.pack_into("=QQ", regs, 16 * 8, 0, 2)  # rip = 0, rflags = 2
    fcntl.ioctl(vcpu, KVM_SET_REGS, bytes(regs))
    saw_io = False
    for _ in range(4):
        fcntl.ioctl(vcpu, KVM_RUN, 0)
        (reason,) = struct.unpack_from("=I", run, 8)
        if reason == KVM_EXIT_IO:
            saw_io = True
        elif reason == KVM_EXIT_HLT:
            return "ok" if saw_io else "vCPU halted without executing the probe code"
        else:
            return f"vCPU exited with reason {reason} running real-mode code"
    return "vCPU did not reach HLT"


def _pvm_host() -> bool:
    return Path("/sys/module/kvm_pvm").exists()


def probe() -> AccelReport:
    """Decide whether KVM can run a normal guest on this host, and say why."""
    pvm = _pvm_host()
    if not os.path.exists("/dev/kvm"):
        return AccelReport(False, "/dev/kvm does not exist (no KVM module or no nested virt)", pvm)
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return AccelReport(False, "/dev/kvm is not accessible to this user", pvm)
    if pvm:
        return AccelReport(
            False,
            "/dev/kvm is a nested PVM host (kvm_pvm): a normal guest kernel cannot run on it; "
            "only a PVM-built guest kernel could",
            True,
        )
    try:
        cp = run(
            [sys.executable, "-I", "-c", _CHILD_CODE, *sys.path],
            timeout_s=PROBE_TIMEOUT_S,
            error=HypervisorError,
            check=False,
        )
    except HypervisorError:  # it did not finish: the python binary itself is there
        return AccelReport(False, f"a KVM test vCPU hung for {PROBE_TIMEOUT_S:g} s", pvm)
    out = cp.stdout.decode(errors="replace").strip()
    if cp.returncode == 0 and out == "ok":
        return AccelReport(True, "a KVM test vCPU ran real-mode code", pvm)
    why = out or cp.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["crashed"]
    return AccelReport(
        False, f"KVM test vCPU failed: {why if isinstance(why, str) else why[0]}", pvm
    )


_CHILD_CODE = (
    "import sys; sys.path[:0] = sys.argv[1:]; from cocoon.hypervisor.accel import _child; _child()"
)


def _child() -> None:
    try:
        print(_run_probe_vm())
    except OSError as e:
        print(f"{e.strerror or e}")
        sys.exit(1)


def choose(setting: str, report: AccelReport | None = None) -> tuple[str, str]:
    """(accel, why) for a config value of auto|kvm|tcg."""
    if setting == "tcg":
        return "tcg", "forced by configuration"
    report = report or cached_probe()
    if setting == "kvm":
        return "kvm", "forced by configuration" + (
            "" if report.kvm_usable else f" ({report.reason})"
        )
    if report.kvm_usable:
        return "kvm", report.reason
    return "tcg", report.reason


_CACHE: AccelReport | None = None


def cached_probe(cache_file: Path | None = None) -> AccelReport:
    """Probe once per process, and once per boot when given a file under /run."""
    global _CACHE
    if _CACHE is not None:
        return _CACHE
    boot_id = ""
    with contextlib.suppress(OSError):
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    if cache_file is not None:
        try:
            raw = json.loads(cache_file.read_text())
            if raw.get("boot_id") == boot_id and boot_id:
                _CACHE = AccelReport(raw["kvm_usable"], raw["reason"], raw["pvm_host"])
                return _CACHE
        except (OSError, ValueError, KeyError, TypeError):
            pass
    _CACHE = probe()
    if cache_file is not None:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            data = {"boot_id": boot_id, **dataclasses.asdict(_CACHE)}
            cache_file.write_text(json.dumps(data))
        except OSError:
            pass
    return _CACHE
