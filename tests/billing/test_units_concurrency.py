"""Two aggregation passes at once (two schedulers started by mistake) with usage arriving meanwhile: every
event is counted exactly once; and a pass never waits for a client edit in progress (PostgreSQL)."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import func, select, text

from billing.agencies import ensure_agency
from billing.ledger import record_usage
from billing.models import RebillClient, UnitReport, UsageEvent
from billing.units import aggregate_pending_usage
from core.database import db
from tests.billing.factories import fresh, make_client, pending_count, record, reports_of, tokens

CLIENTS = 8
N = 7
PRELOADED_PER_CLIENT = 150
WRITER_BATCHES = 12
WRITER_BATCH_SIZE = 40


def amount(number: int) -> int:
    return number % 23 + 1


def run_threads(*targets) -> None:
    """Start the targets together behind a barrier; re-raise the first error any of them hit."""
    barrier = threading.Barrier(len(targets))
    errors: list[BaseException] = []

    def guarded(target):
        try:
            barrier.wait(timeout=30)
            target()
        except BaseException as error:  # collected, re-raised in the test thread
            errors.append(error)

    threads = [threading.Thread(target=guarded, args=(target,)) for target in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "a thread is stuck"
    if errors:
        raise errors[0]


def test_two_aggregators_and_concurrent_writers_count_every_event_exactly_once(app, backend):
    expected: dict[str, int] = {}  # channel -> tokens
    with app.app_context():
        agency = ensure_agency("company-race")
        client_ids = [make_client(agency, source_key=f"chan-{i}", billing_unit=N).id for i in range(CLIENTS)]
        preloaded = []
        for number in range(CLIENTS * PRELOADED_PER_CLIENT):
            channel = f"chan-{number % CLIENTS}"
            preloaded.append(tokens(f"pre-{number}", amount(number), channel=channel))
            expected[channel] = expected.get(channel, 0) + amount(number)
        record(agency, *preloaded)
        db.session.commit()
        agency_id = agency.id

    written: list[list] = [[], []]
    for writer in (0, 1):
        for batch in range(WRITER_BATCHES):
            records = []
            for index in range(WRITER_BATCH_SIZE):
                number = (writer * WRITER_BATCHES + batch) * WRITER_BATCH_SIZE + index
                channel = f"chan-{number % CLIENTS}"
                records.append(tokens(f"new-{number}", amount(number), channel=channel))
                expected[channel] += amount(number)
            written[writer].append(records)

    def aggregator():
        with app.app_context():
            for _ in range(8):
                aggregate_pending_usage(batch_size=60)
                db.session.commit()

    def writer(batches):
        def write():
            with app.app_context():
                for records in batches:
                    assert all(record_usage(agency_id, records))
                    db.session.commit()

        return write

    run_threads(aggregator, aggregator, writer(written[0]), writer(written[1]))

    with app.app_context():
        for _ in range(5):  # drain what the race left (events written late, or deferred by the other pass)
            if pending_count() == 0:
                break
            aggregate_pending_usage()
            db.session.commit()
        assert pending_count() == 0
        total_events = CLIENTS * PRELOADED_PER_CLIENT + 2 * WRITER_BATCHES * WRITER_BATCH_SIZE
        states = dict(db.session.execute(select(UsageEvent.state, func.count()).group_by(UsageEvent.state)).all())
        assert states == {"counted": total_events}
        for client_id in client_ids:
            client = fresh(db.session.get(RebillClient, client_id))
            usage = expected[client.source_key]
            assert client.counted_usage == usage  # no event counted twice, none lost
            assert (client.units_logged, client.remainder) == (usage // N, usage % N)
            assert sum(report.units for report in reports_of(client)) == client.units_logged
        identifiers = db.session.scalars(select(UnitReport.identifier)).all()
        assert len(identifiers) == len(set(identifiers))


def test_a_pass_skips_a_client_an_edit_holds_without_waiting_and_counts_it_next_time(app_context, postgres_only):
    agency = ensure_agency("company-edit-lock")
    held = make_client(agency, source_key="chan-held", billing_unit=10)
    free = make_client(agency, source_key="chan-free", billing_unit=10)
    record(agency, tokens("h1", 25, channel="chan-held"), tokens("f1", 25, channel="chan-free"))
    db.session.commit()

    with db.engine.connect() as edit:  # another transaction holding the client's row lock, as an edit does
        edit.execute(text("SELECT id FROM rebill_client WHERE id = :id FOR UPDATE"), {"id": held.id})
        db.session.execute(text("SET LOCAL lock_timeout = '2s'"))  # a pass that waited would fail, not hang
        result = aggregate_pending_usage()
        db.session.commit()
        edit.rollback()

    assert (result.events, result.deferred, result.units) == (1, 1, 2)
    assert (fresh(held).counted_usage, fresh(free).counted_usage) == (0, 25)
    assert db.session.scalar(select(UsageEvent.state).where(UsageEvent.source_event_id == "h1")) == "pending"

    again = aggregate_pending_usage()
    db.session.commit()
    assert (again.events, again.deferred, again.units) == (1, 0, 2)
    assert (fresh(held).counted_usage, fresh(held).units_logged) == (25, 2)


@pytest.mark.usefixtures("postgres_only")
def test_a_second_pass_skips_events_the_first_pass_claimed(app):
    with app.app_context():
        agency = ensure_agency("company-two-passes")
        client = make_client(agency, billing_unit=1)
        record(agency, *[tokens(f"e{i}", 1) for i in range(10)])
        db.session.commit()
        client_id = client.id

    with app.app_context():
        first = aggregate_pending_usage()  # holds its claims until it commits
        claimed_by_first = first.events
        second_result = {}

        def second():
            with app.app_context():
                db.session.execute(text("SET LOCAL lock_timeout = '2s'"))
                second_result["result"] = aggregate_pending_usage()
                db.session.commit()

        run_threads(second)
        db.session.commit()

    assert claimed_by_first == 10
    assert (second_result["result"].events, second_result["result"].units) == (0, 0)
    with app.app_context():
        assert fresh(db.session.get(RebillClient, client_id)).units_logged == 10
