"""Aggregation: turn pending usage events into per-client counted usage, units and outbox rows.

The rules (docs/billing-rules.md) this module implements, each pinned by a named test in tests/billing/test_units.py
(8 and 12: tests/billing/test_units_isolation.py; 11: tests/billing/test_units_received_time.py):

1. A client keeps ``remainder`` (usage toward its next unit). On q new counted usage:
   ``remainder += q; k = remainder // N; remainder -= k * N; units_logged += k``. Nothing is rounded or dropped.
2. Each event is aggregated once: its state leaves ``pending`` in the same transaction that adds it to its
   client (the ledger already deduplicated it on its source's event id).
3. An event whose channel / subaccount no live client maps becomes ``unmapped``, kept and never billed
   later — unless the agency creates a client with ``bill_unmapped_usage=True`` (billing.clients).
4. Changing N first counts the client's pending events under the old N, then applies the new N to the
   carried remainder (``set_billing_unit``), so the remainder never re-divides retroactively.
5. A paused client's events become ``paused`` (measured, visible, never billed); pausing and resuming first
   count the pending events under the old status, so usage received while paused is never billed.
7. One pass writes ONE ``UnitReport`` outbox row per client carrying all its new units k, in the same
   transaction as the counters and the events' state change (the reporter sends one Stripe call for it).
8. Isolation: one agency's bad data never stops the pass for the others. An impossible value (rule 12) is
   quarantined where it is: an event beyond what one AI call produces becomes ``quarantined``; a client whose
   total would pass ``CLIENT_USAGE_MAX`` (or whose N is not positive) gets a ``quarantine_reason`` and its
   further events are ``quarantined`` — kept, visible, never billed. Anything else that fails a pass (a
   fault nobody foresaw) rolls that pass back and reruns it agency by agency: only the failing agency's
   events wait, and the error is logged with its agency id.
11. An event is judged by the client's settings at the time Rebill first received it (``received_at``), not
   at the time it is aggregated: usage received from ``term_started_at`` on counts under the client's
   current status and source, earlier usage under the closed ``RebillClientTerm`` it was received in, or
   not at all (``unmapped``) before the client existed. Pausing, resuming and moving close the term
   (``start_new_term``) after counting the pending events and under the client's row lock, so an ingest
   that stamped its event before the change but committed after it, or a replayed delivery that keeps its
   first receipt, is judged by the settings in force when it arrived. Passes never see a change half-made:
   the change holds the client's row lock until it commits, and passes skip locked clients. The order of
   commits no longer matters (PostgreSQL READ COMMITTED, the one-statement webhook path that stamps its
   delivery and usage with one time, SQLite ingest waiting for the write lock after stamping): only the
   received time does. Both times come from Rebill's processes' clocks, so hosts must keep NTP time.

Concurrency. Aggregation never waits on a lock on PostgreSQL, so it cannot deadlock with client edits or a
second aggregator: it claims pending events with ``FOR UPDATE SKIP LOCKED`` in id-ordered batches and locks
their clients with ``FOR UPDATE SKIP LOCKED`` in id order before touching counters. Events whose client is
locked elsewhere (an edit, another aggregator) stay pending for the next pass. Client edits lock the client
row (waiting) and count its pending events first (``flush_client_usage``); they may wait on an aggregator,
never the reverse. On SQLite every writer takes the database write lock up front (``take_write_lock``), so
aggregators and edits simply run one after another. Ingest (``record_usage``) only inserts, so it never
waits on aggregation on PostgreSQL (a duplicate of an event being aggregated right now waits for that pass).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from dataclasses import dataclass, fields

from sqlalchemy import BigInteger, bindparam, cast, extract, func, insert, select, text, tuple_, update
from sqlalchemy.orm.util import identity_key

from billing.ledger import MAX_MESSAGES_PER_EVENT, MAX_TOKENS_PER_EVENT
from billing.models import RebillClient, RebillClientTerm, UnitReport, UsageEvent
from billing.periods import client_periods, units_in_periods
from core.database import db, is_postgresql, utcnow

log = logging.getLogger("billing.units")

BATCH_SIZE = 20_000
# Rule 12: a client's lifetime usage stops counting here, well inside BIGINT (9.2e18). No real client gets
# near it: 10^8 tokens every second for a hundred years is 3e17, and 4e18 tokens cost about $400 billion even
# at $0.10 per million. Reaching it means bad data, so the client is quarantined instead of overflowing.
CLIENT_USAGE_MAX = 4 * 10**18
KEY_LOOKUP_CHUNK = 500
# Stripe takes meter event timestamps "within the past 35 calendar days" (docs/stripe.md §1.3,
# docs.stripe.com/billing/subscriptions/usage-based/recording-usage-api); keep an hour of slack for the
# time between writing the outbox row and sending it.
OLDEST_USAGE_TIMESTAMP = dt.timedelta(days=35) - dt.timedelta(hours=1)

ClientKey = tuple[int, str, str]  # (agency_id, provider, source_key)

_EVENT = UsageEvent.__table__.c
_CLIENT = RebillClient.__table__.c
_CLAIM_COLUMNS = (
    _EVENT.id,
    _EVENT.agency_id,
    _EVENT.source,
    _EVENT.channel_id,
    _EVENT.location_id,
    _EVENT.input_tokens,
    _EVENT.output_tokens,
    _EVENT.messages,
    _EVENT.direction,
    _EVENT.occurred_at,
    _EVENT.received_at,
)
# On PostgreSQL the claim reads occurred_at and received_at as integer microseconds since the epoch:
# formatting every timestamp in the server and parsing it into a datetime was a measurable part of the claim
# reads (see bench/README.md); only each client's latest is turned back into a datetime (``_from_microseconds``).
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
# A client created to bill its source's earlier unmapped usage counts everything received before it, too.
SINCE_THE_START = _EPOCH


def _microseconds(column):
    return cast(extract("epoch", column) * 1_000_000, BigInteger)


_CLAIM_COLUMNS_POSTGRESQL = (
    *_CLAIM_COLUMNS[:-2],
    _microseconds(_EVENT.occurred_at).label("occurred_us"),
    _microseconds(_EVENT.received_at).label("received_us"),
)
_TALLY_COLUMNS = (
    _CLIENT.id,
    _CLIENT.agency_id,
    _CLIENT.provider,
    _CLIENT.source_key,
    _CLIENT.charge_by,
    _CLIENT.message_source,
    _CLIENT.status,
    _CLIENT.billing_unit,
    _CLIENT.counted_usage,
    _CLIENT.units_logged,
    _CLIENT.remainder,
    _CLIENT.report_sequence,
    _CLIENT.report_prefix,
    _CLIENT.quarantine_reason,
    _CLIENT.term_started_at,
    _CLIENT.monthly_cap_units,
)


@dataclass(frozen=True)
class AggregationResult:
    """What one aggregation pass did."""

    events: int = 0  # events that left ``pending`` (counted, paused, ignored or unmapped)
    units: int = 0  # units logged (sum of the new outbox rows' units)
    reports: int = 0  # UnitReport outbox rows written (at most one per client)
    deferred: int = 0  # events left pending because their client was locked by an edit or another pass
    quarantined: int = 0  # events kept as "quarantined" (rule 12), of those that left pending
    failed_agencies: tuple[int, ...] = ()  # agencies whose events stay pending after an unforeseen error

    def __add__(self, other: AggregationResult) -> AggregationResult:
        return AggregationResult(*(getattr(self, field.name) + getattr(other, field.name) for field in fields(self)))


def aggregate_pending_usage(batch_size: int = BATCH_SIZE) -> AggregationResult:
    """Aggregate every pending usage event into client counters and outbox rows; flush, never commit.

    Streams pending events in id order, ``batch_size`` at a time, and keeps only per-client tallies in
    memory. Events recorded after the pass started wait for the next pass. If the pass fails, it is rolled
    back and run again one agency at a time, so only the agency whose data fails waits (rule 8).
    """
    take_write_lock()
    try:
        with db.session.begin_nested():
            return _aggregate(batch_size)
    except Exception:  # any fault: the other agencies must not wait on it
        log.exception("aggregation pass failed; aggregating agency by agency")
    result = AggregationResult()
    for agency_id in _agencies_with_pending_usage():
        try:
            with db.session.begin_nested():
                result += _aggregate(batch_size, where=(_EVENT.agency_id == agency_id,))
        except Exception:
            log.exception(
                "aggregation failed for one agency; its usage stays pending", extra={"fields": {"agency_id": agency_id}}
            )
            result += AggregationResult(failed_agencies=(agency_id,))
    return result


def _aggregate(batch_size: int, where: Sequence = ()) -> AggregationResult:
    aggregation = _Aggregation(skip_locked=True)
    aggregation.run(batch_size=batch_size, where=where)
    return aggregation.finish()


def _agencies_with_pending_usage() -> list[int]:
    query = select(_EVENT.agency_id).where(_EVENT.state == "pending").distinct().order_by(_EVENT.agency_id)
    return list(db.session.scalars(query))


def flush_client_usage(client: RebillClient, batch_size: int = BATCH_SIZE) -> AggregationResult:
    """Aggregate the client's pending events under its current settings; the caller holds its row lock.

    Client edits call this before changing N, status, source or deletion, so events received before an edit
    count under the settings that were in force when they arrived. Waits for events another aggregation
    pass has claimed (that pass never waits for us, so this cannot deadlock).
    """
    aggregation = _Aggregation(skip_locked=False)
    aggregation.adopt(client)
    aggregation.run(batch_size=batch_size, where=source_filter(client.agency_id, client.provider, client.source_key))
    return aggregation.finish()


def set_billing_unit(client: RebillClient, billing_unit: int) -> int:
    """Apply a new N to the client's carried remainder and return the units that yields now.

    Call after ``flush_client_usage`` under the client's row lock. Rule 4: the remainder already counted
    carries into the new N. Decision: if the carried remainder reaches the new N (N was lowered), its
    units are logged at the change, in this transaction, with their own outbox row — so ``remainder < N``
    always holds and those units reach Stripe at the next tick without waiting for new usage.
    """
    units, remainder = divmod(client.remainder, billing_unit)
    client.billing_unit = billing_unit
    client.remainder = remainder
    if units:
        client.units_logged += units
        client.report_sequence += 1
        now = utcnow()
        db.session.add(
            UnitReport(
                agency_id=client.agency_id,
                client_id=client.id,
                identifier=report_identifier(client.report_prefix, client.id, client.report_sequence),
                units=units,
                usage_timestamp=now,
                status="pending",
                attempts=0,
                next_attempt_at=now,
            )
        )
    return units


def start_counting(client: RebillClient, *, earlier_usage: bool) -> None:
    """Start a new client's first term now (rule 11), after its source's pending usage was settled.

    ``earlier_usage``: the agency chose to bill the source's earlier unmapped usage, so the term reaches
    back to the start; otherwise usage received before this moment was never this client's.
    """
    client.term_started_at = SINCE_THE_START if earlier_usage else utcnow()


def start_new_term(client: RebillClient) -> None:
    """Close the client's current term now, before its status or source changes (rule 11).

    Call under the client's row lock, after ``flush_client_usage``: usage received until now counts under
    the settings that were in force, usage received from now on under the ones the caller sets next.
    """
    now = utcnow()
    db.session.add(
        RebillClientTerm(
            client_id=client.id,
            starts_at=client.term_started_at,
            ends_at=now,
            status=client.status,
            provider=client.provider,
            source_key=client.source_key,
        )
    )
    client.term_started_at = now


def set_client_status(client: RebillClient, status: str) -> None:
    """Pause or resume a client the caller holds locked (rules 5 and 11).

    Its pending usage counts under the old status first, and usage received until now keeps the old status
    even if it commits later; usage received from now on gets the new one.
    """
    flush_client_usage(client)
    start_new_term(client)
    client.status = status


def settle_source_before_mapping(agency_id: int, provider: str, source_key: str, *, bill_unmapped: bool) -> int:
    """Prepare a source's earlier usage for a client about to map it; return the events it will bill.

    Rule 3. Default: events of the source still pending were received before any client mapped it, so
    they become ``unmapped`` now and are never billed. With ``bill_unmapped=True`` (the agency's explicit
    choice) the source's unmapped events, and its pending ones, are left / put back to ``pending`` and the
    next aggregation counts them under the new client; the count of those events is returned.
    """
    where = source_filter(agency_id, provider, source_key)
    if not bill_unmapped:
        # Waits for events a running pass claimed; that pass marks them unmapped too (it cannot see the
        # client this transaction is creating), and they no longer match "pending" when we get them.
        db.session.execute(
            update(UsageEvent.__table__).where(_EVENT.state == "pending", *where).values(state="unmapped")
        )
        return 0
    # Lock (waiting) the source's pending and unmapped events first: events a running pass claimed come
    # back here as "unmapped" once it commits, and are then put back to pending with the others.
    db.session.execute(
        select(_EVENT.id).where(_EVENT.state.in_(("pending", "unmapped")), *where).with_for_update()
    ).all()
    db.session.execute(update(UsageEvent.__table__).where(_EVENT.state == "unmapped", *where).values(state="pending"))
    return db.session.scalar(select(func.count()).where(_EVENT.state == "pending", *where))


def take_write_lock() -> None:
    """On SQLite, make this transaction the database's writer now, so concurrent writers serialise.

    A read-then-write SQLite transaction can fail with "database is locked" when another writer commits in
    between; a first (empty) write takes the lock up front and later writers wait on the busy timeout.
    PostgreSQL uses row locks instead, so nothing happens there.
    """
    if not is_postgresql():
        db.session.execute(update(RebillClient.__table__).where(_CLIENT.id == -1).values(remainder=_CLIENT.remainder))


def source_filter(agency_id: int, provider: str, source_key: str) -> tuple:
    """Return the WHERE terms selecting usage events of one channel (capri_api) or subaccount (ghl)."""
    column = _EVENT.channel_id if provider == "capri_api" else _EVENT.location_id
    return (_EVENT.agency_id == agency_id, column == source_key)


def measure_usage(
    charge_by: str,
    provider: str,
    message_source: str | None,
    source: str,
    input_tokens: int,
    output_tokens: int,
    messages: int,
    direction: str | None,
) -> int:
    """Return how much of a client's charge_by one matched event carries (docs/billing-rules.md#what-counts)."""
    measure = usage_measure(charge_by, provider, message_source)
    return measure(source, input_tokens, output_tokens, messages, direction)


