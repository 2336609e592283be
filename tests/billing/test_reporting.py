"""Reporting sends the unit outbox to each agency's Stripe exactly once, whatever Stripe answers."""

from __future__ import annotations

import datetime as dt

import pytest
import stripe

from billing.report_claims import LEASE
from billing.reporting import retry_failed_reports
from billing.stripe_connection import connect_stripe_key
from core.database import db
from tests.billing.stripe_support import tick

# ---- the normal tick -------------------------------------------------------------------------------------


def test_one_stripe_call_per_client_with_new_units_and_exact_totals(world):
    alpha, beta = world.agency(), world.agency()
    a1, a2, b1 = world.client(alpha), world.client(alpha), world.client(beta)
    idle = world.client(alpha)  # no new units: no call
    world.report(a1, 3)
    world.report(a2, 1)
    world.report(b1, 250)

    result = tick(world)

    assert [world.stripe_total(alpha, a1), world.stripe_total(alpha, a2), world.stripe_total(beta, b1)] == [3, 1, 250]
    assert world.stripe_total(alpha, idle) == 0
    posts = world.calls()
    assert len(posts) == 3 == result.stripe_calls
    assert sorted(call.params["payload"]["value"] for call in posts) == ["1", "250", "3"]
    assert {call.api_key for call in posts} == {alpha.key, beta.key}  # every call with the agency's own key
    assert result.reports_sent == 3 and result.units_sent == 254
    assert all(report.status == "sent" and report.sent_at and report.attempts == 1 for report in world.reports())


def test_the_identifier_and_timestamp_sent_are_the_outbox_row_s(world):
    setup = world.agency()
    client = world.client(setup, customer_id=world.customer(setup, start=world.clock.now() - dt.timedelta(days=10)))
    at = world.clock.now() - dt.timedelta(days=3, minutes=7)  # inside the customer's current period
    report = world.report(client, 4, at=at)

    tick(world)

    (event,) = world.state.meter_events(setup.key)
    assert event["identifier"] == report.identifier
    assert event["timestamp"] == int(at.timestamp())
    assert event["payload"] == {"stripe_customer_id": client.stripe_customer_id, "value": "4"}


def test_a_second_tick_with_nothing_new_calls_stripe_not_at_all(world):
    setup = world.agency()
    world.report(world.client(setup), 2)
    tick(world)
    calls_before = len(world.state.calls)

    result = tick(world)

    assert result.stripe_calls == 0 and len(world.state.calls) == calls_before


def test_count_meter_gets_k_events_with_their_own_identifiers(world):
    setup = world.agency(formula="count")
    client = world.client(setup)
    report = world.report(client, 3)

    tick(world)

    events = world.state.meter_events(setup.key)
    assert [event["identifier"] for event in events] == [f"{report.identifier}-{n}" for n in (1, 2, 3)]
    assert world.stripe_total(setup, client) == 3


def test_custom_meter_payload_keys_are_used(world):
    setup = world.agency()
    meter = world.state.create_meter(setup.key, "custom_units", customer_key="cust", value_key="qty")
    price = world.state.create_price(setup.key, setup.product, 5, meter=meter)
    setup.meter, setup.price = meter, price
    client = world.client(setup)
    world.report(client, 6)

    tick(world)

    (event,) = world.state.meter_events(setup.key, "custom_units")
    assert event["payload"] == {"cust": client.stripe_customer_id, "qty": "6"}


def test_legacy_price_gets_a_usage_record_keyed_by_the_identifier(world):
    setup = world.agency(legacy=True)
    client = world.client(setup)
    report = world.report(client, 7)

    result = tick(world)

    (call,) = world.calls("/v1/subscription_items/")
    assert call.params == {
        "quantity": "7",
        "timestamp": str(int(report.usage_timestamp.timestamp())),
        "action": "increment",
    }
    assert call.idempotency_key == report.identifier
    assert world.stripe_total(setup, client) == 7
    assert result.stripe_calls == 2  # the subscription item and its period, then the usage record
    (sent,) = world.reports()
    assert sent.status == "sent" and sent.target_subscription_item == call.path.split("/")[3]

    # The item is looked up at every first offer, never taken from a cache the agency may have made stale
    # by re-creating the subscription: one read and one write per legacy client per tick.
    world.report(db.session.get(type(client), client.id), 2)
    assert tick(world).stripe_calls == 2
    assert world.stripe_total(setup, client) == 9


