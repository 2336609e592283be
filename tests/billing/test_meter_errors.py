"""Stripe's asynchronous meter errors: a thin-event destination registered through the agency's key, signed
thin notifications verified with stripe-python, the full event fetched from the fake, and the unit reports
it names flagged (never resent by the flag itself; re-offered only once the agency fixes the client, and
only when Stripe provably recorded none of the report).

The fake Stripe takes the rejected events out of its meter totals, creates the v2 event and signs the thin
notification with the destination's secret, exactly like a webhook delivery.
"""

from __future__ import annotations

import json
import threading
import time
from urllib.parse import urlsplit

import pytest
from sqlalchemy import select

from billing.clients import update_client
from billing.models import RebillClient, StripeEvent, StripeEventEndpoint
from billing.periods import client_money
from billing.reporting import report_pending_units, retry_failed_reports
from billing.stripe_connection import disconnect_stripe
from billing.stripe_events import (
    METER_ERROR_EVENT,
    register_missing_destinations,
    register_stripe_events,
    retry_failed_events,
    stripe_events_status,
)
from core.database import db
from core.encryption import secret_box
from stripe_fake import SignedDelivery, stripe_signature
from tests.billing.stripe_support import PUBLIC_URL, connected


@pytest.fixture
def setup(world):
    return connected(world)


def post(http, delivery: SignedDelivery, **header_overrides):
    return http.post(urlsplit(delivery.url).path, data=delivery.body, headers={**delivery.headers, **header_overrides})


def only(deliveries: list[SignedDelivery]) -> SignedDelivery:
    assert len(deliveries) == 1
    return deliveries[0]


def sent_report(world, setup, units: int = 7, client: RebillClient | None = None):
    client = client or world.client(setup)
    report = world.report(client, units)
    db.session.commit()
    report_pending_units(world.clock.now())
    (report,) = [row for row in world.reports(client) if row.id == report.id]
    assert report.status == "sent" and world.stripe_total(setup, client) >= units
    return client, report


def stored() -> list[StripeEvent]:
    db.session.expire_all()
    return list(db.session.scalars(select(StripeEvent).order_by(StripeEvent.id)))


def money_of(setup, client):
    db.session.expire_all()
    client = db.session.get(RebillClient, client.id)
    return client_money(setup.agency, [client])[client.id]


# ---- registration ------------------------------------------------------------------------------------


def test_connecting_registers_a_thin_event_destination_for_meter_errors_with_its_secret_encrypted(world, setup):
    (destination,) = world.state.event_destinations(setup.key)
    endpoint = db.session.scalars(select(StripeEventEndpoint)).one()

    assert destination["webhook_endpoint"]["url"] == endpoint.url + "/thin"
    assert destination["event_payload"] == "thin" and destination["enabled_events"] == [METER_ERROR_EVENT]
    assert endpoint.destination_status == "registered" and endpoint.destination_id == destination["id"]
    secret = world.state._tenant(setup.key).destination_secrets[destination["id"]]
    assert secret not in endpoint.destination_secret_ciphertext
    assert secret_box().decrypt(endpoint.destination_secret_ciphertext) == secret
    assert stripe_events_status(setup.agency)["meter_errors"] == {"status": "registered", "problem": None}


def test_a_key_without_the_event_destination_permission_says_so_and_the_webhooks_still_work(world):
    setup = connected(world, key="rk_test_nodestinations0000001", denied=("event_destination_write",))

    endpoint = db.session.scalars(select(StripeEventEndpoint)).one()
    assert endpoint.status == "registered"  # the v1 webhook endpoint is unaffected
    assert endpoint.destination_status == "not_permitted" and world.state.event_destinations(setup.key) == []
    status = stripe_events_status(setup.agency)["meter_errors"]
    assert "'Event Destinations' permission" in status["problem"] and "daily reconciliation" in status["problem"]


