"""An agency's Stripe events: endpoint registration through its key, signed intake, effects, dedupe, replay.

The fake Stripe signs every delivery as Stripe does (``t=…,v1=HMAC-SHA256(secret, "t.body")``); Rebill checks
it with stripe-python's own verifier. Deliveries are posted through the app's test client.
"""

from __future__ import annotations

import json
from urllib.parse import urlsplit

import pytest
from sqlalchemy import func, select

from billing.models import StripeEvent, StripeEventEndpoint
from billing.stripe_connection import disconnect_stripe
from billing.stripe_events import EVENT_TYPES, register_stripe_events
from core.database import db
from core.encryption import secret_box
from stripe_fake import SignedDelivery, stripe_signature
from tests.billing.stripe_support import PUBLIC_URL, connected


@pytest.fixture
def setup(world):
    return connected(world)


def post(http, delivery: SignedDelivery, **header_overrides):
    headers = {**delivery.headers, **header_overrides}
    return http.post(urlsplit(delivery.url).path, data=delivery.body, headers=headers)


def only(deliveries: list[SignedDelivery]) -> SignedDelivery:
    assert len(deliveries) == 1
    return deliveries[0]


def stored_events() -> list[StripeEvent]:
    db.session.expire_all()
    return list(db.session.scalars(select(StripeEvent).order_by(StripeEvent.id)))


def subscription_of(world, setup, customer_id):
    return next(s for s in world.state._tenant(setup.key).objects["subscription"].values()
                if s["customer"] == customer_id)


# ---- registration ------------------------------------------------------------------------------------


def test_connecting_registers_an_endpoint_in_the_agencys_account_with_its_secret_encrypted(world, setup):
    endpoints = world.state.webhook_endpoints(setup.key)
    assert len(endpoints) == 1
    endpoint = db.session.scalars(select(StripeEventEndpoint)).one()
    assert endpoints[0]["url"] == endpoint.url == f"{PUBLIC_URL}/webhooks/stripe/{endpoint.route_id}"
    assert sorted(endpoints[0]["enabled_events"]) == sorted(EVENT_TYPES)
    assert endpoint.status == "registered" and endpoint.stripe_endpoint_id == endpoints[0]["id"]
    secret = world.state._tenant(setup.key).webhook_secrets[endpoints[0]["id"]]
    assert secret not in endpoint.secret_ciphertext and secret_box().decrypt(endpoint.secret_ciphertext) == secret


def test_reconnecting_replaces_the_endpoint_and_the_old_url_answers_404(world, setup, http):
    old = db.session.scalars(select(StripeEventEndpoint)).one()
    old_path = urlsplit(old.url).path
    register_stripe_events(setup.agency, PUBLIC_URL)
    db.session.commit()

    assert len(world.state.webhook_endpoints(setup.key)) == 1
    body = json.dumps({"id": "evt_1", "type": "invoice.paid", "data": {"object": {}}}).encode()
    assert http.post(old_path, data=body, headers={"Stripe-Signature": "t=1,v1=00"}).status_code == 404


def test_a_restricted_key_without_the_webhook_permission_says_which_to_add_and_stays_connected(world):
    setup = world.agency(key="rk_test_nowebhooks0000000001", denied=("webhook_write",))
    endpoint = register_stripe_events(setup.agency, PUBLIC_URL)
    db.session.commit()

    assert endpoint.status == "not_permitted"
    assert "rak_webhook_write" in endpoint.problem and "'Webhook Endpoints' permission (Write)" in endpoint.problem
    assert setup.agency.stripe_key_status == "ok"
    assert world.state.webhook_endpoints(setup.key) == []


def test_disconnecting_removes_the_endpoint_from_stripe_and_its_url_answers_404(world, setup, http):
    customer = world.customer(setup)
    world.client(setup, customer_id=customer)
    db.session.commit()
    delivery = only(world.state.invoice_event(setup.key, "invoice.payment_failed", customer))

    disconnect_stripe(setup.agency)
    db.session.commit()

    assert world.state.webhook_endpoints(setup.key) == []
    assert db.session.scalar(select(func.count()).select_from(StripeEventEndpoint)) == 0
    assert post(http, delivery).status_code == 404
    assert stored_events() == []


