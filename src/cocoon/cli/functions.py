"""`cocoon serve` and `cocoon fn`: the function service and its client.

`serve` runs the service in the foreground (cocoon.serve.server); `fn`
talks to it over its unix socket, or to ``--url`` with ``--token`` (also
``$COCOON_SERVE_URL``, ``$COCOON_TOKEN``). Errors follow docker's client: the
service's refusal is one line and exit 1, an unreachable service 125, and a
failed invocation exits with the handler's own code.
"""

from __future__ import annotations

import base64
import io
import json
import os
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import click

from cocoon.cli.main import State, cli
from cocoon.errors import FunctionFailed, UsageError
from cocoon.serve.client import Client
from cocoon.util.units import parse_size


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@cli.command("serve")
@click.option(
    "--listen",
    default=None,
    metavar="IP:PORT",
    help="Also listen on TCP (bearer tokens required there); default: serve.listen.",
)
@click.option(
    "--socket",
    "socket_path",
    default=None,
    metavar="PATH",
    help="The root-only unix socket (default: <root>/serve.sock).",
)
@click.option("--state-dir", default=None, metavar="DIR",
              help="Database, admin token, code (default: <data-dir>/serve).")  # fmt: skip
@click.pass_obj
def serve(state: State, listen: str | None, socket_path: str | None, state_dir: str | None) -> None:
    """Run the function service in the foreground (SIGTERM or Ctrl-C stops it
    and removes every instance it started)."""
    from cocoon.serve import server

    cfg = state.cfg
    if socket_path is not None:
        cfg.serve.socket = os.path.abspath(socket_path)
    if state_dir is not None:
        cfg.serve.state_dir = os.path.abspath(state_dir)
    server.serve(cfg, cfg.serve.listen if listen is None else listen, _say)


class Fn:
    def __init__(self, state: State, url: str, token: str, namespace: str) -> None:
        self.state = state
        self.url = url
        self.token = token
        self.ns = namespace

    def client(self) -> Client:
        from cocoon.serve.server import socket_path

        if self.url:
            return Client(url=self.url, token=self.token)
        return Client(socket=socket_path(self.state.cfg), token=self.token)


@cli.group("fn")
@click.option(
    "--url",
    envvar="COCOON_SERVE_URL",
    default="",
    metavar="URL",
    help="The service over TCP, e.g. http://127.0.0.1:8700 (default: its unix socket).",
)
@click.option("--token", envvar="COCOON_TOKEN", default="", help="Bearer token (TCP).")
@click.option("-n", "--namespace", envvar="COCOON_NAMESPACE", default="default",
              show_default=True)  # fmt: skip
@click.pass_context
def fn(ctx: click.Context, url: str, token: str, namespace: str) -> None:
    """Functions on the function service (`cocoon serve`)."""
    ctx.obj = Fn(ctx.obj, url, token, namespace)


def _code(path: str, host_dir: bool) -> dict[str, Any]:
    p = Path(path)
    if host_dir:
        if not p.is_dir():
            raise UsageError(f"--host-dir: {path} is not a directory")
        return {"host_dir": str(p.resolve())}
    if p.is_dir():
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tf:
            for child in sorted(p.iterdir()):
                tf.add(child, arcname=child.name)
        return {"format": "tar.gz", "data": base64.b64encode(buf.getvalue()).decode()}
    try:
        data = p.read_bytes()
    except OSError as e:
        raise UsageError(f"--code {path}: {e.strerror}") from None
    fmt = "zip" if data.startswith(b"PK") else "tar.gz"
    return {"format": fmt, "data": base64.b64encode(data).decode()}


def _settings(
    runtime: str | None,
    handler: str | None,
    memory: str | None,
    cpus: int | None,
    timeout: float | None,
    envs: tuple[str, ...],
    max_concurrency: int | None,
    keep_alive: float | None,
) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if runtime is not None:
        body["runtime"] = runtime
    if handler is not None:
        body["handler"] = handler
    if memory is not None:
        try:
            body["memory_mib"] = parse_size(memory) >> 20
        except ValueError as e:
            raise UsageError(f"--memory: {e}") from None
    if cpus is not None:
        body["vcpus"] = cpus
    if timeout is not None:
        body["timeout_s"] = timeout
    if envs:
        env = {}
        for item in envs:
            k, eq, v = item.partition("=")
            if not eq:
                raise UsageError(f"-e {item!r}: use KEY=VALUE")
            env[k] = v
        body["env"] = env
    if max_concurrency is not None:
        body["max_concurrency"] = max_concurrency
    if keep_alive is not None:
        body["keep_alive_s"] = keep_alive
    return body


