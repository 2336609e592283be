"""Reconcile compares the ledger with Stripe's totals per client for the current period, and resends nothing."""

from __future__ import annotations

import datetime as dt

from billing.reconcile import reconcile_clients
from billing.reporting import report_pending_units
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
