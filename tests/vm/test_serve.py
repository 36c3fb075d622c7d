"""The function service with real VMs: a shell function invoked synchronously
and asynchronously, its warm instance reused (seen from inside), a failing
and a timed-out handler reported (and the next call answered), every
instance gone when the service stops; and a kill -9 mid-invocation, after
which a restart keeps the records, marks the invocation failed and leaves no
VM behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cocoon.config import Config
from cocoon.errors import ServiceError
from cocoon.runtime.records import ContainerDir, ContainerStore
from cocoon.serve.client import Client
from tests.servefn import Served, invoke, zip_code

pytestmark = [pytest.mark.vm, pytest.mark.timeout(300)]

SCRIPT = """\
read -r line
case "$line" in
  sleep) echo "about to sleep" ; sleep 60 ;;
  fail) echo "bad input" >&2; exit 3 ;;
esac
echo "$COCOON_FN_INVOCATION_ID" >> /tmp/calls
echo "hello $line from $(hostname)"
echo "calls: $(wc -l < /tmp/calls)"
echo "logged $line" >&2
"""

WEB = """\
body=$(cat)
printf 'Status: 201 Created\\r\\nContent-Type: text/plain\\r\\nX-Handler: web\\r\\n\\r\\n'
echo "$REQUEST_METHOD $PATH_INFO $QUERY_STRING"
echo "thing=$HTTP_X_THING type=$CONTENT_TYPE auth=${HTTP_AUTHORIZATION:-none}"
echo "body=$body"
echo "host=$(hostname) calls=$(cat /tmp/calls 2>/dev/null | wc -l)"
"""


def scrape(c: Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = c.request("GET", "/metrics")
    assert r.headers["content-type"].startswith("text/plain; version=")
    return {
        (x.name, tuple(sorted(x.labels.items()))): x.value
        for family in text_string_to_metric_families(r.text)
        for x in family.samples
    }


def labels(base: dict[str, str], **more: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted({**base, **more}.items()))


def wait_for(c: Client, iid: str, done: tuple[str, ...], timeout_s: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while (rec := c.invocation("default", iid))["status"] not in done:
        assert time.monotonic() < deadline, rec
        time.sleep(0.1)
    return rec


def test_invocations_sync_async_warm_failure_timeout(
    cfg: Config, busybox: None, tmp_path: Path
) -> None:
    s = Served(cfg.root, tmp_path / "state").start()
    try:
        with s.admin() as c:
            code = zip_code({"handler.sh": SCRIPT})
            c.create("default", {"name": "echo", "handler": "handler.sh", "timeout_s": 3,
                                 "keep_alive_s": 120, "code": code})  # fmt: skip
            r = invoke(c, "echo", b"one\n")
            assert r.status_code == 200, (r.headers, r.content)
            assert r.headers["x-cocoon-status"] == "succeeded"
            assert r.headers["x-cocoon-start"] == "cold"
            lines = r.content.decode().splitlines()
            assert lines[0].startswith("hello one from ") and lines[1] == "calls: 1"
            host = lines[0].rsplit(" ", 1)[1]
            assert int(r.headers["x-cocoon-billed-ms"]) >= float(r.headers["x-cocoon-duration-ms"])

            # Warm: the same instance, and what the first call left in its /tmp.
            r = invoke(c, "echo", b"two\n")
            assert r.headers["x-cocoon-start"] == "warm"
            assert r.content.decode().splitlines() == [f"hello two from {host}", "calls: 2"]

            # `cocoon fn invoke`: the result on stdout, the handler's exit code.
            fn = [sys.executable, "-m", "cocoon.cli", "--root", str(cfg.root), "fn", "invoke"]
            ok = subprocess.run([*fn, "echo", "-d", "cli"], capture_output=True, timeout=60)
            assert ok.returncode == 0 and ok.stdout.startswith(b"hello cli from "), ok.stderr
            bad = subprocess.run([*fn, "echo"], input=b"fail\n", capture_output=True, timeout=60)
            assert bad.returncode == 3, bad.stderr
            assert bad.stderr.decode().startswith("cocoon: invocation inv-")
            assert bad.stderr.decode().endswith(" failed: the handler exited with code 3\n")

            # A failing handler: 502, its exit code and logs; the instance stays warm.
            r = invoke(c, "echo", b"fail\n")
            assert r.status_code == 502
            assert r.headers["x-cocoon-status"] == "failed"
            assert r.headers["x-cocoon-exit-code"] == "3"
            assert c.logs("default", r.headers["x-cocoon-invocation-id"]) == "bad input\n"

            # Asynchronous: an id at once, the result and logs later.
            r = c.invoke("default", "echo", b"later\n", mode="async")
            assert r.status_code == 202
            iid = r.json()["id"]
            rec = wait_for(c, iid, ("succeeded", "failed", "timeout"))
            assert rec["status"] == "succeeded" and rec["start_kind"] == "warm", rec
            assert rec["result"] == f"hello later from {host}\ncalls: 4\n"
            assert c.logs("default", iid) == "logged later\n"
            assert c.result("default", iid) == rec["result"].encode()

            # Past its timeout: killed, reported, what it wrote kept; the next
            # call is answered by a fresh instance.
            r = invoke(c, "echo", b"sleep\n")
            assert r.status_code == 504
            assert r.headers["x-cocoon-status"] == "timeout"
            assert "timed out after 3 s" in r.headers["x-cocoon-error"]
            assert r.content == b"about to sleep\n"
            r = invoke(c, "echo", b"after\n")
            assert r.status_code == 200 and r.headers["x-cocoon-start"] == "cold"
            assert r.content.decode().splitlines()[1] == "calls: 1"

            done = [x["status"] for x in c.invocations("default", "echo")]
            assert sorted(done) == sorted(
                [
                    "succeeded",
                    "succeeded",
                    "succeeded",
                    "failed",
                    "failed",
                    "succeeded",
                    "timeout",
                    "succeeded",
                ]
            )
            deadline = time.monotonic() + 30  # the timed-out one is removed (in the background)
            while len(ContainerStore(cfg).ids()) != 1:
                assert time.monotonic() < deadline, ContainerStore(cfg).ids()
                time.sleep(0.1)

            # A new version runs in instances of its own; one idle past its
            # keep-alive is removed (the old version's stays: its keep-alive).
            old = set(ContainerStore(cfg).ids())
            assert c.update("default", "echo", {"keep_alive_s": 1})["version"] == 2
            r = invoke(c, "echo", b"v2\n")
            assert r.headers["x-cocoon-start"] == "cold"
            first, calls = r.content.decode().splitlines()
            assert first.startswith("hello v2 from ") and first != f"hello v2 from {host}"
            assert calls == "calls: 1"
            assert len(set(ContainerStore(cfg).ids()) - old) == 1
            deadline = time.monotonic() + 15
            while set(ContainerStore(cfg).ids()) != old:
                assert time.monotonic() < deadline, "an idle instance outlived its keep-alive"
                time.sleep(0.2)

        # The HTTP trigger: the whole request in, as CGI; the handler's CGI
        # answer out. Another function: another sandbox (nothing of echo's).
        with s.tcp(s.admin_token()) as c:
            c.create("default", {"name": "web", "handler": "handler.sh",
                                 "code": zip_code({"handler.sh": WEB})})  # fmt: skip
            r = c.http.post(
                "/v1/namespaces/default/functions/web/http/some/path?x=1&y=2",
                content=b"payload",
                headers={"X-Thing": "yes", "Content-Type": "text/plain"},
            )
            assert r.status_code == 201, r.text
            assert r.headers["x-handler"] == "web" and r.headers["content-type"] == "text/plain"
            lines = r.text.splitlines()
            assert lines[:3] == [
                "POST /some/path x=1&y=2",
                "thing=yes type=text/plain auth=none",
                "body=payload",
            ]
            assert lines[3] != f"host={host} calls=0" and lines[3].endswith(" calls=0")
            rec = c.invocation("default", r.headers["x-cocoon-invocation-id"])
            assert rec["mode"] == "http" and rec["status"] == "succeeded"
            r = c.http.get("/v1/namespaces/default/functions/web/http")
            assert r.status_code == 201 and r.text.startswith("GET / \n")

            # Metrics: Prometheus' own parser reads them, and they count what ran.
            m = scrape(c)
            echo1 = {"namespace": "default", "function": "echo", "version": "1"}
            for status, n in (("succeeded", 5), ("failed", 2), ("timeout", 1)):
                assert m["cocoon_function_calls_total", labels(echo1, status=status)] == n
            assert m["cocoon_function_errors_total", labels(echo1)] == 3
            assert m["cocoon_function_cold_starts_total", labels(echo1)] == 2
            assert m["cocoon_function_starts_total", labels(echo1, kind="warm")] == 6
            assert m["cocoon_function_duration_seconds_count", labels(echo1)] == 8
            web = {"namespace": "default", "function": "web", "version": "1"}
            assert m["cocoon_function_calls_total", labels(web, status="succeeded")] == 2
            gb_s = m["cocoon_function_gb_seconds_total", labels(web)]
            billed = m["cocoon_function_billed_seconds_total", labels(web)]
            assert billed >= 0.2 and gb_s == pytest.approx(billed * 128 / 1024)
            meter = {(x["function"], x["version"]): x for x in c.json(
                "GET", "/v1/namespaces/default/metering")}  # fmt: skip
            assert (meter["echo", 1]["succeeded"], meter["echo", 1]["cold"]) == (5, 2)
            # Another namespace's token scrapes none of these.
            c.http.post("/v1/namespaces", json={"name": "other"})
            other = c.json("POST", "/v1/namespaces/other/tokens")["token"]
        with s.tcp(other) as o:
            assert not [k for k in scrape(o) if dict(k[1]).get("namespace") != "other"]
        with s.tcp() as anon:
            assert anon.http.get("/metrics").status_code == 401
    finally:
        assert s.stop() == 0, s.output()
    assert ContainerStore(cfg).ids() == [], "instances outlived the service"
    # The counters are the metering: a restart keeps them.
    s = Served(cfg.root, tmp_path / "state", port=s.port).start()
    try:
        with s.admin() as c:
            m = scrape(c)
        assert m["cocoon_function_calls_total", labels(echo1, status="succeeded")] == 5
        assert m["cocoon_function_gb_seconds_total", labels(web)] == pytest.approx(gb_s)
    finally:
        assert s.stop() == 0, s.output()


def test_kill_9_mid_invocation_then_restart(cfg: Config, busybox: None, tmp_path: Path) -> None:
    s = Served(cfg.root, tmp_path / "state").start()
    try:
        with s.admin() as c:
            c.create("default", {"name": "slow", "handler": "handler.sh", "timeout_s": 120,
                                 "code": zip_code({"handler.sh": SCRIPT})})  # fmt: skip
            r = c.invoke("default", "slow", b"sleep\n", mode="async")
            iid = r.json()["id"]
            wait_for(c, iid, ("running",))
            time.sleep(1.0)  # the handler runs
        assert s.proc is not None
        helpers = [int(p) for p in os.popen(f"pgrep -P {s.proc.pid}").read().split()]
    except BaseException:
        s.stop()
        raise
    assert s.stop(signal.SIGKILL) == -signal.SIGKILL
    # Its helper processes die with it; its instance is left running.
    deadline = time.monotonic() + 10
    while any(os.path.exists(f"/proc/{p}") for p in helpers):
        assert time.monotonic() < deadline, "helper processes outlived the service"
        time.sleep(0.1)
    assert len(ContainerStore(cfg).ids()) == 1

    s2 = Served(cfg.root, tmp_path / "state").start()
    try:
        assert "1 unfinished invocation(s) marked failed, 1 instance(s) removed" in s2.output()
        assert ContainerStore(cfg).ids() == []
        with s2.admin() as c:
            rec = c.invocation("default", iid)
            assert rec["status"] == "failed"
            assert "the service stopped while this invocation was queued or running" in rec["error"]
            assert c.get("default", "slow")["version"] == 1
    finally:
        assert s2.stop() == 0, s2.output()


def test_max_concurrency_and_a_bounded_queue(cfg: Config, busybox: None, tmp_path: Path) -> None:
    s = Served(cfg.root, tmp_path / "state", {"COCOON_SERVE_QUEUE_PER_FUNCTION": "1"}).start()
    code = zip_code({"handler.sh": "sleep 2; echo ok\n"})
    answers: dict[str, Any] = {}

    def call(tag: str) -> None:
        with s.admin() as c:
            try:
                answers[tag] = invoke(c, "one", b"")
            except ServiceError as e:
                answers[tag] = e

    try:
        with s.admin() as c:
            c.create("default", {"name": "one", "handler": "handler.sh", "max_concurrency": 1,
                                 "code": code})  # fmt: skip
        threads = []
        for tag in ("a", "b", "c"):  # a runs, b waits, c finds the queue full
            threads.append(threading.Thread(target=call, args=(tag,)))
            threads[-1].start()
            time.sleep(0.5)
        assert len(ContainerStore(cfg).ids()) <= 1
        for t in threads:
            t.join(120)
        assert answers["a"].status_code == 200 and answers["a"].content == b"ok\n"
        assert answers["b"].status_code == 200 and answers["b"].headers["x-cocoon-start"] == "warm"
        assert isinstance(answers["c"], ServiceError) and "(HTTP 429)" in str(answers["c"])
        assert len(ContainerStore(cfg).ids()) == 1
        with s.admin() as c:
            done = sorted((x["status"], x["error"][:9]) for x in c.invocations("default", "one"))
            m = scrape(c)
        assert done == [("failed", "throttled"), ("succeeded", ""), ("succeeded", "")]
        one = {"namespace": "default", "function": "one", "version": "1"}
        assert m["cocoon_function_throttled_total", labels(one)] == 1
        assert m["cocoon_function_calls_total", labels(one, status="succeeded")] == 2
    finally:
        assert s.stop() == 0, s.output()


def test_a_timer_fires_and_a_chain_runs_a_then_b(
    cfg: Config, busybox: None, tmp_path: Path
) -> None:
    s = Served(cfg.root, tmp_path / "state").start()
    a = "t=$(grep -o 'trg-[0-9a-f]*' | head -n 1); echo \"from-a $t\"\n"
    b = 'read -r got; echo "b got: $got"\n'
    try:
        with s.admin() as c:
            for name, script in (("a", a), ("b", b)):
                c.create("default", {"name": name, "handler": "h.sh", "keep_alive_s": 60,
                                     "code": zip_code({"h.sh": script})})  # fmt: skip
            base = "/v1/namespaces/default/functions/a/triggers"
            chain = c.json("POST", base, json={"kind": "chain", "target": "b"})["id"]
            timer = c.json("POST", base, json={"kind": "timer", "cron": "* * * * * */2"})["id"]
            deadline = time.monotonic() + 60
            while not [x for x in c.invocations("default", "b") if x["status"] == "succeeded"]:
                assert time.monotonic() < deadline, c.invocations("default", "a")
                time.sleep(0.2)
            assert c.http.delete(f"{base}/{timer}").status_code == 204
            fired = c.invocations("default", "a")
            assert fired and all(x["trigger"] == f"timer:{timer}" for x in fired), fired
            first = c.invocation("default", fired[-1]["id"])
            assert first["status"] == "succeeded" and first["result"] == f"from-a {timer}\n"
            then = [x for x in c.invocations("default", "b") if x["status"] == "succeeded"][-1]
            rec = c.invocation("default", then["id"])
            assert rec["trigger"] == f"chain:{chain}" and rec["depth"] == 1
            assert rec["result"] == f"b got: from-a {timer}\n"
    finally:
        assert s.stop() == 0, s.output()


PY = """\
import json, os, platform, time

