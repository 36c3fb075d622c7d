"""The HTTP API (FastAPI): routes, who may call them, and one error shape.

Every refusal is ``{"error": "<one line>"}`` with a 4xx (5xx only for our own
bugs): a body FastAPI cannot validate is a 400 naming the first bad field,
not pydantic's list. Every route under /v1 knows its caller (auth.Principal):
the unix socket's is the admin; on TCP, no valid bearer token is a 401, a
namespace token outside its namespace a 403, before anything is looked up.
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations,
# which name types local to make_app.

import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from cocoon import __version__
from cocoon.serve import auth, cgi
from cocoon.serve.auth import Principal
from cocoon.serve.models import (
    NAME_PATTERN,
    Accepted,
    ErrorOut,
    FunctionIn,
    FunctionOut,
    InvocationOut,
    MeteringOut,
    NamespaceIn,
    NamespaceOut,
    Settings,
    TokenOut,
    TriggerIn,
    TriggerOut,
    check_name,
)
from cocoon.serve.service import MAX_PAYLOAD, ApiError, Service, describe, invocation_out

log = logging.getLogger(__name__)

#: The scope key saying which listener a request came in on.
TRANSPORT = "cocoon.transport"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Names are checked by the routes (one message); the schema says which.
NAME_DOC = Path(json_schema_extra={"pattern": NAME_PATTERN, "maxLength": 63})

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorOut} for code in (400, 401, 403, 404, 409, 413, 429)
}


def tagged(app: ASGIApp, transport: Literal["unix", "tcp"]) -> ASGIApp:
    """``app`` as served on one listener: its requests say which."""

    async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
        scope[TRANSPORT] = transport
        await app(scope, receive, send)

    return asgi


class BodyLimit:
    """Refuse a body over ``limit`` bytes (413) before it is all read."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for k, v in scope.get("headers", []):
            if k == b"content-length" and v.isdigit() and int(v) > self.limit:
                await _error(413, f"the request body is over {self.limit} B")(scope, receive, send)
                return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise ApiError(413, f"the request body is over {self.limit} B")
            return msg

        await self.app(scope, limited, send)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _first_error(e: RequestValidationError) -> str:
    errs = e.errors()
    if not errs:
        return "invalid request"
    err = errs[0]
    if err.get("type") == "json_invalid":
        return f"the body is not valid JSON: {err.get('ctx', {}).get('error', '')}".rstrip(": ")
    loc = [str(x) for x in err.get("loc", ()) if x not in ("body", "query", "path")]
    msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
    if err.get("type") == "missing":
        return f"{'.'.join(loc) or 'the body'} is required"
    if err.get("type") == "extra_forbidden":
        return f"unknown field {'.'.join(loc)!r}"
    if not loc and err.get("type") == "value_error":  # a check of the whole body
        return msg
    return f"{'.'.join(loc)}: {msg}" if loc else f"the body: {msg}"


