"""The Stripe reads a reporting tick makes before it sends: billing periods, and totals for the >24 h check.

docs/billing-rules.md rule 8: one agency's slow or failing Stripe never holds up another agency's sends. A
tick (billing.reporting) first sends every report that needs no read, in the background, and only then
reads, round-robin across agencies (each agency's first report before any agency's second). The reads
themselves are, for the whole tick:

- cached: a customer's live subscription items are read once (one listing), however many of its reports,
  prices and meters need a period from them;
- budgeted: no read starts once the budget is spent, and beyond each agency's first read of the tick none
  starts once READ_SHARE of it is spent (so every agency makes progress every tick, and sends keep the rest
  of the budget); the reports wait for the next tick;
- remembered: after a read of an agency fails (Stripe unreachable, timed out) or is slow (longer than
  SLOW_SHARE of the budget, and at least SLOW_FLOOR_SECONDS), that agency reads nothing more this tick, and
  its other reports that need a read are retried with backoff (their ``next_attempt_at``), so the next ticks
  do not spend their time on it either. The agency still makes progress: a read at least every backoff.

A single read in flight is never cut short (the Stripe client's own timeout bounds it).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from billing.stripe_gateway import LiveItem, StripeGateway, StripeUnavailable, SubscriptionPeriod, item_for

READ_SHARE = 0.5
SLOW_SHARE = 0.1
SLOW_FLOOR_SECONDS = 1.0


class NotCached(Exception):
    """The answer needs a Stripe read, and reads are not allowed now (the tick's first, read-free pass)."""


class ReadDeferred(Exception):
    """No read now: the tick's budget (or its read share) is spent; the report waits for the next tick."""


class ReadsBackedOff(StripeUnavailable):
    """No read now: this agency's Stripe failed or was slow earlier in the tick; retried with backoff."""


class TickReads:
    """One tick's Stripe reads before sending: cached, within the budget, and remembering slow agencies."""

    def __init__(self, budget_seconds: float):
        started = time.monotonic()
        self._reads_until = started + budget_seconds * READ_SHARE
        self._budget_ends = started + budget_seconds
        self._have_read: set[int] = set()
        self._slow_seconds = max(budget_seconds * SLOW_SHARE, SLOW_FLOOR_SECONDS)
        self._items: dict[tuple[int, str], list[LiveItem]] = {}  # (agency, customer) -> its live items
        self._backed_off: dict[int, str] = {}  # agency id -> why its Stripe is not read again this tick
        self._allowed = True

    @contextmanager
    def cached_only(self) -> Iterator[None]:
        """Within this block every read raises NotCached (answers already read are still given)."""
        self._allowed = False
        try:
            yield
        finally:
            self._allowed = True

    @contextmanager
    def reading(self, agency_id: int) -> Iterator[None]:
        """Make one read of the agency's Stripe, or raise why not (NotCached, ReadDeferred, ReadsBackedOff)."""
        if not self._allowed:
            raise NotCached()
        if agency_id in self._backed_off:
            raise ReadsBackedOff(f"not asked this time: {self._backed_off[agency_id]}; retried later")
        started = time.monotonic()
        if started >= self._budget_ends or (agency_id in self._have_read and started >= self._reads_until):
            raise ReadDeferred()
        self._have_read.add(agency_id)
        try:
            yield
        except StripeUnavailable as error:
            self._backed_off[agency_id] = error.reason
            raise
        finally:
            took = time.monotonic() - started
            if took > self._slow_seconds:
                self._backed_off.setdefault(
                    agency_id, f"Stripe could not be reached quickly (a read took {took:.0f} s)"
                )

    def period(
        self, agency_id: int, gateway: StripeGateway, customer_id: str, price_id: str | None, meter_id: str | None
    ) -> SubscriptionPeriod | None:
        """The current period of the customer's item that bills units sent for the price (``item_for``: on the
        price, else on any price of ``meter_id``; None without one), from one read of the customer's live items
        a tick, however many of its reports, prices and meters need it: a report needing the meter fallback
        needs no second read, which the tick's read share could defer every tick."""
        if not price_id and not meter_id:
            return None
        key = (agency_id, customer_id)
        if key not in self._items:
            with self.reading(agency_id):
                self._items[key] = gateway.live_items(customer_id)
        item = item_for(self._items[key], price_id, meter_id)
        return item.period if item is not None else None