CALLS = 0


def handle(body):
    global CALLS
    CALLS += 1
    print("a log line")
    if body == b"boom":
        raise ValueError("boom")
    if body == b"slow":
        time.sleep(60)
    req = json.loads(body)
    return {"hello": req["who"], "python": platform.python_version(), "code": os.listdir("/code"),
            "calls": CALLS, "id": os.environ["COCOON_FN_INVOCATION_ID"]}
"""


def test_a_python_function(cfg: Config, busybox: None, tmp_path: Path) -> None:
    s = Served(cfg.root, tmp_path / "state").start()
    try:
        with s.admin() as c:
            r = c.http.post("/v1/namespaces/default/functions", json={
                "name": "py", "runtime": "python", "handler": "main.nope.x",
                "code": zip_code({"main.py": PY})})  # fmt: skip
            assert r.status_code == 400 and "'main/nope.py' is not a file" in r.json()["error"]
            c.create("default", {"name": "py", "runtime": "python", "handler": "main.handle",
                                 "timeout_s": 3, "code": zip_code({"main.py": PY})})  # fmt: skip
            r = invoke(c, "py", b'{"who": "you"}')
            assert r.status_code == 200, (r.headers, r.content)
            iid = r.headers["x-cocoon-invocation-id"]
            want = {"hello": "you", "python": "3.11.2", "code": ["main.py"], "calls": 1, "id": iid}
            assert json.loads(r.content) == want
            assert c.logs("default", iid) == "a log line\n"
            # The handler loop: the same process serves the next call.
            r = invoke(c, "py", b'{"who": "again"}')
            assert r.headers["x-cocoon-start"] == "warm" and json.loads(r.content)["calls"] == 2
            r = invoke(c, "py", b"boom")
            assert r.status_code == 502 and r.headers["x-cocoon-start"] == "warm"
            assert r.headers["x-cocoon-error"] == "the handler raised ValueError: boom"
            logs = c.logs("default", r.headers["x-cocoon-invocation-id"])
            assert "Traceback" in logs and "ValueError: boom" in logs
            assert json.loads(invoke(c, "py", b'{"who": "x"}').content)["calls"] == 4
            # Past its timeout: the loop is killed with its instance; a fresh one answers.
            r = invoke(c, "py", b"slow")
            assert r.status_code == 504 and "timed out after 3 s" in r.headers["x-cocoon-error"]
            r = invoke(c, "py", b'{"who": "y"}')
            assert r.headers["x-cocoon-start"] == "cold" and json.loads(r.content)["calls"] == 1
            # A handler that cannot be imported: the call says why.
            c.update("default", "py", {"code": zip_code({"main.py": "def handle(:\n"})})
            r = invoke(c, "py", b"{}")
            assert r.status_code == 502, r.headers
            assert "the handler could not be loaded" in r.headers["x-cocoon-error"]
            assert "SyntaxError" in r.headers["x-cocoon-error"]
    finally:
        assert s.stop() == 0, s.output()


def test_twenty_at_once_within_max_concurrency_and_a_memory_limit(
    cfg: Config, busybox: None, tmp_path: Path
) -> None:
    s = Served(cfg.root, tmp_path / "state").start()
    script = """\