def test_a_backlog_of_rows_is_sent_row_by_row_in_order(world):
    setup = world.agency()
    client = world.client(setup)
    first, second = world.report(client, 2), world.report(client, 5)

    tick(world)

    assert [e["identifier"] for e in world.state.meter_events(setup.key)] == [first.identifier, second.identifier]
    assert world.stripe_total(setup, client) == 7


# ---- Stripe unavailable: retried with backoff, nothing lost ------------------------------------------------


@pytest.mark.parametrize("fault", ["rate_limit", "server_error"])
def test_unavailable_stripe_is_retried_with_backoff_and_nothing_is_lost(world, fault):
    setup = world.agency()
    client = world.client(setup)
    world.report(client, 3)
    world.state.inject("/v1/billing/meter_events", fault)

    first = tick(world)

    (report,) = world.reports()
    assert first.reports_retrying == 1 and report.status == "pending" and report.attempts == 1
    assert "429" in report.last_error if fault == "rate_limit" else "500" in report.last_error
    wait = report.next_attempt_at - world.clock.now()
    assert dt.timedelta(seconds=10) < wait <= dt.timedelta(seconds=30)
    assert tick(world).stripe_calls == 0  # not due yet: no hammering

    tick(world, seconds=31)

    (report,) = world.reports()
    assert report.status == "sent" and report.attempts == 2 and report.last_error is None
    assert world.stripe_total(setup, client) == 3


def test_backoff_grows_exponentially_up_to_a_cap(world):
    setup = world.agency()
    world.report(world.client(setup), 1)
    world.state.inject("/v1/billing/meter_events", "rate_limit", times=20)
    waits = []
    for _ in range(10):
        tick(world, hours=2)
        (report,) = world.reports()
        waits.append((report.next_attempt_at - world.clock.now()).total_seconds())
    assert waits[0] <= 30 < waits[2] <= 120 and all(1800 <= wait <= 3600 for wait in waits[8:])


def test_an_answer_lost_after_stripe_applied_it_is_not_sent_twice(world):
    setup = world.agency()
    client = world.client(setup)
    world.report(client, 4)
    world.state.inject("/v1/billing/meter_events", "accept_then_drop")

    tick(world)
    assert world.reports()[0].status == "pending" and world.stripe_total(setup, client) == 4

    tick(world, minutes=2)

    (report,) = world.reports()
    assert report.status == "sent" and world.stripe_total(setup, client) == 4
    assert [call.status for call in world.calls()][-1] == 400  # Stripe: "already exists" = delivered


def test_a_stripe_timeout_is_retried_later(world, stripe_app):
    stripe_app.config["STRIPE_TIMEOUT_SECONDS"] = 1
    setup = world.agency()
    client = world.client(setup)
    world.report(client, 2)
    world.state.inject("/v1/billing/meter_events", "timeout", seconds=30)

    tick(world)
    world.state.release_hangs()

    (report,) = world.reports()
    assert report.status == "pending" and "could not be reached" in report.last_error
    tick(world, minutes=2)
    assert world.stripe_total(setup, client) == 2 and world.reports()[0].status == "sent"


def test_one_customer_s_trouble_does_not_hold_back_other_customers(world):
    setup = world.agency()
    slow, fine = world.client(setup), world.client(setup)
    world.report(slow, 1)
    world.report(slow, 2)
    world.report(fine, 3)
    world.state.inject("/v1/billing/meter_events", "rate_limit", api_key=setup.key)

    tick(world)

    assert world.stripe_total(setup, fine) == 3
    statuses = [(r.client_id, r.status) for r in world.reports()]
    assert statuses.count((slow.id, "pending")) + statuses.count((slow.id, "sent")) == 2
    tick(world, minutes=2)
    assert world.stripe_total(setup, slow) == 3


