"""Units stay exact as time passes: the 24 h dedupe lapse, 35 days, a period rollover, a key or customer change.

Each test plays the clock forward for Rebill and the fake Stripe together (issue 9, scenarios 1-4 and the
"also likely" findings). The fake forgets meter-event identifiers after 24 h, as Stripe may.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import replace

from billing.periods import FAILING_AFTER_ATTEMPTS, client_money, refresh_client_period
from billing.reporting import report_pending_units, retry_failed_reports
from billing.stripe_connection import connect_stripe_key
from billing.usage import client_usage
from core.database import db
from stripe_fake.app import _add_month
from tests.billing.stripe_support import tick


def roll_key(world, setup):
    """The agency rolls its Stripe key: the old one answers 401 from now on; returns the setup on the new key."""
    new_key = f"sk_test_{uuid.uuid4().hex}"
    world.state.add_account(new_key, account_id=setup.account_id)
    world.state.revoke_key(setup.key)
    return replace(setup, key=new_key, agency_key=new_key)


def reconnect(world, setup) -> None:
    """The agency pastes its new key in the portal."""
    connect_stripe_key(world.agency_row(setup), setup.agency_key)
    db.session.commit()


def at(world, **ago) -> dt.datetime:
    return world.clock.now() - dt.timedelta(**ago)


# ---- scenario 1: count meter, key revoked mid-row ------------------------------------------------------------


def test_a_count_row_cut_by_a_revoked_key_resumes_after_the_last_event_stripe_accepted(world):
    setup = world.agency(formula="count")
    client = world.client(setup)
    report = world.report(client, 3)
    world.state.inject("/v1/billing/meter_events", "revoke_key", after=1)  # event 1 accepted, then the key is rolled

    tick(world)

    (row,) = world.reports()
    assert world.agency_row(setup).stripe_key_status == "needs_attention"
    first_attempt = row.first_attempt_at
    assert (row.status, row.attempts) == ("pending", 1) and first_attempt is not None  # the 401 erases no history
    assert (row.units_confirmed, row.in_doubt_since) == (1, None)

    world.clock.advance(days=2)  # Stripe may have forgotten identifier -1 by now
    new = roll_key(world, setup)
    reconnect(world, new)
    tick(world)

    (row,) = world.reports()
    assert world.state.total_units(new.key, client.stripe_customer_id, "ai_units") == 3
    assert [e["identifier"] for e in world.state.meter_events(new.key)] == [
        f"{report.identifier}-{n}" for n in (1, 2, 3)
    ]
    assert (row.status, row.attempts, row.first_attempt_at) == ("sent", 2, first_attempt)


# ---- scenario 2: lost answer, then the client's customer changes --------------------------------------------


def test_a_lost_answer_is_settled_on_the_customer_it_went_to_not_the_client_s_new_one(world):
    setup = world.agency()
    client = world.client(setup)
    customer_a = client.stripe_customer_id
    world.report(client, 4)
    world.state.inject("/v1/billing/meter_events", "accept_then_drop")
    tick(world)  # Stripe applied the 4 on customer A; Rebill never heard back
    new = roll_key(world, setup)
    tick(world, minutes=5)  # the retry meets the rolled key: the agency is flagged
    assert world.agency_row(setup).stripe_key_status == "needs_attention"

    world.clock.advance(days=1)
    reconnect(world, new)
    customer_b = world.customer(new)
    client.stripe_customer_id = customer_b  # the agency moved the client to customer B
    tick(world)

    (row,) = world.reports()
    assert world.state.total_units(new.key, customer_a, "ai_units") == 4
    assert world.state.total_units(new.key, customer_b, "ai_units") == 0
    assert row.status == "sent" and "confirmed" in row.last_error and row.target_customer == customer_a


def test_units_never_offered_go_to_the_client_s_current_customer(world):
    setup = world.agency()
    client = world.client(setup)
    world.report(client, 2)
    client.stripe_customer_id = customer_b = world.customer(setup)

    tick(world)

    assert world.state.total_units(setup.key, customer_b, "ai_units") == 2
    assert world.reports()[0].target_customer == customer_b


# ---- scenario 3: a definite refusal fixed after 35 days ---------------------------------------------------------


def test_a_refused_row_fixed_after_36_days_is_re_offered_with_a_valid_timestamp(world):
    setup = world.agency()
    client = world.client(setup, customer_id="cus_doesnotexist")
    world.report(client, 3)
    tick(world)
    (row,) = world.reports()
    assert row.status == "failed" and "No such customer" in row.last_error and row.in_doubt_since is None

    world.clock.advance(days=36)
    client.stripe_customer_id = fixed = world.customer(setup)
    assert retry_failed_reports(setup.agency, client.id) == 1
    tick(world)

    (row,) = world.reports()
    assert row.status == "sent" and row.target_customer == fixed, row.last_error
    assert world.state.total_units(setup.key, fixed, "ai_units") == 3
    assert abs(row.stripe_timestamp - world.clock.now()) < dt.timedelta(seconds=5)
    assert "35 days" in row.timestamp_shift


# ---- scenario 4 and the finalized period: usage before the current billing period --------------------------


def test_a_legacy_backlog_across_a_period_rollover_is_billed_in_the_current_period(world):
    setup = world.agency(legacy=True)
    start = at(world, days=20)
    client = world.client(setup, customer_id=world.customer(setup, start=start))
    world.report(client, 5, at=at(world, hours=1))
    setup.agency.stripe_key_status = "needs_attention"  # a key problem holds the backlog...
    tick(world)

    world.clock.advance(days=15)  # ...across the subscription's period start
    world.agency_row(setup).stripe_key_status = "ok"
    tick(world)

    (row,) = world.reports()
    period_start = dt.datetime.fromtimestamp(_add_month(int(start.timestamp())), dt.UTC)
    assert row.status == "sent" and world.stripe_total(setup, client) == 5
    assert row.stripe_timestamp == period_start and row.usage_timestamp < period_start
    assert "before the customer's current billing period" in row.timestamp_shift
    (shown,) = client_usage(world.agency_row(setup), client.id)["reports"]  # what the client page shows
    assert shown["stripe_timestamp"] == period_start and shown["timestamp_shift"] == row.timestamp_shift


def test_meter_units_from_a_period_whose_invoice_is_final_are_billed_on_the_next_invoice(world):
    setup = world.agency()
    start = at(world, days=20)
    client = world.client(setup, customer_id=world.customer(setup, start=start))
    world.report(client, 6, at=at(world, days=1))
    setup.agency.stripe_key_status = "needs_attention"
    tick(world)

    world.clock.advance(days=12)  # the period ended about two days ago; its invoice is finalized
    world.agency_row(setup).stripe_key_status = "ok"
    tick(world)

    assert world.state.billed_units(setup.key, client.stripe_customer_id, "ai_units") == 6
    (row,) = world.reports()
    assert row.status == "sent" and row.stripe_timestamp > row.usage_timestamp
    # The money view counts them in the period they bill in, as Stripe does.
    agency = world.agency_row(setup)
    client = db.session.get(type(client), client.id)
    refresh_client_period(agency, client)
    assert client_money(agency, [client], world.clock.now())[client.id].units == 6


def test_recent_usage_is_sent_with_its_own_time_without_reading_the_subscription(world):
    setup = world.agency()
    client = world.client(setup)
    report = world.report(client, 2, at=at(world, minutes=2))

    assert tick(world).stripe_calls == 1

    (row,) = world.reports()
    assert row.stripe_timestamp == report.usage_timestamp and row.timestamp_shift is None


# ---- legacy subscription items ------------------------------------------------------------------------------


def test_a_legacy_client_s_units_follow_a_re_created_subscription(world):
    setup = world.agency(legacy=True)
    customer = world.customer(setup, subscribe=False)
    old = world.state.create_subscription(
        setup.key, customer, setup.price, start_date=int(at(world, days=3).timestamp())
    )
    client = world.client(setup, customer_id=customer)
    client.subscription_item_id = old["items"]["data"][0]["id"]  # as cached when the client was added
    world.state.cancel_subscription(setup.key, old)
    new = world.state.create_subscription(
        setup.key, customer, setup.price, start_date=int(at(world, days=1).timestamp())
    )
    world.report(client, 5)

    tick(world)

    new_item = new["items"]["data"][0]["id"]
    assert world.state.usage_record_total(setup.key, new_item) == 5
    assert world.state.usage_record_total(setup.key, old["items"]["data"][0]["id"]) == 0
    assert world.reports()[0].target_subscription_item == new_item


def test_a_legacy_item_beyond_the_items_a_subscription_embeds_is_found(world):
    setup = world.agency(legacy=True)
    customer = world.customer(setup, subscribe=False)
    others = [world.state.create_price(setup.key, setup.product, 5, metered=False) for _ in range(11)]
    subscription = world.state.create_subscription(
        setup.key, customer, [*others, setup.price], start_date=int(at(world, days=1).timestamp())
    )
    assert subscription["items"]["has_more"]
    client = world.client(setup, customer_id=customer)
    world.report(client, 4)

    tick(world)

    items = world.server.client(setup.key).v1.subscription_items.list({"subscription": subscription["id"], "limit": 20})
    (item,) = [item.id for item in items.data if item.price.id == setup.price["id"]]
    (row,) = world.reports()
    assert row.status == "sent" and row.target_subscription_item == item
    assert world.state.usage_record_total(setup.key, item) == 4


# ---- count meters: progress per event ---------------------------------------------------------------------------


def test_a_large_count_row_keeps_its_progress_between_ticks_and_never_resends_an_event(world):
    setup = world.agency(formula="count")
    client = world.client(setup)
    report = world.report(client, 1200)

    db.session.commit()
    # A tick cut short by its budget. Past its first 20 events Stripe answers each after 50 ms here, so the
    # budget ends the tick a handful of events later on any machine (unslowed, a fast one might send all 1200
    # within 0.3 s; slowed from the first, a loaded one spent the budget before the first answer came).
    world.state.inject("/v1/billing/meter_events", "slow", times=1200, seconds=0.05, after=20)
    report_pending_units(world.clock.now(), budget=dt.timedelta(seconds=0.3))
    world.state.clear_faults()
    (row,) = world.reports()
    done = row.units_confirmed
    assert 0 < done < 1200 and row.status == "pending" and row.in_doubt_since is None

    tick(world)

    (row,) = world.reports()
    assert row.status == "sent" and row.units_confirmed == 1200
    assert world.stripe_total(setup, client) == 1200
    posted = [call.params["identifier"] for call in world.calls()]
    assert posted == [f"{report.identifier}-{n}" for n in range(1, 1201)]  # each event offered exactly once


def test_a_count_row_in_doubt_after_24h_counts_the_events_stripe_has_and_sends_the_rest(world):
    setup = world.agency(formula="count")
    client = world.client(setup)
    report = world.report(client, 4)
    world.state.inject("/v1/billing/meter_events", "accept_then_drop", after=1)  # event 2 applied, answer lost
    tick(world)
    (row,) = world.reports()
    assert row.units_confirmed == 1 and row.in_doubt_since is not None

    tick(world, hours=25)

    # Events 1-2 are in Stripe and stay on the row; the rest never goes under identifiers an earlier offer may
    # have used (docs/billing-rules.md#fresh-identifiers): it moved to a fresh row and went in the same tick.
    closed, rest = world.reports()
    assert (closed.status, closed.units, closed.units_confirmed) == ("sent", 2, 2)
    assert (rest.status, rest.units, rest.identifier) == ("sent", 2, f"{report.identifier}.2")
    assert world.stripe_total(setup, client) == 4
    identifiers = [e["identifier"] for e in world.state.meter_events(setup.key)]
    assert identifiers == [f"{report.identifier}-{n}" for n in (1, 2)] + [f"{report.identifier}.2-{n}" for n in (1, 2)]


def test_a_legacy_row_in_doubt_when_the_period_rolls_over_is_checked_then_billed_in_the_new_period(world):
    setup = world.agency(legacy=True)
    start = at(world, days=20)
    client = world.client(setup, customer_id=world.customer(setup, start=start))
    period_end = dt.datetime.fromtimestamp(_add_month(int(start.timestamp())), dt.UTC)
    world.clock.advance(seconds=(period_end - world.clock.now()).total_seconds() - 600)
    report = world.report(client, 3)
    world.state.inject("/v1/subscription_items/", "server_error", method="POST")  # Stripe's answer is unknown
    tick(world)

    tick(world, minutes=20)  # the retry carries the recorded time, now before the current period: refused
    (row,) = world.reports()
    assert row.status == "pending" and row.stripe_timestamp == report.usage_timestamp
    assert "timestamp" in row.last_error and row.next_attempt_at > world.clock.now() + dt.timedelta(hours=22)

    tick(world, hours=25)  # the 24 h check reads the old period: nothing there, so it goes in the new one

    (row,) = world.reports()
    assert row.status == "sent" and row.stripe_timestamp == period_end
    assert world.stripe_total(setup, client) == 3


def test_a_count_row_that_made_progress_is_retried_soon_after_a_429(world):
    setup = world.agency(formula="count")
    client = world.client(setup)
    world.report(client, 10**7)  # more events than any machine sends in two short ticks
    db.session.commit()
    for _ in range(2):  # two ticks, each at least one slice, each slice an attempt
        report_pending_units(world.clock.now(), budget=dt.timedelta(seconds=1))
    (row,) = world.reports()
    attempts = row.attempts
    assert attempts >= 2 and 0 < row.units_confirmed < 10**7
    world.state.inject("/v1/billing/meter_events", "rate_limit")

    tick(world)

    (row,) = world.reports()
    assert row.attempts == attempts + 1 and "429" in row.last_error
    assert row.next_attempt_at - world.clock.now() <= dt.timedelta(seconds=30)  # the base backoff, not attempt n's


def test_a_429_after_progress_leaves_the_client_ok_and_only_failures_in_a_row_show_it_failing(world):
    setup = world.agency(formula="count")
    client = world.client(setup)
    world.report(client, 10**7)
    db.session.commit()
    for _ in range(3):  # each slice of the count row is an attempt: many attempts, all of them progress
        report_pending_units(world.clock.now(), budget=dt.timedelta(seconds=1))
    (row,) = world.reports()
    assert row.attempts >= FAILING_AFTER_ATTEMPTS and 0 < row.units_confirmed < 10**7
    world.state.inject("/v1/billing/meter_events", "rate_limit")

    tick(world)

    (row,) = world.reports()
    assert "429" in row.last_error and row.failed_attempts == 1
    assert _billing_state(world, setup, client) == ("ok", None)  # a pause after progress, not a failure

    world.state.inject("/v1/billing/meter_events", "rate_limit", times=FAILING_AFTER_ATTEMPTS - 1)
    for _ in range(FAILING_AFTER_ATTEMPTS - 1):
        tick(world, minutes=2)  # past the backoff: the row made progress, so it is the base one
    state, problem = _billing_state(world, setup, client)
    assert state == "failing" and "keeps retrying" in problem


def _billing_state(world, setup, client):
    agency = world.agency_row(setup)
    money = client_money(agency, [db.session.get(type(client), client.id)])[client.id]
    return money.billing_state, money.billing_problem


def test_a_report_in_doubt_is_not_resent_in_the_hour_before_its_24h_check(world):
    """Stripe's totals lag its meter events, so the >24 h check must read a total the last resend of a report in
    doubt is already in: a resend landing just before the check, not yet in the total, would read as missing
    and go again under a fresh identifier (billed twice). So resends stop an hour before the check."""
    setup = world.agency()
    client = world.client(setup)
    world.report(client, 5)
    world.state.inject("/v1/billing/meter_events", "server_error")  # the answer is unknown: in doubt
    tick(world)
    (row,) = world.reports()
    assert row.status == "pending" and row.in_doubt_since is not None
    posts = len(world.state.meter_events(setup.key))

    tick(world, hours=22, minutes=30)  # inside the last hour before the check: waits for it

    (row,) = world.reports()
    assert len(world.state.meter_events(setup.key)) == posts and row.status == "pending"
    assert row.next_attempt_at == row.in_doubt_since + dt.timedelta(hours=23)

    tick(world, hours=1)  # the check: nothing landed, so it goes now, once

    assert world.stripe_total(setup, client) == 5


# ---- a report in doubt across a period rollover (docs/billing-rules.md#in-doubt-across-a-period-rollover) --------


def _period_ending_in(world, setup, minutes: int):
    """A client whose customer's billing period ends ``minutes`` from the clock's now (moved there); its end."""
    start = at(world, days=20)
    client = world.client(setup, customer_id=world.customer(setup, start=start))
    period_end = dt.datetime.fromtimestamp(_add_month(int(start.timestamp())), dt.UTC)
    world.clock.advance(seconds=(period_end - world.clock.now()).total_seconds() - minutes * 60)
    return client, period_end


def _stamps(world, setup) -> list[dt.datetime]:
    """The timestamps of the meter events Stripe holds, oldest first."""
    return [dt.datetime.fromtimestamp(event["timestamp"], dt.UTC) for event in world.state.meter_events(setup.key)]


def test_a_report_in_doubt_is_not_resent_into_a_period_whose_invoice_may_be_final(world):
    """Offered in the last minutes of a period, the answer lost (nothing landed); the retry comes after the
    previous period's grace. Resent with its recorded time, it would land in that period: billed nowhere. It
    waits for the >24 h check instead, which finds it missing and offers it afresh in the current period."""
    setup = world.agency()
    client, period_end = _period_ending_in(world, setup, minutes=5)
    identifier = world.report(client, 6).identifier
    world.state.inject("/v1/billing/meter_events", "timeout", seconds=0.1)  # not applied, answer lost
    tick(world)
    (row,) = world.reports()
    assert row.in_doubt_since is not None and row.stripe_timestamp < period_end

    tick(world, minutes=80)  # the period rolled over 75 minutes ago: past its invoice's grace

    (row,) = world.reports()
    assert _stamps(world, setup) == [] and len(world.calls()) == 1  # not resent
    assert row.status == "pending" and row.next_attempt_at == row.in_doubt_since + dt.timedelta(hours=23)

    tick(world, hours=23)  # the >24 h check: nothing landed, so it goes afresh, stamped in the current period

    (row,) = world.reports()
    assert row.status == "sent" and row.identifier == f"{identifier}_r1"
    assert row.stripe_timestamp == period_end and "before the customer's current billing period" in row.timestamp_shift
    assert all(stamp >= period_end for stamp in _stamps(world, setup))  # nothing in the closed period
    assert world.stripe_total(setup, client) == 6
    assert world.state.billed_units(setup.key, client.stripe_customer_id, "ai_units") == 6


def test_a_report_in_doubt_that_landed_before_the_rollover_is_confirmed_by_the_check_not_resent(world):
    """The mirror case: the first offer landed (the answer was lost) before the period ended. No resend after
    the grace; the >24 h check finds its units in Stripe and marks it sent: nothing doubled."""
    setup = world.agency()
    client, period_end = _period_ending_in(world, setup, minutes=5)
    report = world.report(client, 6)
    world.state.inject("/v1/billing/meter_events", "accept_then_drop")  # applied, answer lost
    tick(world)
    (row,) = world.reports()
    assert row.in_doubt_since is not None

    tick(world, minutes=80)
    assert len(world.calls()) == 1  # not resent
    tick(world, hours=23)

    (row,) = world.reports()
    assert row.status == "sent" and row.identifier == report.identifier and row.units_confirmed == 6
    assert "confirmed from Stripe's totals" in row.last_error
    (stamp,) = _stamps(world, setup)  # the first offer, billed on the previous period's invoice
    assert len(world.calls()) == 1 and stamp == report.usage_timestamp.replace(microsecond=0) < period_end
    assert world.stripe_total(setup, client) == 6
    assert world.state.billed_units(setup.key, client.stripe_customer_id, "ai_units") == 6


def test_a_report_in_doubt_is_resent_as_recorded_within_the_previous_period_s_grace(world):
    """Before the grace ends the recorded time still bills on the previous period's invoice: resent as today."""
    setup = world.agency()
    client, period_end = _period_ending_in(world, setup, minutes=5)
    report = world.report(client, 6)
    world.state.inject("/v1/billing/meter_events", "timeout", seconds=0.1)
    tick(world)

    tick(world, minutes=20)  # 15 minutes into the new period; the time offered is 20 minutes old

    (row,) = world.reports()
    assert row.status == "sent" and row.identifier == report.identifier
    assert row.stripe_timestamp == report.usage_timestamp < period_end
    assert world.stripe_total(setup, client) == 6
    assert world.state.billed_units(setup.key, client.stripe_customer_id, "ai_units") == 6


