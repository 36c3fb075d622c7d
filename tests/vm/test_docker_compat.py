"""Where cocoon did what a docker user would not expect (issue 15): exit codes of
a command that cannot be run, bare -e names, --read-only with a tmpfs the image
lacks; and the monitor's own log. Real VMs, the real command line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cocoon.config import Config
from tests.vm.conftest import cocoon, ok

pytestmark = [pytest.mark.vm, pytest.mark.timeout(300)]

NOT_FOUND = b"executable file `%s` not found"


def one_error_line(err: bytes) -> bool:
    return err.startswith(b"cocoon: ") and err.count(b"\n") == 1


@pytest.mark.parametrize(
    "flags, command, code",
    [
        ([], "/no/such/cmd", 127),
        ([], "nosuchcmd", 127),
        (["-d"], "/no/such/cmd", 127),
        ([], "/etc/passwd", 126),  # no exec bit
        ([], "/etc", 126),  # a directory
    ],
)
def test_run_of_a_command_that_cannot_run(
    cfg: Config, busybox: None, flags: list[str], command: str, code: int
) -> None:
    r = cocoon(cfg, "run", "--rm", *flags, "busybox", command)
    assert r.returncode == code and one_error_line(r.stderr), r.stderr
    assert cocoon(cfg, "ps", "-aq").stdout == b""  # nothing kept of it


def test_exec_of_a_command_that_cannot_run(cfg: Config, busybox: None) -> None:
    """docker exec: 127 not found, 126 not executable; the container lives on."""
    ok(cocoon(cfg, "run", "-d", "--name", "ex", "busybox", "sleep", "300"))
    try:
        for command, code in (("nosuchcmd", 127), ("/no/such", 127), ("/etc/passwd", 126),
                              ("/etc", 126)):  # fmt: skip
            r = cocoon(cfg, "exec", "ex", command)
            assert r.returncode == code and one_error_line(r.stderr), (command, r.stderr)
        assert NOT_FOUND % b"nosuchcmd" in cocoon(cfg, "exec", "ex", "nosuchcmd").stderr
        assert cocoon(cfg, "exec", "ex", "sh", "-c", "exit 7").returncode == 7
    finally:
        ok(cocoon(cfg, "rm", "-f", "ex"))


def test_bare_env_names_take_the_hosts_value(cfg: Config, busybox: None, tmp_path: Path) -> None:
    """-e NAME and a NAME line in --env-file: the host's value, or nothing if unset."""
    env_file = tmp_path / "env"
    env_file.write_text("FROM_FILE=1\nHOST_A\nHOST_UNSET\n")
    host = {k: v for k, v in os.environ.items() if k != "HOST_UNSET"}
    host |= {"HOST_A": "a value", "HOST_B": "b=value"}
    show = "for n in FROM_FILE HOST_A HOST_B HOST_UNSET; do eval echo $n=\\${$n-unset}; done"
    r = cocoon(cfg, "run", "--rm", "--env-file", str(env_file), "-e", "HOST_B", "-e",
               "HOST_UNSET", "busybox", "sh", "-c", show, env=host)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().splitlines() == [
        "FROM_FILE=1", "HOST_A=a value", "HOST_B=b=value", "HOST_UNSET=unset"
    ]  # fmt: skip
    ok(cocoon(cfg, "run", "-d", "--name", "envx", "busybox", "sleep", "300"))
    try:
        r = cocoon(cfg, "exec", "-e", "HOST_A", "-e", "HOST_UNSET", "envx", "sh", "-c",
                   "echo $HOST_A; echo ${HOST_UNSET-unset}", env=host)  # fmt: skip
        assert (r.returncode, r.stdout) == (0, b"a value\nunset\n"), r.stderr
    finally:
        ok(cocoon(cfg, "rm", "-f", "envx"))


def test_read_only_root_with_a_tmpfs_the_image_lacks(cfg: Config, busybox: None) -> None:
    """docker makes the mount point; the root is read-only all the same."""
    r = cocoon(cfg, "run", "--rm", "--read-only", "--tmpfs", "/scratch", "busybox",
               "sh", "-c", "touch /scratch/x && echo ok")  # fmt: skip
    assert (r.returncode, r.stdout, r.stderr) == (0, b"ok\n", b"")
    r = cocoon(cfg, "run", "--rm", "--read-only", "--tmpfs", "/scratch", "busybox",
               "sh", "-c", "touch /x")  # fmt: skip
    assert r.returncode == 1 and b"Read-only file system" in r.stderr, r.stderr


def test_the_monitor_log_is_json_lines(cfg: Config, busybox: None) -> None:
    cid = ok(cocoon(cfg, "run", "-d", "--name", "mlog", "busybox", "sh", "-c", "exit 3")).strip()
    try:
        assert ok(cocoon(cfg, "wait", "mlog")).strip() == "3"
        log = cfg.root / "containers" / cid / "monitor.log"
        recs = [json.loads(line) for line in log.read_text().splitlines()]
        assert all(r["time"] and r["level"] and r["logger"] for r in recs), recs
        said = [r["msg"] for r in recs]
        assert any(m.startswith("sandbox ") and " up in " in m for m in said), said
        assert f"container {cid[:12]} started" in said
        assert f"container {cid[:12]} exited with code 3" in said
    finally:
        ok(cocoon(cfg, "rm", "mlog"))
