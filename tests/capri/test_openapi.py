"""The OpenAPI document describes the usage API as it really behaves (real requests and answers checked)."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from openapi_core import OpenAPI
from openapi_core.contrib.werkzeug import WerkzeugOpenAPIRequest, WerkzeugOpenAPIResponse
from openapi_spec_validator import validate as validate_openapi_document
from werkzeug.test import EnvironBuilder
from werkzeug.wrappers import Request

from capri.openapi import openapi_document
from capri.validation import COUNT_MAX, check_event
from core.database import utcnow
from tests.capri.conftest import event, iso, make_keyed_agency

USAGE_RESPONSES = set(openapi_document()["paths"]["/api/v1/usage"]["post"]["responses"])


@pytest.fixture(scope="module")
def openapi():
    return OpenAPI.from_dict(openapi_document())


def exchange(client, openapi, *, request_is_valid: bool, method="POST", path="/api/v1/usage", **kwargs):
    """Send one request through the app and check the answer (and, if meant to be valid, the request)."""
    response = client.open(path, method=method, **kwargs)
    request = Request(EnvironBuilder(path=path, method=method, **kwargs).get_environ())
    if request_is_valid:
        openapi.validate_request(WerkzeugOpenAPIRequest(request))
    openapi.validate_response(WerkzeugOpenAPIRequest(request), WerkzeugOpenAPIResponse(response))
    return response


def test_the_served_document_is_valid_openapi_3_1(client):
    response = client.get("/api/v1/openapi.json")
    assert response.status_code == 200
    document = response.get_json()
    validate_openapi_document(document)
    assert document == openapi_document()
    assert document["openapi"].startswith("3.1")


def test_real_requests_and_answers_match_the_document(client, app_context, openapi):
    agency = make_keyed_agency("company-a")
    auth = {"Authorization": f"Bearer {agency.key}"}
    seen = set()

    def send(*, valid: bool, **kwargs):
        response = exchange(client, openapi, request_is_valid=valid, **kwargs)
        seen.add(str(response.status_code))
        return response

    recent = iso(utcnow() - dt.timedelta(minutes=1))
    old = iso(utcnow() - dt.timedelta(days=40))
    good = [
        event(id="a", occurred_at=recent),
        event(id="b", channel=None, location_id="loc-1", model=None, messages=None, occurred_at=recent),
        event(id="c", occurred_at=old),
        event(id="a", occurred_at=recent),
    ]
    response = send(valid=True, json={"events": good}, headers=auth)
    assert [r["status"] for r in response.get_json()["results"]] == ["accepted", "accepted", "accepted", "duplicate"]
    assert response.get_json()["results"][2]["flags"] == ["older_than_35_days"]

    mixed = {"events": [event(id="d", occurred_at=recent), event(id="e", input_tokens=-1), 7]}
    response = send(valid=False, json=mixed, headers=auth)
    assert [r["status"] for r in response.get_json()["results"]] == ["accepted", "rejected", "rejected"]

    send(valid=False, data=b"{not json", headers={**auth, "Content-Type": "application/json"})
    send(valid=False, json={"events": [event(id="n")]})
    send(valid=False, json={"events": [event(id="n")]}, headers={"Authorization": "Bearer nope"})
    send(valid=False, json={"events": [event() for _ in range(1001)]}, headers=auth)
    assert seen == USAGE_RESPONSES


def test_the_document_answer_matches_itself(client, openapi):
    exchange(client, openapi, request_is_valid=True, method="GET", path="/api/v1/openapi.json")


# The event schema and the validator agree: what the API accepts the document allows, and what the document
# allows the API accepts (for timestamps that are in the allowed window: JSON Schema cannot see the clock).
EVENT_SCHEMA = Draft202012Validator(openapi_document()["components"]["schemas"]["UsageEvent"])
NOW = utcnow()
VALID_TIMES = [iso(NOW - dt.timedelta(days=days)) for days in (0, 1, 40)] + ["2025-06-01T10:00:00+02:00"]
text_values = st.one_of(
    st.none(),
    st.text(max_size=300),
    st.text(alphabet=st.characters(codec="ascii"), min_size=1, max_size=70),
    st.integers(),
    st.just(""),
)
count_values = st.one_of(
    st.none(),
    st.integers(min_value=-5, max_value=10),
    st.integers(min_value=10**4 - 2, max_value=10**4 + 2),
    st.integers(min_value=10**8 - 2, max_value=10**8 + 2),
    st.booleans(),
    st.floats(allow_nan=False).filter(lambda number: not number.is_integer()),
    st.text(max_size=3),
)
event_fields = {
    "id": text_values,
    "channel": text_values,
    "location_id": text_values,
    "model": text_values,
    "input_tokens": count_values,
    "output_tokens": count_values,
    "messages": count_values,
    "occurred_at": st.sampled_from(VALID_TIMES),
    "unexpected": st.integers(),
}


printable = st.text(st.characters(exclude_categories=("Cc", "Cs")), min_size=1, max_size=64)


@st.composite
def events(draw):
    """A valid event with zero to three fields replaced, removed or added by arbitrary values."""
    candidate = {"id": draw(printable), "occurred_at": draw(st.sampled_from(VALID_TIMES))}
    candidate[draw(st.sampled_from(["channel", "location_id"]))] = draw(printable)
    for name in draw(st.lists(st.sampled_from(["input_tokens", "output_tokens", "messages"]), min_size=1)):
        candidate[name] = draw(st.integers(min_value=0, max_value=COUNT_MAX[name]))
    if draw(st.booleans()):
        candidate["model"] = draw(printable)
    for name in draw(st.lists(st.sampled_from(sorted(event_fields)), unique=True, max_size=3)):
        if draw(st.booleans()):
            candidate[name] = draw(event_fields[name])
        else:
            candidate.pop(name, None)
    return candidate


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events())
def test_the_event_schema_and_the_validator_agree(candidate):
    accepted = check_event(candidate, utcnow()).record is not None
    assert accepted == EVENT_SCHEMA.is_valid(candidate), (accepted, list(EVENT_SCHEMA.iter_errors(candidate)))