# The GHL message directions each message source counts; "platform" counts the AI platform's `messages`.
GHL_DIRECTIONS = {"ghl_outbound": ("outbound",), "ghl_inbound": ("inbound",), "ghl_all": ("outbound", "inbound")}


def usage_measure(charge_by: str, provider: str, message_source: str | None):
    """Return the function (source, input, output, messages, direction) -> usage for a client's settings."""
    if charge_by == "tokens":
        # Tokens are reported only by the AI platform, through the usage API.
        return lambda source, inputs, outputs, messages, direction: inputs + outputs if source == "capri" else 0
    if provider == "capri_api" or message_source == "platform":
        return lambda source, inputs, outputs, messages, direction: messages if source == "capri" else 0
    directions = GHL_DIRECTIONS.get(message_source or "ghl_outbound", ())
    return lambda source, inputs, outputs, messages, direction: (
        messages if source == "ghl" and direction in directions else 0
    )


def report_identifier(report_prefix: str, client_id: int, sequence: int) -> str:
    """Return the deterministic Stripe identifier of a client's n-th unit report (at most 45 chars)."""
    return f"rebill_{report_prefix}_{client_id}_{sequence}"


def _fetch_all(statement) -> list[tuple]:
    """Run a select on the session's connection and return plain DBAPI tuples (PostgreSQL hot path).

    Streaming a million ledger rows through SQLAlchemy's per-row result processing costs seconds; the
    values the aggregation reads (ids, strings, integers, aware datetimes from psycopg) need none of it.
    """
    compiled = statement.compile(dialect=db.engine.dialect)
    connection = db.session.connection().connection.dbapi_connection
    with connection.cursor() as cursor:
        cursor.execute(str(compiled), compiled.params)
        return cursor.fetchall()