def test_reconnecting_replaces_the_destination_and_disconnecting_removes_it(world, setup, http):
    old = db.session.scalars(select(StripeEventEndpoint)).one().url + "/thin"
    register_stripe_events(setup.agency, PUBLIC_URL)
    db.session.commit()
    assert len(world.state.event_destinations(setup.key)) == 1
    assert http.post(urlsplit(old).path, data=b"{}", headers={"Stripe-Signature": "t=1,v1=00"}).status_code == 404

    _, report = sent_report(world, setup)
    delivery = only(world.state.reject_meter_events_later(setup.key, [report.identifier]))
    disconnect_stripe(setup.agency)
    db.session.commit()

    assert world.state.event_destinations(setup.key) == []
    assert post(http, delivery).status_code == 404 and stored() == []


# ---- the path: signed thin event -> fetch -> flag ------------------------------------------------------


def test_a_rejected_sum_meter_report_is_flagged_failing_and_not_resent(world, setup, http):
    client, report = sent_report(world, setup, units=7)
    sends, original = len(world.calls()), report.identifier

    answer = post(http, only(world.state.reject_meter_events_later(setup.key, [report.identifier])))

    assert answer.status_code == 200 and answer.get_json() == {"status": "processed"}
    (event,) = stored()
    assert (event.event_type, event.status) == (METER_ERROR_EVENT, "processed")
    assert world.calls("/v2/core/events/", "GET")  # the full event was fetched, as thin events require
    (flagged,) = world.reports(client)
    assert flagged.status == "failed" and flagged.units_confirmed == 0
    assert flagged.identifier == original + "_r1"  # a re-offer cannot meet Stripe's 24 h dedupe
    assert "No customer found" in flagged.last_error
    money = money_of(setup, client)
    assert money.billing_state == "failing"
    assert "rejected 7 units after accepting them" in money.billing_problem and "customer" in money.billing_problem

    report_pending_units(world.clock.now())  # ticks go on: the flag sends nothing by itself
    assert len(world.calls()) == sends and world.reports(client)[0].status == "failed"
    assert world.stripe_total(setup, client) == 0


def test_after_the_agency_fixes_the_customer_the_units_go_once_to_the_right_one(world, setup, http):
    client, report = sent_report(world, setup, units=7)
    wrong_customer = client.stripe_customer_id
    post(http, only(world.state.reject_meter_events_later(setup.key, [report.identifier])))
    right_customer = world.customer(setup)
    db.session.commit()

    update_client(setup.agency, client.id, {"stripe_customer_id": right_customer})
    db.session.commit()
    report_pending_units(world.clock.now())
    report_pending_units(world.clock.now())

    (row,) = world.reports(client)
    assert row.status == "sent" and row.units_confirmed == 7 and row.target_customer == right_customer
    assert world.state.total_units(setup.key, right_customer, "ai_units") == 7
    assert world.state.total_units(setup.key, wrong_customer, "ai_units") == 0
    assert money_of(setup, client).billing_state == "ok"


def test_a_count_meter_report_with_one_rejected_event_needs_reconcile_and_is_never_re_offered(world, http):
    setup = connected(world, formula="count", event_name="ai_count")
    client, report = sent_report(world, setup, units=3)
    original = report.identifier

    post(http, only(world.state.reject_meter_events_later(setup.key, [f"{original}-2"])))

    (flagged,) = world.reports(client)
    assert flagged.status == "failed" and flagged.last_error.startswith("needs reconcile")
    assert flagged.units_confirmed == 3 and flagged.identifier == original
    assert retry_failed_reports(setup.agency) == 0  # events 1 and 3 are in Stripe: only a person may release it
    assert money_of(setup, client).billing_state == "failing"


