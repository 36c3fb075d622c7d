"""The function service over real HTTP, without VMs: functions' CRUD and
versions, refusals (hostile, oversized and corrupt code, bad names, bad JSON),
tokens and namespaces, and its state across a kill -9. Invocations, which
need VMs, are in tests/vm/test_serve.py."""

from __future__ import annotations

import base64
import os
import signal
import stat
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cocoon.errors import ServiceError
from tests.servefn import Served, entry, tgz_code, zip_code

HANDLER = {"handler.sh": "cat; echo done\n"}
ENV = {"COCOON_SERVE_MAX_CODE_BYTES": str(256 << 10), "COCOON_SERVE_LAUNCH_WORKERS": "1"}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    base = tmp_path_factory.mktemp("serve")
    s = Served(base / "root", base / "state", ENV).start()
    yield s
    assert s.stop() == 0, s.output()


def fn(name: str, code: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
    return {"name": name, "handler": "handler.sh", "code": code or zip_code(HANDLER), **kw}


def post(c: Any, body: Any, ns: str = "default") -> httpx.Response:
    return c.http.post(f"/v1/namespaces/{ns}/functions", json=body)


def test_listeners_and_admin_token_are_root_only(served: Served) -> None:
    assert stat.S_IMODE(os.stat(served.socket).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(served.state / "admin.token").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(served.state).st_mode) == 0o700
    with served.tcp() as c:
        spec = c.http.get("/openapi.json").json()
    assert "/v1/namespaces/{ns}/functions/{name}/invoke" in spec["paths"]
    # One service per state dir, and per socket: a second is refused in one line.
    import subprocess
    import sys

    serve = [sys.executable, "-m", "cocoon.cli", "--root", str(served.root), "serve"]
    other = ["--state-dir", str(served.state) + "2"]
    for extra, why in (([], "another `cocoon serve` uses"), (other, "is listening there")):
        r = subprocess.run([*serve, "--state-dir", str(served.state), *extra],
                           capture_output=True, timeout=60)  # fmt: skip
        assert r.returncode == 125 and why.encode() in r.stderr, r.stderr
        assert r.stderr.count(b"\n") == 1


def test_create_get_update_list_delete(served: Served) -> None:
    with served.admin() as c:
        f = c.create("default", fn("crud", timeout_s=5, env={"A": "1"}))
        assert (f["version"], f["runtime"], f["memory_mib"], f["timeout_s"]) == (1, "shell", 128, 5)
        assert f["code"]["kind"] == "archive" and f["code"]["format"] == "zip"
        tree = served.state / "code" / f["code"]["digest"]
        assert (tree / "handler.sh").read_text() == HANDLER["handler.sh"]
        # An update is a new immutable version; what it does not name is kept.
        g = c.update("default", "crud", {"memory_mib": 256})
        assert (g["version"], g["memory_mib"], g["timeout_s"], g["env"]) == (2, 256, 5, {"A": "1"})
        assert g["versions"] == [1, 2] and g["code"] == f["code"]
        code2 = tgz_code([(entry("handler.sh"), b"echo two\n")])
        h = c.update("default", "crud", {"code": code2})
        assert h["version"] == 3 and h["code"]["format"] == "tar.gz"
        v1 = c.json("GET", "/v1/namespaces/default/functions/crud", params={"version": 1})
        assert (v1["version"], v1["memory_mib"], v1["code"]) == (1, 128, f["code"])
        assert [x["name"] for x in c.functions("default")].count("crud") == 1
        c.delete("default", "crud")
        with pytest.raises(ServiceError, match="no such function: crud"):
            c.get("default", "crud")
        assert not tree.exists(), "unused code is removed with the function"


@pytest.mark.parametrize(
    "body, status, message",
    [
        (fn("Bad_Name"), 400, "invalid function name 'Bad_Name'"),
        (fn("-x"), 400, "invalid function name"),
        (fn("a" * 64), 400, "invalid function name"),
        (fn("x", runtime="cobol"), 400, "unknown runtime 'cobol'"),
        (fn("x", memory_mib=1), 400, "memory_mib: Input should be greater than or equal to 64"),
        (fn("x", env={"1BAD": "x"}), 400, "invalid environment variable name '1BAD'"),
        (fn("x", memmory_mib=256), 400, "unknown field 'memmory_mib'"),
        ({"name": "x", "code": zip_code(HANDLER)}, 400, "handler is required"),
        (fn("x", handler="nope.sh"), 400, "handler 'nope.sh' is not a file in the code"),
        (fn("x", handler="../etc/passwd"), 400, "'..' in path"),
        (fn("x", {"format": "zip", "data": "%%%"}), 400, "not valid base64"),
        (fn("x", {"format": "zip", "data": base64.b64encode(b"junk").decode()}), 400,
         "said to be a zip archive, but is not one"),
        (fn("x", {"data": "eA=="}), 400, "code.format is required"),
        ([1, 2], 400, "the body: Input should be a valid dictionary"),
    ],
)  # fmt: skip
def test_bad_input_is_one_4xx_and_nothing_is_stored(
    served: Served, body: Any, status: int, message: str
) -> None:
    with served.admin() as c:
        before = sorted(os.listdir(served.state / "code"))
        r = post(c, body)
        assert r.status_code == status, r.text
        assert message in r.json()["error"], r.json()
        assert r.json().keys() == {"error"}
        assert "x" not in [f["name"] for f in c.functions("default")]
        assert sorted(os.listdir(served.state / "code")) == before


def test_bad_json_and_oversized_bodies(served: Served) -> None:
    with served.admin() as c:
        r = c.http.post(
            "/v1/namespaces/default/functions",
            content=b'{"name": "x",',
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
        big = zip_code({"handler.sh": os.urandom(300 << 10)})  # over the 256 KiB cap
        r = post(c, fn("big", big))
        assert r.status_code == 413 and "serve.max_code_bytes" in r.json()["error"], r.text
        r = c.http.post("/v1/namespaces/default/functions", content=b"x" * (7 << 20))
        assert r.status_code == 413
        # Found by the fuzz: a version past SQLite's integers was a 500.
        for method in ("GET", "POST"):
            path = "/v1/namespaces/default/functions/x" + ("/invoke" if method == "POST" else "")
            r = c.http.request(method, path, params={"version": 2**70})
            assert r.status_code == 400 and r.json()["error"].startswith("version: "), r.text
        assert "big" not in [f["name"] for f in c.functions("default")]


def test_hostile_archives_are_refused_with_nothing_written_outside(
    served: Served, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    target = str(outside / "pwned")
    hostile = [
        zip_code({"../../../../../../" + target.lstrip("/"): "x", **HANDLER}),
        zip_code({target: "x", **HANDLER}),
        tgz_code([(entry("handler.sh"), b"x"), (entry("../pwned"), b"x")]),
        tgz_code([(entry("link", tarfile.SYMTYPE, str(outside)), None),
                  (entry("link/pwned"), b"x")]),
        tgz_code([(entry("handler.sh", tarfile.LNKTYPE, "/etc/passwd"), None)]),
        tgz_code([(entry("dev", tarfile.CHRTYPE), None), (entry("handler.sh"), b"x")]),
        # Decompression bombs: 40 MiB of zeros in ~40 KiB.
        zip_code({"handler.sh": "x", "zeros": bytes(40 << 20)}),
        tgz_code([(entry("handler.sh"), b"x"), (entry("zeros"), bytes(40 << 20))]),
    ]  # fmt: skip
    with served.admin() as c:
        before = sorted(os.listdir(served.state / "code"))
        for i, code in enumerate(hostile):
            r = post(c, fn(f"hostile{i}", code))
            assert r.status_code == 400, (i, r.text)
            assert "code archive" in r.json()["error"] or "bomb" in r.json()["error"], r.text
        assert not os.listdir(outside)
        assert sorted(os.listdir(served.state / "code")) == before
        assert not [f for f in c.functions("default") if f["name"].startswith("hostile")]


def test_tokens_and_namespaces(served: Served) -> None:
    admin = served.admin_token()
    with served.tcp() as anon:
        r = anon.http.get("/v1/namespaces/default/functions")
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        r = anon.http.get("/v1/namespaces", headers={"Authorization": "Bearer cct_nope"})
        assert r.status_code == 401
    with served.tcp(admin) as c:
        for ns in ("team-a", "team-b"):
            assert c.http.post("/v1/namespaces", json={"name": ns}).status_code == 201
        assert c.http.post("/v1/namespaces", json={"name": "team-a"}).status_code == 409
        assert c.http.post("/v1/namespaces", json={"name": "Team"}).status_code == 400
        ta = c.json("POST", "/v1/namespaces/team-a/tokens")["token"]
        tb = c.json("POST", "/v1/namespaces/team-b/tokens")["token"]
        c.create("team-a", fn("secret"))
    with served.tcp(ta) as a, served.tcp(tb) as b:
        assert [f["name"] for f in a.functions("team-a")] == ["secret"]
        assert [n["name"] for n in a.json("GET", "/v1/namespaces")] == ["team-a"]
        # Across namespaces: 403 before anything is looked up, whatever the verb.
        for method, path in [
            ("GET", "/v1/namespaces/team-a/functions"),
            ("GET", "/v1/namespaces/team-a/functions/secret"),
            ("DELETE", "/v1/namespaces/team-a/functions/secret"),
            ("POST", "/v1/namespaces/team-a/functions/secret/invoke"),
            ("GET", "/v1/namespaces/team-a/invocations/inv-0"),
            ("PUT", "/v1/namespaces/team-a/functions/secret"),
        ]:
            r = b.http.request(method, path, json={} if method == "PUT" else None)
            assert r.status_code == 403, (method, path, r.text)
        # A namespace token issues no tokens, makes no namespaces, reads no host dirs.
        assert b.http.post("/v1/namespaces/team-b/tokens").status_code == 403
        assert b.http.post("/v1/namespaces", json={"name": "team-c"}).status_code == 403
        r = post(b, fn("dev", {"host_dir": "/etc"}), "team-b")
        assert r.status_code == 403 and "admin only" in r.json()["error"]
        assert a.get("team-a", "secret")["version"] == 1  # still there
        # Its own namespace: everything.
        assert b.create("team-b", fn("mine"))["version"] == 1
        b.delete("team-b", "mine")
    with served.tcp(admin) as c:
        tok = c.json("GET", "/v1/namespaces/team-a/tokens")[0]["id"]
        assert c.http.delete(f"/v1/tokens/{tok}").status_code == 204
        assert c.http.delete("/v1/namespaces/team-a").status_code == 409  # has a function
        c.delete("team-a", "secret")
        assert c.http.delete("/v1/namespaces/team-a").status_code == 204
    with served.tcp(ta) as a:
        assert a.http.get("/v1/namespaces/team-a/functions").status_code == 401


def _writing_under(d: Path) -> list[str]:
    """Processes whose stdout is a file below ``d`` (a service's, and what it started)."""
    out = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if Path(os.readlink(proc / "fd" / "1")).is_relative_to(d):
                out.append(f"{proc.name}: {(proc / 'cmdline').read_bytes()[:80]!r}")
        except OSError:
            continue
    return out


def test_state_survives_kill_9(tmp_path: Path) -> None:
    s = Served(tmp_path / "root", tmp_path / "state", ENV).start()
    with s.admin() as c:
        c.create("default", fn("keep"))
        c.update("default", "keep", {"timeout_s": 7})
        token = c.json("POST", "/v1/namespaces/default/tokens")["token"]
        base = "/v1/namespaces/default/functions/keep/triggers"
        timer = c.json("POST", base, json={"kind": "timer", "cron": "0 0 1 1 *"})
        chain = c.json("POST", base, json={"kind": "chain", "target": "keep", "on": "failed"})
    admin = s.admin_token()
    assert s.stop(signal.SIGKILL) == -signal.SIGKILL
    # its launch helpers go with it (PR_SET_PDEATHSIG; one that was still
    # starting when the service died sees it and goes too)
    deadline = time.monotonic() + 10
    while left := _writing_under(tmp_path):
        assert time.monotonic() < deadline, f"outlived the service: {left}"
        time.sleep(0.1)
    s2 = Served(tmp_path / "root", tmp_path / "state", ENV, port=s.port).start()
    try:
        with s2.tcp(token) as c:
            f = c.get("default", "keep")
            assert (f["version"], f["timeout_s"], f["versions"]) == (2, 7, [1, 2])
            assert sorted(t["id"] for t in c.json("GET", base)) == sorted(
                [timer["id"], chain["id"]]
            )
        assert s2.admin_token() == admin  # the same admin token
        with s2.tcp(admin) as c:
            assert c.get("default", "keep")["version"] == 2
    finally:
        assert s2.stop() == 0, s2.output()


def test_cli_errors_follow_docker(served: Served, tmp_path: Path) -> None:
    import subprocess
    import sys

    code = tmp_path / "code"
    code.mkdir()
    (code / "handler.sh").write_text("cat\n")
    base = [sys.executable, "-m", "cocoon.cli", "--root", str(served.root), "fn"]
    r = subprocess.run([*base, "deploy", "cli-fn", "--code", str(code), "--handler",
                        "handler.sh"], capture_output=True, timeout=60)  # fmt: skip
    assert r.returncode == 0 and r.stdout == b"cli-fn version 1\n", r.stderr
    r = subprocess.run([*base, "deploy", "cli-fn", "--code", str(code), "--handler",
                        "handler.sh"], capture_output=True, timeout=60)  # fmt: skip
    assert r.returncode == 1
    assert (
        r.stderr.decode().strip() == "cocoon: function cli-fn exists: update it instead (HTTP 409)"
    )
    r = subprocess.run([*base, "ls", "-q"], capture_output=True, timeout=60)
    assert b"cli-fn\n" in r.stdout
    r = subprocess.run([*base, "triggers", "cli-fn", "--cron", "0 0 1 1 *"], capture_output=True,
                       timeout=60)  # fmt: skip
    assert r.returncode == 0 and r.stdout.startswith(b"trg-"), r.stderr
    tid = r.stdout.decode().strip()
    r = subprocess.run([*base, "triggers", "cli-fn"], capture_output=True, timeout=60)
    assert r.returncode == 0 and f"{tid}   timer   0 0 1 1 *".encode() in r.stdout, r.stdout
    r = subprocess.run([*base, "triggers", "cli-fn", "--cron", "nonsense"], capture_output=True,
                       timeout=60)  # fmt: skip
    assert r.returncode == 1
    assert r.stderr == b"cocoon: invalid cron expression 'nonsense' (HTTP 400)\n", r.stderr
    r = subprocess.run([*base, "triggers", "cli-fn", "--rm", tid], capture_output=True, timeout=60)
    assert r.returncode == 0 and r.stdout.decode().strip() == tid
    r = subprocess.run([*base, "rm", "cli-fn"], capture_output=True, timeout=60)
    assert r.returncode == 0
    r = subprocess.run([*base, "--url", "http://127.0.0.1:1", "ls"], capture_output=True,
                       timeout=60)  # fmt: skip
    assert r.returncode == 125 and b"cannot reach the function service" in r.stderr
    r = subprocess.run([*base, "--url", served.url, "ls"], capture_output=True, timeout=60)
    assert r.returncode == 1 and b"a valid bearer token is required" in r.stderr
    r = subprocess.run([*base, "--url", served.url, "--token", served.admin_token(), "inspect",
                        "nope"], capture_output=True, timeout=60)  # fmt: skip
    assert r.returncode == 1
    assert r.stderr.decode().strip() == "cocoon: no such function: nope (HTTP 404)"


def test_cgi_request_and_answer() -> None:
    from cocoon.serve import cgi

    env = cgi.request_env(
        "PUT", "/a/b", "q=1", [("Authorization", "Bearer cct_x"), ("Content-Type", "text/x"),
                               ("X-A", "1"), ("x-a", "2"), ("Content-Length", "9")], 3, "1.2.3.4",
    )  # fmt: skip
    assert "REQUEST_METHOD=PUT" in env and "PATH_INFO=/a/b" in env and "QUERY_STRING=q=1" in env
    assert "CONTENT_TYPE=text/x" in env and "CONTENT_LENGTH=3" in env and "HTTP_X_A=1, 2" in env
    assert not [e for e in env if "cct_x" in e or e.startswith("HTTP_CONTENT")]
    assert cgi.parse_response(b"Status: 404 Nope\r\nX-B: c\r\nConnection: close\r\n\r\nbody") == (
        404, [("X-B", "c")], b"body",
    )  # fmt: skip
    assert cgi.parse_response(b"Content-Type: text/plain\n\nhi\n\nthere") == (
        200, [("Content-Type", "text/plain")], b"hi\n\nthere",
    )  # fmt: skip
    for bad in (b"just a body", b"no colon here\n\nx", b"Status: 99\n\n", b"X: a\x01b\n\nx"):
        with pytest.raises(cgi.NotCgi):
            cgi.parse_response(bad)


def test_metrics_need_a_token_and_parse(served: Served) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    with served.tcp() as anon:
        assert anon.http.get("/metrics").status_code == 401
    with served.tcp(served.admin_token()) as c:
        r = c.request("GET", "/metrics")
        names = {f.name for f in text_string_to_metric_families(r.text)}
        assert {"cocoon_function_calls", "cocoon_function_duration_seconds"} <= names
        assert c.json("GET", "/v1/namespaces/default/metering") == []


def test_triggers_are_checked_listed_removed_and_end_with_their_functions(served: Served) -> None:
    with served.admin() as c:
        for name in ("ta", "tb"):
            c.create("default", fn(name))
        base = "/v1/namespaces/default/functions/ta/triggers"
        for body, status, message in [
            ({"kind": "timer", "cron": "every minute"}, 400, "invalid cron expression"),
            ({"kind": "timer"}, 400, "a timer trigger needs cron"),
            ({"kind": "chain", "target": "Nope"}, 400, "invalid function name"),
            ({"kind": "chain", "target": "missing"}, 404, "no such function: missing"),
            ({"kind": "chain", "target": "tb", "on": "maybe"}, 400, "on: Input should be"),
            ({"kind": "webhook"}, 400, "kind: Input should be"),
        ]:
            r = c.http.post(base, json=body)
            assert (r.status_code, r.json()["error"][: len(message)]) == (status, message)
        yearly = c.json("POST", base, json={"kind": "timer", "cron": "0 0 1 1 *"})
        assert yearly["next_fire"] > time.time() and yearly["last_fired"] is None
        chain = c.json("POST", base, json={"kind": "chain", "target": "tb", "on": "any"})
        got = {t["id"]: t for t in c.json("GET", base)}
        assert got[chain["id"]]["target"] == "tb" and got[yearly["id"]]["cron"] == "0 0 1 1 *"
        assert c.http.delete(f"{base}/{yearly['id']}").status_code == 204
        assert c.http.delete(f"{base}/{yearly['id']}").status_code == 404
        # Removing a chain's target removes the chain; removing a function, its triggers.
        c.delete("default", "tb")
        assert c.json("GET", base) == []
        c.delete("default", "ta")
