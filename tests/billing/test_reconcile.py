"""Reconcile compares the ledger with Stripe's totals per client for the current period, and resends nothing."""

from __future__ import annotations

import datetime as dt

from billing.models import RebillClient
from billing.periods import client_money
from billing.reconcile import reconcile_clients, record_reconcile_gaps
from billing.reporting import report_pending_units
from billing.stripe_events import register_stripe_events
from core.database import db


def send_all(world):
    db.session.commit()
    report_pending_units(world.clock.now())


def test_a_fully_reported_client_has_no_drift(world):
    setup = world.agency()
    client = world.client(setup)
    world.report(client, 3)
    world.report(client, 4)
    send_all(world)

    (line,) = reconcile_clients()

    assert (line.client_ids, line.customer_id, line.target) == ([client.id], client.stripe_customer_id, "ai_units")
    assert (line.units_sent, line.stripe_total, line.drift, line.problem) == (7, 7, 0, None)
    assert line.period_start <= world.clock.now() <= line.period_end + dt.timedelta(minutes=1)


def test_units_stripe_has_but_the_ledger_does_not_show_as_drift_and_nothing_is_resent(world):
    setup = world.agency()
    client = world.client(setup)
    world.report(client, 5)
    world.state.inject("/v1/billing/meter_events", "accept_then_drop")
    send_all(world)
    posts = len(world.calls())

    (line,) = reconcile_clients(setup.agency.company_id)

    assert (line.units_sent, line.units_unconfirmed, line.stripe_total, line.drift) == (0, 5, 5, 5)
    assert len(world.calls()) == posts


def test_units_waiting_in_the_outbox_are_shown_apart(world):
    setup = world.agency()
    client = world.client(setup)
    world.report(client, 2)
    db.session.commit()

    (line,) = reconcile_clients()

    assert (line.units_waiting, line.units_sent, line.drift) == (2, 0, 0)


def test_legacy_clients_reconcile_against_the_usage_record_summary(world):
    setup = world.agency(legacy=True)
    client = world.client(setup)
    world.report(client, 6)
    send_all(world)

    (line,) = reconcile_clients()

    assert (line.target, line.units_sent, line.stripe_total, line.drift) == (setup.price["id"], 6, 6, 0)


def test_one_agency_only_and_problems_are_reported(world):
    good, broken = world.agency(), world.agency(register_key=False)
    world.client(good)
    world.client(broken)
    db.session.commit()

    assert [line.company_id for line in reconcile_clients(good.agency.company_id)] == [good.agency.company_id]
    (line,) = reconcile_clients(broken.agency.company_id)
    assert "401" in line.problem and line.stripe_total is None


def test_clients_sharing_a_customer_and_meter_are_reconciled_together(world):
    setup = world.agency()
    customer = world.customer(setup)
    first, second = world.client(setup, customer_id=customer), world.client(setup, customer_id=customer)
    world.report(first, 1)
    world.report(second, 2)
    send_all(world)

    (line,) = reconcile_clients()

    assert line.client_ids == [first.id, second.id] and (line.units_sent, line.drift) == (3, 0)


def test_units_stay_on_the_customer_they_went_to_after_the_client_moves(world):
    setup = world.agency()
    client = world.client(setup)
    first_customer = client.stripe_customer_id
    world.report(client, 4)
    send_all(world)
    client.stripe_customer_id = moved = world.customer(setup)
    world.report(client, 1)
    db.session.commit()

    lines = {line.customer_id: line for line in reconcile_clients()}

    assert (lines[first_customer].units_sent, lines[first_customer].drift) == (4, 0)
    assert (lines[moved].units_sent, lines[moved].units_waiting, lines[moved].drift) == (0, 1, 0)
    assert lines[first_customer].client_ids == lines[moved].client_ids == [client.id]


# ---- the daily gap check: units Stripe rejected after accepting them ------------------------------------


def flagged_state(setup, client):
    db.session.expire_all()
    client = db.session.get(RebillClient, client.id)
    return client_money(setup.agency, [client])[client.id]


