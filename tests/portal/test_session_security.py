"""Issue 10 items 1-2 over HTTP: an uninstall ends access, sign-in payloads are parsed strictly, sign-ins are
rate limited per client address, and every refused sign-in answers the same 401."""

from __future__ import annotations

import json
import time

import pytest

from portal.sessions import SIGN_IN_REFUSED, SIGN_INS_PER_WINDOW, TOKEN_SALT, TOKEN_SECONDS
from tests.conftest import TEST_SECRET_KEY
from tests.ghl.fake_ghl import APP_ID, Signer, WebhookSender, load_payload
from tests.portal.conftest import client_fields, install_tenant, sign_in, sso_payload
from tests.portal.cryptojs import cryptojs_encrypt

SHARED_SECRET = "test-shared-secret"


@pytest.fixture(scope="module")
def signer() -> Signer:
    return Signer()


@pytest.fixture
def portal_app(make_app, fake_stripe, signer):
    """The portal app, also trusting the test webhook keys so UNINSTALL/INSTALL arrive as GHL sends them."""
    return make_app(STRIPE_API_BASE=fake_stripe.url, **signer.config())


@pytest.fixture
def webhooks(portal_client, signer) -> WebhookSender:
    return WebhookSender(portal_client, signer)


def send_install_event(webhooks: WebhookSender, name: str, **fields) -> None:
    answer = webhooks.send(load_payload(name) | {"appId": APP_ID} | fields)
    assert answer.status_code == 200 and answer.json["status"] == "processed", answer.json


def usage_answer(client, key: str):
    event = {"id": f"evt-{time.time_ns()}", "channel": "chan-acme", "input_tokens": 5}
    return client.post("/api/v1/usage", json={"events": [event]}, headers={"Authorization": f"Bearer {key}"})


# ---- item 1: uninstall ends access ----------------------------------------------------------------


def test_an_agency_uninstall_ends_every_token_and_api_key_and_a_reinstall_does_not_revive_them(
    portal_client, tenant_a, webhooks
):
    admin = sign_in(portal_client, "company-a")
    portal_client.put("/api/portal/stripe-key", json={"api_key": tenant_a.stripe_key}, headers=admin)
    created = portal_client.post("/api/portal/clients", json=client_fields(tenant_a), headers=admin).get_json()
    key = portal_client.post("/api/portal/api-keys", json={"name": "capri"}, headers=admin).get_json()["key"]
    assert usage_answer(portal_client, key).status_code == 200

    send_install_event(webhooks, "uninstall_company", companyId="company-a")

    resumed = portal_client.patch(f"/api/portal/clients/{created['id']}", json={"status": "active"}, headers=admin)
    assert resumed.status_code == 401
    assert portal_client.post("/api/portal/api-keys", json={"name": "x"}, headers=admin).status_code == 401
    assert portal_client.get("/api/portal/me", headers=admin).status_code == 401
    assert usage_answer(portal_client, key).status_code == 401
    refused = portal_client.post("/api/portal/session", json={"payload": sso_payload("company-a")})
    assert (refused.status_code, refused.get_json()["error"]) == (401, SIGN_IN_REFUSED)

    send_install_event(webhooks, "install_company", companyId="company-a")

    assert portal_client.get("/api/portal/me", headers=admin).status_code == 401  # signed before: stays dead
    fresh = sign_in(portal_client, "company-a")
    assert portal_client.get(f"/api/portal/clients/{created['id']}", headers=fresh).get_json()["status"] == "paused"
    assert usage_answer(portal_client, key).status_code == 200  # the agency's keys work again once installed


def test_a_subaccount_uninstall_ends_the_tokens_of_its_users(portal_client, tenant_a, webhooks):
    subaccount_user = sign_in(portal_client, "company-a", role="user", user_type="location",
                              location=tenant_a.location_id)  # fmt: skip
    assert portal_client.get("/api/portal/clients", headers=subaccount_user).status_code == 200

    send_install_event(webhooks, "uninstall_location", locationId=tenant_a.location_id)

    assert portal_client.get("/api/portal/clients", headers=subaccount_user).status_code == 401
    again = portal_client.post("/api/portal/session", json={"payload": sso_payload(
        "company-a", role="user", user_type="location", location=tenant_a.location_id)})  # fmt: skip
    assert (again.status_code, again.get_json()["error"]) == (401, SIGN_IN_REFUSED)
    # The agency itself is still installed: its admins sign in again (their old tokens ended too).
    assert portal_client.get("/api/portal/me", headers=sign_in(portal_client, "company-a")).status_code == 200


def test_the_last_subaccount_uninstall_of_a_location_only_install_stops_its_api_keys(
    portal_app, portal_client, fake_stripe, webhooks
):
    tenant = install_tenant(portal_app, fake_stripe, "company-c", agency_install=False)
    inside = sign_in(portal_client, "company-c", location=tenant.location_id)
    key = portal_client.post("/api/portal/api-keys", json={"name": "k"}, headers=inside).get_json()["key"]
    assert usage_answer(portal_client, key).status_code == 200

    send_install_event(webhooks, "uninstall_location", locationId=tenant.location_id)

    assert usage_answer(portal_client, key).status_code == 401
    assert portal_client.get("/api/portal/me", headers=inside).status_code == 401


