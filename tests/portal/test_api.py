"""The portal JSON API: every route's auth, tenant isolation, role checks, validation and happy path."""

from __future__ import annotations

import datetime as dt
import re

import pytest
from sqlalchemy import func, select

from billing.ledger import UsageRecord, record_usage
from billing.models import Agency, RebillClient
from billing.units import aggregate_pending_usage
from capri.models import ApiKey
from core.database import db
from portal.api import OPEN_ENDPOINTS
from tests.portal.conftest import client_fields, sign_in

ADMIN_ONLY = [
    ("PUT", "/api/portal/stripe-key", {"api_key": "sk_test_whatever"}),
    ("DELETE", "/api/portal/stripe-key", None),
    ("POST", "/api/portal/clients", {}),
    ("PATCH", "/api/portal/clients/{id}", {"status": "paused"}),
    ("DELETE", "/api/portal/clients/{id}", None),
    ("POST", "/api/portal/api-keys", {"name": "x"}),
    ("DELETE", "/api/portal/api-keys/{key_id}", None),
    ("PUT", "/api/portal/alert-settings", {"url": "https://alerts.example.com/x"}),
]


def connect(client, headers, tenant) -> dict:
    answer = client.put("/api/portal/stripe-key", json={"api_key": tenant.stripe_key}, headers=headers)
    assert answer.status_code == 200, answer.get_json()
    return answer.get_json()


def add_client(client, headers, tenant, **overrides) -> dict:
    answer = client.post("/api/portal/clients", json=client_fields(tenant, **overrides), headers=headers)
    assert answer.status_code == 201, answer.get_json()
    return answer.get_json()


def count(model) -> int:
    return db.session.scalar(select(func.count()).select_from(model))


def portal_routes(app) -> list[tuple[str, str]]:
    """Every (method, path) of the portal API except the session routes, ids filled with 1."""
    routes = []
    for rule in app.url_map.iter_rules():
        if rule.endpoint.startswith("portal_api.") and rule.endpoint not in OPEN_ENDPOINTS:
            path = re.sub(r"<int:\w+>", "1", rule.rule)
            routes += [(method, path) for method in sorted(rule.methods - {"HEAD", "OPTIONS"})]
    return routes


def test_every_route_needs_a_session(portal_app, portal_client, tenant_a):
    routes = portal_routes(portal_app)
    assert len(routes) == 23  # the 16 of issue 6 + GET /summary, /customers, /statement, export.csv, /alerts,
    # GET and PUT /alert-settings
    for method, path in routes:
        answer = portal_client.open(path, method=method, json={})
        assert answer.status_code == 401, (method, path)
        assert answer.is_json and answer.get_json()["error"], (method, path)


def test_every_changing_route_is_admin_only(portal_app):
    changing = {(method, path) for method, path in portal_routes(portal_app) if method != "GET"}
    listed = {(method, path.format(id=1, key_id=1)) for method, path, _ in ADMIN_ONLY}
    assert changing == listed


def test_stripe_key_connect_status_and_disconnect(portal_app, portal_client, tenant_a, fake_stripe):
    headers = sign_in(portal_client, "company-a")
    assert portal_client.get("/api/portal/stripe-key", headers=headers).get_json()["connected"] is False

    connected = connect(portal_client, headers, tenant_a)

    assert connected["account"] == "acct_companya"
    assert connected["mode"] == "test"
    assert connected["last4"] == tenant_a.stripe_key[-4:]
    status = portal_client.get("/api/portal/stripe-key", headers=headers).get_json()
    assert status["connected"] is True and status["last4"] == tenant_a.stripe_key[-4:]
    assert tenant_a.stripe_key not in portal_client.get("/api/portal/stripe-key", headers=headers).get_data(True)
    with portal_app.app_context():
        stored = db.session.get(Agency, tenant_a.agency_id).stripe_key_ciphertext
        assert stored and tenant_a.stripe_key not in stored  # encrypted at rest

    gone = portal_client.delete("/api/portal/stripe-key", headers=headers)
    assert gone.status_code == 200 and gone.get_json()["connected"] is False


