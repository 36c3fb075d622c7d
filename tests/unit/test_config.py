from __future__ import annotations

from pathlib import Path

import pytest

from cocoon.config import load
from cocoon.errors import ConfigError


def test_defaults_need_no_file(tmp_path: Path) -> None:
    cfg = load(None, env={})
    assert cfg.hypervisor.machine == "microvm"
    assert cfg.hypervisor.accel == "auto"
    assert cfg.root_dir == "/run/cocoon"


def test_file_then_env_then_flags(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('root_dir = "/run/x"\n[hypervisor]\nvcpus = 2\nmemory_mib = 512\n')
    cfg = load(f, env={"COCOON_HYPERVISOR_VCPUS": "3"}, overrides={"hypervisor.memory_mib": 1024})
    assert cfg.root_dir == "/run/x"
    assert cfg.hypervisor.vcpus == 3
    assert cfg.hypervisor.memory_mib == 1024


@pytest.mark.parametrize(
    "text, why",
    [
        ("[hypervisor]\nmachine = 'pc'\n", "hypervisor.machine"),
        ("[hypervisor]\nvcpus = 'two'\n", "not a valid int"),
        ("[hypervisor]\nnope = 1\n", "unknown setting 'hypervisor.nope'"),
        ("hypervisor = 3\n", "must be a table"),
        ("root_dir = 'relative'\n", "absolute"),
        ("[hypervisor\n", "cannot read"),
        ("[images]\nmax_inflation_ratio = 5\n", "images.max_inflation_ratio must be >= 10"),
        ("[images]\nmin_free_bytes = -1\n", "min_free_bytes must be >= 0"),
        ("[images]\nmin_free_percent = 100\n", "images.min_free_percent must be 0..100"),
        ("[pool]\nclasses = ['2x²']\n", "pool.classes"),  # was a ValueError from int()
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, text: str, why: str) -> None:
    f = tmp_path / "c.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=why):
        load(f, env={})


def test_bad_env_value() -> None:
    with pytest.raises(ConfigError, match="hypervisor.accel"):
        load(env={"COCOON_HYPERVISOR_ACCEL": "fast"})


def test_explicit_missing_file() -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load("/nonexistent/cocoon.toml", env={})
