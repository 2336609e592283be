"""GET /api/v1/status: the AI platform asks whether a channel or subaccount may spend, with the usage API key."""

from __future__ import annotations

import datetime as dt

import pytest
from openapi_core import OpenAPI
from openapi_core.contrib.werkzeug import WerkzeugOpenAPIRequest, WerkzeugOpenAPIResponse
from werkzeug.test import EnvironBuilder
from werkzeug.wrappers import Request

from billing.models import ClientPeriod, RebillClient, UnitReport
from billing.periods import calendar_month
from billing.spend import SOURCE_STATUSES
from capri.openapi import openapi_document
from core.database import db, utcnow


def add_client(agency_id: int, *, channel: str | None = None, location_id: str | None = None, **fields) -> RebillClient:
    provider, key = ("capri_api", channel) if channel else ("ghl", location_id)
    client = RebillClient(
        agency_id=agency_id,
        nickname=f"client {key}",
        provider=provider,
        channel_id=channel,
        location_id=location_id,
        source_key=key,
        stripe_product_id="prod_1",
        stripe_price_id="price_1",
        stripe_customer_id="cus_1",
        charge_by="tokens",
        billing_unit=1000,
        **fields,
    )
    db.session.add(client)
    db.session.flush()
    return client


def add_report(client: RebillClient, units: int, at: dt.datetime, status: str = "sent") -> None:
    client.report_sequence += 1
    db.session.add(
        UnitReport(
            agency_id=client.agency_id,
            client_id=client.id,
            identifier=f"rebill_test_{client.id}_{client.report_sequence}",
            units=units,
            usage_timestamp=at,
            status=status,
        )
    )
    db.session.flush()


def ask(client, key: str, **params):
    return client.get("/api/v1/status", query_string=params, headers={"Authorization": f"Bearer {key}"})


def test_every_state_is_answered(client, agency):
    now = utcnow()
    add_client(agency.id, channel="active")
    add_client(agency.id, channel="paused", status="paused")
    add_client(agency.id, channel="dry-run", status="shadow")
    capped_dry_run = add_client(agency.id, channel="capped-dry-run", status="shadow", monthly_cap_units=5)
    add_report(capped_dry_run, 5, utcnow())  # billed before its dry run; the dry run is what the platform hears
    add_client(agency.id, channel="unpaid", payment_failed_at=now)
    add_client(agency.id, channel="unpaid-paused", status="paused", payment_failed_at=now, paused_for_payment=True)
    add_client(agency.id, location_id="loc-1")
    capped = add_client(agency.id, channel="capped", monthly_cap_units=5)
    add_report(capped, 5, utcnow())
    under = add_client(agency.id, channel="under-cap", monthly_cap_units=6, payment_failed_at=now)
    add_report(under, 5, utcnow())
    deleted = add_client(agency.id, channel="deleted")
    deleted.deleted_at = now
    db.session.commit()

    expected = {
        ("channel", "active"): "active",
        ("channel", "paused"): "paused",
        ("channel", "dry-run"): "shadow",  # counted and shown, never sent to Stripe
        ("channel", "capped-dry-run"): "shadow",
        ("channel", "unpaid"): "payment_failed",  # billing continues; the platform decides
        ("channel", "unpaid-paused"): "payment_failed",  # paused by the failure, not by the agency
        ("location_id", "loc-1"): "active",
        ("channel", "capped"): "capped",
        ("channel", "under-cap"): "payment_failed",
        ("channel", "deleted"): "unmapped",
        ("channel", "nobody"): "unmapped",
        ("channel", "loc-1"): "unmapped",  # a subaccount id asked as a channel names no client
    }
    answers = {(kind, name): ask(client, agency.key, **{kind: name}).get_json()["status"] for kind, name in expected}
    assert answers == expected
    assert ask(client, agency.key, channel="capped").get_json()["period"] == {"units": 5, "cap_units": 5}
    assert set(answers.values()) <= set(SOURCE_STATUSES)


def test_period_units_count_this_months_reports_sent_or_waiting(client, agency):
    chat = add_client(agency.id, channel="chat")
    start, _ = calendar_month(utcnow())
    add_report(chat, 3, start + dt.timedelta(seconds=1))
    add_report(chat, 4, utcnow(), status="pending")
    add_report(chat, 50, start - dt.timedelta(seconds=1))  # last month
    db.session.commit()

    answer = ask(client, agency.key, channel="chat")

    assert answer.status_code == 200
    assert answer.get_json() == {"status": "active", "period": {"units": 7, "cap_units": None}}
    assert answer.headers["Cache-Control"] == "private, max-age=5"


def test_another_agencys_client_is_unmapped_for_this_key(client, agency, other_agency):
    add_client(other_agency.id, channel="theirs", status="paused")
    db.session.commit()
    assert ask(client, agency.key, channel="theirs").get_json()["status"] == "unmapped"
    assert ask(client, other_agency.key, channel="theirs").get_json()["status"] == "paused"


@pytest.mark.parametrize(
    "params",
    [{}, {"channel": "a", "location_id": "b"}, {"channel": ""}, {"location_id": "x" * 65}, {"channel": "a", "x": "1"}],
)
def test_bad_questions_are_400(client, agency, params):
    answer = ask(client, agency.key, **params)
    assert answer.status_code == 400 and answer.get_json()["error"]


def test_a_missing_or_unknown_key_is_401(client, agency):
    assert client.get("/api/v1/status?channel=a").status_code == 401
    answer = ask(client, "rbk_unknownkey00_" + "x" * 43, channel="a")
    assert answer.status_code == 401 and answer.headers["WWW-Authenticate"].startswith("Bearer")


def test_the_openapi_document_describes_the_real_answers(client, agency):
    openapi = OpenAPI.from_dict(openapi_document())
    add_client(agency.id, channel="chat")
    db.session.commit()
    auth = {"Authorization": f"Bearer {agency.key}"}
    for query, headers, valid in [
        ("channel=chat", auth, True),
        ("location_id=nobody", auth, True),
        ("", auth, False),
        ("channel=chat", {}, False),
    ]:
        response = client.get(f"/api/v1/status?{query}", headers=headers)
        request = Request(EnvironBuilder(path="/api/v1/status", query_string=query, headers=headers).get_environ())
        if valid:
            openapi.validate_request(WerkzeugOpenAPIRequest(request))
        openapi.validate_response(WerkzeugOpenAPIRequest(request), WerkzeugOpenAPIResponse(response))


def test_the_period_is_the_clients_stripe_billing_period_when_known(client, agency):
    chat = add_client(agency.id, channel="chat", monthly_cap_units=5)
    now = utcnow()
    db.session.add(ClientPeriod(client_id=chat.id, customer_id="cus_1", price_id="price_1",
                                period_start=now - dt.timedelta(hours=1), period_end=now + dt.timedelta(days=30)))
    add_report(chat, 5, now - dt.timedelta(hours=2))  # before the subscription's period: another invoice
    add_report(chat, 2, now)
    db.session.commit()

    assert ask(client, agency.key, channel="chat").get_json() == {
        "status": "active", "period": {"units": 2, "cap_units": 5}
    }
