"""Spend controls in the portal: caps, alert thresholds and the payment-failure choice on clients; alert
settings (the secret shown once) and the alerts list with its delivery log."""

from __future__ import annotations

import pytest

from billing.alerts import check_spend_alerts
from billing.models import RebillClient, UnitReport
from core.database import db, utcnow
from tests.portal.conftest import client_fields, sign_in
from tests.portal.test_api import add_client, connect


@pytest.fixture
def admin(portal_client, tenant_a):
    headers = sign_in(portal_client, "company-a")
    connect(portal_client, headers, tenant_a)
    return headers


def test_a_client_takes_a_cap_thresholds_and_the_payment_failure_choice(portal_client, tenant_a, admin):
    created = add_client(portal_client, admin, tenant_a, monthly_cap_units=500)
    assert created["monthly_cap_units"] == 500 and created["alert_thresholds"] == [50, 80, 100]
    assert created["pause_on_payment_failure"] is False and created["payment_failed"] is False

    changed = portal_client.patch(
        f"/api/portal/clients/{created['id']}",
        json={"alert_thresholds": [90, 25], "pause_on_payment_failure": True, "monthly_cap_units": None},
        headers=admin,
    ).get_json()

    assert changed["alert_thresholds"] == [25, 90] and changed["pause_on_payment_failure"] is True
    assert changed["monthly_cap_units"] is None


@pytest.mark.parametrize(
    "fields",
    [{"monthly_cap_units": 0}, {"monthly_cap_units": "100"}, {"monthly_cap_units": True},
     {"alert_thresholds": []}, {"alert_thresholds": [0]}, {"alert_thresholds": [101]}, {"alert_thresholds": "50"},
     {"pause_on_payment_failure": "yes"}],
)
def test_bad_spend_fields_are_422_naming_the_field(portal_client, tenant_a, admin, fields):
    answer = portal_client.post("/api/portal/clients", json=client_fields(tenant_a, **fields), headers=admin)
    assert answer.status_code == 422 and set(answer.get_json()["fields"]) == set(fields)


def test_alert_settings_show_the_secret_once(portal_client, tenant_a, admin):
    settings = portal_client.get("/api/portal/alert-settings", headers=admin).get_json()
    assert settings == {"url": None, "secret_set": False}
    url = "https://services.leadconnectorhq.com/hooks/loc/webhook-trigger/abc"

    first = portal_client.put("/api/portal/alert-settings", json={"url": url}, headers=admin).get_json()
    again = portal_client.put("/api/portal/alert-settings", json={"url": url}, headers=admin).get_json()

    assert first["secret"].startswith("rbwhsec_") and "secret" not in again
    assert portal_client.get("/api/portal/alert-settings", headers=admin).get_json() == {"url": url, "secret_set": True}
    refused = portal_client.put("/api/portal/alert-settings", json={"url": "http://10.0.0.1/"}, headers=admin)
    assert refused.status_code == 422 and "https" in refused.get_json()["fields"]["url"]
    assert portal_client.put("/api/portal/alert-settings", json={"url": None}, headers=admin).get_json()["url"] is None


def test_the_alerts_list_shows_fired_thresholds(portal_app, portal_client, tenant_a, admin):
    created = add_client(portal_client, admin, tenant_a, monthly_cap_units=10)
    with portal_app.app_context():
        client = db.session.get(RebillClient, created["id"])
        db.session.add(UnitReport(agency_id=client.agency_id, client_id=client.id, units=8, status="sent",
                                  usage_timestamp=utcnow(), identifier=f"rebill_t_{client.id}_1"))
        db.session.commit()
        assert check_spend_alerts() == 2

    alerts = portal_client.get("/api/portal/alerts", headers=admin).get_json()["alerts"]

    assert [(a["client_nickname"], a["threshold_percent"], a["units"], a["cap_units"]) for a in alerts] == [
        ("Acme", 80, 8, 10), ("Acme", 50, 8, 10)
    ]
    assert alerts[0]["deliveries"] == []  # no alert URL set


def test_a_cap_given_in_money_is_shown_both_ways(portal_client, tenant_a, admin):
    # The seeded price charges $0.10 a unit (usd): $50 buys 500 units.
    created = add_client(portal_client, admin, tenant_a, monthly_cap_amount="50")
    assert (created["monthly_cap_units"], created["monthly_cap_amount"], created["monthly_cap_currency"]) == (
        500, "50.00", "usd"
    )
    assert created["cap_estimate"] == {"amount": "50.00", "currency": "usd"}

    changed = portal_client.patch(
        f"/api/portal/clients/{created['id']}", json={"monthly_cap_amount": "7.25"}, headers=admin
    ).get_json()
    assert (changed["monthly_cap_units"], changed["monthly_cap_amount"]) == (72, "7.25")
    assert changed["cap_estimate"] == {"amount": "7.20", "currency": "usd"}  # what the 72 units cost

    in_units = portal_client.patch(
        f"/api/portal/clients/{created['id']}", json={"monthly_cap_units": 100}, headers=admin
    ).get_json()
    assert (in_units["monthly_cap_units"], in_units["monthly_cap_amount"], in_units["monthly_cap_currency"]) == (
        100, None, None
    )
    assert in_units["cap_estimate"] == {"amount": "10.00", "currency": "usd"}


@pytest.mark.parametrize(
    "fields",
    [{"monthly_cap_amount": "12.345"}, {"monthly_cap_amount": "0"}, {"monthly_cap_amount": 50},
     {"monthly_cap_amount": "0.05"}, {"monthly_cap_amount": "1e3"}, {"monthly_cap_amount": "-5"},
     {"monthly_cap_amount": "50", "monthly_cap_units": 10}],
)
def test_a_bad_cap_amount_is_422_and_writes_nothing(portal_app, portal_client, tenant_a, admin, fields):
    answer = portal_client.post("/api/portal/clients", json=client_fields(tenant_a, **fields), headers=admin)
    assert answer.status_code == 422 and "monthly_cap_amount" in answer.get_json()["fields"]

    created = add_client(portal_client, admin, tenant_a, monthly_cap_units=40)
    changed = portal_client.patch(f"/api/portal/clients/{created['id']}", json=fields, headers=admin)
    assert changed.status_code == 422 and "monthly_cap_amount" in changed.get_json()["fields"]
    with portal_app.app_context():
        assert db.session.query(RebillClient).count() == 1
        client = db.session.get(RebillClient, created["id"])
        assert (client.monthly_cap_units, client.monthly_cap_amount, client.monthly_cap_currency) == (40, None, None)
