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
    for event in _in_range(UsageEvent, UsageEvent.occurred_at, client, start, end):
        yield _row(
            record="usage",
            time=_iso(event.received_at),
            occurred_at=_iso(event.occurred_at),
            event_id=_text(event.source_event_id),
            source=event.source,
            model=_text(event.model or ""),
            input_tokens=event.input_tokens,
            output_tokens=event.output_tokens,
            messages=event.messages,
            state=event.state,
            counted=event.counted,
        )
    for report in _in_range(UnitReport, UnitReport.usage_timestamp, client, start, end):
        yield _row(
            record="unit_report",
            time=_iso(report.created_at),
            occurred_at=_iso(report.usage_timestamp),
            units=report.units,
            report_identifier=report.identifier if for_agency else "",
            report_status=report.status,
            sent_at=_iso(report.sent_at),
            last_error=_text(report.last_error or "") if for_agency else "",
        )


def _in_range(model, moment, client: RebillClient, start: dt.datetime, end: dt.datetime):
    """Return the client's rows of ``model`` whose ``moment`` lies in [start, end), in its order, read in batches."""
    query = (
        select(model)
        .where(model.client_id == client.id, moment >= start, moment < end)
        .order_by(moment, model.id)
        .execution_options(yield_per=BATCH)
    )
    return db.session.scalars(query)


def _row(**cells) -> list:
    """Return one CSV row in EXPORT_COLUMNS order; a column the record does not have is empty."""
    return [cells.get(column, "") for column in EXPORT_COLUMNS]


def _iso(moment: dt.datetime | None) -> str:
    return moment.isoformat() if moment else ""


def _text(value: str) -> str:
    return f"'{value}" if value.startswith(FORMULA_STARTS) else value
