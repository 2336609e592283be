"""Spend alerts: thresholds of the monthly cap fire once per period, are listed, and are POSTed signed to the
agency's alert URL (responses at the HTTP boundary; addresses come from a resolver the test hands the sender)."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import threading

import pytest
import requests
import responses
from sqlalchemy import func, select

from billing.agencies import ensure_agency
from billing.alert_sender import AlertSender, AlertUrlRefused, _PinnedAdapter, public_address
from billing.alerts import SIGNATURE_HEADER, check_spend_alerts, deliver_alerts, list_alerts, set_alert_url
from billing.models import AlertDelivery, RebillClient, SpendAlert, UnitReport
from billing.periods import calendar_month
from core.database import db, utcnow

# A GHL workflow "Inbound Webhook" trigger URL (the form GHL shows when the trigger is added).
GHL_HOOK = "https://services.leadconnectorhq.com/hooks/ve9EPM428h8vShlRW1KT/webhook-trigger/6a7b8c9d-0000-4e1f"
PUBLIC = {"services.leadconnectorhq.com": ["104.18.30.1"], "alerts.example.com": ["93.184.216.34"]}


def resolver(table):
    def resolve(host: str, port: int) -> list[str]:
        if host not in table:
            raise OSError(f"unknown host {host}")
        return table[host]

    return resolve


@pytest.fixture
def sender():
    return AlertSender(resolver=resolver(PUBLIC))


@pytest.fixture
def agency(app_context):
    agency = ensure_agency("company-alerts")
    db.session.commit()
    return agency


def add_client(agency, cap: int | None, thresholds: str | None = None, key: str = "chat") -> RebillClient:
    client = RebillClient(
        agency_id=agency.id, nickname=f"Client {key}", provider="capri_api", channel_id=key, source_key=key,
        stripe_product_id="prod_1", stripe_price_id="price_1", stripe_customer_id="cus_1", charge_by="tokens",
        billing_unit=1000, monthly_cap_units=cap, alert_thresholds=thresholds,
    )
    db.session.add(client)
    db.session.flush()
    return client


def bill(client: RebillClient, units: int, at: dt.datetime | None = None, sent: bool = False) -> None:
    """Write a report waiting to be sent, or (``sent``) one Stripe took with its usage time."""
    client.report_sequence += 1
    at = at or utcnow()
    db.session.add(UnitReport(
        agency_id=client.agency_id, client_id=client.id, units=units, usage_timestamp=at,
        identifier=f"rebill_test_{client.id}_{client.report_sequence}", status="sent" if sent else "pending",
        stripe_timestamp=at if sent else None, units_confirmed=units if sent else 0,
    ))
    db.session.commit()


def fired(client) -> list[int]:
    return sorted(db.session.scalars(select(SpendAlert.threshold_percent).where(SpendAlert.client_id == client.id)))


def test_each_threshold_fires_once_per_period(agency):
    client = add_client(agency, cap=100)
    bill(client, 49)
    assert check_spend_alerts() == 0
    bill(client, 1)
    assert check_spend_alerts() == 1 and fired(client) == [50]
    bill(client, 45)
    assert check_spend_alerts() == 1 and fired(client) == [50, 80]
    assert check_spend_alerts() == 0  # nothing new
    bill(client, 5)
    check_spend_alerts()
    assert fired(client) == [50, 80, 100]


def test_a_new_period_fires_again_and_last_periods_units_do_not_count(agency):
    client = add_client(agency, cap=10, thresholds="100")
    start, end = calendar_month(utcnow())
    bill(client, 10, at=start - dt.timedelta(days=1), sent=True)
    assert check_spend_alerts() == 0  # last month's units
    bill(client, 10, sent=True)
    assert check_spend_alerts() == 1
    assert check_spend_alerts(now=end + dt.timedelta(hours=1)) == 0  # next month: nothing billed yet
    bill(client, 10, at=end + dt.timedelta(minutes=1))
    assert check_spend_alerts(now=end + dt.timedelta(hours=1)) == 1
    periods = db.session.scalars(select(SpendAlert.period_start).where(SpendAlert.client_id == client.id)).all()
    assert sorted(periods) == [start, end]


def test_clients_without_a_cap_never_alert(agency):
    client = add_client(agency, cap=None)
    bill(client, 10**6)
    assert check_spend_alerts() == 0


def test_two_concurrent_checks_fire_each_threshold_once(agency, postgres_only, app):
    client = add_client(agency, cap=10)
    set_alert_url(agency, GHL_HOOK)
    bill(client, 10)
    barrier, results = threading.Barrier(2), []

    def check():
        with app.app_context():
            barrier.wait()
            results.append(check_spend_alerts())
            db.session.remove()

    threads = [threading.Thread(target=check) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sum(results) == 3 and fired(client) == [50, 80, 100]
    assert db.session.scalar(select(func.count()).select_from(AlertDelivery)) == 3


@responses.activate
def test_an_alert_is_posted_signed_to_a_ghl_inbound_webhook_url(agency, sender):
    secret = set_alert_url(agency, GHL_HOOK)
    client = add_client(agency, cap=10, thresholds="100")
    bill(client, 10)
    check_spend_alerts()
    responses.post(GHL_HOOK, json={"status": "Success: request sent to trigger execution server"})

    now = utcnow()
    summary = deliver_alerts(now=now, sender=sender)

    assert summary.delivered == 1
    [call] = responses.calls
    body = call.request.body
    payload = json.loads(body)
    assert payload["type"] == "rebill.spend_threshold_reached" and payload["threshold_percent"] == 100
    assert payload["client_nickname"] == "Client chat" and payload["units"] == 10 and payload["capped"] is True
    timestamp = int(now.timestamp())
    expected = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    assert call.request.headers[SIGNATURE_HEADER] == f"t={timestamp},v1={expected}"
    [alert] = list_alerts(agency)
    assert alert["deliveries"][0]["status"] == "delivered" and alert["deliveries"][0]["last_status_code"] == 200
    assert deliver_alerts(now=now + dt.timedelta(hours=1), sender=sender).delivered == 0  # once


@responses.activate
def test_a_failing_receiver_is_retried_with_backoff_then_given_up(agency, sender):
    set_alert_url(agency, "https://alerts.example.com/rebill")
    client = add_client(agency, cap=10, thresholds="100")
    bill(client, 10)
    check_spend_alerts()
    responses.post("https://alerts.example.com/rebill", status=503)

    now = utcnow()
    assert deliver_alerts(now=now, sender=sender).retrying == 1
    assert deliver_alerts(now=now + dt.timedelta(seconds=29), sender=sender).retrying == 0  # not due yet
    assert deliver_alerts(now=now + dt.timedelta(seconds=31), sender=sender).retrying == 1
    delivery = db.session.scalars(select(AlertDelivery)).one()
    assert delivery.attempts == 2 and delivery.last_status_code == 503
    assert delivery.next_attempt_at == now + dt.timedelta(seconds=31) + dt.timedelta(minutes=1)
    later = now
    for _ in range(10):
        later += dt.timedelta(hours=2)
        deliver_alerts(now=later, sender=sender)
    db.session.refresh(delivery)
    assert delivery.status == "failed" and delivery.attempts == 8 and len(responses.calls) == 8


@pytest.mark.parametrize(
    "addresses",
    [["127.0.0.1"], ["10.0.0.5"], ["192.168.1.1"], ["169.254.169.254"], ["::1"], ["fe80::1"], ["fd00::1"],
     ["::ffff:127.0.0.1"], ["0.0.0.0"], ["93.184.216.34", "10.0.0.1"]],
)
@responses.activate
def test_private_loopback_and_link_local_addresses_are_refused(agency, addresses):
    sender = AlertSender(resolver=resolver({"alerts.example.com": addresses}))
    set_alert_url(agency, "https://alerts.example.com/rebill")
    client = add_client(agency, cap=10, thresholds="100")
    bill(client, 10)
    check_spend_alerts()

    deliver_alerts(sender=sender)

    assert len(responses.calls) == 0  # nothing was sent
    delivery = db.session.scalars(select(AlertDelivery)).one()
    assert "private, loopback or link-local" in delivery.last_error
    with pytest.raises(AlertUrlRefused):
        sender.checked_address("https://alerts.example.com/rebill")


def test_the_connection_is_pinned_to_the_checked_address_with_tls_for_the_host_name():
    request = requests.Request("POST", GHL_HOOK).prepare()
    adapter = _PinnedAdapter("104.18.30.1")

    pool = adapter.get_connection_with_tls_context(request, verify=True)
    adapter.add_headers(request)

    assert (pool.host, pool.port) == ("104.18.30.1", 443)
    assert pool.conn_kw["server_hostname"] == pool.assert_hostname == "services.leadconnectorhq.com"
    assert request.headers["Host"] == "services.leadconnectorhq.com"
    adapter.close()


def test_public_addresses_pass_the_check():
    assert public_address("93.184.216.34") and public_address("2606:4700::1111")
    assert not public_address("100.64.0.1")  # carrier-grade NAT


@pytest.mark.parametrize(
    "url", ["http://alerts.example.com/x", "ftp://x", "https://", "https://user:pw@alerts.example.com/", "", 7,
            "https://alerts.example.com:99999/"],
)
def test_alert_urls_of_the_wrong_form_are_refused(agency, url):
    with pytest.raises(AlertUrlRefused):
        set_alert_url(agency, url)


def test_the_secret_is_shown_once_and_kept_encrypted(agency):
    secret = set_alert_url(agency, GHL_HOOK)
    assert secret and secret not in agency.alert_secret_ciphertext
    assert set_alert_url(agency, "https://alerts.example.com/other") is None  # same secret kept
    assert set_alert_url(agency, GHL_HOOK, new_secret=True) not in (None, secret)
