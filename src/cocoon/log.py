"""cocoon's log: the standard logging module, in the form its reader needs.

Every module logs to a child of the ``cocoon`` logger; only the process's
entry point decides where records go and how they look, so a library module
never prints. A person reads text (``cocoon: warning: ...``, the error line
``cocoon: ...``); a program reads JSON lines (``cocoon --log-format json``, and
always a container monitor's monitor.log, which outlives any terminal and is
read by tools); and runc's callers read runc's own lines in its ``--log`` file
(containerd's shim shows the last one).
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
import traceback
from collections.abc import Iterator
from typing import Any, TextIO

ROOT = "cocoon"
FORMATS = ("text", "json")

#: The attributes every LogRecord has: anything else on one came from ``extra``.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message"}


def one_line(text: str) -> str:
    """``text`` as one printable line: a path or a guest's words may hold newlines
    or escapes, and one record must stay one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def rfc3339(t: float) -> str:
    """runc's (and Go's) timestamp: UTC, nanoseconds."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e9):09d}Z"


def _traceback(record: logging.LogRecord) -> str:
    if not record.exc_info:
        return ""
    return "".join(traceback.format_exception(*record.exc_info))


class TextFormatter(logging.Formatter):
    """``prog: level: message`` (an error is just ``prog: message``, the form
    every failure has always had); a traceback, with --debug, comes first."""

    def __init__(self, prog: str) -> None:
        super().__init__()
        self.prog = prog

    def format(self, record: logging.LogRecord) -> str:
        msg = one_line(record.getMessage())
        level = "" if record.levelno >= logging.ERROR else f"{record.levelname.lower()}: "
        return _traceback(record) + f"{self.prog}: {level}{msg}"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, msg, whatever the caller
    passed in ``extra`` (e.g. ``container``, ``exit_code``), and a traceback."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": rfc3339(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in record.__dict__.items():
            if k not in _STANDARD and not k.startswith("_"):
                out[k] = v if isinstance(v, (str, int, float, bool, type(None))) else str(v)
        if record.exc_info:
            out["traceback"] = _traceback(record)
        return json.dumps(out)


class RuncFormatter(logging.Formatter):
    """runc's --log lines: logrus's JSON (``level``, ``msg``, ``time``) or its
    text form, which quotes and escapes the message."""

    def __init__(self, fmt: str) -> None:
        super().__init__()
        self.fmt = fmt

    def format(self, record: logging.LogRecord) -> str:
        level = record.levelname.lower()
        msg, when = one_line(record.getMessage()), rfc3339(record.created)
        if self.fmt == "json":
            return json.dumps({"level": level, "msg": msg, "time": when})
        return f'time="{when}" level={level} msg={json.dumps(msg)}'


class StreamHandler(logging.StreamHandler[TextIO]):
    """A stream that may be gone (a closed pipe, a reader that left): the record
    is dropped rather than a "Logging error" traceback printed in its place."""

    def handleError(self, record: logging.LogRecord) -> None:
        pass


class AppendHandler(logging.Handler):
    """Appends each record to a file it opens for that record: the caller (a
    shim) owns the file, may rotate or read it at any moment, and a file we
    cannot write must not fail the command."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
            with open(self.path, "a") as f:
                f.write(line)
        except (OSError, ValueError):
            pass


@contextlib.contextmanager
def teardown_step(
    logger: logging.Logger,
    what: str,
    left: str,
    *,
    level: int = logging.WARNING,
    errors: tuple[type[BaseException], ...] = (Exception,),
) -> Iterator[None]:
    """One step of a teardown that goes on whatever the step raises: a failure
    is logged, saying what failed and what it left behind (``left``), so that
    nothing leaks silently. ``level``: INFO for a step a later one makes up for."""
    try:
        yield
    except errors as e:
        logger.log(level, "%s failed (%s); left behind: %s", what, str(e) or type(e).__name__, left)


def setup(
    prog: str,
    fmt: str = "text",
    *,
    level: int = logging.WARNING,
    stream: TextIO | None = None,
    stream_level: int | None = None,
    file: str | None = None,
    file_format: str = "text",
) -> None:
    """Send the ``cocoon`` records to ``stream`` (stderr) in ``fmt``, and with
    ``file`` to that file in runc's form too. Called again (the group's options
    are parsed after the first call), it replaces what the last call set."""
    root = _reset(level)
    out = StreamHandler(stream if stream is not None else sys.stderr)
    out.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter(prog))
    out.setLevel(stream_level if stream_level is not None else level)
    root.addHandler(out)
    if file:
        to_file = AppendHandler(file)
        to_file.setFormatter(RuncFormatter(file_format))
        root.addHandler(to_file)


def setup_process_log(stream: TextIO) -> None:
    """A long-lived process's own log (a container monitor's monitor.log): JSON
    lines, ours from INFO, and what asyncio or a library warns of there too."""
    _reset(logging.INFO)
    top = logging.getLogger()
    for h in list(top.handlers):
        top.removeHandler(h)
    handler = StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    top.addHandler(handler)


def _reset(level: int) -> logging.Logger:
    """The ``cocoon`` logger with no handlers of its own, at ``level``. Its
    records still propagate: nothing above it has a handler in our processes
    but the monitor's, and a test's log capture sits there."""
    root = logging.getLogger(ROOT)
    for h in list(root.handlers):
        root.removeHandler(h)
    root.setLevel(level)
    return root