@pytest.mark.parametrize("api_key", ["", "   ", "pk_test_publishable123", "sk_test_unknownkey0000", 42, "x" * 300])
def test_a_bad_stripe_key_answers_422_and_stores_nothing(portal_app, portal_client, tenant_a, api_key):
    headers = sign_in(portal_client, "company-a")

    answer = portal_client.put("/api/portal/stripe-key", json={"api_key": api_key}, headers=headers)

    assert answer.status_code == 422
    assert answer.get_json()["error"]
    assert answer.get_json()["fields"]["api_key"]
    with portal_app.app_context():
        assert db.session.get(Agency, tenant_a.agency_id).stripe_key_ciphertext is None


def test_prices_say_which_can_carry_units(portal_client, tenant_a):
    headers = sign_in(portal_client, "company-a")
    connect(portal_client, headers, tenant_a)

    products = portal_client.get("/api/portal/prices", headers=headers).get_json()["products"]

    prices = {price["id"]: price for product in products for price in product["prices"]}
    assert prices[tenant_a.price_id]["usable"] is True
    assert prices[tenant_a.licensed_price_id]["usable"] is False
    assert "licensed" in prices[tenant_a.licensed_price_id]["reason"]


def test_subaccounts_list_the_agencys_installed_locations(portal_client, tenant_a, tenant_b):
    headers = sign_in(portal_client, "company-a")
    rows = portal_client.get("/api/portal/subaccounts", headers=headers).get_json()["subaccounts"]
    assert rows == [{"location_id": tenant_a.location_id, "name": "Subaccount of company-a"}]


def test_client_lifecycle(portal_app, portal_client, tenant_a):
    headers = sign_in(portal_client, "company-a")
    connect(portal_client, headers, tenant_a)

    created = add_client(portal_client, headers, tenant_a)
    assert created["nickname"] == "Acme" and created["status"] == "active"
    assert created["counted_usage"] == created["units_logged"] == created["remainder"] == 0

    listed = portal_client.get("/api/portal/clients", headers=headers).get_json()["clients"]
    assert [row["id"] for row in listed] == [created["id"]]
    shown = portal_client.get(f"/api/portal/clients/{created['id']}", headers=headers).get_json()
    assert shown["stripe_customer_id"] == tenant_a.customer_id

    paused = portal_client.patch(
        f"/api/portal/clients/{created['id']}", json={"status": "paused", "billing_unit": 500}, headers=headers
    )
    assert paused.status_code == 200
    assert (paused.get_json()["status"], paused.get_json()["billing_unit"]) == ("paused", 500)

    usage = portal_client.get(f"/api/portal/clients/{created['id']}/usage", headers=headers)
    assert usage.status_code == 200
    assert usage.get_json()["units_logged"] == 0

    assert portal_client.delete(f"/api/portal/clients/{created['id']}", headers=headers).status_code == 204
    assert portal_client.get(f"/api/portal/clients/{created['id']}", headers=headers).status_code == 404
    assert portal_client.get("/api/portal/clients", headers=headers).get_json()["clients"] == []


