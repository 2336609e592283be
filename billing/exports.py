"""A client's usage events and unit reports for a date range, as rows for a CSV export, read in batches."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

from sqlalchemy import select

from billing.models import RebillClient, UnitReport, UsageEvent
from core.database import db

EXPORT_COLUMNS = (
    "record",
    "time",
    "occurred_at",
    "event_id",
    "source",
    "model",
    "input_tokens",
    "output_tokens",
    "messages",
    "state",
    "counted",
    "units",
    "report_identifier",
    "report_status",
    "sent_at",
    "last_error",
)
MAX_DAYS = 366
BATCH = 1000
# A text cell starting with one of these is a formula to a spreadsheet (CSV injection, OWASP): event ids and
# model names come from the agency's AI platform, so they are written with a leading apostrophe.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def export_rows(client: RebillClient, start: dt.datetime, end: dt.datetime, *, for_agency: bool) -> Iterator[list]:
    """Yield the header, then the client's usage events (by occurrence) and unit reports (by their usage
    timestamp) in [start, end). ``for_agency`` False (the agency's customer) leaves out the report
    identifiers and Stripe's raw error texts."""
    yield list(EXPORT_COLUMNS)
    events = (
        select(UsageEvent)
        .where(UsageEvent.client_id == client.id, UsageEvent.occurred_at >= start, UsageEvent.occurred_at < end)
        .order_by(UsageEvent.occurred_at, UsageEvent.id)
        .execution_options(yield_per=BATCH)
    )
    for event in db.session.scalars(events):
        yield [
            "usage",
            _iso(event.received_at),
            _iso(event.occurred_at),
            _text(event.source_event_id),
            event.source,
            _text(event.model or ""),
            event.input_tokens,
            event.output_tokens,
            event.messages,
            event.state,
            event.counted,
            "",
            "",
            "",
            "",
            "",
        ]
    reports = (
        select(UnitReport)
        .where(UnitReport.client_id == client.id, UnitReport.usage_timestamp >= start, UnitReport.usage_timestamp < end)
        .order_by(UnitReport.usage_timestamp, UnitReport.id)
        .execution_options(yield_per=BATCH)
    )
    for report in db.session.scalars(reports):
        yield [
            "unit_report",
            _iso(report.created_at),
            _iso(report.usage_timestamp),
            "",
            "",
            "",
            "",
            "",
            "",
            "",
            "",
            report.units,
            report.identifier if for_agency else "",
            report.status,
            _iso(report.sent_at),
            _text(report.last_error or "") if for_agency else "",
        ]


def _iso(moment: dt.datetime | None) -> str:
    return moment.isoformat() if moment else ""


def _text(value: str) -> str:
    return f"'{value}" if value.startswith(FORMULA_STARTS) else value
