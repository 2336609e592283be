"""Aggregation turns pending usage into exact units: one named test per rule of docs/billing-rules.md (1, 2, 4, 5, 7).

Rule 3 (unmapped usage and the agency's choice to bill it) needs create_client: tests/billing/test_clients.py.
"""

import datetime as dt

import pytest
from sqlalchemy import func, select, text

from billing.agencies import ensure_agency
from billing.clients import delete_client, update_client
from billing.models import RebillClient, UnitReport, UsageEvent
from billing.stripe_limits import OLDEST_USAGE_TIMESTAMP
from billing.units import aggregate_pending_usage, report_identifier
from core.database import db, utcnow
from tests.billing.factories import (
    NOW,
    capri_messages,
    event_states,
    fresh,
    ghl_message,
    make_client,
    record,
    reports_of,
    tokens,
)


@pytest.fixture
def agency(app_context):
    return ensure_agency("company-units")


def test_rule1_units_equal_floor_of_usage_over_n_with_remainder_carried(agency):
    client = make_client(agency, billing_unit=1000)
    record(agency, tokens("e1", 999))
    first = aggregate_pending_usage()
    db.session.commit()
    assert (first.events, first.units, first.reports) == (1, 0, 0)
    assert (fresh(client).counted_usage, client.units_logged, client.remainder) == (999, 0, 999)

    record(agency, tokens("e2", 1))
    assert aggregate_pending_usage().units == 1
    record(agency, tokens("e3", 2500), tokens("e4", 1))
    assert aggregate_pending_usage().units == 2
    db.session.commit()

    client = fresh(client)
    assert client.counted_usage == 3501
    assert client.units_logged == 3501 // 1000 == 3
    assert client.remainder == 3501 % 1000 == 501  # carried, never rounded up or dropped
    assert [report.units for report in reports_of(client)] == [1, 2]


def test_rule1_counting_starts_at_zero_and_n_of_one_bills_every_token(agency):
    client = make_client(agency, billing_unit=1)
    record(agency, tokens("e1", 7))
    assert aggregate_pending_usage().units == 7
    assert (fresh(client).units_logged, client.remainder) == (7, 0)


def test_rule2_each_event_counts_once_whatever_duplicates_and_repeated_passes(agency):
    client = make_client(agency, billing_unit=10)
    assert record(agency, tokens("e1", 15), tokens("e1", 15)) == [True, False]
    aggregate_pending_usage()
    db.session.commit()
    assert record(agency, tokens("e1", 15), tokens("e2", 5)) == [False, True]  # a retry after aggregation
    aggregate_pending_usage()
    again = aggregate_pending_usage()
    db.session.commit()

    assert (again.events, again.units, again.reports) == (0, 0, 0)
    client = fresh(client)
    assert (client.counted_usage, client.units_logged, client.remainder) == (20, 2, 0)
    assert sum(report.units for report in reports_of(client)) == 2
    counted = db.session.scalar(select(func.sum(UsageEvent.counted)).where(UsageEvent.state == "counted"))
    assert counted == client.counted_usage


def test_rule3_usage_no_client_maps_is_kept_unmapped_and_not_billed_by_a_later_aggregation(agency):
    record(agency, tokens("early", 5000, channel="chan-new"))
    aggregate_pending_usage()
    assert event_states(agency) == {"early": "unmapped"}
    client = make_client(agency, source_key="chan-new", billing_unit=1000)
    record(agency, tokens("later", 1000, channel="chan-new"))
    aggregate_pending_usage()
    assert event_states(agency) == {"early": "unmapped", "later": "counted"}
    assert (fresh(client).counted_usage, client.units_logged) == (1000, 1)