def test_a_report_in_doubt_is_resent_as_recorded_while_its_period_is_current(world):
    """No rollover: a resend hours later still carries the recorded time and identifier (Stripe deduplicates)."""
    setup = world.agency()
    client = world.client(setup)
    report = world.report(client, 6)
    world.state.inject("/v1/billing/meter_events", "timeout", seconds=0.1)
    tick(world)

    tick(world, hours=2)

    (row,) = world.reports()
    assert row.status == "sent" and row.identifier == report.identifier
    assert row.stripe_timestamp == report.usage_timestamp and row.timestamp_shift is None
    assert world.stripe_total(setup, client) == 6


def test_a_count_report_in_doubt_past_a_rollover_keeps_its_confirmed_events_and_bills_the_rest_in_the_new_period(
    world,
):
    """A count report's first event confirmed, the second's answer lost (not applied), then the period rolls
    over: the rest is not resent with the recorded time after the grace; the >24 h check moves it to a fresh
    report stamped in the current period (billing.unsent_remainder)."""
    setup = world.agency(formula="count")
    client, period_end = _period_ending_in(world, setup, minutes=5)
    report = world.report(client, 4)
    world.state.inject("/v1/billing/meter_events", "timeout", seconds=0.1, after=1)
    tick(world)
    (row,) = world.reports()
    assert (row.units_confirmed, row.in_doubt_since is not None) == (1, True)

    tick(world, minutes=80)
    assert len(world.calls()) == 2  # event 1, and event 2 whose answer was lost: nothing resent
    tick(world, hours=23)

    closed, rest = world.reports()
    assert (closed.status, closed.units, closed.units_confirmed) == ("sent", 1, 1)
    assert (rest.status, rest.units, rest.identifier) == ("sent", 3, f"{report.identifier}.1")
    assert rest.stripe_timestamp == period_end
    assert _stamps(world, setup)[1:] == [period_end] * 3  # only event 1 in the previous period (before its end)
    assert world.stripe_total(setup, client) == 4
    assert world.state.billed_units(setup.key, client.stripe_customer_id, "ai_units") == 4



