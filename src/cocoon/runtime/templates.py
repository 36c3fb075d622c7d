"""Templates as the front ends see them: list, build ahead, remove.

The sandbox layer builds templates on first need by itself; these calls are
for an operator who wants the first start fast too (`template build`), wants
to see what is on disk and whether it is usable (`template ls`, `check`), or
wants it gone (`template rm`, e.g. before turning templates off).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from cocoon.config import Config
from cocoon.sandbox import template
from cocoon.sandbox.sandbox import ensure_template


@dataclass
class TemplateInfo:
    key: str
    vcpus: int
    memory_mib: int
    nics: int
    #: 9p share slots (host directories): 0 or restore.layout's count.
    shares: int
    accel: str
    created: float
    build_s: float
    #: "" when usable; else why a start would refuse it (and rebuild it).
    problem: str
    #: Bytes of the RAM file the disk actually holds (the guest's touched pages).
    ram_bytes_used: int


def ls(cfg: Config) -> list[TemplateInfo]:
    out = []
    for key, meta, problem in template.listing(cfg):
        ram = template.templates_dir(cfg) / key / "ram"
        try:
            used = ram.stat().st_blocks * 512
        except OSError:
            used = 0
        out.append(
            TemplateInfo(
                key=key,
                vcpus=int(meta.get("vcpus", 0)),
                memory_mib=int(meta.get("memory_mib", 0)),
                nics=int(meta.get("nics", 0)),
                shares=int(meta.get("shares", 4)),  # made before the count was recorded: 4
                accel=str(meta.get("accel", "")),
                created=float(meta.get("created", 0.0)),
                build_s=float(meta.get("build_s", 0.0)),
                problem=problem,
                ram_bytes_used=used,
            )
        )
    return out


async def build(
    cfg: Config,
    *,
    vcpus: int | None = None,
    memory_mib: int | None = None,
    nics: int = 0,
    host_dirs: bool = False,
) -> tuple[str, bool, float]:
    """(key, newly built, seconds) of the template for sandboxes of this size
    (``host_dirs``: with share slots, for sandboxes given host directories)."""
    t0 = time.monotonic()
    t, built = await ensure_template(
        cfg, vcpus=vcpus, memory_mib=memory_mib, nics=nics, host_dirs=host_dirs
    )
    return t.key, built, time.monotonic() - t0


def rm(cfg: Config, keys: list[str]) -> list[str]:
    """Remove these templates (all with no keys); the keys actually removed."""
    targets = keys or [key for key, _, _ in template.listing(cfg)]
    return [k for k in targets if template.remove(cfg, k)]


def sweep(cfg: Config) -> list[str]:
    """Remove what template builds killed half-way left (their VMs are reaped
    like any dead sandbox's)."""
    return template.sweep(cfg)