# ---- key rejected: agency flagged, rows untouched, no retry storm ---------------------------------------------


def test_a_rejected_key_flags_the_agency_and_stops_its_calls(world):
    broken = world.agency(register_key=False)
    healthy = world.agency()
    clients = [world.client(broken) for _ in range(3)]
    for client in clients:
        world.report(client, 2)
    other = world.client(healthy)
    world.report(other, 5)

    result = tick(world)

    agency = world.agency_row(broken)
    assert agency.stripe_key_status == "needs_attention" and "401" in agency.stripe_key_problem
    assert result.agencies_flagged == 1
    assert len([call for call in world.state.calls if call.api_key == broken.agency_key]) == 1
    untouched = [r for r in world.reports() if r.agency_id == broken.agency.id]
    # Still pending and not in doubt (Stripe refused the key: nothing landed); the attempt stays counted, since
    # attempt history is append-only (rule 9).
    assert all(r.status == "pending" and r.in_doubt_since is None and r.units_confirmed == 0 for r in untouched)
    assert all(r.attempts == 1 and r.first_attempt_at is not None for r in untouched)
    assert world.stripe_total(healthy, other) == 5

    for _ in range(3):
        tick(world, hours=1)
    assert len([call for call in world.state.calls if call.api_key == broken.agency_key]) == 1  # no storm

    world.state.add_account(broken.agency_key, account_id=broken.account_id)  # the agency fixed its key
    connect_stripe_key(world.agency_row(broken), broken.agency_key)
    db.session.commit()
    tick(world)
    assert [world.stripe_total(broken, c) for c in clients] == [2, 2, 2]


def test_a_missing_permission_is_named_and_the_agency_flagged(world):
    setup = world.agency(denied=("billing_meter_event_write",))
    world.report(world.client(setup), 1)

    tick(world)

    agency = world.agency_row(setup)
    assert agency.stripe_key_status == "needs_attention"
    assert "rak_billing_meter_event_write" in agency.stripe_key_problem
    (report,) = world.reports()
    assert report.status == "pending" and report.attempts == 1 and report.in_doubt_since is None


def test_agencies_without_a_key_are_skipped_without_calls(world):
    setup = world.agency()
    world.report(world.client(setup), 1)
    setup.agency.stripe_key_status = "missing"

    result = tick(world)

    assert result.stripe_calls == 0 and world.state.calls == []
    assert world.reports()[0].status == "pending"


# ---- Stripe refuses the request: failed, visible, retried after a fix -----------------------------------------


def test_an_unknown_customer_fails_visibly_and_is_retried_after_the_client_is_fixed(world):
    setup = world.agency()
    client = world.client(setup, customer_id="cus_doesnotexist")
    world.report(client, 3)

    result = tick(world)

    (report,) = world.reports()
    assert result.reports_failed == 1 and report.status == "failed"
    assert "No such customer" in report.last_error
    tick(world, hours=5)
    assert len(world.calls()) == 1  # failed rows wait for the agency, not for the clock

    client.stripe_customer_id = world.customer(setup)
    assert retry_failed_reports(setup.agency, client.id) == 1
    tick(world)

    assert world.reports()[0].status == "sent" and world.stripe_total(setup, client) == 3


def test_no_active_meter_fails_with_stripe_s_reason(world):
    setup = world.agency()
    client = world.client(setup)
    world.report(client, 1)
    world.server.client(setup.key).v1.billing.meters.deactivate(setup.meter["id"])

    tick(world)

    assert "No active meter" in world.reports()[0].last_error


def test_a_legacy_customer_without_subscription_fails_with_the_reason(world):
    setup = world.agency(legacy=True)
    client = world.client(setup, customer_id=None)
    client.stripe_customer_id = world.customer(setup, subscribe=False)
    world.report(client, 1)

    tick(world)

    (report,) = world.reports()
    assert report.status == "failed" and "no active subscription" in report.last_error


