"""The billing backlog as Prometheus gauges, read from the database when /metrics is scraped (core.metrics).

Read at scrape time rather than kept by the processes: whichever scheduler aggregated or reported, the
database holds the truth. Both queries use partial or status indexes (only pending / failed rows), so a
scrape stays cheap however many units were ever sent; sent units are the ``rebill_units_sent_total`` counter.
"""

from __future__ import annotations

from prometheus_client.core import GaugeMetricFamily, Metric
from sqlalchemy import func, select

from billing.models import UnitReport, UsageEvent
from billing.states import ReportStatus, UsageState
from core.database import db, utcnow

BACKLOG_STATUSES = (ReportStatus.PENDING, ReportStatus.FAILED)


def backlog_gauges() -> list[Metric]:
    """Pending usage, and outbox rows and units pending or failed, with the age of the oldest pending of each."""
    now = utcnow()
    outbox = {
        row.status: row
        for row in db.session.execute(
            select(
                UnitReport.status,
                func.count().label("reports"),
                func.coalesce(func.sum(UnitReport.units), 0).label("units"),
                func.min(UnitReport.created_at).label("oldest"),
            )
            .where(UnitReport.status.in_(BACKLOG_STATUSES))
            .group_by(UnitReport.status)
        )
    }
    usage = db.session.execute(
        select(func.count().label("events"), func.min(UsageEvent.received_at).label("oldest")).where(
            UsageEvent.state == UsageState.PENDING
        )
    ).one()
    db.session.rollback()  # a read: end the transaction, hold nothing between scrapes

    units = GaugeMetricFamily("rebill_outbox_units", "Units in the outbox, by status", labels=["status"])
    reports = GaugeMetricFamily("rebill_outbox_reports", "Outbox rows, by status", labels=["status"])
    for status in BACKLOG_STATUSES:
        row = outbox.get(status)
        units.add_metric([status], row.units if row else 0)
        reports.add_metric([status], row.reports if row else 0)
    pending = outbox.get(ReportStatus.PENDING)
    return [
        units,
        reports,
        GaugeMetricFamily(
            "rebill_outbox_oldest_pending_age_seconds",
            "Age of the oldest outbox row not yet sent to Stripe (0 when none)",
            value=_age(now, pending.oldest if pending else None),
        ),
        GaugeMetricFamily("rebill_usage_events_pending", "Usage events not yet aggregated", value=usage.events),
        GaugeMetricFamily(
            "rebill_usage_oldest_pending_age_seconds",
            "Age of the oldest usage event not yet aggregated (0 when none)",
            value=_age(now, usage.oldest),
        ),
    ]


def _age(now, oldest) -> float:
    return max(0.0, (now - oldest).total_seconds()) if oldest is not None else 0.0
