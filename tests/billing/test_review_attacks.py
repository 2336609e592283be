"""Adversarial review of the money paths changed since 2657eca (issue 9 gaps 1-3, issue 12 item 5).

Each test plays a scenario a reviewer (not the author) built to break the invariant: units in Stripe per client
== floor(usage / N) - already reported, never doubled, never lost; a flagged or failed state never silently
resends something Stripe already counted, and never marks as sent something Stripe does not have. Faults are
injected only at the HTTP boundary (stripe_fake); the clock moves for Rebill and the fake together.

A test here FAILS on main when it proves a problem; its docstring states the scenario and the mechanism.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest

from billing.reporting import report_pending_units, retry_failed_reports
from billing.stripe_events import register_stripe_events
from core.database import db

PUBLIC_URL = "https://rebill.example.test"


@pytest.fixture
def http(stripe_app):
    return stripe_app.test_client()


def connected(world, **agency):
    setup = world.agency(**agency)
    register_stripe_events(setup.agency, PUBLIC_URL)
    db.session.commit()
    return setup


def tick(world, **shift):
    if shift:
        world.clock.advance(**shift)
    db.session.commit()
    return report_pending_units(world.clock.now())


def deliver(http, deliveries):
    (delivery,) = deliveries
    return http.post(urlsplit(delivery.url).path, data=delivery.body, headers=delivery.headers).get_json()


# ---- meter errors x lost answers ------------------------------------------------------------------------------


def test_a_meter_error_for_a_report_whose_answer_was_lost_is_not_swallowed_by_the_resend(world, http):
    """Stripe applies a sum-meter event but the answer is lost (the row stays pending, in doubt). Minutes
    later Stripe's asynchronous validation rejects the event and the thin meter-error event arrives while the
    row is still pending: billing.meter_errors only flags ``sent`` rows, so it notes "left as it is" and the
    event is consumed. The row's retry (same identifier, inside Stripe's 24 h dedupe) is answered "an event
    already exists with identifier", which reporting takes for delivered: the row is ``sent`` while Stripe
    counts none of its units, and nothing ever re-offers them (the daily reconciliation flags, never resends).
    The units are lost. Expected: a report Stripe named as rejected is never marked sent on a duplicate
    answer (flag in-doubt rows too, or remember the rejected identifier and re-offer under a fresh one).
    """
    setup = connected(world)
    client = world.client(setup)
    report = world.report(client, 7)
    world.state.inject("/v1/billing/meter_events", "accept_then_drop")
    tick(world)  # Stripe took the event; Rebill never heard back
    (row,) = world.reports(client)
    assert row.status == "pending" and row.in_doubt_since is not None

    answer = deliver(http, world.state.reject_meter_events_later(setup.key, [report.identifier]))
    assert world.stripe_total(setup, client) == 0  # Stripe holds none of it now
    tick(world, minutes=10)  # past the backoff: the row is retried
    tick(world, minutes=10)

    (row,) = world.reports(client)
    in_stripe = world.stripe_total(setup, client)
    assert not (row.status == "sent" and in_stripe == 0), (
        f"report marked sent ({row.last_error!r}) with {in_stripe} of its 7 units in Stripe; meter-error event "
        f"answered {answer}"
    )


def test_a_row_the_24h_check_finds_missing_is_not_reoffered_under_an_identifier_stripe_still_holds(world):
    """Stripe applies a sum-meter event, the answer is lost, and the agency rolls its key (rows wait). Stripe
    then rejects the event asynchronously (no event destination: only the totals show it). The agency
    reconnects 23.5 h later: the >24 h check (run from DEDUPE_SAFE_AGE = 23 h) finds none of the row in
    Stripe's totals, so billing.unsent_remainder re-opens the row (nothing confirmed) under its SAME
    identifier and it is resent at once. Stripe still holds that identifier (unique for at least 24 h), answers
    "already exists", and reporting records the row as delivered: 7 units marked sent, none in Stripe, never
    re-offered. Mechanism: move_unsent_remainder's ``confirmed == 0`` branch keeps the identifier, although
    the only way a row in doubt can be missing from the totals after reaching Stripe is an asynchronous
    rejection, whose identifier Stripe still remembers. Fix: give the re-opened row a fresh identifier (as
    meter_errors does with ``_r1``), and never take "already exists" for delivered on a re-opened row.
    """
    from tests.billing.test_reporting_over_time import reconnect, roll_key

    setup = world.agency()
    client = world.client(setup)
    report = world.report(client, 7)
    world.state.inject("/v1/billing/meter_events", "accept_then_drop")
    tick(world)  # applied in Stripe; the answer is lost
    new = roll_key(world, setup)
    tick(world, minutes=5)  # the retry meets the rolled key: the agency is flagged, rows wait
    assert world.agency_row(setup).stripe_key_status == "needs_attention"
    world.state.reject_meter_events_later(new.key, [report.identifier])  # nobody hears of it
    assert world.stripe_total(new, client) == 0

    world.clock.advance(hours=23, minutes=30)
    reconnect(world, new)
    tick(world)
    tick(world, minutes=1)

    assert world.calls("/v1/billing/meters/", "GET")  # the >24 h check read Stripe's summaries first
    (row,) = world.reports(client)
    in_stripe = world.stripe_total(new, client)
    assert not (row.status == "sent" and in_stripe == 0), (
        f"report {row.identifier} marked sent ({row.last_error!r}) with {in_stripe} of its 7 units in Stripe"
    )