def test_a_client_without_cached_meter_fails_without_calling_stripe(world):
    setup = world.agency()
    client = world.client(setup)
    client.meter_event_name = None
    world.report(client, 1)

    result = tick(world)

    assert result.stripe_calls == 0 and "edit the client" in world.reports()[0].last_error


# ---- duplicate identifier = delivered ------------------------------------------------------------------------


def test_stripe_already_having_the_identifier_counts_as_delivered(world):
    setup = world.agency()
    client = world.client(setup)
    report = world.report(client, 6)
    world.server.client(setup.key).v1.billing.meter_events.create(
        {
            "event_name": "ai_units",
            "identifier": report.identifier,
            "payload": {"stripe_customer_id": client.stripe_customer_id, "value": "6"},
        }
    )

    result = tick(world)

    assert result.reports_sent == 1 and world.reports()[0].status == "sent"
    assert world.stripe_total(setup, client) == 6


# ---- timestamps -----------------------------------------------------------------------------------------------


def test_units_never_offered_to_stripe_and_older_than_35_days_are_billed_now_not_lost(world):
    setup = world.agency()
    client = world.client(setup)
    world.report(client, 2, at=world.clock.now() - dt.timedelta(days=36))

    result = tick(world)

    (report,) = world.reports()
    assert result.stripe_calls == 1 and report.status == "sent"
    assert abs(report.stripe_timestamp - world.clock.now()) < dt.timedelta(seconds=1)
    assert report.usage_timestamp < report.stripe_timestamp and "35 days" in report.timestamp_shift
    assert world.stripe_total(setup, client) == 2


def test_units_in_doubt_and_now_older_than_35_days_are_checked_then_re_offered_with_a_valid_timestamp(world):
    # Rule 10: no unit is left unbillable. Before, such a row became "needs reconcile" for good.
    setup = world.agency()
    client = world.client(setup)
    world.report(client, 2)
    world.state.inject("/v1/billing/meter_events", "rate_limit")
    tick(world)
    calls = len(world.calls())

    tick(world, days=36)

    (report,) = world.reports()
    assert len(world.calls("/v1/billing/meters/", "GET")) == 1  # Stripe's totals say none of it landed
    assert report.status == "sent" and len(world.calls()) == calls + 1
    assert abs(report.stripe_timestamp - world.clock.now()) < dt.timedelta(seconds=5)
    assert world.stripe_total(setup, client) == 2


def test_a_future_timestamp_waits_until_its_time(world):
    setup = world.agency()
    client = world.client(setup)
    world.report(client, 2, at=world.clock.now() + dt.timedelta(minutes=3))

    assert tick(world).stripe_calls == 0
    tick(world, minutes=4)
    assert world.stripe_total(setup, client) == 2


# ---- the 24 h dedupe window ---------------------------------------------------------------------------------


def test_after_24h_a_row_stripe_already_has_is_confirmed_from_summaries_not_resent(world):
    setup = world.agency()
    client = world.client(setup)
    world.report(client, 4)
    world.state.inject("/v1/billing/meter_events", "accept_then_drop")
    tick(world)
    posts = len(world.calls())

    tick(world, hours=25)

    (report,) = world.reports()
    assert report.status == "sent" and "confirmed" in report.last_error
    assert len(world.calls()) == posts  # nothing resent
    assert len(world.calls("/v1/billing/meters/", "GET")) == 1
    assert world.stripe_total(setup, client) == 4


def test_after_24h_a_row_stripe_never_got_is_resent_after_checking(world):
    setup = world.agency()
    client = world.client(setup)
    world.report(client, 4)
    world.state.inject("/v1/billing/meter_events", "rate_limit")
    tick(world)

    tick(world, hours=25)

    assert world.reports()[0].status == "sent" and world.stripe_total(setup, client) == 4
    assert len(world.calls("/v1/billing/meters/", "GET")) == 1


