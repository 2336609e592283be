"""Schemathesis over the usage API's OpenAPI document, on both databases (issue 10 item 16)."""

from __future__ import annotations

import schemathesis

from tests.api_fuzz import fuzz_document
from tests.capri.conftest import make_keyed_agency


def test_schemathesis_finds_nothing_in_the_usage_api(app, app_context):
    agency = make_keyed_agency("company-a")
    schema = schemathesis.openapi.from_wsgi("/api/v1/openapi.json", app)

    statuses = fuzz_document(schema, app, headers={"Authorization": f"Bearer {agency.key}"}, examples=10)

    assert statuses["POST /api/v1/usage 200"] > 0  # some batches got through to per-event results