def _count_report_cut_before_the_period_end(world):
    """A count report of 3 whose first event Stripe confirmed 5 minutes before the period end, then the key was
    rolled (every offer answered: the rest is provably not in Stripe). Returns the new key's setup, the client,
    the period end and the report's identifier."""
    setup = world.agency(formula="count")
    client, period_end = _period_ending_in(world, setup, minutes=5)
    identifier = world.report(client, 3).identifier
    world.state.inject("/v1/billing/meter_events", "revoke_key", after=1)
    tick(world)
    (row,) = world.reports()
    assert (row.units_confirmed, row.in_doubt_since) == (1, None)
    return roll_key(world, setup), client, period_end, identifier


def test_a_count_report_s_rest_goes_on_with_its_recorded_time_within_the_previous_period_s_grace(world):
    new, client, period_end, identifier = _count_report_cut_before_the_period_end(world)

    world.clock.advance(minutes=20)  # 15 minutes into the new period; the recorded time is 20 minutes old
    reconnect(world, new)
    tick(world)

    (row,) = world.reports()
    assert (row.status, row.units_confirmed, row.identifier) == ("sent", 3, identifier)
    assert row.stripe_timestamp < period_end
    assert world.state.billed_units(new.key, client.stripe_customer_id, "ai_units") == 3


def test_a_count_report_s_rest_moves_to_the_current_period_after_the_previous_period_s_grace(world):
    new, client, period_end, identifier = _count_report_cut_before_the_period_end(world)

    world.clock.advance(minutes=80)  # 75 minutes into the new period: past the grace
    reconnect(world, new)
    tick(world)

    closed, rest = world.reports()
    assert (closed.status, closed.units, closed.units_confirmed) == ("sent", 1, 1)
    assert (rest.status, rest.units, rest.identifier) == ("sent", 2, f"{identifier}.1")
    assert rest.stripe_timestamp == period_end
    assert world.state.billed_units(new.key, client.stripe_customer_id, "ai_units") == 3