@pytest.mark.parametrize("formula", ["sum", "count"])
def test_a_scheduler_whose_offer_is_in_flight_when_its_report_is_flagged_does_not_overwrite_the_flag(
    world, stripe_app, http, formula
):
    """A scheduler holds a report's lease and is waiting for Stripe's answer (the event is applied) when the
    meter error naming it is processed. Its answer (2xx) comes after the flag: recording it must not turn the
    flagged report into ``sent`` (docs/billing-rules.md#meter-errors-stripe-reports-later)."""
    setup = connected(world, formula=formula, event_name="ai_count" if formula == "count" else "ai_units")
    client = world.client(setup)
    report = world.report(client, 3)
    db.session.commit()
    original = report.identifier
    first_event = original if formula == "sum" else f"{original}-1"
    world.state.inject("/v1/billing/meter_events", "slow", seconds=60)  # applied, answered when released
    now = world.clock.now()
    errors = []

    def scheduler():
        with stripe_app.app_context():
            try:
                report_pending_units(now)
            except Exception as error:  # surfaced below
                errors.append(error)

    in_flight = threading.Thread(target=scheduler)
    in_flight.start()
    waited = 0
    while not world.state.total_units(setup.key, client.stripe_customer_id, setup.meter["event_name"]):
        assert waited < 2000 and in_flight.is_alive(), "the scheduler's first event never reached Stripe"
        time.sleep(0.01)  # a synchronisation point (the fake applied the event), not a delay the test relies on
        waited += 1
    answer = post(http, only(world.state.reject_meter_events_later(setup.key, [first_event])))
    world.state.release_hangs()
    in_flight.join(60)
    assert not errors and not in_flight.is_alive()

    assert answer.get_json() == {"status": "processed"}
    (row,) = world.reports(client)
    assert row.status == "failed", (row.status, row.last_error)
    if formula == "sum":
        assert row.identifier == original + "_r1" and row.units_confirmed == 0
        assert world.stripe_total(setup, client) == 0
        update_client(setup.agency, client.id, {"stripe_customer_id": world.customer(setup)})
        db.session.commit()
        report_pending_units(world.clock.now())
        (row,) = world.reports(client)
        assert row.status == "sent" and world.state.total_units(setup.key, row.target_customer, "ai_units") == 3
    else:
        assert row.last_error.startswith("needs reconcile") and row.identifier == original
        assert world.stripe_total(setup, client) == 2  # events 2 and 3 went after the flag; 1 was rejected
        assert retry_failed_reports(setup.agency) == 0


def test_a_redelivered_thin_event_is_applied_once(world, setup, http):
    client, report = sent_report(world, setup)
    delivery = only(world.state.reject_meter_events_later(setup.key, [report.identifier]))
    assert post(http, delivery).get_json() == {"status": "processed"}
    update_client(setup.agency, client.id, {"stripe_customer_id": world.customer(setup)})
    db.session.commit()
    report_pending_units(world.clock.now())
    assert world.reports(client)[0].status == "sent"

    again = post(http, delivery)

    assert again.get_json() == {"status": "duplicate"} and len(stored()) == 1
    assert world.reports(client)[0].status == "sent"  # the re-offered report is not flagged again


def test_identifiers_of_other_agencies_and_unsent_reports_are_left_alone(world, setup, http):
    other = connected(world)
    _, theirs = sent_report(world, other)
    client, _ = sent_report(world, setup)
    waiting = world.report(client, 2)
    db.session.commit()
    # Stripe (here: the fake, told by the test) names an identifier this agency never sent, in its account.
    tenant = world.state._tenant(setup.key)
    stray = {**tenant.events[-1], "identifier": theirs.identifier}
    tenant.events.append(stray)
    tenant.events_by[(setup.meter["id"], client.stripe_customer_id)].append(stray)

    answer = post(http, only(world.state.reject_meter_events_later(setup.key, [theirs.identifier])))

    assert answer.get_json() == {"status": "ignored"}
    assert "no sent report of this agency has identifier" in stored()[0].error
    assert [row.status for row in world.reports()] == ["sent", "sent", "pending"]
    assert waiting.status == "pending"


def test_stripe_unreachable_when_fetching_the_event_fails_it_and_the_replay_flags_the_report(world, setup, http):
    client, report = sent_report(world, setup)
    world.state.inject("/v2/core/events/", "server_error", times=1)

    answer = post(http, only(world.state.reject_meter_events_later(setup.key, [report.identifier])))

    assert answer.status_code == 200 and stored()[0].status == "failed"
    assert world.reports(client)[0].status == "sent"
    retry_failed_events()
    assert stored()[0].status == "processed" and world.reports(client)[0].status == "failed"