def test_after_24h_unconfirmed_neighbours_make_the_total_ambiguous_so_nothing_is_resent(world):
    setup = world.agency()
    client = world.client(setup)
    at = world.clock.now() - dt.timedelta(seconds=30)
    world.report(client, 4, at=at)
    world.state.inject("/v1/billing/meter_events", "accept_then_drop")
    tick(world)  # Stripe applied the 4, Rebill never heard back
    world.report(client, 3, at=at)
    world.state.inject("/v1/billing/meter_events", "rate_limit")
    tick(world, seconds=1)  # the 3 is refused (429) while the 4 waits for its backoff
    posts = len(world.calls())

    tick(world, hours=25)

    reports = world.reports()
    assert [r.status for r in reports] == ["failed", "failed"]
    assert all(r.last_error.startswith("needs reconcile") for r in reports)
    assert len(world.calls()) == posts  # nothing resent blindly
    assert world.stripe_total(setup, client) == 4

    # Fixing the client or the key re-arms refused rows, never these: their units may be in Stripe already.
    from billing.reporting import retry_failed_reports

    assert retry_failed_reports(world.agency_row(setup), client.id) == 0
    assert [r.status for r in world.reports()] == ["failed", "failed"]


def test_after_24h_a_total_that_does_not_match_is_flagged_for_reconcile(world):
    setup = world.agency()
    client = world.client(setup)
    report = world.report(client, 4)
    world.state.inject("/v1/billing/meter_events", "accept_then_drop")
    tick(world)
    world.server.client(setup.key).v1.billing.meter_events.create(  # the agency's own tooling, same minute
        {"event_name": "ai_units", "timestamp": int(report.usage_timestamp.timestamp()),
         "payload": {"stripe_customer_id": client.stripe_customer_id, "value": "2"}}
    )

    tick(world, hours=25)

    (report,) = world.reports()
    assert report.status == "failed" and "Stripe's total for its window is 6" in report.last_error


# The check's proof that a report sent as one event is missing (docs/billing-rules.md, "In doubt across a period
# rollover"): a window total below its units. Rows offered in the same minute, a tick apart (one row per group and
# tick: a refused offer holds the rest of its group back).


def _offered_in_one_minute(world, client, offers):
    """Offer rows of ``(units, fault)`` one tick apart, all with usage 30 s ago (one minute of Stripe's totals);
    ``fault`` is injected on that row's offer (None: answered). Returns the rows."""
    usage = world.clock.now() - dt.timedelta(seconds=30)
    for number, (units, fault) in enumerate(offers):
        world.report(client, units, at=usage)
        if fault == "timeout":
            world.state.inject("/v1/billing/meter_events", "timeout", seconds=0.1)
        elif fault is not None:
            world.state.inject("/v1/billing/meter_events", fault)
        tick(world, seconds=1 if number else 0)
    return world.reports(client)


def test_after_24h_a_total_below_a_sum_report_s_units_proves_it_missing_though_a_neighbour_may_have_landed(world):
    """D (6) not applied, E (2) applied, both answers lost. Stripe's total for the minute is 2: had D's one event
    of 6 landed the total would be at least 6, whatever E did. D is offered afresh; E, which D might have hidden
    as far as its own check could tell, stays for a person. Nothing is doubled."""
    setup = world.agency()
    client = world.client(setup)
    d, e = _offered_in_one_minute(world, client, [(6, "timeout"), (2, "accept_then_drop")])
    assert d.in_doubt_since is not None and e.in_doubt_since is not None
    posts = len(world.calls())

    tick(world, hours=25)

    d, e = world.reports()
    assert d.status == "sent" and d.identifier.endswith("_r1") and d.units_confirmed == 6
    assert e.status == "failed" and e.last_error.startswith("needs reconcile")
    assert len(world.calls()) == posts + 1  # D's fresh offer only
    assert world.stripe_total(setup, client) == 8


