"""The runtimes a function can name: an image and how its handler is run.

``shell``: the handler is a script in the code, run by busybox ``sh`` on the
default busybox image. ``python``: the handler is ``module.function`` (the
module a file in the code), run by the Python runtime image's bootstrap
(images.pyruntime) with Debian's python3.11. Each invocation is one process:
the request body on its stdin, the result on its stdout, logs on stderr.
Both images are built offline on first need.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from cocoon.config import Config
from cocoon.errors import CodeError
from cocoon.images.default import ensure_default_image
from cocoon.images.pyruntime import TAG as PYTHON_TAG
from cocoon.images.pyruntime import ensure_python_image

_MODULE_FUNCTION = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")


@dataclass(frozen=True)
class Runtime:
    image: str
    #: The handler's command line: ``{file}`` is the handler's file in /code,
    #: ``{handler}`` the handler as given.
    command: tuple[str, ...]
    #: Makes the image if it is missing (a few seconds, once).
    ensure: Callable[[Config], object]
    #: "file": the handler names a file; "module": ``module.function``.
    handler_kind: str = "file"

    def handler_file(self, handler: str) -> str:
        """The file in the code that must exist for ``handler``."""
        if self.handler_kind == "file":
            return handler
        if not _MODULE_FUNCTION.match(handler) or len(handler) > 200:
            raise CodeError(f"handler {handler[:80]!r}: use module.function, e.g. main.handle")
        return handler.rpartition(".")[0].replace(".", "/") + ".py"

    def argv(self, handler: str) -> list[str]:
        path = f"/code/{self.handler_file(handler)}"
        return [a.replace("{file}", path).replace("{handler}", handler) for a in self.command]


RUNTIMES = {
    "shell": Runtime("busybox:latest", ("/bin/sh", "{file}"), ensure_default_image),
    "python": Runtime(
        PYTHON_TAG,
        ("/usr/bin/python3", "/opt/cocoon/bootstrap.py", "{handler}"),
        ensure_python_image,
        handler_kind="module",
    ),
}
