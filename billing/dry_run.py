"""Dry-run (``shadow``) clients: what they would have billed (docs/billing-rules.md rule 13).

A client in ``shadow`` status is aggregated like any other (billing.units), but its events are kept in state
``shadow``: measured (their ``counted`` quantity is stored), never added to the client's billed counters
(``counted_usage``, ``remainder``, ``units_logged``) and never in an outbox row, so nothing of them can reach
Stripe, not even after the client is set ``active``: rule 11 judges each event by the status in force when
Rebill first received it.

What a client would have billed is computed when shown, from the ledger: its shadow usage that occurred in
its current period, divided by its billing unit N and rounded down, priced with its price terms
(billing.estimates) as if those were the period's only units. Each period starts afresh (nothing carries from
one period to the next, nor into billing): a dry run's figure is an estimate, the billed money never sees it.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from dataclasses import dataclass

from sqlalchemy import func, select

from billing.estimates import Estimate, PriceTerms, estimate
from billing.models import RebillClient, UsageEvent
from billing.states import ClientStatus, UsageState
from core.database import db


@dataclass(frozen=True)
class WouldHaveBilled:
    """A client's dry-run usage in its current period, the units it makes and what Stripe would charge."""

    usage: int
    units: int
    estimate: Estimate | None  # None until the client's price has been read from Stripe

    @classmethod
    def of(cls, usage: int, billing_unit: int, terms: PriceTerms | None) -> WouldHaveBilled:
        """Turn dry-run usage into whole units (floor(usage / N), as billing would) and price them."""
        units = usage // billing_unit if billing_unit > 0 else 0
        return cls(usage=usage, units=units, estimate=estimate(terms, units) if terms is not None else None)

    def to_json(self) -> dict:
        """The client object's ``would_have_billed`` (docs/contract.md §5)."""
        return {
            "usage": self.usage,
            "units": self.units,
            "estimate": None
            if self.estimate is None
            else {"amount": self.estimate.amount, "currency": self.estimate.currency},
        }


def shows_dry_run(client: RebillClient, shadow_usage: int) -> bool:
    """A client shows what it would have billed while in shadow, and for the rest of a period it spent some in."""
    return client.status == ClientStatus.SHADOW or shadow_usage > 0


def shadow_usage_in_periods(periods: dict[int, tuple[dt.datetime, dt.datetime]]) -> dict[int, int]:
    """Sum each client's dry-run usage that occurred in its period: one query per distinct period."""
    by_period: dict[tuple[dt.datetime, dt.datetime], list[int]] = defaultdict(list)
    for client_id, period in periods.items():
        by_period[period].append(client_id)
    usage: dict[int, int] = {}
    for (start, end), client_ids in by_period.items():
        rows = db.session.execute(
            select(UsageEvent.client_id, func.sum(UsageEvent.counted))
            .where(
                UsageEvent.client_id.in_(client_ids),
                UsageEvent.state == UsageState.SHADOW,
                UsageEvent.occurred_at >= start,
                UsageEvent.occurred_at < end,
            )
            .group_by(UsageEvent.client_id)
        ).all()
        usage.update({client_id: int(total) for client_id, total in rows})
    return usage