def test_after_24h_a_total_short_of_the_known_units_plus_a_report_s_does_not_prove_it_missing(world):
    """N (2) confirmed, D (6) applied with its answer lost; Stripe later rejects N without a word to Rebill (no
    event destination). The minute's total is 6: below N's 2 + D's 6, yet D is there. Only a total below D's own
    units proves it missing; this one leaves D for a person, and a resend would have billed it twice."""
    setup = world.agency()
    client = world.client(setup)
    n, d = _offered_in_one_minute(world, client, [(2, None), (6, "accept_then_drop")])
    assert n.status == "sent" and d.in_doubt_since is not None
    assert world.state.reject_meter_events_later(setup.key, [n.identifier]) == []  # nobody hears of it
    posts = len(world.calls())

    tick(world, hours=25)

    n, d = world.reports()
    assert d.status == "failed" and d.last_error.startswith("needs reconcile")
    assert len(world.calls()) == posts and world.stripe_total(setup, client) == 6


def test_after_24h_two_sum_reports_of_equal_units_one_of_which_landed_are_left_for_a_person(world):
    """D1 and D2 (6 each) in doubt, one applied: a total of 6 fits either. Neither is resent."""
    setup = world.agency()
    client = world.client(setup)
    _offered_in_one_minute(world, client, [(6, "accept_then_drop"), (6, "timeout")])
    posts = len(world.calls())

    tick(world, hours=25)

    assert [(r.status, r.last_error.split(":")[0]) for r in world.reports()] == [("failed", "needs reconcile")] * 2
    assert len(world.calls()) == posts and world.stripe_total(setup, client) == 6


def test_after_24h_a_count_report_beside_a_confirmed_neighbour_is_left_for_a_person(world):
    """Count meter: N (2 events) confirmed, D (3 events) whose first offer was not applied. The total, 2, is N's;
    but D's possible events are worth 1 each, and N's may have been rejected since: 2 also fits D's first two
    events landed (a tick that died mid-slice records none of them) with N gone. Not widened: a person decides."""
    setup = world.agency(formula="count")
    client = world.client(setup)
    _offered_in_one_minute(world, client, [(2, None), (3, "timeout")])
    posts = len(world.calls())

    tick(world, hours=25)

    n, d = world.reports()
    assert n.status == "sent" and d.status == "failed" and d.last_error.startswith("needs reconcile")
    assert len(world.calls()) == posts and world.stripe_total(setup, client) == 2


def test_after_24h_a_legacy_row_is_checked_against_the_usage_record_summary(world):
    setup = world.agency(legacy=True)
    client = world.client(setup)
    world.report(client, 3)
    world.state.inject("/v1/subscription_items/", "accept_then_drop", method="POST")
    tick(world)
    posts = len(world.calls("/v1/subscription_items/"))

    tick(world, hours=25)

    assert world.reports()[0].status == "sent" and world.stripe_total(setup, client) == 3
    assert len(world.calls("/v1/subscription_items/")) == posts


# ---- leases -----------------------------------------------------------------------------------------------------


def test_a_row_leased_by_a_crashed_tick_waits_for_its_lease_then_goes_once(world):
    setup = world.agency()
    client = world.client(setup)
    report = world.report(client, 2)
    # A tick that claimed the row, sent it and died before recording the answer:
    report.attempts, report.first_attempt_at = 1, world.clock.now()
    report.next_attempt_at = world.clock.now() + LEASE
    world.server.client(setup.key).v1.billing.meter_events.create(
        {
            "event_name": "ai_units",
            "identifier": report.identifier,
            "timestamp": int(report.usage_timestamp.timestamp()),
            "payload": {"stripe_customer_id": client.stripe_customer_id, "value": "2"},
        }
    )

    assert tick(world).stripe_calls == 0
    tick(world, seconds=LEASE.total_seconds() + 1)

    assert world.reports()[0].status == "sent" and world.stripe_total(setup, client) == 2


def test_the_sdk_is_never_configured_globally(world):
    setup = world.agency()
    world.report(world.client(setup), 1)
    tick(world)
    assert stripe.api_key is None
