"""hypervisor/qemu/qmp against a socket that takes connections and never
greets (a QEMU whose main loop has not run yet): a connection given up on
is closed at once, since QEMU's monitor serves one client at a time and
the next one (a stop's `quit`) would wait behind it."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from cocoon.errors import HypervisorError
from cocoon.hypervisor.qemu.qmp import Qmp


async def _hangs_up_within(peer: socket.socket, timeout_s: float) -> bool:
    """Whether the other end closes within ``timeout_s`` (what it sent is skipped)."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout_s):
            while await loop.sock_recv(peer, 1 << 16):
                pass
            return True
    except TimeoutError:
        return False


@pytest.mark.parametrize("how", ["cancelled", "timed out"])
@pytest.mark.parametrize("call", ["connect", "pipelined"])
def test_a_connection_given_up_on_is_closed_at_once(tmp_path: Path, call: str, how: str) -> None:
    async def body() -> None:
        path = tmp_path / "qmp.sock"
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(str(path))
        srv.listen(1)
        srv.setblocking(False)
        loop = asyncio.get_running_loop()
        timeout_s = 0.2 if how == "timed out" else 30.0
        task: asyncio.Task[object] = asyncio.create_task(
            Qmp.connect(path, timeout_s=timeout_s)
            if call == "connect"
            else Qmp.pipelined(path, [("cont", None, [])], timeout_s)
        )
        peer, _ = await loop.sock_accept(srv)
        if how == "cancelled":
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        else:
            with pytest.raises(HypervisorError, match="cannot talk to QEMU's QMP socket"):
                await task
        # Closed now, not when the object is collected.
        assert await _hangs_up_within(peer, 1.0)
        peer.close()
        srv.close()

    asyncio.run(body())
