"""Reconcile: compare what the ledger says reached Stripe with Stripe's own totals, per client, this period.

Read-only: it never sends or resends anything. Stripe deduplicates identifiers only for ~24 h, so a unit
whose delivery is unknown after that window must be settled by a person looking at these numbers
(docs/stripe.md §1.8-§1.9, §8.6), not by retrying blindly.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from dataclasses import dataclass, field
from decimal import Decimal

from sqlalchemy import case, func, select

from billing.models import Agency, RebillClient, UnitReport
from billing.stripe_gateway import StripeGateway, StripeGatewayError, StripeWindowTotal, gateway_for
from core.database import db, utcnow


@dataclass
class ReconcileLine:
    """One Stripe target (customer + meter, or customer + legacy price) and how the ledger compares."""

    company_id: str
    client_ids: list[int]
    customer_id: str
    target: str  # the meter's event name, or the legacy price id
    period_start: dt.datetime | None = None
    period_end: dt.datetime | None = None
    units_sent: int = 0  # marked sent in the ledger, usage timestamp inside the period
    units_unconfirmed: int = 0  # attempted, delivery not confirmed (pending retries, failed rows)
    units_waiting: int = 0  # never attempted yet
    stripe_total: Decimal | None = None
    problem: str | None = None
    nicknames: list[str] = field(default_factory=list)

    @property
    def drift(self) -> Decimal | None:
        """Return Stripe's total minus the units the ledger marked sent (None when Stripe was not read)."""
        return None if self.stripe_total is None else self.stripe_total - self.units_sent


def reconcile_clients(company_id: str | None = None, now: dt.datetime | None = None) -> list[ReconcileLine]:
    """Compare ledger and Stripe for every client (of one agency, or all) over its current billing period."""
    now = now or utcnow()
    agencies = select(Agency).where(Agency.stripe_key_ciphertext.is_not(None)).order_by(Agency.id)
    if company_id is not None:
        agencies = agencies.where(Agency.company_id == company_id)
    lines: list[ReconcileLine] = []
    for agency in db.session.scalars(agencies).all():
        lines.extend(_reconcile_agency(agency, now))
    db.session.rollback()
    return lines


def _reconcile_agency(agency: Agency, now: dt.datetime) -> list[ReconcileLine]:
    clients = db.session.scalars(
        select(RebillClient).where(RebillClient.agency_id == agency.id).order_by(RebillClient.id)
    ).all()
    groups: dict[tuple[str, str], list[RebillClient]] = defaultdict(list)
    for client in clients:
        target = client.meter_event_name if client.report_mode == "meter" else client.stripe_price_id
        groups[(client.stripe_customer_id, target or "")].append(client)
    if not groups:
        return []
    try:
        gateway = gateway_for(agency)
    except StripeGatewayError as error:
        return [_line(agency, key, members, problem=error.reason) for key, members in groups.items()]
    return [_reconcile_group(gateway, agency, key, members, now) for key, members in groups.items()]


def _line(agency: Agency, key: tuple[str, str], clients: list[RebillClient], **fields) -> ReconcileLine:
    return ReconcileLine(
        company_id=agency.company_id,
        client_ids=[client.id for client in clients],
        nicknames=[client.nickname for client in clients],
        customer_id=key[0],
        target=key[1],
        **fields,
    )


def _reconcile_group(
    gateway: StripeGateway, agency: Agency, key: tuple[str, str], clients: list[RebillClient], now: dt.datetime
) -> ReconcileLine:
    line = _line(agency, key, clients)
    first = clients[0]
    try:
        window = _stripe_window(gateway, first, now)
    except StripeGatewayError as error:
        line.problem = error.reason
        return line
    if window is None:
        line.problem = "Stripe shows no current period for this client (no subscription item on its price)"
        return line
    line.period_start, line.period_end, line.stripe_total = window.start, window.end, window.total
    sent, unconfirmed, waiting = db.session.execute(
        select(
            _units_where(UnitReport.status == "sent"),
            _units_where((UnitReport.status != "sent") & UnitReport.first_attempt_at.is_not(None)),
            _units_where((UnitReport.status != "sent") & UnitReport.first_attempt_at.is_(None)),
        ).where(
            UnitReport.client_id.in_(line.client_ids),
            UnitReport.usage_timestamp >= window.start,
            UnitReport.usage_timestamp < window.end,
        )
    ).one()
    line.units_sent, line.units_unconfirmed, line.units_waiting = int(sent), int(unconfirmed), int(waiting)
    return line


def _units_where(condition):
    """Sum the units of the reports matching a condition (0 when none)."""
    return func.coalesce(func.sum(case((condition, UnitReport.units), else_=0)), 0)


def _stripe_window(gateway: StripeGateway, client: RebillClient, now: dt.datetime) -> StripeWindowTotal | None:
    """Read Stripe's total for the client's current period (subscription period, else the calendar month)."""
    if client.report_mode == "legacy":
        item = client.subscription_item_id or gateway.find_subscription_item(
            client.stripe_customer_id, client.stripe_price_id
        )
        return gateway.usage_record_total(item, now) if item else None
    if not client.meter_id:
        raise _NoMeter()
    period = gateway.subscription_period(client.stripe_customer_id, client.stripe_price_id)
    start, end = period if period else (now.replace(day=1, hour=0, minute=0, second=0, microsecond=0), now)
    return gateway.meter_event_total(client.meter_id, client.stripe_customer_id, start, min(end, now))


class _NoMeter(StripeGatewayError):
    def __init__(self):
        super().__init__("the client's meter id is unknown; edit the client to refresh its price")
