"""Issue 10 item 8: agency users who are not admins see only the subaccount they have open in GHL.

GHL can restrict an agency user to some subaccounts; the SSO payload does not list them, and GHL only lets
the user open the ones they may see. So the scope is the open subaccount, decided without asking GHL:
GHL's API is faked at the transport and no call may reach it.
"""

from __future__ import annotations

import pytest
import responses

from tests.portal.conftest import client_fields, sign_in, sso_payload


@pytest.fixture
def ghl_api():
    """GHL's HTTP API with nothing registered: any call to it fails the request that made it."""
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


@pytest.fixture
def two_subaccounts(portal_app, portal_client, tenant_a):
    """Agency A with a client in each of two installed subaccounts and one API-channel client."""
    from core.database import db
    from ghl.locations import upsert_location

    with portal_app.app_context():
        upsert_location(tenant_a.agency_id, "company-a-loc-2", name="Second subaccount", installed=True)
        db.session.commit()
    admin = sign_in(portal_client, "company-a")
    portal_client.put("/api/portal/stripe-key", json={"api_key": tenant_a.stripe_key}, headers=admin)
    ids = {}
    for name, location in (("first", tenant_a.location_id), ("second", "company-a-loc-2")):
        fields = client_fields(tenant_a, nickname=name, provider="ghl", channel_id=None, location_id=location)
        ids[name] = portal_client.post("/api/portal/clients", json=fields, headers=admin).get_json()["id"]
    channel = portal_client.post("/api/portal/clients", json=client_fields(tenant_a), headers=admin)
    ids["channel"] = channel.get_json()["id"]
    return ids


def test_an_agency_user_who_is_not_an_admin_sees_only_the_open_subaccount(portal_client, tenant_a, two_subaccounts,
                                                                           ghl_api):  # fmt: skip
    user = sign_in(portal_client, "company-a", role="user", location=tenant_a.location_id, user_id="staff-1")

    listed = portal_client.get("/api/portal/clients", headers=user).get_json()["clients"]
    assert [row["nickname"] for row in listed] == ["first"]
    for hidden in ("second", "channel"):
        client_path = f"/api/portal/clients/{two_subaccounts[hidden]}"
        for path in (client_path, f"{client_path}/usage"):
            assert portal_client.get(path, headers=user).status_code == 404, path
    subaccounts = portal_client.get("/api/portal/subaccounts", headers=user).get_json()["subaccounts"]
    assert [row["location_id"] for row in subaccounts] == [tenant_a.location_id]
    assert portal_client.get("/api/portal/me", headers=user).get_json()["session"]["location_scope"] == (
        tenant_a.location_id
    )
    assert len(ghl_api.calls) == 0  # decided without GHL's Users API


def test_outside_a_subaccount_an_agency_user_who_is_not_an_admin_is_asked_to_open_one(portal_client, tenant_a,
                                                                                     ghl_api):  # fmt: skip
    answer = portal_client.post("/api/portal/session", json={"payload": sso_payload("company-a", role="user")})
    assert answer.status_code == 403
    assert "inside one of your subaccounts" in answer.get_json()["error"]
    assert "token" not in answer.get_json()
    assert len(ghl_api.calls) == 0


def test_agency_admins_still_see_every_subaccount(portal_client, tenant_a, two_subaccounts):
    admin = sign_in(portal_client, "company-a", location=tenant_a.location_id)
    listed = portal_client.get("/api/portal/clients", headers=admin).get_json()["clients"]
    assert sorted(row["nickname"] for row in listed) == ["Acme", "first", "second"]


def test_a_non_admin_agency_user_scoped_to_one_subaccount_cannot_read_agency_settings(portal_client, tenant_a):
    admin = sign_in(portal_client, "company-a")
    assert portal_client.post("/api/portal/api-keys", json={"name": "prod"}, headers=admin).status_code == 201
    # Item 8: agency users who are not admins see one subaccount at a time...
    user = sign_in(portal_client, "company-a", role="user", location=tenant_a.location_id)
    # ...so the whole agency's API keys, Stripe account, price list and customers are not theirs.
    for path in ("/api/portal/api-keys", "/api/portal/stripe-key", "/api/portal/prices", "/api/portal/customers"):
        answer = portal_client.get(path, headers=user)
        assert answer.status_code == 403, (path, answer.get_json())
    assert portal_client.get("/api/portal/me", headers=user).get_json()["session"]["sees_agency_settings"] is False
    assert portal_client.get("/api/portal/api-keys", headers=admin).status_code == 200
