"""Issue 10 item 11: subaccount users see the plan's name and plain statuses, never the agency's Stripe ids or
Stripe's raw error texts; agency users still see everything."""

from __future__ import annotations

from billing.models import UnitReport
from core.database import db, utcnow
from tests.portal.conftest import client_fields, sign_in

RAW_STRIPE_ERROR = "No such customer: 'cus_secret123'; request req_ABC (acct_1Secret)"


def test_a_subaccount_user_sees_names_and_plain_statuses_not_stripe_ids(portal_app, portal_client, tenant_a):
    admin = sign_in(portal_client, "company-a")
    portal_client.put("/api/portal/stripe-key", json={"api_key": tenant_a.stripe_key}, headers=admin)
    fields = client_fields(tenant_a, nickname="Their client", provider="ghl", channel_id=None,
                           location_id=tenant_a.location_id)  # fmt: skip
    created = portal_client.post("/api/portal/clients", json=fields, headers=admin).get_json()
    with portal_app.app_context():
        db.session.add(UnitReport(agency_id=tenant_a.agency_id, client_id=created["id"], identifier="rebill_x_1_1",
                                  units=3, usage_timestamp=utcnow(), status="failed", attempts=4,
                                  last_error=RAW_STRIPE_ERROR))  # fmt: skip
        db.session.commit()
    customer = sign_in(portal_client, "company-a", role="user", user_type="location", location=tenant_a.location_id,
                       user_id="customer-1")  # fmt: skip

    listed = portal_client.get("/api/portal/clients", headers=customer)
    shown = portal_client.get(f"/api/portal/clients/{created['id']}", headers=customer)
    usage = portal_client.get(f"/api/portal/clients/{created['id']}/usage", headers=customer)

    for answer in (listed, shown, usage):
        assert answer.status_code == 200
        text = answer.get_data(as_text=True)
        for secret in (tenant_a.customer_id, tenant_a.price_id, tenant_a.product_id, "rebill_x_1_1", "req_ABC"):
            assert secret not in text, (answer.request.path, secret)
    (row,) = listed.get_json()["clients"]
    assert row["product_name"] and row["product_name"] == shown.get_json()["product_name"]  # names, not ids
    assert row["nickname"] == "Their client" and row["status"] == "active"
    assert row["billing_state"] == "failing" and row["billing_note"] == "billing needs your agency's attention"
    assert "billing_problem" not in row
    (report,) = usage.get_json()["reports"]
    assert report == report | {"units": 3, "status": "failed", "note": "not reported yet; Rebill keeps trying"}
    assert "last_error" not in report and "identifier" not in report

    agency_view = portal_client.get(f"/api/portal/clients/{created['id']}/usage", headers=admin).get_json()
    assert agency_view["reports"][0]["last_error"] == RAW_STRIPE_ERROR
    assert portal_client.get("/api/portal/clients", headers=admin).get_json()["clients"][0]["stripe_customer_id"] == (
        tenant_a.customer_id
    )
