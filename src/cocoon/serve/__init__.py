"""`cocoon serve`: the function service (function compute on cocoon).

An HTTP API (FastAPI on uvicorn, `app.py`) over a SQLite state (`store.py`):
namespaces and their tokens (`auth.py`), functions and their immutable
versions, code unpacked escape-proof (`code.py`), invocations. Each version's
invocations run in warm instances of their own (`instances.py`): one
long-lived container per instance, started through runtime/ as `cocoon run -d`
starts one, with the version's code bound read-only at /code (a pooled
sandbox takes it through its hub: no copy, no reboot; a pre-warmed blank
instance gets it bound over its empty /code: `prewarm.py`), and an exec per
invocation (shell) or one handler loop per instance (python: `runtimes.py`).
Triggers: HTTP (`cgi.py`), timers and chains (`service.py`); metrics and
metering (`metrics.py`). `server.py` listens, recovers after a crash and
cleans up on stop; `client.py` is what `cocoon fn` speaks.
"""
