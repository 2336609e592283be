"""POST /api/portal/session and bearer tokens: who gets in, with what scope, and who does not."""

from __future__ import annotations

import time

import pytest
from itsdangerous import TimestampSigner, URLSafeTimedSerializer

from portal.sessions import SIGN_IN_REFUSED, TOKEN_SALT, TOKEN_SECONDS
from tests.conftest import TEST_SECRET_KEY
from tests.portal.conftest import install_tenant, sign_in, sso_payload
from tests.portal.cryptojs import cryptojs_encrypt


def test_an_installed_agency_admin_gets_a_short_lived_token(portal_client, tenant_a):
    answer = portal_client.post("/api/portal/session", json={"payload": sso_payload("company-a")})

    assert answer.status_code == 200
    body = answer.get_json()
    assert body["expires_in"] == TOKEN_SECONDS == 600  # minutes, not an hour (issue 10)
    assert body["session"]["company_id"] == "company-a"
    assert body["session"]["can_manage_billing"] is True
    assert "Set-Cookie" not in answer.headers  # no cookies inside the iframe
    me = portal_client.get("/api/portal/me", headers={"Authorization": f"Bearer {body['token']}"})
    assert me.status_code == 200
    assert me.get_json()["session"]["user_id"] == "user-1"
    assert me.get_json()["agency"]["name"] == "Agency company-a"


@pytest.mark.parametrize(
    "payload",
    [
        "garbage",
        sso_payload("company-a", secret="not-our-shared-secret"),
        cryptojs_encrypt('{"userId": "u", "role": "admin", "type": "agency"}', "test-shared-secret"),  # no companyId
        cryptojs_encrypt('"a JSON string"', "test-shared-secret"),
        None,
        12,
    ],
    # The ciphertexts are random: fixed ids keep test ids equal across pytest-xdist workers.
    ids=["garbage", "wrong-secret", "no-company", "not-an-object", "null", "number"],
)
def test_bad_payloads_answer_401(portal_client, tenant_a, payload):
    answer = portal_client.post("/api/portal/session", json={"payload": payload})

    assert answer.status_code == 401
    assert "token" not in answer.get_json()
    assert answer.get_json()["error"]


def test_a_body_that_is_not_json_answers_400(portal_client, tenant_a):
    answer = portal_client.post("/api/portal/session", data="payload=x", content_type="text/plain")
    assert answer.status_code == 400


def test_an_agency_that_did_not_install_rebill_is_refused(portal_client, tenant_a):
    answer = portal_client.post("/api/portal/session", json={"payload": sso_payload("company-unknown")})
    assert answer.status_code == 401
    # The same text as a payload that does not decrypt (issue 10: a different one tells a tamperer more).
    assert answer.get_json()["error"] == SIGN_IN_REFUSED


def test_without_a_shared_secret_nobody_signs_in(make_app, fake_stripe):
    app = make_app(STRIPE_API_BASE=fake_stripe.url, GHL_SHARED_SECRET=None)
    install_tenant(app, fake_stripe, "company-a")
    answer = app.test_client().post("/api/portal/session", json={"payload": sso_payload("company-a")})
    assert answer.status_code == 503
    assert "GHL_SHARED_SECRET" in answer.get_json()["error"]


def test_a_location_only_install_admits_that_subaccount_only(portal_app, portal_client, fake_stripe):
    tenant = install_tenant(portal_app, fake_stripe, "company-c", agency_install=False)

    inside = portal_client.post(
        "/api/portal/session", json={"payload": sso_payload("company-c", location=tenant.location_id)}
    )
    outside = portal_client.post("/api/portal/session", json={"payload": sso_payload("company-c")})
    elsewhere = portal_client.post(
        "/api/portal/session", json={"payload": sso_payload("company-c", location="company-c-loc-9")}
    )

    other = install_tenant(portal_app, fake_stripe, "company-d")
    foreign = portal_client.post(  # another agency's installed subaccount
        "/api/portal/session", json={"payload": sso_payload("company-c", location=other.location_id)}
    )

    assert inside.status_code == 200
    assert foreign.status_code == 401
    assert inside.get_json()["session"]["location_scope"] == tenant.location_id
    assert outside.status_code == 401
    assert elsewhere.status_code == 401
    headers = {"Authorization": f"Bearer {inside.get_json()['token']}"}
    subaccounts = portal_client.get("/api/portal/subaccounts", headers=headers).get_json()["subaccounts"]
    assert [row["location_id"] for row in subaccounts] == [tenant.location_id]


