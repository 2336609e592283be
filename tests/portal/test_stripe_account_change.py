"""PUT /api/portal/stripe-key with a key of another Stripe account or mode: 409 saying what would happen,
nothing stored, until the agency confirms."""

from __future__ import annotations

import datetime as dt

from billing.models import UnitReport
from core.database import db, utcnow
from tests.portal.conftest import client_fields, sign_in


def put_key(client, headers, api_key: str, **extra):
    return client.put("/api/portal/stripe-key", json={"api_key": api_key, **extra}, headers=headers)


def pending_units(app, tenant, client_id: int, units: int) -> None:
    """Units waiting in the outbox, as aggregation leaves them."""
    with app.app_context():
        db.session.add(UnitReport(agency_id=tenant.agency_id, client_id=client_id, identifier="rebill_test_pending_1",
                                  units=units, usage_timestamp=utcnow() - dt.timedelta(minutes=1), status="pending"))
        db.session.commit()


def test_another_accounts_key_needs_confirmation_while_units_are_pending(
    portal_app, portal_client, tenant_a, fake_stripe
):
    headers = sign_in(portal_client, tenant_a.company_id)
    assert put_key(portal_client, headers, tenant_a.stripe_key).status_code == 200
    created = portal_client.post("/api/portal/clients", json=client_fields(tenant_a), headers=headers).get_json()
    pending_units(portal_app, tenant_a, created["id"], 7)
    other_key = "sk_test_otheraccount000000000000"
    fake_stripe.state.add_account(other_key, account_id="acct_other")

    refused = put_key(portal_client, headers, other_key)
    assert refused.status_code == 409
    answer = refused.get_json()
    assert answer["confirm"] == "confirm_account_change" and answer["pending_units"] == 7
    assert answer["new"] == {"account": "acct_other", "mode": "test"}
    assert answer["current"]["account"] == "acct_companya"
    assert "7 units not yet offered to Stripe will be sent to account acct_other" in answer["error"]
    status = portal_client.get("/api/portal/stripe-key", headers=headers).get_json()
    assert (status["account"], status["last4"]) == ("acct_companya", tenant_a.stripe_key[-4:])  # unchanged

    assert put_key(portal_client, headers, other_key, confirm_account_change="yes").status_code == 422
    confirmed = put_key(portal_client, headers, other_key, confirm_account_change=True)
    assert confirmed.status_code == 200
    assert confirmed.get_json()["account"] == "acct_other"


def test_a_live_key_after_test_mode_needs_confirmation_even_with_nothing_pending(portal_client, tenant_a, fake_stripe):
    headers = sign_in(portal_client, tenant_a.company_id)
    assert put_key(portal_client, headers, tenant_a.stripe_key).status_code == 200
    live_key = "sk_live_companya000000000000000"
    fake_stripe.state.add_account(live_key, account_id="acct_companya")
    refused = put_key(portal_client, headers, live_key)
    assert refused.status_code == 409
    assert refused.get_json()["new"] == {"account": "acct_companya", "mode": "live"}
    assert put_key(portal_client, headers, live_key, confirm_account_change=True).get_json()["mode"] == "live"
