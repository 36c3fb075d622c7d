"""Console-script entry points: run a command line, then leave at once.

Every `cocoon` and `cocoon-runtime` call is a new interpreter, and podman
makes three per container (create, start, delete). Interpreter finalization
(tearing down ~250 modules and their objects) cost ~26 ms of each call here,
for nothing: by the time a command returns, its output is written, its files
are closed, its event loops are closed and its threads are joined. So we
flush what may be buffered and ``os._exit`` with the command's status.
``python -m cocoon.cli`` keeps the ordinary exit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable
from typing import NoReturn


def cocoon() -> NoReturn:
    from cocoon.cli.main import main

    _run(main)


def cocoon_runtime() -> NoReturn:
    _without_openssl()
    from cocoon.ocicli.main import main

    _run(main)


def containerd_shim() -> NoReturn:
    _without_openssl()
    from cocoon.shim.main import main

    _run(lambda: sys.exit(main()))


def _without_openssl() -> None:
    """runc's command line and containerd's shim never speak TLS (images
    are pulled by the engine), yet asyncio imports ``ssl`` and hashlib its
    OpenSSL backend: ~7 ms of every create, and ~1-2 MiB of every
    container's monitor (a fork of these processes) for OpenSSL's libraries
    and tables. Blocked, asyncio runs without TLS and hashlib with Python's
    own digests (ids and cache keys: a few bytes each)."""
    for name in ("ssl", "_ssl", "_hashlib"):
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]


def _run(main: Callable[[], object]) -> NoReturn:
    try:
        main()
        code = 0
    except SystemExit as e:
        code = _status(e.code)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: the status counts
            stream.flush()
    os._exit(code)


def _status(code: object) -> int:
    """SystemExit's code as the interpreter would turn it into a status."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1
