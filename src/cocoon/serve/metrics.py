"""Metrics (`GET /metrics`, Prometheus' text format) and metering.

Series are named as Fission's and OpenWhisk's users look for them (calls
total, cold starts total, duration seconds), labelled by namespace, function
and version, and by start kind (``cold``: a new instance; ``warm``: a free
one reused; the start histogram also has ``prewarmed``: a new instance taken
pre-warmed, counted as cold elsewhere) where it applies:

- ``cocoon_function_calls_total{status}``: invocations that ran to an end
  (succeeded, failed, timeout); ``cocoon_function_errors_total``: the
  failed and timed-out ones; ``cocoon_function_throttled_total``: 429s;
- ``cocoon_function_starts_total{kind}`` and ``cocoon_function_cold_starts_total``;
- ``cocoon_function_duration_seconds`` (the handler's run) and
  ``cocoon_function_start_seconds{kind}`` (request to instance ready),
  histograms;
- ``cocoon_function_billed_seconds_total`` and
  ``cocoon_function_gb_seconds_total``: memory (GB) x billed time, the unit
  function platforms bill.

Counters are the persistent metering (store.Store's ``metering`` table, one
row per version, updated in the invocation's own transaction) loaded at
start, so they do not fall back to zero when the service restarts; the
histograms start empty. A namespace token's scrape holds its namespace's
series only.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.metrics_core import Metric

LABELS = ("namespace", "function", "version")
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900)
START_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.calls = Counter("cocoon_function_calls", "Invocations that ran to an end.",
                             [*LABELS, "status"], registry=r)  # fmt: skip
        self.errors = Counter("cocoon_function_errors", "Invocations that failed or timed out.",
                              LABELS, registry=r)  # fmt: skip
        self.throttled = Counter("cocoon_function_throttled", "Invocations refused with 429.",
                                 LABELS, registry=r)  # fmt: skip
        self.starts = Counter("cocoon_function_starts", "Invocations by start kind.",
                              [*LABELS, "kind"], registry=r)  # fmt: skip
        self.cold = Counter("cocoon_function_cold_starts", "Invocations that started an instance.",
                            LABELS, registry=r)  # fmt: skip
        self.billed = Counter("cocoon_function_billed_seconds", "Billed handler time.",
                              LABELS, registry=r)  # fmt: skip
        self.gb_s = Counter("cocoon_function_gb_seconds", "Memory (GB) x billed time.",
                            LABELS, registry=r)  # fmt: skip
        self.duration = Histogram("cocoon_function_duration_seconds", "The handler's run.",
                                  LABELS, buckets=DURATION_BUCKETS, registry=r)  # fmt: skip
        self.start = Histogram("cocoon_function_start_seconds",
                               "From the request to an instance ready for it.",
                               [*LABELS, "kind"], buckets=START_BUCKETS, registry=r)  # fmt: skip

    def load(self, rows: list[dict[str, Any]]) -> None:
        """The counters as the persistent metering has them."""
        for m in rows:
            lv = (m["namespace"], m["function"], str(m["version"]))
            for status in ("succeeded", "failed", "timeout"):
                if m[status]:
                    self.calls.labels(*lv, status).inc(m[status])
            if m["failed"] + m["timeout"]:
                self.errors.labels(*lv).inc(m["failed"] + m["timeout"])
            for kind in ("cold", "warm"):
                if m[kind]:
                    self.starts.labels(*lv, kind).inc(m[kind])
            if m["cold"]:
                self.cold.labels(*lv).inc(m["cold"])
            if m["throttled"]:
                self.throttled.labels(*lv).inc(m["throttled"])
            self.billed.labels(*lv).inc(m["billed_ms"] / 1000)
            self.gb_s.labels(*lv).inc(m["gb_s"])

    def observe(
        self,
        lv: tuple[str, str, str],
        *,
        status: str,
        kind: str,
        start_s: float,
        duration_s: float,
        billed_s: float,
        gb_s: float,
    ) -> None:
        self.calls.labels(*lv, status).inc()
        if status != "succeeded":
            self.errors.labels(*lv).inc()
        if kind:
            # A pre-warmed start is a new instance: counted as the metering
            # counts it (cold), timed apart (the histograms are not kept).
            counted = "cold" if kind == "prewarmed" else kind
            self.starts.labels(*lv, counted).inc()
            self.start.labels(*lv, kind).observe(start_s)
            if counted == "cold":
                self.cold.labels(*lv).inc()
        self.duration.labels(*lv).observe(duration_s)
        self.billed.labels(*lv).inc(billed_s)
        self.gb_s.labels(*lv).inc(gb_s)

    def text(self, namespace: str | None = None) -> bytes:
        """The exposition; with ``namespace``, that namespace's series only."""
        if namespace is None:
            return generate_latest(self.registry)
        only = CollectorRegistry(auto_describe=False)
        only.register(_Only(self.registry, namespace))
        return generate_latest(only)


class _Only:
    """A registry's metrics with only one namespace's samples."""

    def __init__(self, registry: CollectorRegistry, namespace: str) -> None:
        self.registry = registry
        self.namespace = namespace

    def collect(self) -> Iterator[Metric]:
        for m in self.registry.collect():
            copy = Metric(m.name, m.documentation, m.type, m.unit)
            copy.samples = [s for s in m.samples if s.labels.get("namespace") == self.namespace]
            yield copy
