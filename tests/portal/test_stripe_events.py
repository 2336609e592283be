"""Connecting Stripe in the portal registers Rebill's webhook endpoint; disconnecting or uninstalling removes it."""

from __future__ import annotations

from billing.models import RebillClient
from core.database import db
from ghl.installs import record_uninstall_event
from tests.portal.conftest import client_fields, install_tenant, sign_in


def connect(client, headers, api_key: str) -> dict:
    answer = client.put("/api/portal/stripe-key", json={"api_key": api_key}, headers=headers)
    assert answer.status_code == 200, answer.get_json()
    return answer.get_json()


def test_connecting_registers_under_the_address_the_request_came_to(portal_client, tenant_a, fake_stripe):
    headers = sign_in(portal_client, "company-a")

    events = connect(portal_client, headers, tenant_a.stripe_key)["events"]

    assert events["status"] == "registered" and events["problem"] is None
    assert events["url"].startswith("http://localhost/webhooks/stripe/")
    assert [e["url"] for e in fake_stripe.state.webhook_endpoints(tenant_a.stripe_key)] == [events["url"]]

    gone = portal_client.delete("/api/portal/stripe-key", headers=headers)
    assert gone.get_json()["events"]["status"] == "none"
    assert fake_stripe.state.webhook_endpoints(tenant_a.stripe_key) == []


def test_rebill_public_url_names_the_registered_address(make_app, fake_stripe):
    app = make_app(STRIPE_API_BASE=fake_stripe.url, REBILL_PUBLIC_URL="https://rebill.example.com/")
    tenant = install_tenant(app, fake_stripe, "company-p")
    client = app.test_client()

    events = connect(client, sign_in(client, "company-p"), tenant.stripe_key)["events"]

    assert events["url"].startswith("https://rebill.example.com/webhooks/stripe/")


def test_a_restricted_key_without_the_permission_connects_and_the_page_says_what_to_add(
    portal_client, tenant_a, fake_stripe
):
    key = "rk_test_companyarestricted000001"
    fake_stripe.state.add_account(key, account_id="acct_companya", denied_permissions=("webhook_write",))
    headers = sign_in(portal_client, "company-a")

    answer = connect(portal_client, headers, key)

    assert answer["connected"] is True and answer["status"] == "ok"
    assert answer["events"]["status"] == "not_permitted"
    assert "Webhook Endpoints" in answer["events"]["problem"]
    assert portal_client.get("/api/portal/prices", headers=headers).status_code == 200  # everything else works


def test_an_agency_uninstall_removes_the_endpoint(portal_app, portal_client, tenant_a, fake_stripe):
    connect(portal_client, sign_in(portal_client, "company-a"), tenant_a.stripe_key)
    with portal_app.app_context():
        record_uninstall_event({"type": "UNINSTALL", "companyId": "company-a"})
        db.session.commit()

    assert fake_stripe.state.webhook_endpoints(tenant_a.stripe_key) == []



def test_the_stripe_page_shows_the_meter_error_destination_and_uninstall_removes_it(
    portal_app, portal_client, tenant_a, fake_stripe
):
    headers = sign_in(portal_client, "company-a")

    events = connect(portal_client, headers, tenant_a.stripe_key)["events"]

    assert events["meter_errors"] == {"status": "registered", "problem": None}
    (destination,) = fake_stripe.state.event_destinations(tenant_a.stripe_key)
    assert destination["webhook_endpoint"]["url"] == events["url"] + "/thin"
    with portal_app.app_context():
        record_uninstall_event({"type": "UNINSTALL", "companyId": "company-a"})
        db.session.commit()
    assert fake_stripe.state.event_destinations(tenant_a.stripe_key) == []


def test_a_key_that_may_not_create_event_destinations_says_the_daily_check_covers_it(
    portal_client, tenant_a, fake_stripe
):
    key = "rk_test_companyanodestination01"
    fake_stripe.state.add_account(key, account_id="acct_companya", denied_permissions=("event_destination_write",))
    headers = sign_in(portal_client, "company-a")

    events = connect(portal_client, headers, key)["events"]

    assert events["status"] == "registered" and events["meter_errors"]["status"] == "not_permitted"
    assert "Event Destinations" in events["meter_errors"]["problem"]
    assert "daily reconciliation" in events["meter_errors"]["problem"]


def test_the_client_page_says_when_the_daily_check_found_units_missing_in_stripe(
    portal_app, portal_client, tenant_a, fake_stripe
):
    headers = sign_in(portal_client, "company-a")
    connect(portal_client, headers, tenant_a.stripe_key)
    created = portal_client.post("/api/portal/clients", json=client_fields(tenant_a), headers=headers).get_json()
    with portal_app.app_context():
        client = db.session.get(RebillClient, created["id"])
        client.reconcile_problem = "Stripe's meter holds 5 units fewer for customer cus_1 this period than Rebill sent"
        db.session.commit()

    shown = portal_client.get(f"/api/portal/clients/{created['id']}", headers=headers).get_json()

    assert shown["billing_state"] == "failing" and "5 units fewer" in shown["billing_problem"]
