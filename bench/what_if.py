"""gunicorn targets for what-if runs of the webhook benchmarks: Rebill with one thing changed.

    .venv/bin/python bench/webhook_variants.py base=what_if:rebill() "writers2=what_if:rebill(max_writers=2)"
    .venv/bin/python bench/webhook_bench.py --rebill-target "what_if:rebill(max_wait=0.001)"

Diagnostics, never production: each factory changes Rebill in this process before building the app. The
group commit's settings replace MessageIngest's defaults (ghl.message_ingest); ``without_database`` answers
every message delivery as if its batch statement had stored it, and ``waiting_instead_of_database`` does the
same after a pause as long as a statement, so that a run shows what the write itself costs. Both store
nothing: webhook_bench.py's loss check then counts every answer as lost, so run them with
webhook_variants.py, which has none.
"""

from __future__ import annotations

import gc

import gevent

import ghl.message_ingest as message_ingest


def rebill(max_rows: int | None = None, max_wait: float | None = None, max_writers: int | None = None,
           gc_threshold: int | None = None):  # fmt: skip
    """Rebill with other group-commit settings (None: the default) and, optionally, a first GC generation of
    ``gc_threshold`` allocations (Python's default is 700)."""
    defaults = message_ingest.MessageIngest.__init__.__kwdefaults__
    for name, value in (("max_rows", max_rows), ("max_wait", max_wait), ("max_writers", max_writers)):
        if value is not None:
            defaults[name] = value
    if gc_threshold is not None:
        gc.set_threshold(gc_threshold, *gc.get_threshold()[1:])
    from app import create_app

    return create_app()


def _answered_unstored(self, items, deadline):
    """What the batch statement returns for deliveries it stored and counted: (webhookId, id, status, error)."""
    return [(item["webhook_id"], 0, "processed", None) for item in items]


def without_database(**settings):
    """Rebill whose batch writer answers without sending its statement: everything but the write."""
    message_ingest.MessageIngest._execute = _answered_unstored
    return rebill(**settings)


def waiting_instead_of_database(seconds: float = 0.0008, **settings):
    """Rebill whose batch writer encodes the batch and then waits ``seconds`` (about one batch statement's
    latency under load) instead of sending it: the write's waiting without the database's work."""

    def execute(self, items, deadline):
        message_ingest._rows_json(items)
        gevent.sleep(seconds)
        return _answered_unstored(self, items, deadline)

    message_ingest.MessageIngest._execute = execute
    return rebill(**settings)