def test_the_daily_check_flags_clients_whose_units_stripe_rejected_later_and_resends_nothing(world):
    # A key that may not register an event destination: the meter error event reaches nobody.
    setup = world.agency(key="rk_test_nodestination00000002", denied=("event_destination_write",))
    register_stripe_events(setup.agency, "https://rebill.example.test")
    client, fine = world.client(setup), world.client(setup)
    rejected = world.report(client, 5)
    world.report(client, 3)
    world.report(fine, 4)
    send_all(world)
    assert world.state.reject_meter_events_later(setup.key, [rejected.identifier]) == []  # no destination
    posts = len(world.calls())

    assert record_reconcile_gaps(world.clock.now()) == 0  # sent just now: Stripe's summaries may lag
    world.clock.advance(hours=2)
    assert record_reconcile_gaps(world.clock.now()) == 1

    money = flagged_state(setup, client)
    assert money.billing_state == "failing" and "5 units fewer" in money.billing_problem
    assert "8 sent, 3 in Stripe" in money.billing_problem
    assert flagged_state(setup, fine).billing_state == "ok"
    assert len(world.calls()) == posts  # nothing resent
    assert [row.status for row in world.reports(client)] == ["sent", "sent"]

    # The agency records the missing units in Stripe by hand: the next check clears the flag.
    world.server.client(setup.key).v1.billing.meter_events.create(
        {"event_name": "ai_units", "payload": {"stripe_customer_id": client.stripe_customer_id, "value": "5"},
         "timestamp": int(rejected.stripe_timestamp.timestamp())}
    )
    assert record_reconcile_gaps(world.clock.now()) == 0
    assert flagged_state(setup, client).billing_state == "ok"


def test_one_agencys_unreachable_stripe_keeps_its_last_result_and_checks_the_others(world):
    first, second = world.agency(), world.agency()
    mine, theirs = world.client(first), world.client(second)
    lost_here, lost_there = world.report(mine, 2), world.report(theirs, 2)
    send_all(world)
    world.state.reject_meter_events_later(first.key, [lost_here.identifier])
    world.state.reject_meter_events_later(second.key, [lost_there.identifier])
    world.clock.advance(hours=2)
    assert record_reconcile_gaps(world.clock.now()) == 2

    world.state.inject("/v1/billing/meters/", "server_error", times=10, api_key=first.key)
    world.server.client(second.key).v1.billing.meter_events.create(
        {"event_name": "ai_units", "payload": {"stripe_customer_id": theirs.stripe_customer_id, "value": "2"},
         "timestamp": int(lost_there.stripe_timestamp.timestamp())}
    )
    assert record_reconcile_gaps(world.clock.now()) == 0

    assert flagged_state(first, mine).billing_state == "failing"  # not read this time: the last finding stays
    assert flagged_state(second, theirs).billing_state == "ok"


def test_the_daily_check_counts_another_agency_s_units_to_the_same_customer_and_flags_a_rejection(world):
    """Two agencies connect one Stripe account (one business, two GHL companies) and bill one customer's meter.
    Stripe rejects 5 of agency 1's units after their 2xx; agency 2's 5 units fill the customer's total (5): counted
    per agency, agency 1's ledger (5) matched the total and the gap was hidden."""
    from dataclasses import replace

    from billing.agencies import ensure_agency
    from core.encryption import secret_box

    setup = world.agency(key="rk_test_nodestination00000003", denied=("event_destination_write",))
    register_stripe_events(setup.agency, "https://rebill.example.test")
    shared = ensure_agency("company-on-the-same-stripe-account")
    shared.stripe_key_ciphertext = secret_box().encrypt(setup.agency_key)
    shared.stripe_key_last4, shared.stripe_mode, shared.stripe_key_status = setup.agency_key[-4:], "test", "ok"
    db.session.flush()
    client = world.client(setup)
    other = world.client(replace(setup, agency=shared), customer_id=client.stripe_customer_id)
    rejected = world.report(client, 5)
    world.report(other, 5)
    send_all(world)
    assert world.state.reject_meter_events_later(setup.key, [rejected.identifier]) == []  # no destination
    world.clock.advance(hours=2)

    # Both agencies see the customer's total short of what the account's ledger marked sent (10 sent, 5 there).
    assert record_reconcile_gaps(world.clock.now()) == 2
    money = flagged_state(setup, client)
    assert money.billing_state == "failing" and "5 units fewer" in money.billing_problem
