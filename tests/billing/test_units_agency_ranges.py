"""A pass over more clients than a round holds works range of agencies by range (issue 13, bench/README.md).

Each range holds at most ``clients_per_round`` live clients, and its rounds claim only its agencies' events:
every pending event is claimed once in a pass (no round re-reads the events another left), and the results
are those of one unbounded pass: exact counters, one outbox row per client.
"""

from __future__ import annotations

from collections import Counter

import pytest
from sqlalchemy import select, text

from billing import aggregation_store as aggregation_store_module
from billing.agencies import ensure_agency
from billing.aggregation_store import aggregation_store
from billing.models import RebillClient, UnitReport
from billing.units import aggregate_pending_usage
from core.database import db
from tests.billing.factories import event_states, fresh, make_client, pending_count, record, reports_of, tokens

N = 10
# Clients per agency, in agency id order; the last agency has usage and no client.
SIZES = (2, 3, 1, 2, 0)
EVENTS = 60


def usage(number: int) -> int:
    return number * 7 % 19 + 1


@pytest.fixture
def agencies(app_context):
    return [ensure_agency(f"company-ranges-{i}") for i in range(len(SIZES))]


@pytest.fixture
def claimed(monkeypatch):
    """Count the events every claim returns."""
    counts = []
    store = type(aggregation_store())
    claim = store.claim

    def counting(self, **arguments):
        rows = claim(self, **arguments)
        counts.append(len(rows))
        return rows

    monkeypatch.setattr(store, "claim", counting)
    return counts


def sources(agencies) -> list[tuple]:
    """(agency, channel) of every source, interleaved across agencies; the last agency's are unknown."""
    return [
        (agency, f"chan-{i}-{j}")
        for j in range(max(SIZES))
        for i, agency in enumerate(agencies)
        if j < max(SIZES[i], 1)
    ]


def test_agency_ranges_hold_at_most_a_round_of_clients_and_cover_every_agency(agencies):
    for agency, size in zip(agencies, SIZES, strict=True):
        for j in range(size):
            make_client(agency, source_key=f"chan-x-{j}")
    ids = [agency.id for agency in agencies]

    assert aggregation_store().agency_ranges(3) == [(None, ids[1]), (ids[1], ids[2]), (ids[2], None)]
    assert aggregation_store().agency_ranges(8) == [(None, None)]  # everyone fits: one range, no filter
    assert aggregation_store().agency_ranges(2) == [(None, ids[1]), (ids[1], ids[2]), (ids[2], ids[3]), (ids[3], None)]


