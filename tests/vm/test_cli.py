"""The `cocoon` command as a user types it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cocoon.config import Config
from tests.vm.conftest import cocoon

pytestmark = [pytest.mark.vm, pytest.mark.timeout(300)]


def test_check_reports_accelerator(cfg: Config) -> None:
    r = cocoon(cfg, "check")
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    assert "accelerator" in out and ("tcg" in out or "kvm" in out)
    assert "qemu" in out and "guest image" in out


def test_check_fails_without_guest_assets(cfg: Config, tmp_path: object) -> None:
    r = cocoon(cfg, "--data-dir", str(tmp_path), "check")
    assert r.returncode == 1
    assert r.stderr.decode().count("\n") == 1
    assert "cocoon guest build" in r.stderr.decode()


def test_env_prints_effective_config(cfg: Config) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "cocoon.cli", "env"],
        capture_output=True,
        env={"PATH": "/usr/bin:/bin", "COCOON_HYPERVISOR_VCPUS": "2"},
        check=True,
    )
    assert "vcpus = 2" in r.stdout.decode()


def test_sandbox_run_relays_output_stdin_and_exit_code(cfg: Config) -> None:
    r = cocoon(cfg, "sandbox", "run", "-i", "--", "sh", "-c", "cat; echo oops >&2; exit 42",
               input=b"through the VM\n")  # fmt: skip
    assert r.returncode == 42
    assert r.stdout == b"through the VM\n"
    assert r.stderr == b"oops\n"


def test_sandbox_run_missing_binary_is_one_clear_line(cfg: Config) -> None:
    r = cocoon(cfg, "sandbox", "run", "--", "/no/such/thing")
    assert r.returncode != 0
    err = r.stderr.decode()
    assert err.startswith("cocoon: ") and err.count("\n") == 1
    assert "/no/such/thing" in err
