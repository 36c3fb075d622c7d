"""`cocoon`'s last resort: an exception that is no CocoonError is still one line, exit 125."""

from __future__ import annotations

import sys

import pytest

from cocoon.cli import main


def test_an_unexpected_exception_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(**_kw: object) -> None:
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(main.cli, "main", broken)
    monkeypatch.setattr(sys, "argv", ["cocoon", "pull", "x"])
    with pytest.raises(SystemExit) as e:
        main.main()
    assert e.value.code == 125
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("cocoon: internal error: RecursionError: maximum recursion depth")
