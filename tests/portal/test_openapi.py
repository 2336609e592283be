"""The portal's OpenAPI document: valid, served, covering every portal route, and fuzzed with schemathesis
against the real app on both databases (issue 10 item 16)."""

from __future__ import annotations

import schemathesis
from openapi_spec_validator import validate as validate_openapi_document

from portal.openapi import openapi_document
from tests.api_fuzz import fuzz_document
from tests.portal.conftest import client_fields, sign_in


def test_the_served_document_is_valid_openapi_3_1(portal_client):
    answer = portal_client.get("/api/portal/openapi.json")
    assert answer.status_code == 200
    validate_openapi_document(answer.get_json())
    assert answer.get_json() == openapi_document()


def test_every_portal_route_is_documented(portal_app):
    documented = {(path, method.upper()) for path, item in openapi_document()["paths"].items() for method in item}
    routed = {
        (rule.rule.replace("<int:", "{").replace(">", "}"), method)
        for rule in portal_app.url_map.iter_rules()
        if rule.rule.startswith("/api/portal/")
        for method in rule.methods - {"HEAD", "OPTIONS"}
    }
    # A new portal route goes into portal/openapi.py too, so schemathesis fuzzes it (issue 10 item 16).
    assert routed - documented == set(), "routes missing from portal/openapi.py"
    assert documented - routed == set(), "portal/openapi.py documents routes that do not exist"


def test_schemathesis_finds_nothing_in_the_portal_api(portal_app, portal_client, tenant_a):
    admin = sign_in(portal_client, "company-a")
    portal_client.put("/api/portal/stripe-key", json={"api_key": tenant_a.stripe_key}, headers=admin)
    portal_client.post("/api/portal/clients", json=client_fields(tenant_a), headers=admin)
    schema = schemathesis.openapi.from_wsgi("/api/portal/openapi.json", portal_app)

    statuses = fuzz_document(schema, portal_app, headers=admin, examples=6)

    assert statuses["POST /api/portal/api-keys 201"] > 0  # valid requests got through, not only refusals