def test_rule4_changing_n_flushes_pending_usage_under_the_old_n_then_carries_the_remainder(agency):
    client = make_client(agency, billing_unit=1000)
    record(agency, tokens("before", 1500))  # pending when N changes: counts under the old N
    update_client(agency, client.id, {"billing_unit": 2000})
    db.session.commit()
    client = fresh(client)
    assert (client.units_logged, client.remainder, client.billing_unit) == (1, 500, 2000)

    record(agency, tokens("after", 1600))
    aggregate_pending_usage()
    client = fresh(client)
    # Old N on the first 1500 (1 unit, 500 carried), new N on 500 + 1600 = 2100 (1 unit, 100 carried).
    # Re-dividing everything by the new N would give floor(3100 / 2000) = 1 unit in all, not 2.
    assert (client.units_logged, client.remainder, client.counted_usage) == (2, 100, 3100)
    assert [report.units for report in reports_of(client)] == [1, 1]


def test_rule4_lowering_n_below_the_carried_remainder_logs_its_units_at_the_change(agency):
    client = make_client(agency, billing_unit=1000)
    record(agency, tokens("e1", 1500))
    aggregate_pending_usage()
    update_client(agency, client.id, {"billing_unit": 300})
    db.session.commit()
    client = fresh(client)
    # The carried 500 meets the new N at once: 1 unit now (its own outbox row), 200 carried; remainder < N.
    assert (client.units_logged, client.remainder) == (2, 200)
    assert [report.units for report in reports_of(client)] == [1, 1]

    record(agency, tokens("e2", 400))
    aggregate_pending_usage()
    assert (fresh(client).units_logged, client.remainder) == (4, 0)  # 200 + 400 = 2 x 300
    assert sum(report.units for report in reports_of(client)) == 4  # not floor(1900 / 300) = 6


def test_rule5_usage_received_while_paused_is_never_billed_even_if_resumed_before_the_next_pass(agency):
    client = make_client(agency, billing_unit=1000)
    record(agency, tokens("active-1", 500))  # pending when the client is paused: it was active
    update_client(agency, client.id, {"status": "paused"})
    record(agency, tokens("paused-1", 700))
    update_client(agency, client.id, {"status": "active"})  # resumed before any aggregation pass
    record(agency, tokens("active-2", 600))
    aggregate_pending_usage()
    db.session.commit()

    client = fresh(client)
    assert event_states(agency) == {"active-1": "counted", "paused-1": "paused", "active-2": "counted"}
    assert (client.counted_usage, client.units_logged, client.remainder) == (1100, 1, 100)
    paused = db.session.scalar(select(UsageEvent.counted).where(UsageEvent.source_event_id == "paused-1"))
    assert paused == 700  # visible as paused usage, never billed


def test_rule5_a_paused_client_logs_no_units_at_any_pass(agency):
    client = make_client(agency, billing_unit=1, status="paused")
    record(agency, tokens("e1", 10))
    result = aggregate_pending_usage()
    assert (result.events, result.units, result.reports) == (1, 0, 0)
    assert (fresh(client).units_logged, client.counted_usage) == (0, 0)


def test_rule7_one_outbox_row_per_client_per_pass_carries_all_new_units(agency):
    many = make_client(agency, source_key="chan-many", billing_unit=10)
    few = make_client(agency, source_key="chan-few", billing_unit=100)
    none = make_client(agency, source_key="chan-none", billing_unit=1000)
    record(agency, *[tokens(f"m{i}", 7, channel="chan-many") for i in range(30)])  # 210 -> 21 units
    record(agency, *[tokens(f"f{i}", 60, channel="chan-few") for i in range(5)])  # 300 -> 3 units
    record(agency, tokens("n1", 999, channel="chan-none"))  # no unit yet: no row
    result = aggregate_pending_usage(batch_size=4)  # many batches, still one row per client
    db.session.commit()

    assert (result.events, result.units, result.reports) == (36, 24, 2)
    assert [report.units for report in reports_of(many)] == [21]
    assert [report.units for report in reports_of(few)] == [3]
    assert reports_of(none) == []