def make_app(service: Service) -> FastAPI:
    app = FastAPI(
        title="cocoon function service",
        version=__version__,
        description="Functions in namespaces, each version run in warm microVM sandboxes of "
        "its own. On TCP every /v1 request needs `Authorization: Bearer <token>`.",
        docs_url=None,
        redoc_url=None,
    )

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return _error(e.status, str(e), headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        return _error(400, _first_error(e))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return _error(e.status_code, str(e.detail), dict(e.headers or {}))  # 405: Allow

    @app.exception_handler(Exception)
    async def bug(request: Request, e: Exception) -> JSONResponse:
        log.exception("%s %s", request.method, request.url.path)
        return _error(500, f"internal error: {e.__class__.__name__}")

    def principal(request: Request) -> Principal:
        if request.scope.get(TRANSPORT) == "unix":
            return auth.ADMIN
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        who = auth.lookup(service.store, token.strip()) if scheme.lower() == "bearer" else None
        if who is None:
            raise ApiError(401, "a valid bearer token is required (Authorization: Bearer ...)")
        return who

    Who = Annotated[Principal, Depends(principal)]

    def admin(who: Who) -> Principal:
        if not who.admin:
            raise ApiError(403, "this needs the admin token")
        return who

    Admin = Annotated[Principal, Depends(admin)]

    def namespace(ns: Annotated[str, NAME_DOC], who: Who) -> str:
        if not who.may(ns):
            raise ApiError(403, f"this token is for namespace {who.namespace}, not {ns[:80]}")
        try:
            return check_name("namespace", ns)
        except ValueError as e:
            raise ApiError(400, str(e)) from None

    Ns = Annotated[str, Depends(namespace)]

    def fname(name: Annotated[str, NAME_DOC]) -> str:
        try:
            return check_name("function", name)
        except ValueError as e:
            raise ApiError(400, str(e)) from None

    Name = Annotated[str, Depends(fname)]

    @app.get(
        "/metrics",
        response_class=PlainTextResponse,
        responses={**ERRORS, 200: {"description": "Prometheus' text format."}},
    )
    async def metrics(who: Who) -> Response:
        """Every namespace's series for the admin, its own for a namespace token."""
        body = service.metrics.text(None if who.admin else who.namespace)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/namespaces/{ns}/metering", response_model=list[MeteringOut], responses=ERRORS)
    async def metering(ns: Ns) -> list[dict[str, Any]]:
        """Per function version, kept across restarts: calls by outcome, cold
        and warm starts, time run and billed, GB-seconds."""
        if not service.store.has_namespace(ns):
            raise ApiError(404, f"no such namespace: {ns}")
        return service.store.metering(ns)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, Any]:
        inst = service.instances
        ready = inst.prewarm.count if inst is not None and inst.prewarm is not None else 0
        return {"ok": True, "version": __version__, "prewarmed": ready}

    # -- namespaces and tokens ---------------------------------------------------

    @app.get("/v1/namespaces", response_model=list[NamespaceOut], responses=ERRORS)
    async def list_namespaces(who: Who) -> list[dict[str, Any]]:
        return [n for n in service.store.namespaces() if who.may(n["name"])]

    @app.post("/v1/namespaces", status_code=201, response_model=NamespaceOut, responses=ERRORS)
    async def create_namespace(body: NamespaceIn, who: Admin) -> dict[str, Any]:
        if not service.store.add_namespace(body.name):
            raise ApiError(409, f"namespace {body.name} exists")
        return next(n for n in service.store.namespaces() if n["name"] == body.name)

    @app.delete("/v1/namespaces/{ns}", status_code=204, responses=ERRORS)
    async def delete_namespace(ns: Ns, who: Admin) -> Response:
        if not service.store.has_namespace(ns):
            raise ApiError(404, f"no such namespace: {ns}")
        if service.store.functions(ns):
            raise ApiError(409, f"namespace {ns} still has functions: remove them first")
        service.store.remove_namespace(ns)
        return Response(status_code=204)

    @app.post(
        "/v1/namespaces/{ns}/tokens", status_code=201, response_model=TokenOut, responses=ERRORS
    )
    async def issue_token(ns: Ns, who: Admin) -> dict[str, Any]:
        if not service.store.has_namespace(ns):
            raise ApiError(404, f"no such namespace: {ns}")
        tid, token, dig = auth.new_token()
        service.store.add_token(tid, dig, ns, admin=False)
        t = service.store.token(dig)
        assert t is not None
        return {**t.__dict__, "token": token}

    @app.get("/v1/namespaces/{ns}/tokens", response_model=list[TokenOut], responses=ERRORS)
    async def list_tokens(ns: Ns, who: Admin) -> list[dict[str, Any]]:
        return [t.__dict__ for t in service.store.tokens(ns)]

    @app.delete("/v1/tokens/{tid}", status_code=204, responses=ERRORS)
    async def revoke_token(tid: str, who: Admin) -> Response:
        if not service.store.remove_token(tid):
            raise ApiError(404, f"no such token: {tid[:80]}")
        return Response(status_code=204)

    # -- functions -------------------------------------------------------------------

    @app.get("/v1/namespaces/{ns}/functions", response_model=list[FunctionOut], responses=ERRORS)
    async def list_functions(ns: Ns) -> list[dict[str, Any]]:
        return [describe(v) for v in service.functions(ns)]

    @app.post(
        "/v1/namespaces/{ns}/functions",
        status_code=201,
        response_model=FunctionOut,
        responses=ERRORS,
    )
    async def create_function(ns: Ns, body: FunctionIn, who: Who) -> dict[str, Any]:
        v = await service.create(ns, body, who.admin)
        return describe(v, [v.version])

    @app.get("/v1/namespaces/{ns}/functions/{name}", response_model=FunctionOut, responses=ERRORS)
    async def get_function(
        ns: Ns, name: Name, version: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None
    ) -> dict[str, Any]:
        return describe(*service.get(ns, name, version))

    @app.put("/v1/namespaces/{ns}/functions/{name}", response_model=FunctionOut, responses=ERRORS)
    async def update_function(ns: Ns, name: Name, body: Settings, who: Who) -> dict[str, Any]:
        v = await service.update(ns, name, body, who.admin)
        return describe(*service.get(ns, v.name))

    @app.delete("/v1/namespaces/{ns}/functions/{name}", status_code=204, responses=ERRORS)
    async def delete_function(ns: Ns, name: Name) -> Response:
        await service.delete(ns, name)
        return Response(status_code=204)

    # -- triggers ----------------------------------------------------------------------

    @app.post(
        "/v1/namespaces/{ns}/functions/{name}/triggers",
        status_code=201,
        response_model=TriggerOut,
        responses=ERRORS,
    )
    async def add_trigger(ns: Ns, name: Name, body: TriggerIn) -> dict[str, Any]:
        return service.add_trigger(ns, name, body)

    @app.get(
        "/v1/namespaces/{ns}/functions/{name}/triggers",
        response_model=list[TriggerOut],
        responses=ERRORS,
    )
    async def list_triggers(ns: Ns, name: Name) -> list[dict[str, Any]]:
        return service.triggers(ns, name)

    @app.delete(
        "/v1/namespaces/{ns}/functions/{name}/triggers/{tid}", status_code=204, responses=ERRORS
    )
    async def remove_trigger(ns: Ns, name: Name, tid: str) -> Response:
        service.remove_trigger(ns, name, tid)
        return Response(status_code=204)

    # -- invocations -----------------------------------------------------------------

    invoke_body = {
        "requestBody": {
            "content": {"application/octet-stream": {"schema": {"type": "string"}}},
            "description": "The function's input, on its handler's stdin.",
        }
    }

    @app.post(
        "/v1/namespaces/{ns}/functions/{name}/invoke",
        responses={
            **ERRORS,
            200: {"description": "Succeeded: the handler's stdout."},
            202: {"model": Accepted, "description": "mode=async: accepted."},
            502: {"description": "The handler failed: its stdout; X-Cocoon-Error says why."},
            504: {"description": "The handler timed out and was killed."},
        },
        openapi_extra=invoke_body,
    )
    async def invoke(
        ns: Ns,
        name: Name,
        request: Request,
        mode: Annotated[Literal["sync", "async"], Query()] = "sync",
        version: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None,
    ) -> Response:
        payload = await request.body()
        if len(payload) > MAX_PAYLOAD:
            raise ApiError(413, f"the input is over {MAX_PAYLOAD} B")
        if mode == "async":
            iid = service.invoke_async(ns, name, version, payload)
            return JSONResponse(
                {"id": iid, "status": "queued"},
                status_code=202,
                headers={"X-Cocoon-Invocation-Id": iid},
            )
        iid, out = await service.invoke_sync(ns, name, version, payload)
        status = {"succeeded": 200, "timeout": 504}.get(out.status, 502)
        headers = {
            "X-Cocoon-Invocation-Id": iid,
            "X-Cocoon-Status": out.status,
            "X-Cocoon-Start": out.start_kind,
            "X-Cocoon-Start-Ms": f"{out.start_ms:.3f}",
            "X-Cocoon-Duration-Ms": f"{out.duration_ms:.3f}",
            "X-Cocoon-Billed-Ms": str(out.billed_ms),
        }
        if out.exit_code is not None:
            headers["X-Cocoon-Exit-Code"] = str(out.exit_code)
        if out.error:
            headers["X-Cocoon-Error"] = _header_text(out.error)
        return Response(
            out.result, status_code=status, headers=headers, media_type="application/octet-stream"
        )

    async def http_trigger(ns: str, name: str, path: str, request: Request) -> Response:
        payload = await request.body()
        if len(payload) > MAX_PAYLOAD:
            raise ApiError(413, f"the request body is over {MAX_PAYLOAD} B")
        client = request.client.host if request.client else ""
        env = cgi.request_env(
            request.method, "/" + path, request.url.query, list(request.headers.items()),
            len(payload), client,
        )  # fmt: skip
        iid, out = await service.invoke_sync(ns, name, None, payload, mode="http", env=env)
        ids = {"X-Cocoon-Invocation-Id": iid}
        if out.status != "succeeded":
            ids["X-Cocoon-Error"] = _header_text(out.error)
            return _error(504 if out.status == "timeout" else 502, out.error, ids)
        try:
            status, headers, body = cgi.parse_response(out.result)
        except cgi.NotCgi as e:
            return _error(502, str(e), ids)
        r = Response(body, status_code=status)
        for k, v in [*headers, *ids.items()]:
            r.headers.append(k, v)
        return r

    trigger_doc = {
        "summary": "HTTP trigger",
        "description": "The whole request (method, path below /http, query, headers but "
        "Authorization, body) goes to the function as CGI (RFC 3875); its CGI answer is "
        "the response.",
        "responses": {**ERRORS, 502: {"model": ErrorOut}, 504: {"model": ErrorOut}},
        "methods": ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
    }

    @app.api_route("/v1/namespaces/{ns}/functions/{name}/http", **trigger_doc)  # type: ignore[arg-type]
    async def http_root(ns: Ns, name: Name, request: Request) -> Response:
        return await http_trigger(ns, name, "", request)

    @app.api_route("/v1/namespaces/{ns}/functions/{name}/http/{path:path}", **trigger_doc)  # type: ignore[arg-type]
    async def http_path(ns: Ns, name: Name, path: str, request: Request) -> Response:
        return await http_trigger(ns, name, path, request)

    @app.get(
        "/v1/namespaces/{ns}/functions/{name}/invocations",
        response_model=list[InvocationOut],
        responses=ERRORS,
    )
    async def list_invocations(
        ns: Ns, name: Name, limit: Annotated[int, Query(ge=1, le=1000)] = 20
    ) -> list[dict[str, Any]]:
        return [invocation_out(r, False) for r in service.invocations(ns, name, limit)]

    @app.get(
        "/v1/namespaces/{ns}/invocations/{iid}", response_model=InvocationOut, responses=ERRORS
    )
    async def get_invocation(ns: Ns, iid: str) -> dict[str, Any]:
        return invocation_out(service.invocation(ns, iid))

    @app.get(
        "/v1/namespaces/{ns}/invocations/{iid}/result",
        response_class=Response,
        responses={**ERRORS, 200: {"description": "The handler's stdout, as it wrote it."}},
    )
    async def get_result(ns: Ns, iid: str) -> Response:
        rec = service.invocation(ns, iid)
        return Response(rec["result"] or b"", media_type="application/octet-stream")

    @app.get(
        "/v1/namespaces/{ns}/invocations/{iid}/logs",
        response_class=PlainTextResponse,
        responses={**ERRORS, 200: {"description": "The handler's stderr."}},
    )
    async def get_logs(ns: Ns, iid: str) -> PlainTextResponse:
        rec = service.invocation(ns, iid)
        return PlainTextResponse((rec["logs"] or b"").decode("utf-8", "replace"))

    def openapi() -> dict[str, Any]:
        """FastAPI's description, less the 422 it adds to every operation:
        a body that fails validation is a 400 here (one message)."""
        if app.openapi_schema is None:
            spec = get_openapi(
                title=app.title, version=app.version, description=app.description,
                routes=app.routes,
            )  # fmt: skip
            for ops in spec.get("paths", {}).values():
                for op in ops.values():
                    if isinstance(op, dict):
                        op.get("responses", {}).pop("422", None)
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _header_text(text: str) -> str:
    """One line of printable ASCII (a header cannot hold more)."""
    out = json.dumps(text)[1:-1] if not text.isascii() else text
    return "".join(c if " " <= c <= "~" else " " for c in out)[:1000]