# ---- signatures ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tamper",
    ["missing header", "wrong secret", "body changed", "too old", "garbage header"],
)
def test_a_bad_signature_is_401_and_nothing_is_stored_or_changed(world, setup, http, tamper):
    customer = world.customer(setup)
    client = world.client(setup, customer_id=customer)
    db.session.commit()
    delivery = only(world.state.invoice_event(setup.key, "invoice.payment_failed", customer))
    timestamp = world.state.now()
    body, headers = delivery.body, dict(delivery.headers)
    if tamper == "missing header":
        headers.pop("Stripe-Signature")
    elif tamper == "wrong secret":
        headers["Stripe-Signature"] = stripe_signature(body, "whsec_not_the_endpoints_secret", timestamp)
    elif tamper == "body changed":
        body = body.replace(b"invoice.payment_failed", b"invoice.paid")
    elif tamper == "too old":  # signed correctly, but replayed 10 minutes later (tolerance 5 minutes)
        secret = world.state._tenant(setup.key).webhook_secrets[world.state.webhook_endpoints(setup.key)[0]["id"]]
        headers["Stripe-Signature"] = stripe_signature(body, secret, timestamp - 600)
    else:
        headers["Stripe-Signature"] = "not a signature"

    answer = http.post(urlsplit(delivery.url).path, data=body, headers=headers)

    assert answer.status_code == 401 and "error" in answer.get_json()
    assert stored_events() == []
    db.session.refresh(client)
    assert client.payment_failed_at is None


def test_a_signed_body_that_is_no_stripe_event_is_400_and_nothing_is_stored(world, setup, http):
    endpoint = db.session.scalars(select(StripeEventEndpoint)).one()
    secret = secret_box().decrypt(endpoint.secret_ciphertext)
    body = json.dumps({"id": "evt_x", "type": "invoice.paid"}).encode()  # no data.object
    headers = {"Stripe-Signature": stripe_signature(body, secret, world.state.now())}

    answer = http.post(urlsplit(endpoint.url).path, data=body, headers=headers)

    assert answer.status_code == 400 and stored_events() == []


# ---- effects, dedupe, ordering ------------------------------------------------------------------------


def test_a_failed_payment_marks_the_customers_clients_and_billing_continues(world, setup, http):
    customer = world.customer(setup)
    first, second = world.client(setup, customer_id=customer), world.client(setup, customer_id=customer)
    other = world.client(setup)
    db.session.commit()

    answer = post(http, only(world.state.invoice_event(setup.key, "invoice.payment_failed", customer)))

    assert answer.status_code == 200 and answer.get_json() == {"status": "processed"}
    for client in (first, second, other):
        db.session.refresh(client)
    assert first.payment_failed_at is not None and second.payment_failed_at is not None
    assert "was not paid" in first.payment_problem
    assert first.status == second.status == "active"  # the agency did not ask to pause
    assert other.payment_failed_at is None
    stored = [(e.event_type, e.status, e.attempts) for e in stored_events()]
    assert stored == [("invoice.payment_failed", "processed", 1)]


def test_a_redelivered_event_is_stored_and_applied_once(world, setup, http):
    customer = world.customer(setup)
    client = world.client(setup, customer_id=customer)
    client.pause_on_payment_failure = True
    db.session.commit()
    failed = only(world.state.invoice_event(setup.key, "invoice.payment_failed", customer))
    assert post(http, failed).get_json() == {"status": "processed"}
    assert post(http, only(world.state.invoice_event(setup.key, "invoice.paid", customer))).status_code == 200
    db.session.refresh(client)
    assert client.status == "active"

    again = post(http, failed)  # Stripe retries the first event (same id)

    assert again.status_code == 200 and again.get_json() == {"status": "duplicate"}
    db.session.refresh(client)
    assert client.status == "active" and client.payment_failed_at is None
    assert [e.attempts for e in stored_events()] == [1, 1]


