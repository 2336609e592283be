"""Dry-run clients (status ``shadow``, docs/billing-rules.md rule 13) through the portal API and the real tick.

Usage is counted and shown as what it would have billed; nothing reaches the fake Stripe, then or after the
client is set active; only usage received from the switch on is billed.
"""

from __future__ import annotations

import itertools

import pytest
from sqlalchemy import func, select

from billing.jobs import run_tick
from billing.ledger import UsageRecord, record_usage
from billing.models import RebillClient, UnitReport, UsageEvent
from core.database import db, utcnow
from portal.demo_agency import DEMO_METER_EVENT
from tests.portal.conftest import client_fields, sign_in
from tests.portal.test_api import add_client, connect

_events = itertools.count(1)


@pytest.fixture
def admin(portal_client, tenant_a):
    headers = sign_in(portal_client, "company-a")
    connect(portal_client, headers, tenant_a)
    return headers


def use_and_tick(app, client_id: int, tokens: int) -> None:
    """Record usage for the client now, then run the scheduler's tick (aggregation and Stripe reporting)."""
    with app.app_context():
        client = db.session.get(RebillClient, client_id)
        record_usage(
            client.agency_id,
            [
                UsageRecord(
                    source="capri",
                    source_event_id=f"dry-run-{next(_events)}",
                    channel_id=client.channel_id,
                    input_tokens=tokens,
                    occurred_at=utcnow(),
                )
            ],
        )
        db.session.commit()
        run_tick()


def billed_in_stripe(fake_stripe, tenant) -> int:
    return fake_stripe.state.total_units(tenant.stripe_key, tenant.customer_id, DEMO_METER_EVENT)


def test_a_dry_run_counts_and_shows_what_it_would_bill_and_sends_nothing(
    portal_app, portal_client, admin, tenant_a, fake_stripe
):
    created = add_client(portal_client, admin, tenant_a, status="shadow")
    assert created["status"] == "shadow"
    assert created["would_have_billed"] == {"usage": 0, "units": 0, "estimate": {"amount": "0.00", "currency": "usd"}}

    use_and_tick(portal_app, created["id"], 2_500)
    use_and_tick(portal_app, created["id"], 1_700)

    assert fake_stripe.state.meter_events(tenant_a.stripe_key) == []
    shown = portal_client.get(f"/api/portal/clients/{created['id']}", headers=admin).get_json()
    # 4,200 tokens at 1 unit per 1,000: 4 units at $0.10 would be $0.40; nothing billed.
    assert shown["would_have_billed"] == {"usage": 4_200, "units": 4, "estimate": {"amount": "0.40", "currency": "usd"}}
    assert shown["period"]["units"] == 0 and shown["period"]["estimate"]["amount"] == "0.00"
    assert (shown["counted_usage"], shown["units_logged"], shown["remainder"]) == (0, 0, 0)
    listed = portal_client.get("/api/portal/clients", headers=admin).get_json()["clients"]
    assert listed[0]["would_have_billed"] == shown["would_have_billed"]
    usage = portal_client.get(f"/api/portal/clients/{created['id']}/usage", headers=admin).get_json()
    assert usage["shadow_usage"] == 4_200 and usage["daily"][-1]["shadow_usage"] == 4_200
    summary = portal_client.get("/api/portal/summary", headers=admin).get_json()
    assert summary["totals"] == [{"currency": "usd", "amount": "0.00", "units": 0}]  # a dry run adds no money
    with portal_app.app_context():
        assert db.session.scalar(select(func.count()).select_from(UnitReport)) == 0
        states = db.session.scalars(select(UsageEvent.state)).all()
        assert states == ["shadow", "shadow"]


def test_starting_billing_bills_only_usage_from_that_moment(portal_app, portal_client, admin, tenant_a, fake_stripe):
    created = add_client(portal_client, admin, tenant_a, status="shadow")
    use_and_tick(portal_app, created["id"], 2_900)

    switched = portal_client.patch(f"/api/portal/clients/{created['id']}", json={"status": "active"}, headers=admin)
    assert switched.status_code == 200 and switched.get_json()["status"] == "active"
    use_and_tick(portal_app, created["id"], 3_400)

    # Only the 3,400 tokens after the switch: 3 units, remainder 400 (the dry run's 2,900 carry nothing).
    assert billed_in_stripe(fake_stripe, tenant_a) == 3
    shown = portal_client.get(f"/api/portal/clients/{created['id']}", headers=admin).get_json()
    assert (shown["counted_usage"], shown["units_logged"], shown["remainder"]) == (3_400, 3, 400)
    assert shown["period"]["units"] == 3 and shown["period"]["estimate"]["amount"] == "0.30"
    # The dry run earlier this period is still shown for what it was.
    assert shown["would_have_billed"] == {"usage": 2_900, "units": 2, "estimate": {"amount": "0.20", "currency": "usd"}}


