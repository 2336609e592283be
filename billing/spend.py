"""Spend controls the AI platform asks about: may this channel or subaccount spend now?

``source_status`` answers in one indexed read (the live-source unique index of rebill_client, and the
client's unit reports of the period), so the platform can ask before every answer it generates.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import and_, func, select

from billing.models import RebillClient, UnitReport
from core.database import db, utcnow

SOURCE_STATUSES = ("active", "paused", "capped", "payment_failed", "shadow", "unmapped")


@dataclass(frozen=True)
class SourceStatus:
    """What the AI platform needs to decide whether to serve a channel or subaccount."""

    status: str
    units: int
    cap_units: int | None


def source_status(agency_id: int, *, channel: str | None = None, location_id: str | None = None) -> SourceStatus:
    """Return the status of the live client mapping an API channel or a GHL subaccount, and its period units.

    unmapped: no client maps it. payment_failed: Stripe could not collect the customer's invoice (whether or
    not the agency chose to pause the client for it). paused / shadow: as the agency set the client. capped:
    the period's billed units reached the client's monthly cap. active: billed normally.
    """
    provider, source_key = ("capri_api", channel) if channel is not None else ("ghl", location_id)
    start, end = current_period(utcnow())
    units = _units_query(RebillClient.id == UnitReport.client_id, start, end).scalar_subquery()
    row = db.session.execute(
        select(
            RebillClient.status,
            RebillClient.payment_failed_at,
            RebillClient.paused_for_payment,
            RebillClient.monthly_cap_units,
            units.label("units"),
        ).where(
            and_(
                RebillClient.agency_id == agency_id,
                RebillClient.provider == provider,
                RebillClient.source_key == source_key,
                RebillClient.deleted_at.is_(None),
            )
        )
    ).one_or_none()
    if row is None:
        return SourceStatus("unmapped", 0, None)
    if row.paused_for_payment and row.status == "paused":
        status = "payment_failed"
    elif row.status in ("paused", "shadow"):
        status = row.status
    elif row.monthly_cap_units is not None and row.units >= row.monthly_cap_units:
        status = "capped"
    elif row.payment_failed_at is not None:
        status = "payment_failed"
    else:
        status = "active"
    return SourceStatus(status, int(row.units), row.monthly_cap_units)


def current_period(now: dt.datetime) -> tuple[dt.datetime, dt.datetime]:
    """The period caps and alerts count units in: the UTC calendar month."""
    return calendar_month(now)


def period_units(client_ids: list[int], start: dt.datetime, end: dt.datetime) -> dict[int, int]:
    """Units billed to each client in [start, end): its unit reports by usage time, sent or waiting to be."""
    if not client_ids:
        return {}
    rows = db.session.execute(
        _units_query(UnitReport.client_id.in_(client_ids), start, end)
        .add_columns(UnitReport.client_id)
        .group_by(UnitReport.client_id)
    ).all()
    return {row.client_id: int(row[0]) for row in rows}


def _units_query(which, start: dt.datetime, end: dt.datetime):
    return select(func.coalesce(func.sum(UnitReport.units), 0)).where(
        which, UnitReport.usage_timestamp >= start, UnitReport.usage_timestamp < end
    )


def calendar_month(moment: dt.datetime) -> tuple[dt.datetime, dt.datetime]:
    """The UTC calendar month holding ``moment``: [first day 00:00, first day of the next month)."""
    start = moment.astimezone(dt.UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = (start + dt.timedelta(days=32)).replace(day=1)
    return start, end