def test_report_identifiers_are_deterministic_per_client_sequence_and_fit_stripe(agency):
    first = make_client(agency, source_key="chan-a", billing_unit=1)
    second = make_client(agency, source_key="chan-b", billing_unit=1)
    assert first.report_prefix != second.report_prefix and len(first.report_prefix) == 16
    for number in range(3):
        record(agency, tokens(f"a{number}", 1, channel="chan-a"), tokens(f"b{number}", 1, channel="chan-b"))
        aggregate_pending_usage()
    db.session.commit()

    identifiers = [report.identifier for report in reports_of(first)]
    assert identifiers == [report_identifier(first.report_prefix, first.id, sequence) for sequence in (1, 2, 3)]
    assert identifiers[0] == f"rebill_{first.report_prefix}_{first.id}_1"
    assert fresh(first).report_sequence == 3
    assert not set(identifiers) & {report.identifier for report in reports_of(second)}
    assert all(len(identifier) <= 100 for identifier in identifiers)


def test_usage_timestamp_is_the_latest_usage_never_in_the_future_never_older_than_35_days(agency):
    recent = make_client(agency, source_key="chan-recent", billing_unit=1)
    old = make_client(agency, source_key="chan-old", billing_unit=1)
    future = make_client(agency, source_key="chan-future", billing_unit=1)
    record(
        agency,
        tokens("r1", 1, channel="chan-recent", occurred_at=NOW - dt.timedelta(hours=3)),
        tokens("r2", 1, channel="chan-recent", occurred_at=NOW - dt.timedelta(hours=1)),
        tokens("o1", 1, channel="chan-old", occurred_at=NOW - dt.timedelta(days=50)),
        tokens("f1", 1, channel="chan-future", occurred_at=utcnow() + dt.timedelta(minutes=4)),
    )
    before = utcnow()
    aggregate_pending_usage()
    after = utcnow()

    assert reports_of(recent)[0].usage_timestamp == NOW - dt.timedelta(hours=1)
    old_stamp = reports_of(old)[0].usage_timestamp
    assert before - OLDEST_USAGE_TIMESTAMP <= old_stamp <= after - OLDEST_USAGE_TIMESTAMP
    assert after - old_stamp < dt.timedelta(days=35)
    assert before <= reports_of(future)[0].usage_timestamp <= after


@pytest.mark.parametrize(
    ("message_source", "counted"),
    [
        ("ghl_outbound", {"out": 1, "in": 0, "platform": 0, "tokens": 0}),
        ("ghl_inbound", {"out": 0, "in": 1, "platform": 0, "tokens": 0}),
        ("ghl_all", {"out": 1, "in": 1, "platform": 0, "tokens": 0}),
        ("platform", {"out": 0, "in": 0, "platform": 3, "tokens": 0}),
    ],
)
def test_ghl_message_clients_count_exactly_their_one_message_source(agency, message_source, counted):
    client = make_client(
        agency, provider="ghl", source_key="loc-1", charge_by="messages", billing_unit=1, message_source=message_source
    )
    record(
        agency,
        ghl_message("out", "loc-1", "outbound"),
        ghl_message("in", "loc-1", "inbound"),
        capri_messages("platform", 3, location="loc-1"),
        tokens("tokens", 500, location="loc-1"),
    )
    aggregate_pending_usage()
    db.session.commit()
    measured = dict(
        db.session.execute(
            select(UsageEvent.source_event_id, UsageEvent.counted).where(UsageEvent.agency_id == agency.id)
        ).all()
    )
    assert measured == counted
    assert fresh(client).counted_usage == sum(counted.values())
    states = event_states(agency)
    assert {event for event, state in states.items() if state == "counted"} == {e for e, n in counted.items() if n}
    assert {event for event, state in states.items() if state == "ignored"} == {e for e, n in counted.items() if not n}


def test_token_clients_count_input_plus_output_of_the_platform_only(agency):
    channel = make_client(agency, source_key="chan-1", billing_unit=1)
    location = make_client(agency, provider="ghl", source_key="loc-1", billing_unit=1)
    record(
        agency,
        tokens("c1", 301, channel="chan-1"),
        capri_messages("c2", 4, channel="chan-1"),  # a tokens client ignores messages
        tokens("l1", 50, location="loc-1"),
        ghl_message("l2", "loc-1", "outbound"),  # GHL webhooks carry no tokens
    )
    aggregate_pending_usage()
    assert fresh(channel).counted_usage == 301
    assert fresh(location).counted_usage == 50
    assert event_states(agency) == {"c1": "counted", "c2": "ignored", "l1": "counted", "l2": "ignored"}