def _array_literal(values: Sequence[int | str]) -> str:
    """Return a PostgreSQL array literal of integers or plain words (no quoting needed)."""
    return "{" + ",".join(map(str, values)) + "}"


def _to_microseconds(moment: dt.datetime) -> int:
    """Return a datetime as integer microseconds since the epoch, as the PostgreSQL claim reads times."""
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _from_microseconds(moment: dt.datetime | int | None) -> dt.datetime | None:
    """Return an aware UTC datetime for a claim's occurred_at (a datetime, or microseconds since the epoch)."""
    if isinstance(moment, int):
        return _EPOCH + dt.timedelta(microseconds=moment)
    return moment


def usage_timestamp(latest: dt.datetime | None, now: dt.datetime) -> dt.datetime:
    """Return the timestamp Stripe gets for units: the latest usage, never future, never > 35 days old."""
    if latest is None:
        return now
    return min(max(latest, now - OLDEST_USAGE_TIMESTAMP), now)


class _Tally:
    """One locked client's settings, counters, and the usage this pass adds to it."""

    def __init__(self, row, postgresql: bool):
        for name in _TALLY_COLUMNS:
            setattr(self, name.key, getattr(row, name.key))
        # In the claim's unit: microseconds on PostgreSQL, aware datetimes on SQLite.
        self.term_started = _to_microseconds(self.term_started_at) if postgresql else self.term_started_at
        self.closed_terms: list[tuple] | None = None  # (starts, ends, status, provider, source_key), loaded once
        self.measure = usage_measure(self.charge_by, self.provider, self.message_source)
        self.new_usage = 0
        self.latest: dt.datetime | int | None = None  # int: microseconds since the epoch (PostgreSQL)
        # What the client may still count before CLIENT_USAGE_MAX (rule 12); below zero is never written.
        self.headroom = CLIENT_USAGE_MAX - self.counted_usage
        # Usage the client may still count this period before its units reach monthly_cap_units (None: no
        # cap); set by _Aggregation.limit_to_caps.
        self.cap_room: int | None = None
        self.newly_quarantined = False
        if self.quarantine_reason is None and self.billing_unit < 1:
            self.quarantine(f"its billing unit is {self.billing_unit}, not a positive number; usage kept, not billed")

    def quarantine(self, reason: str) -> None:
        """Stop counting this client's usage, for a reason the agency and operators can read."""
        self.quarantine_reason = reason
        self.newly_quarantined = True

    @property
    def key(self) -> ClientKey:
        return (self.agency_id, self.provider, self.source_key)


