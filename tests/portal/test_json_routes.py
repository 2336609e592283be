"""Issue 10 item 3 over HTTP: a body nested thousands of levels deep is a 400 on every JSON route, not a 500."""

from __future__ import annotations

import re

import pytest

from tests.ghl.fake_ghl import Signer
from tests.portal.conftest import client_fields, sign_in

NESTED = b"[" * 100_000 + b"]" * 100_000
NESTED_OBJECT = b'{"payload": ' + b'{"a": ' * 50_000 + b"1" + b"}" * 50_000 + b"}"


@pytest.fixture(scope="module")
def signer() -> Signer:
    return Signer()


@pytest.fixture
def portal_app(make_app, fake_stripe, signer):
    return make_app(STRIPE_API_BASE=fake_stripe.url, **signer.config())


def test_deep_nesting_is_a_400_on_every_json_route(portal_app, portal_client, tenant_a, signer):
    admin = sign_in(portal_client, "company-a")
    portal_client.put("/api/portal/stripe-key", json={"api_key": tenant_a.stripe_key}, headers=admin)
    client_id = portal_client.post("/api/portal/clients", json=client_fields(tenant_a), headers=admin).get_json()["id"]
    key = portal_client.post("/api/portal/api-keys", json={"name": "k"}, headers=admin).get_json()["key"]
    routes = [
        ("POST", "/api/portal/session", {}),
        ("PUT", "/api/portal/stripe-key", admin),
        ("POST", "/api/portal/clients", admin),
        ("PATCH", f"/api/portal/clients/{client_id}", admin),
        ("POST", "/api/portal/api-keys", admin),
        ("POST", "/api/v1/usage", {"Authorization": f"Bearer {key}"}),
    ]
    for body in (NESTED, NESTED_OBJECT):
        for method, path, headers in routes:
            answer = portal_client.open(path, method=method, data=body, content_type="application/json",
                                        headers=headers)  # fmt: skip
            assert answer.status_code == 400, (method, path, answer.status_code)
            assert answer.is_json and answer.get_json()["error"], (method, path)
        webhook = portal_client.post("/webhooks/ghl", data=body, headers=signer.headers(body))
        assert webhook.status_code == 400


def test_no_route_answers_500_to_deep_nesting(portal_app, portal_client, tenant_a):
    """Every rule of the app, whatever its method, with a signed-in admin: never a server error."""
    admin = sign_in(portal_client, "company-a")
    for rule in portal_app.url_map.iter_rules():
        path = re.sub(r"<int:[^>]+>", "1", rule.rule.replace("<path:filename>", "portal/portal.js"))
        path = re.sub(r"<[^>]+>", "x", path)
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            answer = portal_client.open(path, method=method, data=NESTED, content_type="application/json",
                                        headers=admin)  # fmt: skip
            assert answer.status_code < 500, (method, rule.rule, answer.status_code)
