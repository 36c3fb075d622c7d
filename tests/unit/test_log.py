"""cocoon's log: one line per record in every form, and teardown steps that fail
say so instead of vanishing."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest

from cocoon import log as cocoon_log
from cocoon.cli.env import env_flags
from cocoon.errors import UsageError


def records(fmt: str, emit: object) -> list[str]:
    out = io.StringIO()
    cocoon_log.setup("cocoon", fmt, stream=out)
    assert callable(emit)
    emit(logging.getLogger("cocoon.test"))
    return out.getvalue().splitlines()


def test_text_is_the_lines_cocoon_always_printed() -> None:
    lines = records("text", lambda lg: (lg.warning("template x\nstale"), lg.error("no such thing")))
    assert lines == ["cocoon: warning: template x\\nstale", "cocoon: no such thing"]


def test_json_lines_carry_level_logger_and_extra_fields() -> None:
    (line,) = records("json", lambda lg: lg.error("boom\nagain", extra={"exit_code": 127}))
    rec = json.loads(line)
    assert (rec["level"], rec["logger"], rec["msg"]) == ("error", "cocoon.test", "boom\nagain")
    assert rec["exit_code"] == 127 and rec["time"].endswith("Z")


def test_the_level_hides_debug_unless_asked() -> None:
    assert records("text", lambda lg: lg.debug("hidden")) == []


def test_the_runc_log_file_gets_runc_lines(tmp_path: Path) -> None:
    path = tmp_path / "rt.log"
    err = io.StringIO()
    cocoon_log.setup("cocoon-runtime", stream=err, stream_level=logging.ERROR,
                     file=str(path), file_format="json")  # fmt: skip
    lg = logging.getLogger("cocoon.test")
    lg.warning("only in the file")
    lg.error("in both")
    assert err.getvalue() == "cocoon-runtime: in both\n"
    got = [json.loads(x) for x in path.read_text().splitlines()]
    assert [(r["level"], r["msg"]) for r in got] == [
        ("warning", "only in the file"), ("error", "in both")
    ]  # fmt: skip


def test_a_failed_teardown_step_is_logged_with_what_it_left() -> None:
    def emit(lg: logging.Logger) -> None:
        with cocoon_log.teardown_step(lg, "destroying sandbox s1", "its dir"):
            raise OSError("device busy")
        with cocoon_log.teardown_step(lg, "quiet", "nothing", level=logging.DEBUG):
            raise OSError("not shown")
        with cocoon_log.teardown_step(lg, "fine", "nothing"):
            pass

    lines = records("text", emit)
    assert lines == [
        "cocoon: warning: destroying sandbox s1 failed (device busy); left behind: its dir"
    ]


def test_a_teardown_step_lets_other_errors_through() -> None:
    lg = logging.getLogger("cocoon.test")
    with pytest.raises(KeyError), cocoon_log.teardown_step(lg, "x", "y", errors=(OSError,)):
        raise KeyError("not ours to swallow")


def test_bare_env_names_take_the_hosts_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COCOON_T_SET", "from host")
    monkeypatch.delenv("COCOON_T_UNSET", raising=False)
    f = tmp_path / "env"
    f.write_text("# a comment\nA=1\n\nCOCOON_T_SET\nCOCOON_T_UNSET\n")
    got = env_flags(["B=2=3", "COCOON_T_SET", "COCOON_T_UNSET", "C="], [str(f)])
    assert got == ["A=1", "COCOON_T_SET=from host", "B=2=3", "COCOON_T_SET=from host", "C="]
    with pytest.raises(UsageError, match="cannot read env file"):
        env_flags([], [str(f) + ".missing"])
