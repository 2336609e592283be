"""Rule 13: a dry run (status ``shadow``) counts usage and never bills it, judged by received time (rule 11).

An event Rebill received during the dry run stays unbilled even when its ingest commits after the client was
set active; one received while active is billed even when it commits after a switch to ``shadow``. The billed
counters (rule 1) never see dry-run usage. The PostgreSQL test races a real ingest transaction against the
switch; the others store the event such a transaction leaves, on both backends.
"""


import pytest
from sqlalchemy import select

from billing.agencies import ensure_agency
from billing.dry_run import shadow_usage_in_periods
from billing.models import UsageEvent
from billing.periods import calendar_month
from billing.units import aggregate_pending_usage
from core.database import db, utcnow
from tests.billing.factories import event_states, fresh, make_client, record, reports_of, tokens
from tests.billing.test_units_received_time import (
    set_status,
    store_committed_late,
    switch_status_while_an_ingest_is_in_flight,
)


@pytest.fixture
def agency(app_context):
    return ensure_agency("company-shadow")


def aggregate() -> None:
    aggregate_pending_usage()
    db.session.commit()


def test_rule13_dry_run_usage_is_counted_as_shadow_and_never_reaches_the_outbox(agency):
    client = make_client(agency, billing_unit=10, status="shadow")
    db.session.commit()
    record(agency, tokens("dry-1", 25), tokens("dry-2", 18))
    aggregate()

    assert event_states(agency) == {"dry-1": "shadow", "dry-2": "shadow"}
    assert db.session.scalars(select(UsageEvent.counted).order_by(UsageEvent.id)).all() == [25, 18]
    assert (fresh(client).counted_usage, client.units_logged, client.remainder) == (0, 0, 0)
    assert reports_of(client) == []
    assert shadow_usage_in_periods({client.id: calendar_month(utcnow())}) == {client.id: 43}


def test_rule13_setting_active_bills_only_usage_received_from_then_on(agency):
    client = make_client(agency, billing_unit=10, status="shadow")
    db.session.commit()
    record(agency, tokens("dry", 95))  # pending at the switch: counted under the dry run first
    set_status(agency, client, "active")
    record(agency, tokens("billed", 23))
    aggregate()

    assert event_states(agency) == {"dry": "shadow", "billed": "counted"}
    assert (fresh(client).counted_usage, client.units_logged, client.remainder) == (23, 2, 3)
    assert [report.units for report in reports_of(client)] == [2]


def test_rule13_the_remainder_carried_into_billing_skips_the_dry_run(agency):
    client = make_client(agency, billing_unit=10)
    db.session.commit()
    record(agency, tokens("before", 7))
    aggregate()
    set_status(agency, client, "shadow")
    record(agency, tokens("dry", 999))
    aggregate()
    set_status(agency, client, "active")
    record(agency, tokens("after", 5))
    aggregate()

    # floor((7 + 5) / 10) = 1 unit, remainder 2: the dry run's 999 neither adds units nor moves the remainder.
    assert (fresh(client).counted_usage, client.units_logged, client.remainder) == (12, 1, 2)
    assert sum(report.units for report in reports_of(client)) == 1


def test_rule13_usage_received_in_the_dry_run_but_committed_after_the_switch_is_never_billed(agency):
    client = make_client(agency, billing_unit=10, status="shadow")
    db.session.commit()
    received = set_status(agency, client, "active")
    store_committed_late(agency, "in-flight", 25, received)
    record(agency, tokens("after-switch", 40))
    aggregate()

    assert event_states(agency) == {"in-flight": "shadow", "after-switch": "counted"}
    assert (fresh(client).counted_usage, client.units_logged) == (40, 4)


def test_rule13_usage_received_while_active_but_committed_after_a_switch_to_shadow_is_billed(agency):
    client = make_client(agency, billing_unit=10)
    db.session.commit()
    received = set_status(agency, client, "shadow")
    store_committed_late(agency, "in-flight", 25, received)
    record(agency, tokens("dry", 40))
    aggregate()

    assert event_states(agency) == {"in-flight": "counted", "dry": "shadow"}
    assert (fresh(client).counted_usage, client.units_logged) == (25, 2)
    assert [report.units for report in reports_of(client)] == [2]


def test_rule13_a_dry_run_does_not_use_up_the_monthly_cap(agency):
    client = make_client(agency, billing_unit=10, status="shadow")
    client.monthly_cap_units = 1
    db.session.commit()
    record(agency, tokens("dry", 500))
    aggregate()
    set_status(agency, client, "active")
    record(agency, tokens("billed", 10))
    aggregate()

    assert event_states(agency) == {"dry": "shadow", "billed": "counted"}
    assert fresh(client).units_logged == 1


@pytest.mark.parametrize(
    ("before", "after", "expected_state", "expected_usage"),
    [("active", "shadow", "counted", 25), ("shadow", "active", "shadow", 0)],
    ids=["into-dry-run", "start-billing"],
)
def test_rule13_an_ingest_in_flight_during_the_switch_is_judged_by_its_received_time(
    app, postgres_only, before, after, expected_state, expected_usage
):
    state, usage = switch_status_while_an_ingest_is_in_flight(app, "company-shadow-in-flight", before, after)
    assert state == expected_state
    assert usage == expected_usage
