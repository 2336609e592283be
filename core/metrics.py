"""Prometheus metrics: the instruments every package increments, and ``GET /metrics`` that exposes them.

Instruments live here, in core, so billing, ghl and capri can all count without importing one another.
Incrementing is cheap (a lock and a float add; no database), so the webhook hot path pays microseconds.

Several processes: gunicorn forks workers, and schedulers are processes of their own. When
``PROMETHEUS_MULTIPROC_DIR`` is set in a process's environment, prometheus_client (which reads that variable
itself, at import) keeps the process's values in memory-mapped files in that directory, and ``/metrics``
sums the files of every process that shares it: one scrape of any web process of a host shows the web
workers and the schedulers of that host. Point every process of a host at one empty directory, emptied
before they start (deploy/run-local and deploy/entrypoint do). Without it (development, tests) a process
reports its own values only.

Gauges that describe the database (outbox backlog, oldest pending row) are computed when scraped, by
functions the owning package registers (``register_scrape_gauges``), so they are exact whichever process
did the work. Access: ``REBILL_METRICS_TOKEN`` unset → 404; set → ``Authorization: Bearer <token>`` or 401.
"""

from __future__ import annotations

import functools
import hmac
import logging
import os
import time
from collections.abc import Callable, Iterable

from flask import Blueprint, Flask, current_app, jsonify, request
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector

from core.database import db

log = logging.getLogger("rebill.metrics")

blueprint = Blueprint("metrics", __name__)

# ---- instruments (prometheus_client adds ``_total`` to counter names) -------------------------------------

GHL_WEBHOOKS_RECEIVED = Counter(
    "rebill_ghl_webhooks_received",
    "GHL webhook deliveries received, by outcome: processed, ignored, failed (stored, replayable), received "
    "(stored, processing pending), duplicate, other_app, stale (refused: too old or dated ahead), unauthorized, "
    "bad_request, unavailable (answered 429)",
    ["outcome"],
)
USAGE_EVENTS_RECEIVED = Counter(
    "rebill_usage_events_received",
    "Usage events received on POST /api/v1/usage, by outcome: accepted, duplicate, rejected",
    ["outcome"],
)
# Webhooks answer in milliseconds; a usage batch of 1000 events takes longer. Both fit these buckets.
INGEST_DURATION = Histogram(
    "rebill_ingest_request_duration_seconds",
    "Time to answer an ingest request (GHL webhook or usage batch), by endpoint and HTTP status code",
    ["endpoint", "code"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
_PASS_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
AGGREGATION_DURATION = Histogram(
    "rebill_aggregation_duration_seconds", "Duration of one aggregation pass (usage → units)", buckets=_PASS_BUCKETS
)
REPORTING_DURATION = Histogram(
    "rebill_reporting_duration_seconds", "Duration of one reporting pass (outbox → Stripe)", buckets=_PASS_BUCKETS
)
USAGE_EVENTS_AGGREGATED = Counter("rebill_usage_events_aggregated", "Usage events that left the pending state")
UNITS_LOGGED = Counter("rebill_units_logged", "Units written to the outbox by aggregation")
UNITS_SENT = Counter("rebill_units_sent", "Units Stripe accepted (or already held under the same identifier)")
UNIT_REPORTS = Counter(
    "rebill_unit_reports", "Outbox rows a reporting pass finished with, by outcome: sent, failed, retrying", ["outcome"]
)
STRIPE_CALLS = Counter(
    "rebill_stripe_calls",
    "Stripe API calls, by outcome: ok, unavailable (429/5xx/network), key_rejected (401/403), request_rejected",
    ["outcome"],
)
GHL_TOKEN_REFRESHES = Counter(
    "rebill_ghl_token_refreshes",
    "GHL access token refreshes, by outcome: refreshed, reauth_required, unavailable",
    ["outcome"],
)
SCHEDULED_JOB_RUNS = Counter(
    "rebill_scheduler_job_runs",
    "Scheduler job runs, by job and outcome: ok, failed, skipped (another scheduler holds housekeeping)",
    ["job", "outcome"],
)


def observe_ingest(endpoint: str) -> Callable:
    """Decorate an ingest view: time it into INGEST_DURATION under ``endpoint`` and the answer's status code."""

    def decorate(view: Callable) -> Callable:
        @functools.wraps(view)
        def timed(*args, **kwargs):
            started = time.perf_counter()
            code = "500"  # an exception leaves the view: the error handler answers (503 for the database)
            try:
                response = current_app.make_response(view(*args, **kwargs))
                code = str(response.status_code)
                return response
            finally:
                INGEST_DURATION.labels(endpoint, code).observe(time.perf_counter() - started)

        return timed

    return decorate


# ---- scrape-time gauges and the endpoint ----------------------------------------------------------------

SCRAPE_GAUGES = "rebill.metrics.scrape_gauges"
ScrapeGauges = Callable[[], Iterable[Metric]]


def register_scrape_gauges(app: Flask, gauges: ScrapeGauges) -> None:
    """Have ``/metrics`` call ``gauges()`` (in an app context) on every scrape and expose what it returns."""
    app.extensions.setdefault(SCRAPE_GAUGES, []).append(gauges)


class _Collected:
    """A collector over functions returning metric families. No describe(): registering it queries nothing."""

    def __init__(self, *sources: Callable[[], Iterable[Metric]]):
        self.sources = sources

    def collect(self) -> Iterable[Metric]:
        for source in self.sources:
            yield from source()


def serve_process_metrics(port: int, address: str = "0.0.0.0"):  # noqa: S104  (a container's private network)
    """Serve this process's instruments on ``address:port`` in a thread (a scheduler has no web server).

    For a scheduler that shares no PROMETHEUS_MULTIPROC_DIR with a web process (its own container). No token:
    bind it where only Prometheus reaches it. Returns the server (``shutdown()`` stops it).
    """
    server, _ = start_http_server(port, addr=address, registry=_process_registry())
    return server


def _process_registry() -> CollectorRegistry:
    """The instruments of every process sharing PROMETHEUS_MULTIPROC_DIR, or this process's own."""
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # the library's own switch (see the module docstring)
        MultiProcessCollector(registry)
    else:
        registry.register(_Collected(REGISTRY.collect))
    return registry


@blueprint.get("/metrics")
def metrics():
    """Prometheus text format: every process's instruments plus the database gauges; token protected."""
    token = current_app.config.get("REBILL_METRICS_TOKEN")
    if not token:
        return jsonify(error="not found"), 404
    scheme, _, supplied = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(supplied.strip().encode(), token.encode()):
        response = jsonify(error="a valid metrics token is required: Authorization: Bearer <token>")
        response.headers["WWW-Authenticate"] = 'Bearer realm="rebill-metrics"'
        return response, 401
    registry = _process_registry()
    registry.register(_Collected(_database_gauges))
    encode, content_type = choose_encoder(request.headers.get("Accept"))  # text format, or OpenMetrics if asked
    return current_app.response_class(encode(registry), content_type=content_type)


def _database_gauges() -> Iterable[Metric]:
    """The registered scrape-time gauges; a database that cannot answer is reported, not a failed scrape."""
    families: list[Metric] = []
    up = 1
    for gauges in current_app.extensions.get(SCRAPE_GAUGES, []):
        try:
            families.extend(gauges())
        except Exception as error:  # the instruments above still tell what the processes did
            db.session.rollback()
            up = 0
            log.warning("scrape-time gauges failed", extra={"fields": {"error": type(error).__name__}})
    yield GaugeMetricFamily("rebill_metrics_database_up", "1 if the scrape-time database gauges were read", value=up)
    yield from families
