"""The scheduler's work: one tick = aggregate new usage into units, then report units to Stripe.

Jobs select work by database state ("everything not yet aggregated / reported"), so a missed or doubled
tick does no harm. Each step commits its own transactions: units are durable in the outbox before any
Stripe call, and one agency's Stripe trouble never rolls back another's progress.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, fields

from billing.reporting import report_pending_units
from billing.units import aggregate_pending_usage
from core.database import db, utcnow
from core.metrics import (
    AGGREGATION_DURATION,
    REPORTING_DURATION,
    UNIT_REPORTS,
    UNITS_LOGGED,
    UNITS_SENT,
    USAGE_EVENTS_AGGREGATED,
)

log = logging.getLogger("billing.jobs")


@dataclass
class TickSummary:
    """What one tick did, for logs and the CLI."""

    events_aggregated: int = 0
    units_logged: int = 0
    reports_sent: int = 0
    units_sent: int = 0
    reports_failed: int = 0
    reports_retrying: int = 0
    stripe_calls: int = 0
    agencies_flagged: int = 0
    aggregation_failed: bool = False


def run_tick(now: dt.datetime | None = None) -> TickSummary:
    """Run one aggregation + reporting cycle; commits its own transactions (``now``: tests run it later)."""
    summary = TickSummary()
    try:
        with AGGREGATION_DURATION.time():
            aggregation = aggregate_pending_usage()
            db.session.commit()
        summary.events_aggregated = aggregation.events
        summary.units_logged = aggregation.units
    except Exception:
        # Units already in the outbox must still go out; the failed aggregation is retried next tick.
        db.session.rollback()
        summary.aggregation_failed = True
        log.exception("aggregation failed")
    # Outbox rows written just now are stamped with the real clock; a caller's earlier `now` must not hide them.
    with REPORTING_DURATION.time():
        reporting = report_pending_units(max(now, utcnow()) if now else None)
    for field in fields(reporting):  # the summary carries every reporting count it names
        if hasattr(summary, field.name):
            setattr(summary, field.name, getattr(reporting, field.name))
    _count(summary)
    log.info("tick finished", extra={"fields": vars(summary)})
    return summary


def _count(summary: TickSummary) -> None:
    """Add what the tick did to the process's counters (core.metrics)."""
    USAGE_EVENTS_AGGREGATED.inc(summary.events_aggregated)
    UNITS_LOGGED.inc(summary.units_logged)
    UNITS_SENT.inc(summary.units_sent)
    UNIT_REPORTS.labels("sent").inc(summary.reports_sent)
    UNIT_REPORTS.labels("failed").inc(summary.reports_failed)
    UNIT_REPORTS.labels("retrying").inc(summary.reports_retrying)
