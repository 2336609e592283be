"""A client's statement, as the client itself reads it: this period's usage, units and estimated charge, the
daily usage, and the previous periods. No Stripe ids, no agency settings: only names and plain words.
"""

from __future__ import annotations

import calendar
import datetime as dt

from sqlalchemy import func, select

from billing.estimates import PriceTerms, estimate
from billing.models import Agency, ClientPeriod, RebillClient, UnitReport, UsageEvent
from billing.periods import ClientMoney, client_money
from billing.states import BillingState, ClientStatus, UsageState
from billing.usage import client_usage
from core.database import db, utcnow

PREVIOUS_PERIODS = 3
MEASURES = {
    "tokens": "tokens",
    "ghl_outbound": "GHL outbound messages",
    "ghl_inbound": "GHL inbound messages",
    "ghl_all": "GHL messages (inbound and outbound)",
    "platform": "messages",
    "messages": "messages",
}
STATES = {
    BillingState.OK: "Billing normally",
    BillingState.FAILING: "Billing needs your agency's attention",
    BillingState.PAUSED: "Paused: usage is recorded, not billed",
    BillingState.STRIPE_DISCONNECTED: "Billing is on hold at your agency",
}
DRY_RUN_STATE = "Dry run: usage is counted and shown, nothing is billed yet"


def client_statements(agency: Agency, clients: list[RebillClient], now: dt.datetime | None = None) -> list[dict]:
    """Return each client's statement (see the module docstring), oldest client first."""
    now = now or utcnow()
    money = client_money(agency, clients, now)
    return [_statement(agency, client, money[client.id], now) for client in clients]


def _statement(agency: Agency, client: RebillClient, money: ClientMoney, now: dt.datetime) -> dict:
    cached = db.session.get(ClientPeriod, client.id)
    fresh = cached is not None and cached.price_id == client.stripe_price_id and cached.price_terms
    terms = PriceTerms.from_json(cached.price_terms) if fresh else None
    previous = []
    for start, end in previous_periods(money.period_start, money.period_end, PREVIOUS_PERIODS):
        if end <= client.created_at:
            break  # the client did not exist yet
        units = _units_between(client.id, start, end)
        previous.append(
            {
                "start": start.isoformat(),
                "end": end.isoformat(),
                "units": units,
                # At today's price: Stripe's invoice for that period is the authority.
                "estimate": _estimate_json(terms, units),
            }
        )
    usage = client_usage(agency, client.id)
    dry_run = client.status == ClientStatus.SHADOW
    return {
        "client_id": client.id,
        "nickname": client.nickname,
        "measure": MEASURES.get(client.message_source or client.charge_by, client.charge_by),
        "billing_unit": client.billing_unit,
        "state": DRY_RUN_STATE if dry_run else STATES.get(money.billing_state, money.billing_state),
        "dry_run": dry_run,
        # What the dry run would have billed this period (billing.dry_run); None without dry-run usage in it.
        "would_have_billed": money.would_have_billed.to_json() if money.would_have_billed else None,
        "product_name": money.product_name,
        "price_name": money.price_name,
        "period": money.period_json() | {"usage": _usage_between(client.id, money.period_start, money.period_end)},
        "daily": [
            {"date": day["date"], "usage": day["usage"], "shadow_usage": day["shadow_usage"]} for day in usage["daily"]
        ],
        "previous_periods": previous,
    }


def previous_periods(start: dt.datetime, end: dt.datetime, count: int) -> list[tuple[dt.datetime, dt.datetime]]:
    """Return the ``count`` periods before [start, end), newest first: whole months for a monthly period
    (Stripe keeps the anchor day, shortened to the month's last day), else the same length."""
    monthly = 28 <= (end - start).days <= 31
    periods = []
    for _ in range(count):
        earlier = _months_before(start, 1) if monthly else start - (end - start)
        periods.append((earlier, start))
        start, end = earlier, start
    return periods


def _months_before(moment: dt.datetime, months: int) -> dt.datetime:
    month = moment.month - months
    year = moment.year + (month - 1) // 12
    month = (month - 1) % 12 + 1
    return moment.replace(year=year, month=month, day=min(moment.day, calendar.monthrange(year, month)[1]))


def _units_between(client_id: int, start: dt.datetime, end: dt.datetime) -> int:
    return int(
        db.session.scalar(
            select(func.coalesce(func.sum(UnitReport.units), 0)).where(
                UnitReport.client_id == client_id, UnitReport.usage_timestamp >= start, UnitReport.usage_timestamp < end
            )
        )
    )


def _usage_between(client_id: int, start: dt.datetime, end: dt.datetime) -> int:
    """Sum the usage billed toward units that occurred in [start, end)."""
    return int(
        db.session.scalar(
            select(func.coalesce(func.sum(UsageEvent.counted), 0)).where(
                UsageEvent.client_id == client_id,
                UsageEvent.state == UsageState.COUNTED,
                UsageEvent.occurred_at >= start,
                UsageEvent.occurred_at < end,
            )
        )
    )


def _estimate_json(terms: PriceTerms | None, units: int) -> dict | None:
    if terms is None:
        return None
    charge = estimate(terms, units)
    return {"amount": charge.amount, "currency": charge.currency}
