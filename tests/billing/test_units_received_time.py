"""Rule 11: an event is judged by the client's settings at the time Rebill received it, whatever the order in
which the ingest and a client change commit (issue 9, scenario 7).

An ingest transaction stamps ``received_at`` before it commits; a pause, resume or creation committed in
between used to be applied to it anyway (the event was still pending at the next pass, which only knew the
client's new settings). The PostgreSQL tests race a real ingest transaction against the change; the others
store the event such a transaction leaves (received before the change, committed after it) on both backends.
"""

import datetime as dt
import threading

import pytest
from sqlalchemy import select

from billing.agencies import ensure_agency
from billing.clients import update_client
from billing.ledger import record_usage
from billing.models import Agency, RebillClient, UsageEvent
from billing.units import aggregate_pending_usage
from core.database import db, utcnow
from tests.billing.factories import NOW, event_states, fresh, make_client, record, tokens


@pytest.fixture
def agency(app_context):
    return ensure_agency("company-received-time")


def store_committed_late(agency, event_id: str, total: int, received_at: dt.datetime, channel: str = "chan-1"):
    """Store the row an ingest leaves that stamped ``received_at`` and committed only now."""
    db.session.add(
        UsageEvent(
            agency_id=agency.id, source="capri", source_event_id=event_id, channel_id=channel, occurred_at=NOW,
            input_tokens=total, received_at=received_at,
        )
    )
    db.session.commit()


def set_status(agency, client, status: str) -> dt.datetime:
    """Pause or resume through the service, committed; return a time just before the change."""
    before = utcnow()
    update_client(agency, client.id, {"status": status})
    db.session.commit()
    return before


def test_rule11_usage_received_before_a_pause_but_committed_after_it_is_billed(agency):
    client = make_client(agency, billing_unit=10)
    db.session.commit()
    received = set_status(agency, client, "paused")
    store_committed_late(agency, "in-flight", 25, received)
    record(agency, tokens("while-paused", 40))
    aggregate_pending_usage()
    db.session.commit()
    assert event_states(agency) == {"in-flight": "counted", "while-paused": "paused"}
    assert (fresh(client).counted_usage, client.units_logged) == (25, 2)


def test_rule11_usage_received_while_paused_but_committed_after_resume_is_never_billed(agency):
    client = make_client(agency, billing_unit=10, status="paused")
    db.session.commit()
    received = set_status(agency, client, "active")
    store_committed_late(agency, "in-flight", 25, received)
    record(agency, tokens("after-resume", 40))
    aggregate_pending_usage()
    db.session.commit()
    assert event_states(agency) == {"in-flight": "paused", "after-resume": "counted"}
    assert (fresh(client).counted_usage, client.units_logged) == (40, 4)


def test_rule11_each_event_is_judged_by_the_term_it_was_received_in(agency):
    client = make_client(agency, billing_unit=1)
    db.session.commit()
    active_1 = utcnow()
    paused_at = set_status(agency, client, "paused")
    paused_window = utcnow()
    set_status(agency, client, "active")
    for event_id, received in (("a", active_1), ("p", paused_window), ("a2", utcnow())):
        store_committed_late(agency, event_id, 1, received)
    aggregate_pending_usage()
    db.session.commit()
    assert paused_at < paused_window
    assert event_states(agency) == {"a": "counted", "p": "paused", "a2": "counted"}
    assert fresh(client).units_logged == 2


def test_rule11_usage_received_before_a_client_existed_stays_unmapped(agency):
    received = utcnow()
    client = make_client(agency, billing_unit=1)
    db.session.commit()
    store_committed_late(agency, "before-creation", 5, received)
    aggregate_pending_usage()
    db.session.commit()
    assert event_states(agency) == {"before-creation": "unmapped"}
    assert fresh(client).counted_usage == 0
    event = db.session.scalars(select(UsageEvent)).one()
    assert event.client_id is None


def test_rule11_usage_of_a_new_source_received_before_the_move_stays_unmapped(agency):
    client = make_client(agency, billing_unit=1, source_key="chan-old")
    db.session.commit()
    before_move = utcnow()
    update_client(agency, client.id, {"channel_id": "chan-new"})
    db.session.commit()
    store_committed_late(agency, "new-before", 5, before_move, channel="chan-new")
    record(agency, tokens("new-after", 7, channel="chan-new"))
    aggregate_pending_usage()
    db.session.commit()
    assert event_states(agency) == {"new-before": "unmapped", "new-after": "counted"}
    assert fresh(client).counted_usage == 7


# A real ingest transaction racing the change (PostgreSQL: READ COMMITTED, row locks) ---------------------


def ingest_committing_after(app, agency_id: int, stamped: threading.Event, change_done: threading.Event, errors):
    """Record one event (stamping received_at), then hold the transaction open until the change committed."""

    def run():
        try:
            with app.app_context():
                assert record_usage(agency_id, [tokens("in-flight", 25)]) == [True]
                stamped.set()
                assert change_done.wait(timeout=30)
                db.session.commit()
        except BaseException as error:  # re-raised by the test thread
            errors.append(error)
            stamped.set()

    return threading.Thread(target=run)


def switch_status_while_an_ingest_is_in_flight(app, company: str, before: str, after: str) -> tuple[str, int]:
    """Set a client's status from ``before`` to ``after`` while a real ingest, received before the change, commits
    after it; then aggregate. Returns the event's state and the client's counted usage."""
    with app.app_context():
        agency = ensure_agency(company)
        client_id = make_client(agency, billing_unit=10, status=before).id
        db.session.commit()
        agency_id = agency.id

    stamped, change_done, errors = threading.Event(), threading.Event(), []
    ingest = ingest_committing_after(app, agency_id, stamped, change_done, errors)
    ingest.start()
    assert stamped.wait(timeout=30)
    with app.app_context():  # the change flushes pending usage: the uncommitted event is not visible to it
        update_client(db.session.get(Agency, agency_id), client_id, {"status": after})
        db.session.commit()
    change_done.set()
    ingest.join(timeout=60)
    assert not ingest.is_alive() and not errors, errors

    with app.app_context():
        aggregate_pending_usage()
        db.session.commit()
        return db.session.scalar(select(UsageEvent.state)), db.session.get(RebillClient, client_id).counted_usage


@pytest.mark.parametrize(
    ("before", "after", "expected_state", "expected_usage"),
    [("active", "paused", "counted", 25), ("paused", "active", "paused", 0)],
    ids=["pause", "resume"],
)
def test_scenario7_an_ingest_in_flight_during_a_pause_or_resume_is_judged_by_its_received_time(
    app, postgres_only, before, after, expected_state, expected_usage
):
    state, usage = switch_status_while_an_ingest_is_in_flight(app, "company-in-flight", before, after)
    assert state == expected_state
    assert usage == expected_usage