# ---- signatures ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("tamper", ["missing header", "wrong secret", "body changed", "too old", "webhook secret"])
def test_a_bad_thin_event_signature_is_401_and_nothing_is_stored_or_flagged(world, setup, http, tamper):
    client, report = sent_report(world, setup)
    delivery = only(world.state.reject_meter_events_later(setup.key, [report.identifier]))
    body, headers = delivery.body, dict(delivery.headers)
    now = world.state.now()
    endpoint = db.session.scalars(select(StripeEventEndpoint)).one()
    if tamper == "missing header":
        headers.pop("Stripe-Signature")
    elif tamper == "wrong secret":
        headers["Stripe-Signature"] = stripe_signature(body, "whsec_not_the_destinations", now)
    elif tamper == "body changed":
        body = body.replace(b"error_report_triggered", b"error_report_triggerex")
    elif tamper == "too old":
        secret = secret_box().decrypt(endpoint.destination_secret_ciphertext)
        headers["Stripe-Signature"] = stripe_signature(body, secret, now - 600)
    else:  # signed with the v1 webhook endpoint's secret: each destination has its own
        headers["Stripe-Signature"] = stripe_signature(body, secret_box().decrypt(endpoint.secret_ciphertext), now)

    answer = http.post(urlsplit(delivery.url).path, data=body, headers=headers)

    assert answer.status_code == 401 and stored() == []
    assert world.reports(client)[0].status == "sent"


def test_a_signed_snapshot_event_at_the_thin_url_is_400(world, setup, http):
    endpoint = db.session.scalars(select(StripeEventEndpoint)).one()
    secret = secret_box().decrypt(endpoint.destination_secret_ciphertext)
    body = json.dumps({"id": "evt_1", "object": "event", "type": "invoice.paid", "data": {"object": {}}}).encode()

    answer = http.post(
        urlsplit(endpoint.url + "/thin").path, data=body,
        headers={"Stripe-Signature": stripe_signature(body, secret, world.state.now())},
    )

    assert answer.status_code == 400 and stored() == []


# ---- endpoints registered before meter errors, and destinations Stripe could not create -------------------


def test_the_hourly_job_gives_older_endpoints_a_destination_and_retries_failed_ones(world, http):
    older, failed, refused = connected(world), world.agency(), world.agency(denied=("event_destination_write",))
    # An endpoint registered before Rebill listened to meter errors: no destination in Stripe or here.
    endpoint = db.session.scalars(
        select(StripeEventEndpoint).where(StripeEventEndpoint.agency_id == older.agency.id)
    ).one()
    world.server.client(older.key).v2.core.event_destinations.delete(endpoint.destination_id)
    endpoint.destination_id = endpoint.destination_secret_ciphertext = endpoint.destination_status = None
    world.state.inject("/v2/core/event_destinations", "server_error", api_key=failed.key)
    register_stripe_events(failed.agency, PUBLIC_URL)
    register_stripe_events(refused.agency, PUBLIC_URL)
    db.session.commit()
    status = stripe_events_status(failed.agency)["meter_errors"]
    assert status["status"] == "failed" and "tries again within the hour" in status["problem"]

    assert register_missing_destinations() == 2

    for setup in (older, failed):
        assert stripe_events_status(setup.agency)["meter_errors"]["status"] == "registered"
        assert len(world.state.event_destinations(setup.key)) == 1
    assert stripe_events_status(refused.agency)["meter_errors"]["status"] == "not_permitted"  # waits for a new key
    assert register_missing_destinations() == 0  # nothing left to do, nothing created twice
    assert len(world.state.event_destinations(older.key)) == 1

    # The late destination delivers like one registered at connect time.
    client, report = sent_report(world, older)
    answer = post(http, only(world.state.reject_meter_events_later(older.key, [report.identifier])))
    assert answer.get_json() == {"status": "processed"} and world.reports(client)[0].status == "failed"
