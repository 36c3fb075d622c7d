"""The two session-level exceptions both ends share (the host's asyncio session
and the agent's threaded one), so an ERROR frame means the same on each side."""

from __future__ import annotations


class SessionClosed(ConnectionError):
    """The session ended; the message says why (EOF, violation, local close)."""


class RemoteError(Exception):
    """An ERROR frame: raised by a handler to send one, or by a caller who got one."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