def test_a_token_signed_under_an_older_generation_is_refused(portal_client, tenant_a):
    session = {"company_id": "company-a", "user_id": "user-1", "role": "admin", "user_type": "agency",
               "active_location": None, "location_scope": None, "demo": False}  # fmt: skip
    current = {"Authorization": f"Bearer {_sign(session | {'generation': 0})}"}
    older = {"Authorization": f"Bearer {_sign(session | {'generation': -1})}"}
    assert portal_client.get("/api/portal/me", headers=current).status_code == 200
    assert portal_client.get("/api/portal/me", headers=older).status_code == 401


def test_tokens_live_minutes(portal_client, tenant_a):
    session = {"company_id": "company-a", "user_id": "user-1", "role": "admin", "user_type": "agency",
               "active_location": None, "location_scope": None, "generation": 0, "demo": False}  # fmt: skip
    assert TOKEN_SECONDS <= 15 * 60
    stale = {"Authorization": f"Bearer {_sign(session, issued_at=time.time() - TOKEN_SECONDS - 1)}"}
    assert portal_client.get("/api/portal/me", headers=stale).status_code == 401


def _sign(data: dict, issued_at: float | None = None) -> str:
    from itsdangerous import TimestampSigner, URLSafeTimedSerializer

    class Signer(TimestampSigner):
        def get_timestamp(self) -> int:
            return int(issued_at if issued_at is not None else time.time())

    return URLSafeTimedSerializer(TEST_SECRET_KEY, salt=TOKEN_SALT, signer=Signer).dumps(data)


# ---- item 2: strict SSO parsing, one 401 text, a rate limit ---------------------------------------

USER = {"userId": "user-1", "companyId": "company-a", "role": "user", "type": "location",
        "activeLocation": "company-a-loc-1", "userName": "Pat", "email": "pat@example.com"}  # fmt: skip


def _encrypted(text: str) -> str:
    return cryptojs_encrypt(text, SHARED_SECRET)


REFUSED_PAYLOADS = {
    # The last key would win: a subaccount user turning into an agency admin.
    "repeated keys": _encrypted(json.dumps(USER)[:-1] + ', "type": "agency", "role": "admin"}'),
    "repeated key, same value": _encrypted(json.dumps(USER)[:-1] + ', "role": "user"}'),
    "role a list": _encrypted(json.dumps(USER | {"role": ["admin"]})),
    "type a number": _encrypted(json.dumps(USER | {"type": 1})),
    "userId a number": _encrypted(json.dumps(USER | {"userId": 7})),
    "companyId an object": _encrypted(json.dumps(USER | {"companyId": {"id": "company-a"}})),
    "not installed": _encrypted(json.dumps(USER | {"companyId": "company-unknown"})),
    "nested too deep": _encrypted("[" * 50_000 + "]" * 50_000),
    "wrong secret": cryptojs_encrypt(json.dumps(USER), "not-our-secret"),
    "garbage": "garbage",
    "not a string": 12,
}


@pytest.mark.parametrize("name", list(REFUSED_PAYLOADS))
def test_every_refused_sign_in_answers_the_same_401(portal_client, tenant_a, name):
    answer = portal_client.post("/api/portal/session", json={"payload": REFUSED_PAYLOADS[name]})
    assert answer.status_code == 401
    assert answer.get_json() == {"error": SIGN_IN_REFUSED}


def test_the_strict_payload_is_accepted_when_each_key_appears_once(portal_client, tenant_a):
    answer = portal_client.post("/api/portal/session", json={"payload": _encrypted(json.dumps(USER))})
    assert answer.status_code == 200
    assert answer.get_json()["session"]["user_type"] == "location"


def test_a_request_body_with_a_repeated_key_is_a_400(portal_client, tenant_a):
    body = '{"payload": "x", "payload": "%s"}' % sso_payload("company-a")  # noqa: UP031
    answer = portal_client.post("/api/portal/session", data=body, content_type="application/json")
    assert answer.status_code == 400


def test_sign_ins_are_limited_per_client_address_across_workers(make_app, portal_app, tenant_a):
    # Two app instances on one database stand for two gunicorn workers: they share the count.
    workers = [portal_app.test_client(), make_app(STRIPE_API_BASE="http://127.0.0.1:9").test_client()]
    attacker = {"REMOTE_ADDR": "203.0.113.7"}
    for attempt in range(SIGN_INS_PER_WINDOW):
        answer = workers[attempt % 2].post("/api/portal/session", json={"payload": "garbage"}, environ_base=attacker)
        assert answer.status_code == 401, attempt

    limited = workers[0].post("/api/portal/session", json={"payload": sso_payload("company-a")}, environ_base=attacker)
    assert limited.status_code == 429
    assert 1 <= int(limited.headers["Retry-After"]) <= 60
    assert "token" not in limited.get_json()
    elsewhere = workers[1].post("/api/portal/session", json={"payload": sso_payload("company-a")},
                                environ_base={"REMOTE_ADDR": "198.51.100.4"})  # fmt: skip
    assert elsewhere.status_code == 200
