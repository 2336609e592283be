"""Connecting Stripe in the portal registers Rebill's webhook endpoint; disconnecting or uninstalling removes it."""

from __future__ import annotations

from core.database import db
from ghl.installs import record_uninstall_event
from tests.portal.conftest import install_tenant, sign_in


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