def _function_options(f: Any) -> Any:
    opts = [
        click.option("--code", "code_path", metavar="ZIP|TAR.GZ|DIR",
                     help="The code: an archive, or a directory (sent as a tar.gz)."),
        click.option("--host-dir", is_flag=True,
                     help="Use the --code directory in place on the host (admin; development)."),
        click.option("--runtime", default=None, help="shell (default)."),
        click.option("--handler", default=None, help="The handler's file in the code."),
        click.option("--memory", "-m", default=None, metavar="SIZE", help="e.g. 128m."),
        click.option("--cpus", type=int, default=None, help="vCPUs."),
        click.option("--timeout", type=float, default=None, metavar="SECONDS"),
        click.option("-e", "--env", "envs", multiple=True, metavar="K=V"),
        click.option("--max-concurrency", type=int, default=None),
        click.option("--keep-alive", type=float, default=None, metavar="SECONDS",
                     help="How long an idle instance stays warm."),
    ]  # fmt: skip
    for o in reversed(opts):
        f = o(f)
    return f


@fn.command("deploy")
@_function_options
@click.argument("name")
@click.pass_obj
def deploy(obj: Fn, /, name: str, code_path: str | None, host_dir: bool, **kw: Any) -> None:
    """Create function NAME (version 1)."""
    if not code_path:
        raise UsageError("deploy needs --code")
    body = {"name": name, **_settings(**kw), "code": _code(code_path, host_dir)}
    with obj.client() as c:
        f = c.create(obj.ns, body)
    click.echo(f"{f['name']} version {f['version']}")


@fn.command("update")
@_function_options
@click.argument("name")
@click.pass_obj
def update(obj: Fn, /, name: str, code_path: str | None, host_dir: bool, **kw: Any) -> None:
    """A new version of NAME: what is given changes, the rest is kept."""
    body = _settings(**kw)
    if code_path:
        body["code"] = _code(code_path, host_dir)
    with obj.client() as c:
        f = c.update(obj.ns, name, body)
    click.echo(f"{f['name']} version {f['version']}")


@fn.command("invoke")
@click.option("--async", "is_async", is_flag=True, help="Print the invocation's id at once.")
@click.option("-d", "--data", default=None, help="The input (default: stdin, if not a terminal).")
@click.option("--version", "fversion", type=int, default=None, help="A version (default: latest).")
@click.argument("name")
@click.pass_obj
def invoke(obj: Fn, is_async: bool, data: str | None, fversion: int | None, name: str) -> None:
    """Call NAME: its result on stdout; exit with its handler's exit code."""
    if data is not None:
        payload = data.encode()
    elif not sys.stdin.isatty():
        payload = sys.stdin.buffer.read()
    else:
        payload = b""
    with obj.client() as c:
        r = c.invoke(obj.ns, name, payload, mode="async" if is_async else "sync", version=fversion)
    if is_async:
        click.echo(r.json()["id"])
        return
    sys.stdout.buffer.write(r.content)
    sys.stdout.flush()
    status = r.headers.get("x-cocoon-status", "")
    if status != "succeeded":
        iid = r.headers.get("x-cocoon-invocation-id", "")
        err = r.headers.get("x-cocoon-error", status)
        code = r.headers.get("x-cocoon-exit-code", "")
        exit_code = 124 if status == "timeout" else int(code) if code.isdigit() else 1
        raise FunctionFailed(f"invocation {iid} {status}: {err}", exit_code or 1)


@fn.command("logs")
@click.option("--limit", type=int, default=20, help="With a function: how many invocations.")
@click.argument("ref")
@click.pass_obj
def logs(obj: Fn, limit: int, ref: str) -> None:
    """An invocation's logs (its handler's stderr) and, on stdout, its result;
    or, given a function's name, its recent invocations."""
    with obj.client() as c:
        if ref.startswith("inv-"):
            rec = c.invocation(obj.ns, ref)
            sys.stderr.write(c.logs(obj.ns, ref))
            sys.stderr.flush()
            sys.stdout.buffer.write(c.result(obj.ns, ref))
            sys.stdout.flush()
            if rec["status"] not in ("succeeded", "queued", "running"):
                click.echo(f"{rec['status']}: {rec['error']}", err=True)
            return
        rows = [["INVOCATION", "VERSION", "MODE", "STATUS", "START", "DURATION", "WHEN"]]
        for r in c.invocations(obj.ns, ref, limit):
            dur = f"{r['duration_ms']:.0f}ms" if r["duration_ms"] is not None else "-"
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["created_at"]))
            rows.append([r["id"], str(r["version"]), r["mode"], r["status"],
                         r["start_kind"] or "-", dur, when])  # fmt: skip
    _table(rows)