read -r what
if [ "$what" = hog ]; then exec dd if=/dev/zero of=/dev/null bs=200M count=1 2>/dev/null; fi
echo "$what $(hostname)"
"""
    answers: list[Any] = []

    def call(i: int) -> None:
        with s.admin() as c:
            answers.append((i, invoke(c, "many", f"n{i}\n".encode())))

    try:
        with s.admin() as c:
            # The hog (the handler's own process: the loop reports an OOM kill
            # of the handler) fills one 200 MiB buffer in one read(2) of
            # /dev/zero: a shell growing a string through a pipe instead
            # thrashed its few file pages under TCG (the kernel reclaimed and
            # refaulted its own text between charges) for minutes before any
            # OOM kill, twice in CI. (A long timeout all the same: TCG is slow.)
            c.create("default", {"name": "many", "handler": "h.sh", "max_concurrency": 3,
                                 "memory_mib": 64, "timeout_s": 120,
                                 "code": zip_code({"h.sh": script})})  # fmt: skip
        threads = [threading.Thread(target=call, args=(i,)) for i in range(20)]
        for t in threads:
            t.start()
        peak = 0
        while any(t.is_alive() for t in threads):
            peak = max(peak, len(ContainerStore(cfg).ids()))
            time.sleep(0.05)
        assert len(answers) == 20 and peak <= 3
        hosts = set()
        for i, r in answers:
            assert r.status_code == 200, (i, r.headers)
            word, host = r.content.decode().split()
            assert word == f"n{i}"
            hosts.add(host)
        assert 1 <= len(hosts) <= 3
        # Past its memory: killed, reported as such; the next call is answered.
        with s.admin() as c:
            r = invoke(c, "many", b"hog\n")
            assert r.status_code == 502, r.headers
            assert "out of memory" in r.headers["x-cocoon-error"], r.headers
            r = invoke(c, "many", b"after\n")
            assert r.status_code == 200 and r.content.startswith(b"after ")
    finally:
        assert s.stop() == 0, s.output()


@pytest.mark.parametrize("path", ["copy", "cold"])
def test_the_other_start_paths(cfg: Config, busybox: None, tmp_path: Path, path: str) -> None:
    """serve.start_path: "copy" puts the code in the container (no mount at
    /code); "cold" boots a VM for the instance (no template)."""
    s = Served(cfg.root, tmp_path / "state", {"COCOON_SERVE_START_PATH": path}).start()
    script = "echo \"$(cat /code/data.txt) $(grep -c ' /code ' /proc/mounts)\"\n"
    try:
        with s.admin() as c:
            code = zip_code({"h.sh": script, "data.txt": "payload"})
            c.create("default", {"name": "paths", "handler": "h.sh", "code": code})
            r = invoke(c, "paths")
            assert r.status_code == 200, r.headers
            assert r.content == (b"payload 0\n" if path == "copy" else b"payload 1\n")
            store = ContainerStore(cfg)
            [cid] = store.ids()
            template = ContainerDir(store.root, cid).state().template
            assert bool(template) == (path == "copy")
            assert invoke(c, "paths").headers["x-cocoon-start"] == "warm"
    finally:
        assert s.stop() == 0, s.output()


BYTES = """\
what=$(dd bs=4 count=1 2>/dev/null)
case "$what" in
  echo) cat; printf 'err\\000x' >&2 ;;
  skip) echo "skipped $COCOON_FN_VERSION" ;;
  boom) echo partial; exit 7 ;;
  envs) printf '%s|%s' "${#BIG}" "$ODD" ;;
  ppid) cat "/proc/$PPID/cmdline" 2>/dev/null | grep -c cocoon-shloop ;;
  vars) echo "$SHLVL ${OLDPWD:-none} $(pwd)" ;;
  hdrs) printf 'Content-Type: text/plain\\n\\n%s %s' "${#HTTP_X_BIG}" "$PATH_INFO" ;;
