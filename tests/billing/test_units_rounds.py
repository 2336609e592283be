"""A pass holds at most ``clients_per_round`` clients at once (issue 13: memory flat in the number of clients).

A round that is full leaves the other clients' events pending and the next round of the same pass counts
them, so the results are those of one unbounded pass: exact counters, one outbox row per client. Rounds are
visible in the database: each writes its counters and outbox rows with its own time.
"""

from __future__ import annotations

from collections import Counter

import pytest
from sqlalchemy import select, text

from billing.agencies import ensure_agency
from billing.models import RebillClient, UnitReport
from billing.units import aggregate_pending_usage
from core.database import db
from tests.billing.factories import event_states, fresh, make_client, pending_count, record, reports_of, tokens

CLIENTS = 7
EVENTS = 42
N = 10


def usage(number: int) -> int:
    return number * 7 % 19 + 1


@pytest.fixture
def agency(app_context):
    return ensure_agency("company-rounds")


def test_a_pass_over_more_clients_than_a_round_holds_counts_them_all_in_bounded_rounds_exactly(agency):
    clients = [make_client(agency, source_key=f"chan-{i}", billing_unit=N) for i in range(CLIENTS)]
    # Interleaved as the ledger is: every batch of events meets several clients, and an unknown channel.
    record(agency, *(tokens(f"e{n}", usage(n), channel=f"chan-{n % CLIENTS}") for n in range(EVENTS)))
    record(agency, tokens("stray", 5, channel="chan-unknown"))
    db.session.commit()

    result = aggregate_pending_usage(batch_size=4, clients_per_round=3)
    db.session.commit()

    expected = {i: sum(usage(n) for n in range(EVENTS) if n % CLIENTS == i) for i in range(CLIENTS)}
    for i, client in enumerate(clients):
        client = fresh(client)
        assert (client.counted_usage, client.units_logged, client.remainder) == (
            expected[i],
            expected[i] // N,
            expected[i] % N,
        )
        assert [report.units for report in reports_of(client)] == [expected[i] // N]  # one row per client
    assert (result.events, result.units, result.reports, result.deferred) == (
        EVENTS + 1,
        sum(total // N for total in expected.values()),
        CLIENTS,
        0,
    )
    assert pending_count() == 0
    assert event_states(agency)["stray"] == "unmapped"
    # Each round wrote its clients' counters and outbox rows at its own time: three rounds of at most three.
    rounds = Counter(db.session.scalars(select(UnitReport.created_at)))
    assert sorted(rounds.values()) == [1, 3, 3]
    assert Counter(db.session.scalars(select(RebillClient.updated_at))) == rounds


def test_one_round_when_the_clients_fit(agency):
    for i in range(CLIENTS):
        make_client(agency, source_key=f"chan-{i}", billing_unit=N)
    record(agency, *(tokens(f"e{n}", usage(n), channel=f"chan-{n % CLIENTS}") for n in range(EVENTS)))
    db.session.commit()

    result = aggregate_pending_usage(batch_size=4, clients_per_round=CLIENTS)
    db.session.commit()

    assert (result.events, result.reports) == (EVENTS, CLIENTS)
    assert list(Counter(db.session.scalars(select(UnitReport.created_at))).values()) == [CLIENTS]


def test_a_client_locked_elsewhere_takes_no_room_and_its_events_count_as_deferred_once(app_context, postgres_only):
    agency = ensure_agency("company-rounds-locked")
    held = make_client(agency, source_key="chan-held", billing_unit=N)
    free = [make_client(agency, source_key=f"chan-{i}", billing_unit=N) for i in range(4)]
    # The held client's events come first and between the others': each round meets them again.
    record(agency, tokens("h0", 11, channel="chan-held"))
    record(agency, *(tokens(f"e{n}", usage(n), channel=f"chan-{n % 4}") for n in range(12)))
    record(agency, tokens("h1", 12, channel="chan-held"))
    record(agency, *(tokens(f"f{n}", usage(n), channel=f"chan-{n % 4}") for n in range(12, 20)))
    db.session.commit()

    with db.engine.connect() as edit:  # another transaction holding the client's row lock, as an edit does
        edit.execute(text("SELECT id FROM rebill_client WHERE id = :id FOR UPDATE"), {"id": held.id})
        db.session.execute(text("SET LOCAL lock_timeout = '2s'"))  # a pass that waited would fail, not hang
        result = aggregate_pending_usage(batch_size=3, clients_per_round=2)
        db.session.commit()
        edit.rollback()

    assert (result.events, result.deferred, result.reports) == (20, 2, 4)  # h0 and h1, each once
    assert sum(fresh(client).counted_usage for client in free) == sum(usage(n) for n in range(20))
    assert fresh(held).counted_usage == 0
    assert sorted(Counter(db.session.scalars(select(UnitReport.created_at))).values()) == [2, 2]

    again = aggregate_pending_usage(clients_per_round=2)
    db.session.commit()
    assert (again.events, again.deferred) == (2, 0)
    assert (fresh(held).counted_usage, fresh(held).units_logged) == (23, 2)
