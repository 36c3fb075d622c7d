"""The function service's HTTP API fuzzed against its own OpenAPI description
(schemathesis): every operation, bodies and parameters generated from the
schema and mutated past it, as the admin over TCP; no answer may be a 5xx.
No VM starts: no generated function has code a handler can run from."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from tests.servefn import Served


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    base: Path = tmp_path_factory.mktemp("fuzz")
    s = Served(base / "root", base / "state", {"COCOON_SERVE_LAUNCH_WORKERS": "1"}).start()
    yield s
    assert s.stop() == 0, s.output()


@pytest.fixture(scope="module")
def api(served: Served) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{served.url}/openapi.json")


schema = schemathesis.pytest.from_fixture("api")


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case: schemathesis.Case, served: Served) -> None:
    case.call_and_validate(
        base_url=served.url,
        headers={"Authorization": f"Bearer {served.admin_token()}"},
        checks=[not_a_server_error],
    )
