"""Aggregation: turn pending usage events into per-client counted usage, units and outbox rows.

It applies docs/billing-rules.md rules 1-5, 7, 8 and 11-13, each pinned by a named test in
tests/billing/test_units*.py. How it applies them:

- Rule 2: an event's state leaves ``pending`` in the transaction that adds it to its client's counters.
- Rule 7: one ``UnitReport`` outbox row per client per pass, written with the counters and the events' states. A
  pass works in rounds of at most CLIENTS_PER_ROUND clients (bounded memory); each client's events up to the
  pass's newest event are all counted in the one round that holds it.
- Rule 8: an impossible value (rule 12) is quarantined where it is (the event, or the client, whose later
  events are kept but never counted); any other fault rolls the pass back and reruns it agency by agency.
- Rule 11: an event counts under the client's current status if received from ``term_started_at`` on, else
  under the closed ``RebillClientTerm`` it was received in, else not at all (``unmapped``); edits close terms
  (billing.client_terms). Rules 5 and 13: paused and shadow clients' events are measured, kept, never counted.

Concurrency: docs/billing-rules.md, "Aggregation and concurrency" (why it never waits on a lock on
PostgreSQL, and what client edits and ingest wait for).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from billing.aggregation_result import AggregationResult
from billing.aggregation_store import (
    EPOCH,
    ClaimedEvent,
    ClientCounters,
    EventMarks,
    NewReport,
    agency_filter,
    agency_range_filter,
    aggregation_store,
    source_filter,
    take_write_lock,
)
from billing.client_tally import CLIENT_USAGE_MAX, ClientTally
from billing.ledger import MAX_MESSAGES_PER_EVENT, MAX_TOKENS_PER_EVENT
from billing.models import RebillClient
from billing.round_clients import RoundClients
from billing.sources import ClientKey, client_key
from billing.states import ClientStatus, UsageState
from billing.stripe_limits import usage_timestamp
from core.database import db, utcnow

log = logging.getLogger("billing.units")

BATCH_SIZE = 20_000
# Clients one round of a pass holds at once (their settings, counters and new usage, ~0.5 KB each): a round
# stops taking new clients at this many, leaves their events pending and the next round of the same pass
# (same transaction, same newest event) counts them. So a process's memory does not grow with the number of
# clients or agencies with usage (bench/README.md, issue 13). A pass over more clients works range of agencies by
# range, each range's rounds reading only its own events; only an agency with more clients than a round holds
# has rounds that reread the events its earlier rounds left.
CLIENTS_PER_ROUND = 50_000
# Clients whose counters and outbox rows one statement writes.
WRITE_CHUNK = 5_000
# A client created to bill its source's earlier unmapped usage counts everything received before it, too.
SINCE_THE_START = EPOCH
# Client statuses whose usage is measured and kept, never billed, with the state their events get: paused
# (rule 5) and shadow, a dry run (rule 13).
UNBILLED_STATES = {
    ClientStatus.PAUSED.value: UsageState.PAUSED.value,
    ClientStatus.SHADOW.value: UsageState.SHADOW.value,
}


def aggregate_pending_usage(
    batch_size: int = BATCH_SIZE, clients_per_round: int = CLIENTS_PER_ROUND
) -> AggregationResult:
    """Aggregate every pending usage event into client counters and outbox rows; flush, never commit.

    Streams pending events in id order, ``batch_size`` at a time, and keeps per-client tallies of at most
    ``clients_per_round`` clients in memory: a round that has that many leaves the other clients' events
    pending and writes its counters and outbox rows; the next round starts at the first event it left. Events
    recorded after the pass started wait for the next pass. If the pass fails, it is rolled back and run
    again one agency at a time, so only the agency whose data fails waits (rule 8).
    """
    take_write_lock()
    try:
        with db.session.begin_nested():
            return _aggregate(batch_size, clients_per_round)
    except Exception:  # any fault: the other agencies must not wait on it
        log.exception("aggregation pass failed; aggregating agency by agency")
    result = AggregationResult()
    for agency_id in aggregation_store().agencies_with_pending_usage():
        try:
            with db.session.begin_nested():
                result += _aggregate(batch_size, clients_per_round, agency_id=agency_id)
        except Exception:
            log.exception(
                "aggregation failed for one agency; its usage stays pending", extra={"fields": {"agency_id": agency_id}}
            )
            result += AggregationResult(failed_agencies=(agency_id,))
    return result


def _aggregate(batch_size: int, clients_per_round: int, agency_id: int | None = None) -> AggregationResult:
    """Run rounds of at most ``clients_per_round`` clients over the pending events, one range of agencies after
    another (one agency, ``agency_id``, when given).

    The ranges are planned from the live clients per agency so that each holds at most ``clients_per_round``
    of them: a round then claims only its own agencies' events and no round claims, locks or reads another's
    (the id-ordered walk still steps over them in the server). An agency with more clients than a round holds,
    or clients created meanwhile, fall back on rounds within the range: a full round leaves the events of
    clients it has no room for and the next round of the range starts at the first one it left.
    """
    store = aggregation_store()
    newest = store.newest_event_id()
    if newest is None:
        return AggregationResult()
    if agency_id is not None:
        ranges: Sequence[Sequence] = (agency_filter(agency_id),)
    else:
        ranges = [agency_range_filter(low, high) for low, high in store.agency_ranges(clients_per_round)]
    result = AggregationResult()
    for where in ranges:
        after = 0
        while True:
            aggregation = _Aggregation(skip_locked=True, max_clients=clients_per_round)
            aggregation.run(batch_size=batch_size, where=where, after=after, newest=newest)
            result += aggregation.finish()
            if aggregation.first_postponed is None:
                break
            after = aggregation.first_postponed - 1
    return result


def flush_client_usage(client: RebillClient, batch_size: int = BATCH_SIZE) -> AggregationResult:
    """Aggregate the client's pending events under its current settings; the caller holds its row lock.

    Client edits call this before changing N, status, source or deletion, so events received before an edit
    count under the settings that were in force when they arrived. Waits for events another aggregation
    pass has claimed (that pass never waits for us, so this cannot deadlock).
    """
    aggregation = _Aggregation(skip_locked=False)
    aggregation.clients.adopt(client)
    newest = aggregation.store.newest_event_id()
    if newest is not None:
        where = source_filter(client.agency_id, client.provider, client.source_key)
        aggregation.run(batch_size=batch_size, where=where, after=0, newest=newest)
    return aggregation.finish()


def report_identifier(report_prefix: str, client_id: int, sequence: int) -> str:
    """Return the deterministic Stripe identifier of a client's n-th unit report (at most 45 chars)."""
    return f"rebill_{report_prefix}_{client_id}_{sequence}"