def test_pause_on_payment_failure_pauses_and_a_paid_invoice_resumes(world, setup, http):
    customer = world.customer(setup)
    client = world.client(setup, customer_id=customer)
    client.pause_on_payment_failure = True
    db.session.commit()

    post(http, only(world.state.invoice_event(setup.key, "invoice.payment_failed", customer)))
    db.session.refresh(client)
    assert (client.status, client.paused_for_payment) == ("paused", True)

    post(http, only(world.state.invoice_event(setup.key, "invoice.paid", customer)))
    db.session.refresh(client)
    assert (client.status, client.paused_for_payment, client.payment_failed_at) == ("active", False, None)


def test_a_paid_invoice_does_not_resume_a_client_the_agency_paused_itself(world, setup, http):
    customer = world.customer(setup)
    client = world.client(setup, customer_id=customer)
    client.status = "paused"
    client.pause_on_payment_failure = True
    db.session.commit()

    post(http, only(world.state.invoice_event(setup.key, "invoice.payment_failed", customer)))
    post(http, only(world.state.invoice_event(setup.key, "invoice.paid", customer)))

    db.session.refresh(client)
    assert client.status == "paused" and client.payment_failed_at is None


def test_an_older_payment_event_arriving_late_does_not_undo_a_newer_one(world, setup, http, stripe_clock):
    customer = world.customer(setup)
    client = world.client(setup, customer_id=customer)
    db.session.commit()
    failed = only(world.state.invoice_event(setup.key, "invoice.payment_failed", customer))
    stripe_clock.advance(seconds=60)
    paid = only(world.state.invoice_event(setup.key, "invoice.paid", customer))

    post(http, paid)
    post(http, failed)  # delivered out of order

    db.session.refresh(client)
    assert client.payment_failed_at is None
    assert [e.status for e in stored_events()] == ["processed", "processed"]


def test_a_deleted_subscription_flags_the_client_and_a_new_one_clears_it(world, setup, http):
    customer = world.customer(setup)
    client = world.client(setup, customer_id=customer)
    db.session.commit()

    post(http, only(world.state.cancel_subscription(setup.key, subscription_of(world, setup, customer))))
    db.session.refresh(client)
    assert f"no active subscription with price {setup.price['id']}" in client.subscription_problem

    subscription = world.state.create_subscription(setup.key, customer, setup.price)
    post(http, only(world.state.emit_event(setup.key, "customer.subscription.updated", subscription)))
    db.session.refresh(client)
    assert client.subscription_problem is None


def test_a_changed_subscription_refreshes_a_legacy_clients_cached_item(world, http):
    setup = world.agency(legacy=True)
    register_stripe_events(setup.agency, PUBLIC_URL)
    customer = world.customer(setup)
    client = world.client(setup, customer_id=customer)
    client.subscription_item_id = "si_stale"
    db.session.commit()
    world.state.cancel_subscription(setup.key, subscription_of(world, setup, customer))
    subscription = world.state.create_subscription(setup.key, customer, setup.price)

    post(http, only(world.state.emit_event(setup.key, "customer.subscription.updated", subscription)))

    db.session.refresh(client)
    assert client.subscription_item_id == subscription["items"]["data"][0]["id"]
    assert client.subscription_problem is None


def test_an_event_that_fails_is_kept_and_the_replay_command_applies_it(world, setup, http, stripe_app):
    customer = world.customer(setup)
    client = world.client(setup, customer_id=customer)
    db.session.commit()
    world.state.inject("/v1/subscriptions", "server_error", times=1)
    delivery = only(world.state.cancel_subscription(setup.key, subscription_of(world, setup, customer)))

    answer = post(http, delivery)

    assert answer.status_code == 200 and answer.get_json() == {"status": "failed"}
    [event] = stored_events()
    assert event.status == "failed" and "500" in event.error
    result = stripe_app.test_cli_runner().invoke(args=["rebill", "stripe-events", "replay", "--failed"])
    assert result.exit_code == 0, result.output
    assert "processed=1" in result.output
    assert [e.status for e in stored_events()] == ["processed"]
    db.session.refresh(client)
    assert client.subscription_problem is not None


def test_events_of_customers_no_client_bills_are_stored_and_ignored(world, setup, http):
    customer = world.customer(setup)
    answer = post(http, only(world.state.invoice_event(setup.key, "invoice.payment_failed", customer)))
    assert answer.get_json() == {"status": "ignored"}
    assert "no client bills" in stored_events()[0].error