def test_a_ghl_client_shows_its_subaccount_name(portal_client, tenant_a):
    headers = sign_in(portal_client, "company-a")
    connect(portal_client, headers, tenant_a)

    created = add_client(
        portal_client, headers, tenant_a, provider="ghl", channel_id=None, location_id=tenant_a.location_id,
        charge_by="messages", message_source="ghl_outbound", billing_unit=10,
    )

    assert created["subaccount_name"] == "Subaccount of company-a"


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"nickname": ""}, "nickname"),
        ({"provider": "fax"}, "provider"),
        ({"charge_by": "vibes"}, "charge_by"),
        ({"billing_unit": 0}, "billing_unit"),
        ({"billing_unit": "ten"}, "billing_unit"),
        ({"stripe_customer_id": "cus_doesnotexist"}, "stripe_customer_id"),
        ({"stripe_price_id": "licensed"}, "stripe_price_id"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_invalid_client_fields_answer_422_with_the_field_and_write_nothing(
    portal_app, portal_client, tenant_a, overrides, field
):
    headers = sign_in(portal_client, "company-a")
    connect(portal_client, headers, tenant_a)
    if overrides.get("stripe_price_id") == "licensed":
        overrides = {"stripe_price_id": tenant_a.licensed_price_id}

    answer = portal_client.post("/api/portal/clients", json=client_fields(tenant_a, **overrides), headers=headers)

    assert answer.status_code == 422
    assert field in answer.get_json()["fields"], answer.get_json()
    assert answer.get_json()["error"]
    with portal_app.app_context():
        assert count(RebillClient) == 0


def test_an_invalid_edit_answers_422_and_changes_nothing(portal_client, tenant_a):
    headers = sign_in(portal_client, "company-a")
    connect(portal_client, headers, tenant_a)
    created = add_client(portal_client, headers, tenant_a)

    answer = portal_client.patch(
        f"/api/portal/clients/{created['id']}", json={"billing_unit": -5, "nickname": "Renamed"}, headers=headers
    )

    assert answer.status_code == 422
    assert "billing_unit" in answer.get_json()["fields"]
    shown = portal_client.get(f"/api/portal/clients/{created['id']}", headers=headers).get_json()
    assert (shown["nickname"], shown["billing_unit"]) == ("Acme", 1000)


@pytest.mark.parametrize("body", ["not json", "[1, 2]", "null"])
def test_a_body_that_is_not_an_object_answers_400(portal_client, tenant_a, body):
    headers = sign_in(portal_client, "company-a")
    answer = portal_client.post("/api/portal/clients", data=body, content_type="application/json", headers=headers)
    assert answer.status_code == 400


def test_non_admins_read_but_cannot_change_billing_settings(portal_app, portal_client, tenant_a):
    admin = sign_in(portal_client, "company-a")
    connect(portal_client, admin, tenant_a)
    created = add_client(portal_client, admin, tenant_a, provider="ghl", channel_id=None,
                         location_id=tenant_a.location_id)  # fmt: skip
    key_id = portal_client.post("/api/portal/api-keys", json={"name": "k"}, headers=admin).get_json()["id"]
    # Agency users who are not admins see the subaccount they have open (issue 10 item 8).
    user = sign_in(portal_client, "company-a", role="user", user_id="user-2", location=tenant_a.location_id)

    for method, path, body in ADMIN_ONLY:
        path = path.format(id=created["id"], key_id=key_id)
        answer = portal_client.open(path, method=method, json=body, headers=user)
        assert answer.status_code == 403, (method, path)
        assert "admin" in answer.get_json()["error"]

    for path in ("/api/portal/clients", f"/api/portal/clients/{created['id']}",
                 f"/api/portal/clients/{created['id']}/usage", "/api/portal/subaccounts",
                 "/api/portal/unmapped-usage"):
        assert portal_client.get(path, headers=user).status_code == 200, path
    # Scoped to one subaccount, they see it as its customer does: the agency's settings are not theirs.
    for path in ("/api/portal/stripe-key", "/api/portal/api-keys", "/api/portal/prices"):
        assert portal_client.get(path, headers=user).status_code == 403, path
    with portal_app.app_context():
        client_row = db.session.get(RebillClient, created["id"])
        assert (client_row.status, client_row.deleted_at) == ("active", None)
        assert db.session.get(ApiKey, key_id).revoked_at is None
        assert db.session.get(Agency, tenant_a.agency_id).stripe_key_ciphertext is not None


def test_a_subaccount_user_sees_their_subaccount_but_not_the_agencys_own_settings(portal_client, tenant_a):
    admin = sign_in(portal_client, "company-a")
    connect(portal_client, admin, tenant_a)
    add_client(portal_client, admin, tenant_a, nickname="Other channel")
    own = add_client(
        portal_client, admin, tenant_a, provider="ghl", channel_id=None, location_id=tenant_a.location_id,
        charge_by="messages", billing_unit=10,
    )
    portal_client.post("/api/portal/api-keys", json={"name": "platform"}, headers=admin)
    subaccount_user = sign_in(
        portal_client, "company-a", role="admin", user_type="location", location=tenant_a.location_id, user_id="u-3"
    )

    for path in ("/api/portal/stripe-key", "/api/portal/prices", "/api/portal/api-keys"):
        answer = portal_client.get(path, headers=subaccount_user)
        assert answer.status_code == 403, path
        assert "agency admins" in answer.get_json()["error"]
    listed = portal_client.get("/api/portal/clients", headers=subaccount_user).get_json()["clients"]
    assert [row["id"] for row in listed] == [own["id"]]
    assert portal_client.get(f"/api/portal/clients/{own['id']}/usage", headers=subaccount_user).status_code == 200


def test_agency_a_can_neither_see_nor_change_agency_b(portal_app, portal_client, tenant_a, tenant_b):
    a = sign_in(portal_client, "company-a")
    b = sign_in(portal_client, "company-b", user_id="user-b")
    connect(portal_client, b, tenant_b)
    b_client = add_client(portal_client, b, tenant_b, nickname="B's client", channel_id="chan-b")
    b_key = portal_client.post("/api/portal/api-keys", json={"name": "b"}, headers=b).get_json()
    with portal_app.app_context():
        record_usage(tenant_b.agency_id, [usage_record("b-1", channel_id="chan-b-unmapped")])
        aggregate_pending_usage()
        db.session.commit()
    assert len(portal_client.get("/api/portal/unmapped-usage", headers=b).get_json()["unmapped"]) == 1

    for method, path, body in [
        ("GET", f"/api/portal/clients/{b_client['id']}", None),
        ("PATCH", f"/api/portal/clients/{b_client['id']}", {"status": "paused"}),
        ("DELETE", f"/api/portal/clients/{b_client['id']}", None),
        ("GET", f"/api/portal/clients/{b_client['id']}/usage", None),
        ("DELETE", f"/api/portal/api-keys/{b_key['id']}", None),
    ]:
        answer = portal_client.open(path, method=method, json=body, headers=a)
        assert answer.status_code == 404, (method, path)

    assert portal_client.get("/api/portal/clients", headers=a).get_json()["clients"] == []
    assert portal_client.get("/api/portal/api-keys", headers=a).get_json()["api_keys"] == []
    assert portal_client.get("/api/portal/unmapped-usage", headers=a).get_json()["unmapped"] == []
    assert portal_client.get("/api/portal/stripe-key", headers=a).get_json()["connected"] is False
    # A's Stripe calls use A's key: B's price and customer are unknown there.
    connect(portal_client, a, tenant_a)
    stolen = portal_client.post("/api/portal/clients", json=client_fields(tenant_b), headers=a)
    assert stolen.status_code == 422
    with portal_app.app_context():
        row = db.session.get(RebillClient, b_client["id"])
        assert (row.status, row.deleted_at) == ("active", None)
        assert db.session.get(ApiKey, b_key["id"]).revoked_at is None


def test_ids_beyond_the_databases_integer_range_answer_404(portal_client, tenant_a):
    headers = sign_in(portal_client, "company-a")
    huge = 2**31  # PostgreSQL refuses to compare it with an integer column: never a 503 "database unavailable"
    for method, path, body in [
        ("GET", f"/api/portal/clients/{huge}", None),
        ("PATCH", f"/api/portal/clients/{huge}", {"status": "paused"}),
        ("DELETE", f"/api/portal/clients/{huge}", None),
        ("GET", f"/api/portal/clients/{huge}/usage", None),
        ("DELETE", f"/api/portal/api-keys/{huge}", None),
    ]:
        answer = portal_client.open(path, method=method, json=body, headers=headers)
        assert answer.status_code == 404, (method, path, answer.get_json())


def usage_record(event_id: str, **source) -> UsageRecord:
    return UsageRecord(
        source="capri",
        source_event_id=event_id,
        occurred_at=dt.datetime.now(dt.UTC),
        input_tokens=700,
        output_tokens=300,
        messages=1,
        **source,
    )


def test_unmapped_usage_is_listed_and_can_be_added_as_a_client(portal_app, portal_client, tenant_a):
    headers = sign_in(portal_client, "company-a")
    connect(portal_client, headers, tenant_a)
    with portal_app.app_context():
        record_usage(tenant_a.agency_id, [usage_record(f"u-{n}", channel_id="chan-new") for n in (1, 2)])
        aggregate_pending_usage()
        db.session.commit()

    rows = portal_client.get("/api/portal/unmapped-usage", headers=headers).get_json()["unmapped"]

    assert len(rows) == 1
    assert rows[0]["channel_id"] == "chan-new"
    assert (rows[0]["tokens"], rows[0]["messages"], rows[0]["events"]) == (2000, 2, 2)
    add_client(portal_client, headers, tenant_a, channel_id="chan-new", bill_unmapped_usage=False)
    assert portal_client.get("/api/portal/unmapped-usage", headers=headers).get_json()["unmapped"] == []


def test_bill_unmapped_usage_must_be_a_boolean(portal_client, tenant_a):
    headers = sign_in(portal_client, "company-a")
    connect(portal_client, headers, tenant_a)
    answer = portal_client.post(
        "/api/portal/clients", json=client_fields(tenant_a, bill_unmapped_usage="yes"), headers=headers
    )
    assert answer.status_code == 422
    assert "bill_unmapped_usage" in answer.get_json()["fields"]


def test_api_keys_are_shown_once_listed_by_prefix_and_revoked(portal_client, tenant_a):
    headers = sign_in(portal_client, "company-a")

    created = portal_client.post("/api/portal/api-keys", json={"name": "Capri prod"}, headers=headers)

    assert created.status_code == 201
    body = created.get_json()
    assert body["key"].startswith(body["prefix"] + "_")
    listed = portal_client.get("/api/portal/api-keys", headers=headers)
    assert body["key"] not in listed.get_data(as_text=True)
    (row,) = listed.get_json()["api_keys"]
    assert (row["id"], row["prefix"], row["name"]) == (body["id"], body["prefix"], "Capri prod")
    assert row["revoked_at"] is None

    assert portal_client.delete(f"/api/portal/api-keys/{body['id']}", headers=headers).status_code == 204
    assert portal_client.get("/api/portal/api-keys", headers=headers).get_json()["api_keys"][0]["revoked_at"]
    assert portal_client.delete("/api/portal/api-keys/999999", headers=headers).status_code == 404


@pytest.mark.parametrize("name", ["x" * 121, 42, ["list"]])
def test_an_api_key_name_that_is_too_long_or_not_text_answers_422(portal_app, portal_client, tenant_a, name):
    headers = sign_in(portal_client, "company-a")
    assert portal_client.post("/api/portal/api-keys", json={"name": name}, headers=headers).status_code == 422
    with portal_app.app_context():
        assert count(ApiKey) == 0


def test_a_subaccount_scoped_admin_manages_only_that_subaccount(portal_app, portal_client, fake_stripe):
    from tests.portal.conftest import install_tenant

    tenant = install_tenant(portal_app, fake_stripe, "company-c", agency_install=False)
    headers = sign_in(portal_client, "company-c", location=tenant.location_id)
    connect(portal_client, headers, tenant)

    channel = portal_client.post("/api/portal/clients", json=client_fields(tenant), headers=headers)
    assert channel.status_code == 403
    own = add_client(
        portal_client, headers, tenant, provider="ghl", channel_id=None, location_id=tenant.location_id,
        charge_by="messages", message_source="ghl_outbound", billing_unit=10,
    )
    moved = portal_client.patch(
        f"/api/portal/clients/{own['id']}", json={"location_id": "company-c-loc-2"}, headers=headers
    )
    assert moved.status_code == 403
    assert [row["id"] for row in portal_client.get("/api/portal/clients", headers=headers).get_json()["clients"]] == [
        own["id"]
    ]
