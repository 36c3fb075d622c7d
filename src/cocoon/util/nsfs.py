"""What kind of namespace a path names (nsfs's NS_GET_NSTYPE ioctl, Linux 4.11).

Both the OCI bundle checks (a namespace entry's path must match its type) and
the network layer (``--network ns:PATH``) ask this; one place answers.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat

NS_GET_NSTYPE = 0xB703  # _IO(0xb7, 0x3)
#: runtime-spec's namespace type -> its CLONE_NEW* flag.
CLONE_FLAGS = {
    "cgroup": 0x02000000, "ipc": 0x08000000, "mount": 0x00020000, "network": 0x40000000,
    "pid": 0x20000000, "time": 0x00000080, "user": 0x10000000, "uts": 0x04000000,
}  # fmt: skip
NAMES = {v: k for k, v in CLONE_FLAGS.items()}


def kind_of(path: str) -> str:
    """The namespace type ``path`` names ("network", ...), or "" for a file
    that is no namespace. OSError when it cannot be opened.

    The path comes from a caller's bundle or flag: only a regular file is
    opened (namespace files are), never blocking and never as a controlling
    terminal, so a FIFO cannot hang us and a device is never opened at all.
    """
    if "\0" in path:
        raise OSError(errno.EINVAL, "path contains a NUL byte")
    try:
        os.fsencode(path)
    except UnicodeEncodeError:  # a JSON string may hold lone surrogates
        raise OSError(errno.EINVAL, "path is not valid UTF-8") from None
    if not stat.S_ISREG(os.stat(path).st_mode):
        return ""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    try:
        flag = fcntl.ioctl(fd, NS_GET_NSTYPE)
    except OSError:
        return ""
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    return NAMES.get(flag, "")
