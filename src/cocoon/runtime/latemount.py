"""A bind volume whose contents arrive after its container started.

A container in a pooled sandbox gets its host directories through the
sandbox's hub (storage/hub.py): its first bind volume is the hub's slot 0,
which the guest reaches by a path its 9p mount resolves on the host at each
lookup. So a directory bound read-only over that slot on the host later is
what the container sees at the volume's target from then on: the function
service's pre-warmed instances (serve/prewarm.py) take their code this way.
A container in any other sandbox has no hub: its shares are fixed when QEMU
starts.
"""

from __future__ import annotations

from pathlib import Path

from cocoon.config import Config
from cocoon.runtime.records import ContainerDir, ContainerStore
from cocoon.storage import hub
from cocoon.util.fs import mount_points_under


def first_volume_slot(cfg: Config, cid: str) -> Path | None:
    """Where, on the host, container ``cid``'s first bind volume can be
    covered; None if its sandbox has no hub."""
    sid = ContainerDir(ContainerStore(cfg).root, cid).state().sandbox_id
    if not sid:
        return None
    slot = hub.hub_dir(cfg.root, sid) / "0"
    # Not os.path.ismount: a bind from the same filesystem has the same st_dev.
    return slot if str(slot) in mount_points_under(slot) else None


def cover(slot: Path, source: Path) -> None:
    """``source`` read-only at ``slot`` (a HostError if not); it goes with the
    sandbox's hub when the container is removed."""
    hub.cover(slot, source)