def test_a_subaccount_user_is_scoped_to_their_subaccount_and_reads_only(portal_client, tenant_a):
    answer = portal_client.post(
        "/api/portal/session",
        json={"payload": sso_payload("company-a", role="admin", user_type="location", location=tenant_a.location_id)},
    )

    assert answer.status_code == 200
    session = answer.get_json()["session"]
    assert session["location_scope"] == tenant_a.location_id
    assert session["can_manage_billing"] is False  # a subaccount admin is not an agency admin


def test_an_agency_user_inside_a_subaccount_keeps_the_agency_view(portal_client, tenant_a):
    answer = portal_client.post(
        "/api/portal/session", json={"payload": sso_payload("company-a", location=tenant_a.location_id)}
    )
    assert answer.get_json()["session"]["location_scope"] is None
    assert answer.get_json()["session"]["active_location"] == tenant_a.location_id


def _token_signed(secret: str, data: dict, issued_at: float | None = None) -> str:
    class Signer(TimestampSigner):
        def get_timestamp(self) -> int:
            return int(issued_at if issued_at is not None else time.time())

    return URLSafeTimedSerializer(secret, salt=TOKEN_SALT, signer=Signer).dumps(data)


SESSION_DATA = {
    "company_id": "company-a",
    "user_id": "user-1",
    "role": "admin",
    "user_type": "agency",
    "active_location": None,
    "location_scope": None,
    "demo": False,
}


def test_tokens_that_are_missing_forged_expired_or_odd_answer_401(portal_client, tenant_a):
    good = _token_signed(TEST_SECRET_KEY, SESSION_DATA)
    assert portal_client.get("/api/portal/me", headers={"Authorization": f"Bearer {good}"}).status_code == 200

    cases = {
        "no header": {},
        "no scheme": {"Authorization": good},
        "basic": {"Authorization": "Basic dXNlcjpwYXNz"},
        "empty bearer": {"Authorization": "Bearer "},
        "forged": {"Authorization": f"Bearer {_token_signed('someone-elses-secret', SESSION_DATA)}"},
        "tampered": {"Authorization": f"Bearer {good[:-2]}xx"},
        "expired": {
            "Authorization": f"Bearer {_token_signed(TEST_SECRET_KEY, SESSION_DATA, time.time() - TOKEN_SECONDS - 5)}"
        },
        "wrong shape": {"Authorization": f"Bearer {_token_signed(TEST_SECRET_KEY, {'company_id': 'company-a'})}"},
    }
    for name, headers in cases.items():
        answer = portal_client.get("/api/portal/me", headers=headers)
        assert answer.status_code == 401, name
        assert answer.headers["WWW-Authenticate"].startswith("Bearer"), name
        assert answer.get_json()["error"], name


def test_a_token_for_an_agency_that_no_longer_exists_answers_401(portal_client, tenant_a):
    token = _token_signed(TEST_SECRET_KEY, SESSION_DATA | {"company_id": "company-gone"})
    assert portal_client.get("/api/portal/me", headers={"Authorization": f"Bearer {token}"}).status_code == 401


def test_sign_in_helper_round_trip(portal_client, tenant_a):
    headers = sign_in(portal_client, "company-a", role="user", location=tenant_a.location_id)
    assert portal_client.get("/api/portal/me", headers=headers).get_json()["session"]["can_manage_billing"] is False