@fn.command("status")
@click.argument("invocation")
@click.pass_obj
def status(obj: Fn, invocation: str) -> None:
    """An invocation's record, as JSON."""
    with obj.client() as c:
        click.echo(json.dumps(c.invocation(obj.ns, invocation), indent=1))


@fn.command("ls")
@click.option("-q", "--quiet", is_flag=True, help="Only names.")
@click.pass_obj
def ls(obj: Fn, quiet: bool) -> None:
    """Functions of the namespace (their latest versions)."""
    with obj.client() as c:
        fns = c.functions(obj.ns)
    if quiet:
        for f in fns:
            click.echo(f["name"])
        return
    rows = [["NAME", "VERSION", "RUNTIME", "HANDLER", "MEMORY", "CPUS", "TIMEOUT", "CONCURRENCY"]]
    for f in fns:
        rows.append([f["name"], str(f["version"]), f["runtime"], f["handler"],
                     f"{f['memory_mib']}MiB", str(f["vcpus"]), f"{f['timeout_s']:g}s",
                     str(f["max_concurrency"])])  # fmt: skip
    _table(rows)


@fn.command("inspect")
@click.argument("name")
@click.pass_obj
def inspect(obj: Fn, name: str) -> None:
    """A function's latest version, as JSON."""
    with obj.client() as c:
        click.echo(json.dumps(c.get(obj.ns, name), indent=1))


@fn.command("rm")
@click.argument("names", nargs=-1, required=True)
@click.pass_obj
def rm(obj: Fn, names: tuple[str, ...]) -> None:
    """Remove functions (every version, their invocations and instances)."""
    with obj.client() as c:
        for n in names:
            c.delete(obj.ns, n)
            click.echo(n)


@fn.command("triggers")
@click.option(
    "--cron",
    default=None,
    metavar="EXPR",
    help="Add a timer: cron in UTC (a 6th field is seconds: '* * * * * */10').",
)
@click.option(
    "--chain", default=None, metavar="TARGET", help="Add a chain: invoke TARGET with NAME's result."
)
@click.option(
    "--on",
    "on",
    type=click.Choice(["succeeded", "failed", "any"]),
    default="succeeded",
    help="With --chain: after which ends.",
)
@click.option("--rm", "remove", default=None, metavar="TRIGGER", help="Remove a trigger.")
@click.argument("name")
@click.pass_obj
def triggers(obj: Fn, cron: str | None, chain: str | None, on: str, remove: str | None,
             name: str) -> None:  # fmt: skip
    """NAME's triggers (timers and chains), or add or remove one."""
    base = f"/v1/namespaces/{obj.ns}/functions/{name}/triggers"
    with obj.client() as c:
        if sum(x is not None for x in (cron, chain, remove)) > 1:
            raise UsageError("give one of --cron, --chain, --rm")
        if remove is not None:
            c.request("DELETE", f"{base}/{remove}")
            click.echo(remove)
            return
        if cron is not None or chain is not None:
            body: dict[str, Any] = {"kind": "timer", "cron": cron}
            if chain is not None:
                body = {"kind": "chain", "target": chain, "on": on}
            click.echo(c.json("POST", base, json=body)["id"])
            return
        rows = [["TRIGGER", "KIND", "WHAT", "LAST FIRED", "NEXT"]]
        for t in c.json("GET", base):
            what = t["cron"] if t["kind"] == "timer" else f"-> {t['target']} on {t['on']}"
            last = _when(t["last_fired"]) if t["last_fired"] else "-"
            nxt = _when(t["next_fire"]) if t["next_fire"] else "-"
            rows.append([t["id"], t["kind"], what, last, nxt])
    _table(rows)


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


@fn.command("token")
@click.argument("namespace")
@click.pass_obj
def token(obj: Fn, namespace: str) -> None:
    """Issue a token for NAMESPACE (made if missing; admin)."""
    with obj.client() as c:
        c.request("POST", "/v1/namespaces", json={"name": namespace}, ok=(409,))
        t = c.json("POST", f"/v1/namespaces/{namespace}/tokens")
    click.echo(t["token"])


def _table(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