esac
"""


@pytest.mark.parametrize("loop", ["true", "false"])
def test_a_shell_function_carries_any_bytes(
    cfg: Config, busybox: None, tmp_path: Path, loop: str
) -> None:
    """Through the shell loop (serve.shell_loop) as through an exec per call:
    any bytes in and out, an input the handler leaves unread (more than a
    pipe holds) gone with its call, an exit code with what was written."""
    s = Served(cfg.root, tmp_path / "state", {"COCOON_SERVE_SHELL_LOOP": loop}).start()
    data = bytes(range(256)) * 1024
    try:
        with s.admin() as c:
            env = {"BIG": "x" * 3000, "ODD": 'a\'b\n"c" $d `e`\\'}
            c.create("default", {"name": "bytes", "handler": "h.sh", "env": env,
                                 "code": zip_code({"h.sh": BYTES})})  # fmt: skip
            r = invoke(c, "bytes", b"echo" + data)
            assert r.status_code == 200 and r.content == data, r.headers
            assert c.logs("default", r.headers["x-cocoon-invocation-id"]) == "err\x00x"
            r = invoke(c, "bytes", b"skip" + data)
            assert r.content == b"skipped 1\n" and r.headers["x-cocoon-start"] == "warm"
            r = invoke(c, "bytes", b"boom")
            assert r.status_code == 502 and r.headers["x-cocoon-exit-code"] == "7"
            assert r.content == b"partial\n"
            r = invoke(c, "bytes", b"echo")
            assert r.status_code == 200 and r.content == b"", r.headers
            # A mark-like line is output like any other.
            r = invoke(c, "bytes", b"echo" + b"0123456789abcdef" * 2 + b" 0 0\n")
            assert r.content == b"0123456789abcdef" * 2 + b" 0 0\n"
            assert r.headers["x-cocoon-start"] == "warm"
            # The loop is the handler's parent (or not: an exec per call).
            assert invoke(c, "bytes", b"ppid").content == (b"1\n" if loop == "true" else b"0\n")
            # The version's environment and a call's (long, and odd) as an exec's,
            # and nothing of the loop's.
            assert invoke(c, "bytes", b"vars").content == b"1 none /code\n"
            assert invoke(c, "bytes", b"envs").content == f"3000|{env['ODD']}".encode()
            r = c.http.post("/v1/namespaces/default/functions/bytes/http/a%20b'c", content=b"hdrs",
                            headers={"X-Big": "y" * 2000})  # fmt: skip
            assert r.status_code == 200 and r.text == "2000 /a b'c", r.text
    finally:
        assert s.stop() == 0, s.output()


PROBE = """\
cat /code/data.txt
ls /code | tr '\\n' ' '; echo
grep ' /code ' /proc/mounts | cut -d' ' -f4 | cut -d, -f1
touch /code/new 2>/dev/null && echo writable || echo refused
hostname
"""


def test_prewarmed_instances_take_the_code_mounted_in(
    cfg: Config, busybox: None, tmp_path: Path
) -> None:
    """With a warm pool, serve.prewarm keeps a blank instance started: a new
    function's first call is served by it (its container there before the
    function), the code read-only at /code; a second function takes another
    blank, never the first one's; the blanks refill; a Python function's
    loop starts once its code is in; nothing is left after."""
    coc = [sys.executable, "-m", "cocoon.cli", "--root", str(cfg.root)]
    with open(tmp_path / "pool.log", "wb") as pool_log:
        pool = subprocess.Popen([*coc, "pool", "serve", "--size", "1"], stderr=pool_log)
    s: Served | None = None
    try:
        deadline = time.monotonic() + 60
        while not (cfg.root / "pool.sock").exists():
            assert time.monotonic() < deadline and pool.poll() is None, "no pool server"
            time.sleep(0.1)
        s = Served(cfg.root, tmp_path / "state").start()
        store = ContainerStore(cfg)
        seen: list[str] = []
        with s.admin() as c:
            for name in ("a", "b"):
                assert s.prewarmed() == 1
                [blank] = [cid for cid in store.ids() if cid[:12] not in seen]
                code = zip_code({"h.sh": PROBE, "data.txt": f"payload {name}\n"})
                c.create("default", {"name": name, "handler": "h.sh", "code": code})
                r = invoke(c, name)
                assert r.status_code == 200, (r.headers, r.content)
                assert r.headers["x-cocoon-start"] == "prewarmed"
                rec = c.invocation("default", r.headers["x-cocoon-invocation-id"])
                assert rec["start_kind"] == "prewarmed"
                lines = r.content.decode().splitlines()
                # Its own code only, read-only in the guest and on the host.
                assert lines == [f"payload {name}", "data.txt h.sh ", "ro", "refused", blank[:12]]
                seen.append(blank[:12])
                slots = [x.split() for x in Path("/proc/self/mountinfo").read_text().splitlines()]
                # Every code slot (and blank's empty one) is read-only on the host too.
                code = [f for f in slots if f[4].startswith(f"{cfg.root}/hubs/") and
                        f[4].endswith("/0")]  # fmt: skip
                assert len(code) >= 2 and all(f[5].split(",")[0] == "ro" for f in code)
                assert invoke(c, name).headers["x-cocoon-start"] == "warm"
            assert s.prewarmed() == 1  # refilled once more
            # A Python function: the runtime is pre-warmed once one is
            # deployed, and the handler loop starts after the code is in.
            src = "def handle(body):\n    return open('/code/data.txt').read()\n"
            code = zip_code({"main.py": src, "data.txt": "from python"})
            c.create("default", {"name": "py", "runtime": "python", "handler": "main.handle",
                                 "code": code})  # fmt: skip
            assert s.prewarmed(2) == 2
            r = invoke(c, "py")
            assert r.headers["x-cocoon-start"] == "prewarmed" and r.content == b"from python"
            metrics = scrape(c)
            base = {"namespace": "default", "function": "a", "version": "1"}
            assert metrics[("cocoon_function_cold_starts_total", labels(base))] == 1
    finally:
        try:
            if s is not None:
                assert s.stop() == 0, s.output()
        finally:
            pool.terminate()
            pool.wait(timeout=60)
    assert ContainerStore(cfg).ids() == []
    assert not any((cfg.root / "hubs").iterdir())
