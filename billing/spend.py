"""Spend controls the AI platform asks about: may this channel or subaccount spend now?

``source_status`` reads the live client mapping the source with its cached billing period (one query on the
live-source unique index and the period's primary key), then the units of that period (the unit reports'
client index), so the platform can ask before every answer it generates. The period and its units are the
money view's (billing.periods): the same figures the portal shows.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import and_, select

from billing.models import ClientPeriod, RebillClient
from billing.periods import period_of, units_in_periods
from billing.sources import client_source
from billing.states import ClientStatus, SpendStatus
from core.database import db, utcnow

SOURCE_STATUSES = tuple(SpendStatus)  # the answer's words, in the order docs/contract.md lists them


@dataclass(frozen=True)
class SourceStatus:
    """What the AI platform needs to decide whether to serve a channel or subaccount."""

    status: SpendStatus
    units: int
    cap_units: int | None


def source_status(agency_id: int, *, channel: str | None = None, location_id: str | None = None) -> SourceStatus:
    """Return the status of the live client mapping an API channel or a GHL subaccount, and its period units.

    unmapped: no client maps it. payment_failed: Stripe could not collect the customer's invoice (whether or
    not the agency chose to pause the client for it). paused / shadow: as the agency set the client. capped:
    the period's billed units reached the client's monthly cap. active: billed normally.
    """
    provider, source_key = client_source(channel, location_id)
    found = db.session.execute(
        select(RebillClient, ClientPeriod)
        .outerjoin(ClientPeriod, ClientPeriod.client_id == RebillClient.id)
        .where(
            and_(
                RebillClient.agency_id == agency_id,
                RebillClient.provider == provider,
                RebillClient.source_key == source_key,
                RebillClient.deleted_at.is_(None),
            )
        )
    ).one_or_none()
    if found is None:
        return SourceStatus(SpendStatus.UNMAPPED, 0, None)
    client, cached = found
    now = utcnow()
    units = units_in_periods({client.id: period_of(cached, client, now)}, now).get(client.id, 0)
    cap = client.monthly_cap_units
    if client.paused_for_payment and client.status == ClientStatus.PAUSED:
        status = SpendStatus.PAYMENT_FAILED
    elif client.status in (ClientStatus.PAUSED, ClientStatus.SHADOW):
        status = SpendStatus(client.status)
    elif cap is not None and units >= cap:
        status = SpendStatus.CAPPED
    elif client.payment_failed_at is not None:
        status = SpendStatus.PAYMENT_FAILED
    else:
        status = SpendStatus.ACTIVE
    return SourceStatus(status, units, cap)
