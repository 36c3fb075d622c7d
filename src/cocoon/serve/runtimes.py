"""The runtimes a function can name: an image and how its handler is run.

``shell``: the handler is a script in the code, run by busybox ``sh`` on the
default busybox image. ``python``: the handler is ``module.function`` (the
module a file in the code), served by the Python runtime image's handler
loop (images.pyloop) with Debian's python3.11: one process per instance,
the handler imported once. A shell invocation is one process: the request
body on its stdin, the result on its stdout, logs on stderr; run by the
instance's shell loop (serve/shloop.py), or exec'd in the instance. Both
images are built offline on first need.
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
    #: Makes the image if it is missing (a few seconds, once).
    ensure: Callable[[Config], object]
    #: One process per invocation: its command line (``{file}`` is the
    #: handler's file in /code, ``{handler}`` the handler as given) ...
    command: tuple[str, ...] = ()
    #: ... or one process per instance that serves every invocation
    #: (images/pyloop.py's frames).
    loop: tuple[str, ...] = ()
    #: "file": the handler names a file; "module": ``module.function``.
    handler_kind: str = "file"
    #: ``command`` served by the shell loop (serve/shloop.py): one ``sh``
    #: per instance runs it per invocation as its child, where an exec per
    #: invocation (the fallback, serve.shell_loop = false) costs a `crun
    #: exec` in the guest each time.
    shell_loop: bool = False

    def handler_file(self, handler: str) -> str:
        """The file in the code that must exist for ``handler``."""
        if self.handler_kind == "file":
            return handler
        if not _MODULE_FUNCTION.match(handler) or len(handler) > 200:
            raise CodeError(f"handler {handler[:80]!r}: use module.function, e.g. main.handle")
        return handler.rpartition(".")[0].replace(".", "/") + ".py"

    def argv(self, handler: str, *, loop: bool = False) -> list[str]:
        path = f"/code/{self.handler_file(handler)}"
        cmd = self.loop if loop else self.command
        return [a.replace("{file}", path).replace("{handler}", handler) for a in cmd]


RUNTIMES = {
    "shell": Runtime(
        "busybox:latest", ensure_default_image, command=("/bin/sh", "{file}"), shell_loop=True
    ),
    "python": Runtime(
        PYTHON_TAG,
        ensure_python_image,
        loop=("/usr/bin/python3", "/opt/cocoon/loop.py", "{handler}"),
        handler_kind="module",
    ),
}
