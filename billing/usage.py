"""What the agency sees of usage: a client's counters, daily series and Stripe reports; unmapped usage."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import case, func, select

from billing.aggregation_store import source_filter
from billing.clients import get_client
from billing.models import Agency, RebillClient, UnitReport, UsageEvent
from billing.sources import client_source
from billing.states import ReportStatus, UsageState
from core.database import db, is_postgresql, utcnow

DAILY_DAYS = 30
RECENT_REPORTS = 20


def client_usage(agency: Agency, client_id: int, *, days: int = DAILY_DAYS, reports: int = RECENT_REPORTS) -> dict:
    """Return a client's counted usage, units logged / reported / awaiting Stripe, daily series and reports.

    ``daily`` covers the last ``days`` UTC days (oldest first, days without usage included) by the day the
    usage occurred: ``usage`` is what was billed toward units, ``paused_usage`` what arrived while paused,
    ``shadow_usage`` what arrived during a dry run (rule 13; ``capped_usage``: what arrived once the period's
    units had reached the monthly cap).
    ``quarantine_reason`` says why the client's usage stopped counting (None while it counts), and
    ``quarantined_events`` how many of its events were held back as impossible values.
    NotFound for another agency's client or a deleted one.
    """
    client = get_client(agency, client_id)
    units_by_status = dict(
        db.session.execute(
            select(UnitReport.status, func.coalesce(func.sum(UnitReport.units), 0))
            .where(UnitReport.client_id == client.id)
            .group_by(UnitReport.status)
        ).all()
    )
    held_back = dict(
        db.session.execute(
            select(UsageEvent.state, func.coalesce(func.sum(UsageEvent.counted), 0))
            .where(
                UsageEvent.client_id == client.id,
                UsageEvent.state.in_((UsageState.PAUSED, UsageState.CAPPED, UsageState.SHADOW)),
            )
            .group_by(UsageEvent.state)
        ).all()
    )
    quarantined_events = db.session.scalar(
        select(func.count()).where(UsageEvent.client_id == client.id, UsageEvent.state == UsageState.QUARANTINED)
    )
    awaiting = db.session.scalar(
        select(func.count())
        .select_from(UsageEvent)
        .where(
            UsageEvent.state == UsageState.PENDING,
            *source_filter(client.agency_id, client.provider, client.source_key),
        )
    )
    return {
        "client_id": client.id,
        "charge_by": client.charge_by,
        "billing_unit": client.billing_unit,
        "status": client.status,
        "counted_usage": client.counted_usage,
        "units_logged": client.units_logged,
        "units_reported": int(units_by_status.get(ReportStatus.SENT, 0)),
        "units_awaiting_stripe": int(
            sum(units for status, units in units_by_status.items() if status != ReportStatus.SENT)
        ),
        "remainder": client.remainder,
        "paused_usage": int(held_back.get(UsageState.PAUSED, 0)),
        # Usage received during a dry run (status shadow): counted and shown, never billed (rule 13).
        "shadow_usage": int(held_back.get(UsageState.SHADOW, 0)),
        # Usage that arrived after the period's units reached the client's monthly cap: shown, never billed.
        "capped_usage": int(held_back.get(UsageState.CAPPED, 0)),
        # Rule 12: events held back as impossible (beyond one AI call, or after the client's own quarantine).
        "quarantined_events": quarantined_events,
        "quarantine_reason": client.quarantine_reason,
        "events_awaiting_aggregation": awaiting,
        "daily": _daily_series(client, days),
        "models": _model_breakdown(client),
        "reports": _recent_reports(client, reports),
    }


def unmapped_usage(agency: Agency) -> list[dict]:
    """List channels and subaccounts with usage that no live client maps (rule 3), most recent first.

    Each row: ``channel_id`` or ``location_id`` (the other is None), the ``provider`` a client for it would
    have, ``tokens`` (input + output) with the split, ``messages``, ``events``, ``first_seen`` and
    ``last_seen`` (when Rebill received the usage). Usage of a source that a client maps now, received
    before that client existed, stays in the ledger unbilled but is not listed here.
    """
    rows = db.session.execute(
        select(
            UsageEvent.channel_id,
            UsageEvent.location_id,
            func.sum(UsageEvent.input_tokens).label("input_tokens"),
            func.sum(UsageEvent.output_tokens).label("output_tokens"),
            func.sum(UsageEvent.messages).label("messages"),
            func.count().label("events"),
            func.min(UsageEvent.received_at).label("first_seen"),
            func.max(UsageEvent.received_at).label("last_seen"),
        )
        .where(UsageEvent.agency_id == agency.id, UsageEvent.state == UsageState.UNMAPPED)
        .group_by(UsageEvent.channel_id, UsageEvent.location_id)
    ).all()
    mapped = set(
        db.session.execute(
            select(RebillClient.provider, RebillClient.source_key).where(
                RebillClient.agency_id == agency.id, RebillClient.deleted_at.is_(None)
            )
        ).all()
    )
    listed = []
    for row in rows:
        provider, source_key = client_source(row.channel_id, row.location_id)
        if (provider, source_key) in mapped:
            continue
        listed.append(
            {
                "channel_id": row.channel_id,
                "location_id": row.location_id,
                "provider": provider,
                "tokens": int(row.input_tokens) + int(row.output_tokens),
                "input_tokens": int(row.input_tokens),
                "output_tokens": int(row.output_tokens),
                "messages": int(row.messages),
                "events": row.events,
                "first_seen": _aware(row.first_seen),
                "last_seen": _aware(row.last_seen),
            }
        )
    return sorted(listed, key=lambda item: item["last_seen"], reverse=True)


def _daily_series(client: RebillClient, days: int) -> list[dict[str, Any]]:
    """Sum counted, paused and dry-run usage per UTC day of occurrence over the last ``days`` days."""
    today = utcnow().date()
    first_day = today - dt.timedelta(days=days - 1)
    since = dt.datetime.combine(first_day, dt.time(), dt.UTC)
    day = _utc_day(UsageEvent.occurred_at)
    rows = db.session.execute(
        select(
            day.label("day"),
            func.sum(case((UsageEvent.state == UsageState.COUNTED, UsageEvent.counted), else_=0)).label("usage"),
            func.sum(case((UsageEvent.state == UsageState.PAUSED, UsageEvent.counted), else_=0)).label("paused_usage"),
            func.sum(case((UsageEvent.state == UsageState.SHADOW, UsageEvent.counted), else_=0)).label("shadow_usage"),
            func.count().label("events"),
        )
        .where(
            UsageEvent.client_id == client.id,
            UsageEvent.state.in_((UsageState.COUNTED, UsageState.PAUSED, UsageState.SHADOW)),
            UsageEvent.occurred_at >= since,
        )
        .group_by(day)
    ).all()
    by_day = {row.day: row for row in rows}
    series = []
    for offset in range(days):
        date = (first_day + dt.timedelta(days=offset)).isoformat()
        row = by_day.get(date)
        series.append(
            {
                "date": date,
                "usage": int(row.usage) if row else 0,
                "paused_usage": int(row.paused_usage) if row else 0,
                "shadow_usage": int(row.shadow_usage) if row else 0,
                "events": row.events if row else 0,
            }
        )
    return series


def _model_breakdown(client: RebillClient) -> list[dict[str, Any]]:
    """Sum the client's billed events per model, with the input/output token split.

    What counts: docs/billing-rules.md#what-counts.
    """
    rows = db.session.execute(
        select(
            UsageEvent.model,
            func.sum(UsageEvent.input_tokens).label("input_tokens"),
            func.sum(UsageEvent.output_tokens).label("output_tokens"),
            func.sum(UsageEvent.messages).label("messages"),
            func.count().label("events"),
        )
        .where(UsageEvent.client_id == client.id, UsageEvent.state == UsageState.COUNTED)
        .group_by(UsageEvent.model)
        .order_by(UsageEvent.model)
    ).all()
    return [
        {
            "model": row.model,
            "input_tokens": int(row.input_tokens),
            "output_tokens": int(row.output_tokens),
            "messages": int(row.messages),
            "events": row.events,
        }
        for row in rows
    ]


def _recent_reports(client: RebillClient, limit: int) -> list[dict[str, Any]]:
    """Return the client's newest outbox rows with their Stripe identifiers and delivery state."""
    reports = db.session.scalars(
        select(UnitReport).where(UnitReport.client_id == client.id).order_by(UnitReport.id.desc()).limit(limit)
    )
    return [
        {
            "identifier": report.identifier,
            "units": report.units,
            "status": report.status,
            "attempts": report.attempts,
            "last_error": report.last_error,
            "usage_timestamp": report.usage_timestamp,
            # The time Stripe was given and why it differs (usage before the current period, or too old).
            "stripe_timestamp": report.stripe_timestamp,
            "timestamp_shift": report.timestamp_shift,
            "created_at": report.created_at,
            "sent_at": report.sent_at,
        }
        for report in reports
    ]


def _utc_day(column):
    """Return a SQL expression for the UTC calendar day (YYYY-MM-DD) of a timestamp, on either backend."""
    if is_postgresql():
        return func.to_char(func.timezone("UTC", column), "YYYY-MM-DD")
    # SQLite holds UTC timestamps as ISO text (core.database.UTCDateTime).
    return func.strftime("%Y-%m-%d", column)


def _aware(value: dt.datetime | str | None) -> dt.datetime | None:
    """Aggregates bypass the column type on SQLite: make min/max timestamps aware UTC datetimes."""
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    if value is not None and value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value