class _Aggregation:
    """One pass: claim pending events batch by batch, classify them, then write counters and outbox rows."""

    def __init__(self, *, skip_locked: bool):
        self.skip_locked = skip_locked
        self.postgresql = is_postgresql()
        self.now = utcnow()
        self.tallies: dict[int, _Tally] = {}
        self.by_key: dict[ClientKey, _Tally] = {}
        self.events = 0
        self.deferred = 0
        self.units = 0
        self.reports = 0
        self.quarantined = 0

    def adopt(self, client: RebillClient) -> None:
        """Aggregate for a client the caller already locked."""
        db.session.flush()
        tally = _Tally(client, self.postgresql)
        self.tallies[tally.id] = tally
        self.by_key[tally.key] = tally
        self.limit_to_caps([tally])

    def run(self, *, batch_size: int, where: Sequence = ()) -> None:
        """Claim and classify pending events (up to the newest id at the start), batch by batch."""
        newest = db.session.scalar(select(func.max(_EVENT.id)))
        if newest is None:
            return
        after = 0
        while True:
            claim = (
                select(*(_CLAIM_COLUMNS_POSTGRESQL if self.postgresql else _CLAIM_COLUMNS))
                .where(_EVENT.state == "pending", _EVENT.id > after, _EVENT.id <= newest, *where)
                .order_by(_EVENT.id)
                .limit(batch_size)
            )
            if self.postgresql:
                # SKIP LOCKED: two passes at once claim disjoint events. A flush waits instead, so it
                # sees every pending event of its client (LockRows sits under LIMIT: rows that stopped
                # being pending while we waited are skipped, not returned, so an empty batch means done).
                claim = claim.with_for_update(skip_locked=self.skip_locked)
            rows = _fetch_all(claim) if self.postgresql else db.session.execute(claim).all()
            if not rows:
                return
            after = rows[-1][0]
            keys = {(row[1], "capri_api", row[3]) if row[3] is not None else (row[1], "ghl", row[4]) for row in rows}
            live_keys = self._lock_clients(keys)
            self._write_events(rows[0][0], after, *self._classify(rows, live_keys))

    def _lock_clients(self, keys: set[ClientKey]) -> set[ClientKey]:
        """Lock the live clients of these keys (skipping ones locked elsewhere); return every live key."""
        unknown = [key for key in keys if key not in self.by_key]
        if not unknown:
            return set()
        found = self._find_live_clients(unknown)
        live = {(agency_id, provider, source_key) for _, agency_id, provider, source_key in found}
        ids = sorted(client_id for client_id, *_ in found)
        for start in range(0, len(ids), KEY_LOOKUP_CHUNK):
            # Consistent id order; SKIP LOCKED so aggregation never waits (see the module docstring).
            locked = db.session.execute(
                select(*_TALLY_COLUMNS)
                .where(_CLIENT.id.in_(ids[start : start + KEY_LOOKUP_CHUNK]), _CLIENT.deleted_at.is_(None))
                .order_by(_CLIENT.id)
                .with_for_update(skip_locked=self.skip_locked)
            ).all()
            tallies = [_Tally(row, self.postgresql) for row in locked]
            for tally in tallies:
                self.tallies[tally.id] = tally
                self.by_key[tally.key] = tally
            self.limit_to_caps(tallies)
        return live

    def limit_to_caps(self, tallies: list[_Tally]) -> None:
        """Give each capped client the usage it may still count before this period's units reach the cap.

        Units in the period are the money view's (billing.periods: the client's Stripe billing period, else
        the calendar month; units sent or waiting). The remainder already carried counts toward the next
        unit, so the room ends exactly on the cap's unit boundary.
        """
        capped = {tally.id: tally for tally in tallies if tally.monthly_cap_units is not None}
        if not capped:
            return
        clients = db.session.scalars(select(RebillClient).where(RebillClient.id.in_(list(capped)))).all()
        units = units_in_periods(client_periods(clients, self.now))
        for client_id, tally in capped.items():
            units_left = max(0, tally.monthly_cap_units - units.get(client_id, 0))
            tally.cap_room = max(0, units_left * tally.billing_unit - tally.remainder)

    def _find_live_clients(self, keys: list[ClientKey]) -> list[tuple[int, int, str, str]]:
        """Return (id, agency_id, provider, source_key) of the live clients of these keys (no lock)."""
        if self.postgresql:
            # One statement for any number of keys; the join uses the live-source unique index.
            return db.session.execute(
                text(
                    "SELECT c.id, c.agency_id, c.provider, c.source_key FROM rebill_client AS c "
                    "JOIN unnest(CAST(:agencies AS integer[]), CAST(:providers AS text[]), CAST(:keys AS text[])) "
                    "AS k(agency_id, provider, source_key) ON c.agency_id = k.agency_id "
                    "AND c.provider = k.provider AND c.source_key = k.source_key WHERE c.deleted_at IS NULL"
                ),
                {
                    "agencies": [key[0] for key in keys],
                    "providers": [key[1] for key in keys],
                    "keys": [key[2] for key in keys],
                },
            ).all()
        found = []
        for start in range(0, len(keys), KEY_LOOKUP_CHUNK):
            found += db.session.execute(
                select(_CLIENT.id, _CLIENT.agency_id, _CLIENT.provider, _CLIENT.source_key).where(
                    _CLIENT.deleted_at.is_(None),
                    tuple_(_CLIENT.agency_id, _CLIENT.provider, _CLIENT.source_key).in_(
                        keys[start : start + KEY_LOOKUP_CHUNK]
                    ),
                )
            ).all()
        return found

    def _classify(self, rows: Sequence, live_keys: set[ClientKey]) -> tuple[list, list, list, list]:
        """Decide each event's new state (as parallel lists) and add counted usage to its client's tally.

        Client id 0 stands for "no client" (unmapped), so the lists stay plain integers.
        """
        ids, states, client_ids, quantities = [], [], [], []
        by_key = self.by_key
        max_tokens, max_messages = MAX_TOKENS_PER_EVENT, MAX_MESSAGES_PER_EVENT
        # One unpacking per row: this loop runs once per event (a million in the benchmark).
        for event_id, agency_id, source, channel_id, location_id, inputs, outputs, messages, direction, at, received in rows:  # noqa: E501
            key = (agency_id, "capri_api", channel_id) if channel_id is not None else (agency_id, "ghl", location_id)
            tally = by_key.get(key)
            if tally is None and key in live_keys:
                self.deferred += 1  # its client is locked by an edit or another pass: next pass
                continue
            # Rule 11: the client's status when Rebill received the event; None: no client of it then.
            status = None
            if tally is not None:
                status = tally.status if received >= tally.term_started else self._status_at(tally, received)
            if inputs > max_tokens or outputs > max_tokens or messages > max_messages:
                # Rule 12: more than one AI call produces (stored before the ingest bounds existed).
                state, quantity = "quarantined", 0
            elif status is None:
                state, quantity = "unmapped", 0
            else:
                quantity = tally.measure(source, inputs, outputs, messages, direction)
                state = "counted"
                if quantity == 0:
                    state = "ignored"
                elif tally.quarantine_reason is not None:
                    state = "quarantined"
                elif status == "paused":
                    state = "paused"
                elif tally.cap_room == 0:
                    state = "capped"  # the period's units reached the cap: recorded, never billed
                elif quantity > tally.headroom:
                    tally.quarantine(
                        f"its usage stopped counting at {CLIENT_USAGE_MAX - tally.headroom:,} {tally.charge_by}: "
                        f"{quantity:,} more would pass the lifetime limit of {CLIENT_USAGE_MAX:,}, which no real "
                        "usage reaches; its later usage is kept, not billed"
                    )
                    state = "quarantined"
                else:
                    if tally.cap_room is not None:
                        # The event that crosses the cap counts only up to it, so exactly the cap is billed.
                        quantity = min(quantity, tally.cap_room)
                        tally.cap_room -= quantity
                    tally.headroom -= quantity
                    tally.new_usage += quantity
                    if tally.latest is None or at > tally.latest:
                        tally.latest = at
            if state == "quarantined":
                self.quarantined += 1
            ids.append(event_id)
            states.append(state)
            client_ids.append(tally.id if status is not None else 0)
            quantities.append(quantity)
        return ids, states, client_ids, quantities

    def _status_at(self, tally: _Tally, received: dt.datetime | int) -> str | None:
        """Return the client's status for usage received before its current term; None: not its usage then.

        Rare (an ingest that committed after a change, a replay): the client's closed terms are read once.
        """
        if tally.closed_terms is None:
            term = RebillClientTerm.__table__.c
            rows = db.session.execute(
                select(term.starts_at, term.ends_at, term.status, term.provider, term.source_key).where(
                    term.client_id == tally.id
                )
            ).all()
            moment = _to_microseconds if self.postgresql else (lambda value: value)
            tally.closed_terms = [(moment(starts), moment(ends), *settings) for starts, ends, *settings in rows]
        for starts, ends, status, provider, source_key in tally.closed_terms:
            if starts <= received < ends:
                return status if (provider, source_key) == (tally.provider, tally.source_key) else None
        return None

    def _write_events(self, first_id: int, last_id: int, ids: list, states: list, client_ids: list, quantities: list):
        """Move a batch of events out of pending in one statement."""
        if not ids:
            return
        self.events += len(ids)
        if self.postgresql:
            # Arrays as text literals (integers and fixed state words only): far cheaper to
            # build than adapting Python lists element by element. The id range keeps the join on the
            # primary key instead of a scan of the whole ledger.
            db.session.execute(
                text(
                    "UPDATE usage_event AS e SET state = v.state, client_id = NULLIF(v.client_id, 0), "
                    "counted = v.counted "
                    "FROM unnest(CAST(:ids AS bigint[]), CAST(:states AS text[]), CAST(:client_ids AS integer[]), "
                    "CAST(:counted AS bigint[])) AS v(id, state, client_id, counted) "
                    "WHERE e.id = v.id AND e.id BETWEEN :first_id AND :last_id"
                ),
                {
                    "ids": _array_literal(ids),
                    "states": _array_literal(states),
                    "client_ids": _array_literal(client_ids),
                    "counted": _array_literal(quantities),
                    "first_id": first_id,
                    "last_id": last_id,
                },
            )
            return
        db.session.execute(
            update(UsageEvent.__table__)
            .where(_EVENT.id == bindparam("b_id"))
            .values(state=bindparam("b_state"), client_id=bindparam("b_client_id"), counted=bindparam("b_counted")),
            [
                {"b_id": event_id, "b_state": state, "b_client_id": client_id or None, "b_counted": quantity}
                for event_id, state, client_id, quantity in zip(ids, states, client_ids, quantities, strict=True)
            ],
        )

    def finish(self) -> AggregationResult:
        """Apply the rule-1 arithmetic per client and write counters and one outbox row per client."""
        client_rows, report_rows = [], []
        self._write_quarantines([tally for tally in self.tallies.values() if tally.newly_quarantined])
        for tally in self.tallies.values():
            if tally.new_usage == 0:
                continue
            remainder = tally.remainder + tally.new_usage
            units, remainder = divmod(remainder, tally.billing_unit)
            sequence = tally.report_sequence + (1 if units else 0)
            client_rows.append(
                {
                    "b_id": tally.id,
                    "b_counted_usage": tally.counted_usage + tally.new_usage,
                    "b_units_logged": tally.units_logged + units,
                    "b_remainder": remainder,
                    "b_report_sequence": sequence,
                }
            )
            if units:
                self.units += units
                report_rows.append(
                    {
                        "agency_id": tally.agency_id,
                        "client_id": tally.id,
                        "identifier": report_identifier(tally.report_prefix, tally.id, sequence),
                        "units": units,
                        "usage_timestamp": usage_timestamp(_from_microseconds(tally.latest), self.now),
                        "status": "pending",
                        "attempts": 0,
                        "next_attempt_at": self.now,
                        "created_at": self.now,
                        "updated_at": self.now,
                    }
                )
        if client_rows:
            self._write_clients(client_rows)
        if report_rows:
            # Written last: if the outbox insert fails, the whole transaction (counters, event states)
            # rolls back with it, so there are never counters without their outbox row.
            self._write_reports(report_rows)
            self.reports = len(report_rows)
        self._expire_loaded(client_rows)
        return AggregationResult(
            events=self.events,
            units=self.units,
            reports=self.reports,
            deferred=self.deferred,
            quarantined=self.quarantined,
        )

    def _write_quarantines(self, tallies: list[_Tally]) -> None:
        """Record why these clients stopped counting (rare: one statement per client)."""
        for tally in tallies:
            log.error(
                "client quarantined: its usage is kept but no longer counted",
                extra={
                    "fields": {"client_id": tally.id, "agency_id": tally.agency_id, "reason": tally.quarantine_reason}
                },
            )
            db.session.execute(
                update(RebillClient.__table__)
                .where(_CLIENT.id == tally.id)
                .values(quarantine_reason=tally.quarantine_reason, updated_at=self.now)
            )
            client = db.session.identity_map.get(identity_key(RebillClient, tally.id))
            if client is not None:
                db.session.expire(client)

    def _write_clients(self, client_rows: list[dict]) -> None:
        """Store the new counters of every client this pass changed, in one statement on PostgreSQL."""
        if not self.postgresql:
            db.session.execute(
                update(RebillClient.__table__)
                .where(_CLIENT.id == bindparam("b_id"))
                .values(
                    counted_usage=bindparam("b_counted_usage"),
                    units_logged=bindparam("b_units_logged"),
                    remainder=bindparam("b_remainder"),
                    report_sequence=bindparam("b_report_sequence"),
                    updated_at=self.now,
                ),
                client_rows,
            )
            return
        db.session.execute(
            text(
                "UPDATE rebill_client AS c SET counted_usage = v.counted_usage, units_logged = v.units_logged, "
                "remainder = v.remainder, report_sequence = v.report_sequence, updated_at = :now "
                "FROM unnest(CAST(:ids AS integer[]), CAST(:counted AS bigint[]), CAST(:units AS bigint[]), "
                "CAST(:remainders AS bigint[]), CAST(:sequences AS integer[])) "
                "AS v(id, counted_usage, units_logged, remainder, report_sequence) WHERE c.id = v.id"
            ),
            {
                "ids": _array_literal([row["b_id"] for row in client_rows]),
                "counted": _array_literal([row["b_counted_usage"] for row in client_rows]),
                "units": _array_literal([row["b_units_logged"] for row in client_rows]),
                "remainders": _array_literal([row["b_remainder"] for row in client_rows]),
                "sequences": _array_literal([row["b_report_sequence"] for row in client_rows]),
                "now": self.now,
            },
        )

    def _write_reports(self, report_rows: list[dict]) -> None:
        """Insert the pass's outbox rows, in one statement on PostgreSQL."""
        if not self.postgresql:
            db.session.execute(insert(UnitReport.__table__), report_rows)
            return
        db.session.execute(
            text(
                "INSERT INTO unit_report (agency_id, client_id, identifier, units, usage_timestamp, status, "
                "attempts, next_attempt_at, created_at, updated_at) "
                "SELECT v.agency_id, v.client_id, v.identifier, v.units, v.usage_timestamp, 'pending', 0, "
                ":now, :now, :now FROM unnest(CAST(:agencies AS integer[]), CAST(:clients AS integer[]), "
                "CAST(:identifiers AS text[]), CAST(:units AS bigint[]), CAST(:stamps AS timestamptz[])) "
                "AS v(agency_id, client_id, identifier, units, usage_timestamp)"
            ),
            {
                "agencies": [row["agency_id"] for row in report_rows],
                "clients": [row["client_id"] for row in report_rows],
                "identifiers": [row["identifier"] for row in report_rows],
                "units": [row["units"] for row in report_rows],
                "stamps": [row["usage_timestamp"] for row in report_rows],
                "now": self.now,
            },
        )

    @staticmethod
    def _expire_loaded(client_rows: list[dict]) -> None:
        """Expire ORM objects this pass changed behind the session's back, so they reload on next access."""
        identity_map = db.session.identity_map
        for row in client_rows:
            client = identity_map.get(identity_key(RebillClient, row["b_id"]))
            if client is not None:
                db.session.expire(client)
        for obj in list(identity_map.values()):
            if isinstance(obj, UsageEvent):
                db.session.expire(obj)