def test_back_to_a_dry_run_bills_what_was_received_while_active(
    portal_app, portal_client, admin, tenant_a, fake_stripe
):
    created = add_client(portal_client, admin, tenant_a)
    use_and_tick(portal_app, created["id"], 1_500)
    assert billed_in_stripe(fake_stripe, tenant_a) == 1

    path = f"/api/portal/clients/{created['id']}"
    assert portal_client.patch(path, json={"status": "shadow"}, headers=admin).status_code == 200
    use_and_tick(portal_app, created["id"], 5_000)
    resumed = portal_client.patch(path, json={"status": "active"}, headers=admin).get_json()
    assert resumed["remainder"] == 500  # the active remainder waited through the dry run, untouched
    use_and_tick(portal_app, created["id"], 600)

    assert billed_in_stripe(fake_stripe, tenant_a) == 2  # 1,500 + 600 tokens billed; the dry run's 5,000 never


@pytest.mark.parametrize(
    "fields",
    [{"status": "dry-run"}, {"status": "SHADOW"}, {"status": None}, {"status": ["shadow"]}, {"status": 1}],
)
def test_a_bad_status_is_refused_and_nothing_is_written(portal_app, portal_client, admin, tenant_a, fields):
    answer = portal_client.post("/api/portal/clients", json=client_fields(tenant_a, **fields), headers=admin)
    assert answer.status_code == 422 and "status" in answer.get_json()["fields"]
    created = add_client(portal_client, admin, tenant_a, status="shadow")

    edited = portal_client.patch(f"/api/portal/clients/{created['id']}", json=fields, headers=admin)

    assert edited.status_code == 422 and "status" in edited.get_json()["fields"]
    with portal_app.app_context():
        assert db.session.scalars(select(RebillClient.status)).all() == ["shadow"]


def test_a_dry_run_cannot_bill_earlier_unmapped_usage(portal_app, portal_client, admin, tenant_a):
    body = client_fields(tenant_a, status="shadow") | {"bill_unmapped_usage": True}

    answer = portal_client.post("/api/portal/clients", json=body, headers=admin)

    assert answer.status_code == 422
    assert "dry-run" in answer.get_json()["fields"]["bill_unmapped_usage"]
    with portal_app.app_context():
        assert db.session.scalar(select(func.count()).select_from(RebillClient)) == 0


def test_only_admins_start_billing_a_dry_run(portal_app, portal_client, admin, tenant_a):
    created = add_client(portal_client, admin, tenant_a, status="shadow")
    reader = sign_in(portal_client, "company-a", user_type="location", role="user", location=tenant_a.location_id)

    answer = portal_client.patch(f"/api/portal/clients/{created['id']}", json={"status": "active"}, headers=reader)

    assert answer.status_code == 403
    with portal_app.app_context():
        assert db.session.get(RebillClient, created["id"]).status == "shadow"


def test_a_subaccount_users_statement_says_dry_run_and_what_it_would_be(
    portal_app, portal_client, admin, tenant_a, fake_stripe
):
    fields = {
        "provider": "ghl",
        "channel_id": None,
        "location_id": tenant_a.location_id,
        "charge_by": "messages",
        "message_source": "platform",
        "billing_unit": 5,
        "status": "shadow",
    }
    created = add_client(portal_client, admin, tenant_a, **fields)
    with portal_app.app_context():
        record_usage(
            tenant_a.agency_id,
            [
                UsageRecord(
                    source="capri",
                    source_event_id="statement-1",
                    location_id=tenant_a.location_id,
                    messages=12,
                    occurred_at=utcnow(),  # the tenant's subscription period began at its seeding, moments ago
                )
            ],
        )
        db.session.commit()
        run_tick()
    headers = sign_in(portal_client, "company-a", user_type="location", role="user", location=tenant_a.location_id)

    statement = portal_client.get("/api/portal/statement", headers=headers).get_json()["statements"][0]
    client = portal_client.get(f"/api/portal/clients/{created['id']}", headers=headers).get_json()

    assert statement["dry_run"] is True and statement["state"].startswith("Dry run")
    expected = {"usage": 12, "units": 2, "estimate": {"amount": "0.20", "currency": "usd"}}
    assert statement["would_have_billed"] == expected
    assert statement["period"]["units"] == 0
    assert client["would_have_billed"]["units"] == 2 and "stripe_customer_id" not in client
    assert fake_stripe.state.meter_events(tenant_a.stripe_key) == []