class _Aggregation:
    """One round of a pass: claim pending events batch by batch, classify them, write counters and outbox rows.

    ``max_clients``: the round holds at most this many clients; events of clients it has no room for stay
    pending and ``first_postponed`` says where the next round starts (None: nothing was left for later).
    """

    def __init__(self, *, skip_locked: bool, max_clients: int | None = None):
        self.skip_locked = skip_locked
        self.store = aggregation_store()
        self.now = utcnow()
        self.clients = RoundClients(self.store, self.now, skip_locked=skip_locked, max_clients=max_clients)
        self.by_key = self.clients.by_key
        self.events = 0
        self.deferred = 0
        self.units = 0
        self.reports = 0
        self.quarantined = 0
        self.first_postponed: int | None = None
        self._deferred_before_postponed = 0  # events after the first postponed one are seen again next round

    def run(self, *, batch_size: int, where: Sequence = (), after: int, newest: int) -> None:
        """Claim and classify pending events with after < id <= newest, batch by batch.

        A batch is marked one step behind the claims (``MarkingPipeline``): on PostgreSQL the server's UPDATE
        and this process's work on the next batch overlap (bench/README.md).
        """
        with self.store.marking_pipeline() as pipeline:
            while True:
                rows = self.store.claim(
                    after=after,
                    newest=newest,
                    limit=batch_size,
                    where=where,
                    skip_locked=self.skip_locked,
                    meanwhile=pipeline.start,
                )
                if not rows:
                    break
                first, after = ClaimedEvent(*rows[0]).id, ClaimedEvent(*rows[-1]).id
                keys = [
                    client_key(agency_id, channel_id, location_id)
                    for _, agency_id, _, channel_id, location_id, _, _, _, _, _, _ in rows
                ]
                live_keys, postponed_keys = self.clients.lock(set(keys))
                marks = self._classify(rows, keys, live_keys, postponed_keys)
                self.events += len(marks.ids)
                pipeline.queue(first, after, marks)

    def _classify(
        self, rows: Sequence, keys: list[ClientKey], live_keys: set[ClientKey], postponed_keys: set[ClientKey]
    ) -> EventMarks:
        """Decide each event's new state and add counted usage to its client's tally (rows: ``ClaimedEvent``)."""
        ids, states, client_ids, quantities = [], [], [], []
        by_key = self.by_key
        max_tokens, max_messages = MAX_TOKENS_PER_EVENT, MAX_MESSAGES_PER_EVENT
        # The states and the unbilled statuses as local plain words: enum member lookups once per event cost.
        counted, unmapped, ignored = UsageState.COUNTED.value, UsageState.UNMAPPED.value, UsageState.IGNORED.value
        quarantined, capped = UsageState.QUARANTINED.value, UsageState.CAPPED.value
        unbilled = UNBILLED_STATES
        # One unpacking per row: this loop runs once per event (a million in the benchmark).
        for (event_id, _, source, _, _, inputs, outputs, messages, direction, at, received), key in zip(
            rows, keys, strict=True
        ):
            tally = by_key.get(key)
            if tally is None and key in postponed_keys:
                if self.first_postponed is None:  # no room for its client in this round: the next one
                    self.first_postponed, self._deferred_before_postponed = event_id, self.deferred
                continue
            if tally is None and key in live_keys:
                self.deferred += 1  # its client is locked by an edit or another pass: next pass
                continue
            # Rule 11: the client's status when Rebill received the event; None: no client of it then.
            status = None
            if tally is not None:
                status = (
                    tally.status if received >= tally.term_started else tally.status_before_term(received, self.store)
                )
            if inputs > max_tokens or outputs > max_tokens or messages > max_messages:
                # Rule 12: more than one AI call produces (stored before the ingest bounds existed).
                state, quantity = quarantined, 0
            elif status is None:
                state, quantity = unmapped, 0
            else:
                quantity = tally.measure(source, inputs, outputs, messages, direction)
                state = counted
                if quantity == 0:
                    state = ignored
                elif tally.quarantine_reason is not None:
                    state = quarantined
                elif status in unbilled:
                    state = unbilled[status]
                elif tally.cap_room == 0:
                    state = capped  # the period's units reached the cap: recorded, never billed
                elif quantity > tally.headroom:
                    tally.quarantine(
                        f"its usage stopped counting at {CLIENT_USAGE_MAX - tally.headroom:,} {tally.charge_by}: "
                        f"{quantity:,} more would pass the lifetime limit of {CLIENT_USAGE_MAX:,}, which no real "
                        "usage reaches; its later usage is kept, not billed"
                    )
                    state = quarantined
                else:
                    if tally.cap_room is not None:
                        # The event that crosses the cap counts only up to it, so exactly the cap is billed.
                        quantity = min(quantity, tally.cap_room)
                        tally.cap_room -= quantity
                    tally.headroom -= quantity
                    tally.new_usage += quantity
                    if tally.latest is None or at > tally.latest:
                        tally.latest = at
            if state == quarantined:
                self.quarantined += 1
            ids.append(event_id)
            states.append(state)
            client_ids.append(tally.id if status is not None else 0)
            quantities.append(quantity)
        return EventMarks(ids, states, client_ids, quantities)

    def finish(self) -> AggregationResult:
        """Apply the rule-1 arithmetic per client and write counters and one outbox row per client."""
        self._write_quarantines([tally for tally in self.by_key.values() if tally.newly_quarantined])
        changed = [tally for tally in self.by_key.values() if tally.new_usage]
        # A round's writes go WRITE_CHUNK clients a statement: a round's worth of rows and their statement
        # parameters at once would be a good part of its peak memory (bench/README.md).
        for start in range(0, len(changed), WRITE_CHUNK):
            self._write(changed[start : start + WRITE_CHUNK])
        self.store.expire_loaded([tally.id for tally in changed])
        return AggregationResult(
            events=self.events,
            units=self.units,
            reports=self.reports,
            deferred=self.deferred if self.first_postponed is None else self._deferred_before_postponed,
            quarantined=self.quarantined,
        )

    def _write(self, tallies: list[ClientTally]) -> None:
        """Write these clients' new counters, then the outbox rows of those with new units."""
        counters, reports = [], []
        for tally in tallies:
            units, remainder = divmod(tally.remainder + tally.new_usage, tally.billing_unit)
            sequence = tally.report_sequence + (1 if units else 0)
            counters.append(
                ClientCounters(
                    id=tally.id,
                    counted_usage=tally.counted_usage + tally.new_usage,
                    units_logged=tally.units_logged + units,
                    remainder=remainder,
                    report_sequence=sequence,
                )
            )
            if units:
                self.units += units
                reports.append(
                    NewReport(
                        agency_id=tally.agency_id,
                        client_id=tally.id,
                        identifier=report_identifier(tally.report_prefix, tally.id, sequence),
                        units=units,
                        usage_timestamp=usage_timestamp(self.store.as_datetime(tally.latest), self.now),
                    )
                )
        self.store.write_counters(counters, self.now)
        if reports:
            # Written after the counters, in the pass's one transaction: if the outbox insert fails, the whole
            # transaction (counters, event states) rolls back with it, so there are never counters without
            # their outbox row.
            self.store.write_reports(reports, self.now)
            self.reports += len(reports)

    def _write_quarantines(self, tallies: list[ClientTally]) -> None:
        """Record why these clients stopped counting (rare: one statement per client)."""
        for tally in tallies:
            log.error(
                "client quarantined: its usage is kept but no longer counted",
                extra={
                    "fields": {"client_id": tally.id, "agency_id": tally.agency_id, "reason": tally.quarantine_reason}
                },
            )
            self.store.write_quarantine(tally.id, tally.quarantine_reason, self.now)