def test_api_channel_message_clients_count_the_messages_field(agency):
    client = make_client(agency, source_key="chan-1", charge_by="messages", billing_unit=2)
    record(agency, capri_messages("m1", 3), capri_messages("m2", 2), tokens("t1", 100))
    aggregate_pending_usage()
    assert (fresh(client).counted_usage, client.units_logged, client.remainder) == (5, 2, 1)


def test_events_match_only_their_own_agency_and_kind_of_source(agency):
    other = ensure_agency("company-other")
    mine = make_client(agency, source_key="same-key", billing_unit=1)
    record(other, tokens("theirs", 10, channel="same-key"))  # another agency's channel with the same name
    record(agency, tokens("as-location", 10, location="same-key"))  # a subaccount id equal to my channel id
    record(agency, tokens("mine", 10, channel="same-key"))
    aggregate_pending_usage()
    assert fresh(mine).counted_usage == 10
    assert event_states(other) == {"theirs": "unmapped"}
    assert event_states(agency) == {"as-location": "unmapped", "mine": "counted"}


def test_deleting_a_client_counts_its_pending_usage_keeps_history_and_unmaps_new_usage(agency):
    client = make_client(agency, billing_unit=100)
    record(agency, tokens("before", 250))
    delete_client(agency, client.id)
    record(agency, tokens("after", 900))
    aggregate_pending_usage()
    db.session.commit()

    deleted = fresh(client)
    assert deleted.deleted_at is not None
    assert (deleted.counted_usage, deleted.units_logged, deleted.remainder) == (250, 2, 50)
    assert [report.units for report in reports_of(deleted)] == [2]
    assert event_states(agency) == {"before": "counted", "after": "unmapped"}


def test_a_failure_mid_aggregation_rolls_back_counters_event_states_and_outbox_together(agency):
    client = make_client(agency, billing_unit=10)
    bystander = make_client(agency, source_key="chan-2", billing_unit=10)
    record(agency, tokens("e1", 25), tokens("e2", 30, channel="chan-2"))
    db.session.commit()
    # Real data that makes the outbox insert fail: a row already holding the client's next identifier.
    db.session.add(
        UnitReport(
            agency_id=agency.id,
            client_id=bystander.id,
            identifier=report_identifier(client.report_prefix, client.id, 1),
            units=1,
            usage_timestamp=NOW,
        )
    )
    db.session.commit()

    # Rule 8: the failure no longer escapes the pass (other agencies go on, test_units_isolation.py), but
    # this agency's part is still all or nothing.
    assert aggregate_pending_usage().failed_agencies == (agency.id,)
    db.session.commit()

    assert event_states(agency) == {"e1": "pending", "e2": "pending"}
    for untouched in (fresh(client), fresh(bystander)):
        assert (untouched.counted_usage, untouched.units_logged, untouched.remainder) == (0, 0, 0)
        assert untouched.report_sequence == 0
    assert db.session.scalar(select(func.count()).select_from(UnitReport)) == 1

    db.session.execute(text("DELETE FROM unit_report"))
    result = aggregate_pending_usage()
    db.session.commit()
    assert (result.events, result.units, result.reports) == (2, 5, 2)
    assert [report.units for report in reports_of(client)] == [2]


def test_aggregation_leaves_orm_objects_consistent_with_the_database(agency):
    client = make_client(agency, billing_unit=10)
    loaded = db.session.get(RebillClient, client.id)
    record(agency, tokens("e1", 35))
    aggregate_pending_usage()
    assert (loaded.counted_usage, loaded.units_logged, loaded.remainder) == (35, 3, 5)


def test_an_empty_ledger_aggregates_to_nothing(agency):
    assert aggregate_pending_usage() == aggregate_pending_usage().__class__()
