"""A client as an aggregation round holds it (billing.units): its settings and counters, and what the pass adds.

A round holds up to ``billing.units.CLIENTS_PER_ROUND`` of these at once, so each is small: slots, one string
object per setting value shared by every client that has it, one measuring function per combination of
settings (bench/README.md, issue 13). What the tally knows besides the client's row: its status when an event
was received (rule 11) and the usage it may still count before its lifetime limit (rule 12) and its cap
(docs/billing-rules.md "Units in a period").
"""

from __future__ import annotations

import datetime as dt
import functools
import sys

from sqlalchemy import select

from billing.aggregation_store import TALLY_FIELDS, AggregationStore
from billing.models import RebillClient
from billing.periods import client_periods, units_in_periods
from billing.sources import ClientKey, usage_measure
from core.database import db

# Rule 12: a client's lifetime usage stops counting here, well inside BIGINT (9.2e18). No real client gets
# near it: 10^8 tokens every second for a hundred years is 3e17, and 4e18 tokens cost about $400 billion even
# at $0.10 per million. Reaching it means bad data, so the client is quarantined instead of overflowing.
CLIENT_USAGE_MAX = 4 * 10**18

# Settings many clients share: one string object each instead of one per client.
_SHARED_STRINGS = frozenset(("provider", "charge_by", "message_source", "status"))
# One measuring function per combination of settings, shared by the clients that have it.
_measure = functools.cache(usage_measure)


class ClientTally:
    """One locked client's settings, counters, and the usage this pass adds to it."""

    __slots__ = (
        *TALLY_FIELDS,
        "term_started",
        "closed_terms",
        "measure",
        "new_usage",
        "latest",
        "headroom",
        "cap_room",
        "newly_quarantined",
    )

    def __init__(self, row, store: AggregationStore):
        for name in TALLY_FIELDS:
            value = getattr(row, name)
            setattr(self, name, sys.intern(value) if name in _SHARED_STRINGS and value is not None else value)
        self.term_started = store.moment(self.term_started_at)  # in the claim's unit of time
        self.closed_terms: list[tuple] | None = None  # (starts, ends, status, (provider, source_key)), loaded once
        self.measure = _measure(self.charge_by, self.provider, self.message_source)
        self.new_usage = 0
        self.latest: dt.datetime | int | None = None  # in the claim's unit of time
        # What the client may still count before CLIENT_USAGE_MAX (rule 12); below zero is never written.
        self.headroom = CLIENT_USAGE_MAX - self.counted_usage
        # Usage the client may still count this period before its units reach monthly_cap_units (None: no
        # cap); set by give_cap_room.
        self.cap_room: int | None = None
        self.newly_quarantined = False
        if self.quarantine_reason is None and self.billing_unit < 1:
            self.quarantine(f"its billing unit is {self.billing_unit}, not a positive number; usage kept, not billed")

    @property
    def key(self) -> ClientKey:
        return (self.agency_id, self.provider, self.source_key)

    def quarantine(self, reason: str) -> None:
        """Stop counting this client's usage, for a reason the agency and operators can read."""
        self.quarantine_reason = reason
        self.newly_quarantined = True

    def status_before_term(self, received: dt.datetime | int, store: AggregationStore) -> str | None:
        """Return the client's status for usage received before its current term; None: not its usage then.

        Rare (an ingest that committed after a change, a replay): the client's closed terms are read once.
        """
        if self.closed_terms is None:
            moment = store.moment
            self.closed_terms = [
                (moment(term.starts_at), moment(term.ends_at), term.status, (term.provider, term.source_key))
                for term in store.closed_terms(self.id)
            ]
        for starts, ends, status, source in self.closed_terms:
            if starts <= received < ends:
                return status if source == (self.provider, self.source_key) else None
        return None


def give_cap_room(tallies: list[ClientTally], now: dt.datetime) -> None:
    """Give each capped client the usage it may still count before this period's units reach the cap.

    Units in the period are the money view's (billing.periods: the client's Stripe billing period, else
    the calendar month; units sent or waiting). The remainder already carried counts toward the next
    unit, so the room ends exactly on the cap's unit boundary.
    """
    capped = {tally.id: tally for tally in tallies if tally.monthly_cap_units is not None}
    if not capped:
        return
    clients = db.session.scalars(select(RebillClient).where(RebillClient.id.in_(list(capped)))).all()
    units = units_in_periods(client_periods(clients, now), now)
    for client_id, tally in capped.items():
        units_left = max(0, tally.monthly_cap_units - units.get(client_id, 0))
        tally.cap_room = max(0, units_left * tally.billing_unit - tally.remainder)