def test_rounds_over_agency_ranges_claim_every_event_once_and_count_exactly(agencies, claimed):
    clients = {}
    for i, (agency, size) in enumerate(zip(agencies, SIZES, strict=True)):
        for j in range(size):
            clients[(agency.id, f"chan-{i}-{j}")] = make_client(agency, source_key=f"chan-{i}-{j}", billing_unit=N)
    every = sources(agencies)
    expected: Counter = Counter()
    for n in range(EVENTS):  # interleaved as the ledger is: every batch meets several agencies and clients
        agency, channel = every[n % len(every)]
        record(agency, tokens(f"e{n}", usage(n), channel=channel))
        expected[(agency.id, channel)] += usage(n)
    db.session.commit()

    result = aggregate_pending_usage(batch_size=4, clients_per_round=3)
    db.session.commit()

    assert sum(claimed) == EVENTS  # no event claimed twice: each range reads only its agencies' events
    for key, client in clients.items():
        client = fresh(client)
        total = expected[key]
        assert (client.counted_usage, client.units_logged, client.remainder) == (total, total // N, total % N)
        assert [report.units for report in reports_of(client)] == ([total // N] if total >= N else [])
    assert (result.events, result.deferred) == (EVENTS, 0)
    assert result.units == sum(expected[key] // N for key in clients)
    assert pending_count() == 0
    assert set(event_states(agencies[-1]).values()) == {"unmapped"}
    # Three ranges of at most three clients, each one round writing at its own time: 2, 3 and 1 + 2 clients.
    rounds = Counter(db.session.scalars(select(RebillClient.updated_at)))
    assert sorted(rounds.values()) == [2, 3, 3]


def test_an_agency_with_more_clients_than_a_round_gets_rounds_of_its_own(agencies, claimed):
    small, big = agencies[0], agencies[1]
    make_client(small, source_key="chan-s", billing_unit=N)
    bigs = [make_client(big, source_key=f"chan-b{j}", billing_unit=N) for j in range(5)]
    for n in range(30):
        record(big, tokens(f"b{n}", usage(n), channel=f"chan-b{n % 5}"))
        record(small, tokens(f"s{n}", 1, channel="chan-s"))
    db.session.commit()

    result = aggregate_pending_usage(batch_size=4, clients_per_round=2)
    db.session.commit()

    assert (result.events, result.reports) == (60, 6)
    assert sum(fresh(client).counted_usage for client in bigs) == sum(usage(n) for n in range(30))
    assert all(len(reports_of(client)) == 1 for client in bigs)
    # The small agency's range is one round; the big one's rounds of 2, 2 and 1 re-read only its own events.
    assert sorted(Counter(db.session.scalars(select(UnitReport.created_at))).values()) == [1, 1, 2, 2]
    assert sum(claimed) == 30 + 30 + 18 + 6  # small's 30; big's 30, then the 18 and 6 events left


def test_a_client_locked_elsewhere_in_a_later_range_is_deferred_once(app_context, postgres_only):
    agencies = [ensure_agency(f"company-ranges-locked-{i}") for i in range(3)]
    clients = [make_client(agency, source_key=f"chan-{i}", billing_unit=N) for i, agency in enumerate(agencies)]
    held = make_client(agencies[2], source_key="chan-held", billing_unit=N)
    for n in range(12):
        record(agencies[n % 3], tokens(f"e{n}", usage(n), channel=f"chan-{n % 3}"))
        if n % 4 == 0:
            record(agencies[2], tokens(f"h{n}", 3, channel="chan-held"))
    db.session.commit()

    with db.engine.connect() as edit:  # another transaction holding the client's row lock, as an edit does
        edit.execute(text("SELECT id FROM rebill_client WHERE id = :id FOR UPDATE"), {"id": held.id})
        db.session.execute(text("SET LOCAL lock_timeout = '2s'"))  # a pass that waited would fail, not hang
        result = aggregate_pending_usage(batch_size=3, clients_per_round=1)
        db.session.commit()
        edit.rollback()

    assert (result.events, result.deferred, result.reports) == (12, 3, 3)  # h0, h4, h8, each once
    for i, client in enumerate(clients):
        assert fresh(client).counted_usage == sum(usage(n) for n in range(12) if n % 3 == i)
    assert fresh(held).counted_usage == 0

    again = aggregate_pending_usage(clients_per_round=1)
    db.session.commit()
    assert (again.events, again.deferred) == (3, 0)
    assert (fresh(held).counted_usage, fresh(held).units_logged, fresh(held).remainder) == (9, 0, 9)


def test_a_marking_statement_failing_in_the_server_fails_the_pass_cleanly(app_context, postgres_only, monkeypatch):
    """The UPDATE marking a batch runs while the next batch is classified: its error still fails the pass."""
    bad, good = ensure_agency("company-marking-bad"), ensure_agency("company-marking-good")
    damaged, other = make_client(bad, billing_unit=N), make_client(good, billing_unit=N)
    for n in range(9):
        record(good, tokens(f"g{n}", usage(n)))
        if n % 3 == 2:
            record(bad, tokens(f"b{n}", usage(n)))
    db.session.commit()
    # The server fails to mark any batch holding an event of agency "bad" (division by zero).
    statement = aggregation_store_module._MARK_EVENTS
    failing = statement.replace("counted = v.counted", f"counted = v.counted + 0 * (1 / (e.agency_id - {bad.id}))")
    assert failing != statement
    monkeypatch.setattr(aggregation_store_module, "_MARK_EVENTS", failing)

    result = aggregate_pending_usage(batch_size=2)
    db.session.commit()

    assert result.failed_agencies == (bad.id,)  # the whole pass rolled back, then agency by agency
    assert fresh(other).counted_usage == sum(usage(n) for n in range(9))
    assert set(event_states(good).values()) == {"counted"}
    assert set(event_states(bad).values()) == {"pending"}
    assert (fresh(damaged).counted_usage, reports_of(damaged)) == (0, [])
