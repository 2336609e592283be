"""The GHL API client over a faked transport: versions, timeouts, 401 refresh-once, 429 backoff, typed errors."""

from __future__ import annotations

import pytest
import requests
from responses import matchers

from ghl.client import (
    DEFAULT_TIMEOUT,
    GhlClient,
    GhlError,
    GhlGrantRejected,
    GhlRateLimited,
    GhlRejected,
    GhlResponseInvalid,
    GhlUnauthorized,
    GhlUnavailable,
    TokenGrant,
    retry_delay,
)
from tests.ghl.fake_ghl import API, APP_ID, CLIENT_ID, COMPANY_ID, TOKEN_URL, load_payload, token_answer


class FakeCredentials:
    """Credentials that hand out numbered tokens and count refreshes."""

    def __init__(self):
        self.current = "token-1"
        self.refreshes: list[str] = []

    def access_token(self) -> str:
        return self.current

    def refreshed_access_token(self, rejected: str) -> str:
        self.refreshes.append(rejected)
        self.current = f"token-{len(self.refreshes) + 1}"
        return self.current


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def ghl(sleeps) -> GhlClient:
    return GhlClient(api_base=API, client_id=CLIENT_ID, client_secret="secret", sleep=sleeps.append)


def test_every_call_sends_the_services_version_and_a_timeout(ghl, ghl_api):
    ghl_api.get(f"{API}/locations/loc1", json={"location": {"id": "loc1", "name": "A"}})
    ghl_api.get(f"{API}/conversations/search", json={"conversations": []})
    ghl_api.post(TOKEN_URL, json=token_answer("a", "r", userType="Company", companyId=COMPANY_ID))
    credentials = FakeCredentials()
    assert ghl.get_location(credentials, "loc1") == {"id": "loc1", "name": "A"}
    ghl.request("GET", "/conversations/search", credentials=credentials)
    ghl.refresh("r", user_type="Company")
    location, conversations, token = (call.request for call in ghl_api.calls)
    assert location.headers["Version"] == "2021-07-28"
    assert conversations.headers["Version"] == "2021-04-15"
    assert location.headers["Authorization"] == "Bearer token-1"
    assert "Authorization" not in token.headers  # the token endpoint authenticates in the form body
    assert all(call.request.req_kwargs["timeout"] == DEFAULT_TIMEOUT for call in ghl_api.calls)


def test_a_401_refreshes_once_and_retries(ghl, ghl_api):
    ghl_api.get(
        f"{API}/locations/loc1", status=401, json={"message": "Invalid JWT"},
        match=[matchers.header_matcher({"Authorization": "Bearer token-1"})],
    )
    ghl_api.get(
        f"{API}/locations/loc1", json={"location": {"name": "B"}},
        match=[matchers.header_matcher({"Authorization": "Bearer token-2"})],
    )
    credentials = FakeCredentials()
    assert ghl.get_location(credentials, "loc1") == {"name": "B"}
    assert credentials.refreshes == ["token-1"]


def test_a_second_401_is_final(ghl, ghl_api):
    ghl_api.get(f"{API}/locations/loc1", status=401, json={"message": "Invalid JWT", "traceId": "trace-9"})
    credentials = FakeCredentials()
    with pytest.raises(GhlUnauthorized) as raised:
        ghl.get_location(credentials, "loc1")
    assert credentials.refreshes == ["token-1"]
    assert len(ghl_api.calls) == 2
    assert (raised.value.status, raised.value.trace_id) == (401, "trace-9")


def test_429_backs_off_by_the_rate_limit_headers_then_succeeds(ghl, ghl_api, sleeps):
    window = {"X-RateLimit-Remaining": "0", "X-RateLimit-Interval-Milliseconds": "10000", "X-RateLimit-Max": "100"}
    ghl_api.get(f"{API}/locations/loc1", status=429, headers=window, json={"message": "Too many requests"})
    ghl_api.get(f"{API}/locations/loc1", status=429, headers={"Retry-After": "2"}, json={})
    ghl_api.get(f"{API}/locations/loc1", status=429, json={})
    ghl_api.get(f"{API}/locations/loc1", json={"location": {"name": "C"}})
    assert ghl.get_location(FakeCredentials(), "loc1") == {"name": "C"}
    assert sleeps == [10.0, 2.0, 2.0]  # one window, Retry-After, then 0.5 s * 2^2


def test_429_gives_up_after_the_allowed_attempts(ghl, ghl_api, sleeps):
    ghl_api.get(f"{API}/locations/loc1", status=429, json={})
    with pytest.raises(GhlRateLimited):
        ghl.get_location(FakeCredentials(), "loc1")
    assert len(ghl_api.calls) == 4
    assert sleeps == [0.5, 1.0, 2.0]


def test_a_spent_daily_budget_is_not_retried(ghl, ghl_api, sleeps):
    ghl_api.get(f"{API}/locations/loc1", status=429, headers={"X-RateLimit-Daily-Remaining": "0"}, json={})
    with pytest.raises(GhlRateLimited):
        ghl.get_location(FakeCredentials(), "loc1")
    assert sleeps == [] and len(ghl_api.calls) == 1


def test_429_on_the_token_endpoint_is_backed_off_too(ghl, ghl_api, sleeps):
    ghl_api.post(TOKEN_URL, status=429, headers={"Retry-After": "1"}, json={})
    ghl_api.post(TOKEN_URL, json=token_answer("a2", "r2", userType="Company", companyId=COMPANY_ID))
    grant = ghl.refresh("r1", user_type="Company")
    assert (grant.access_token, grant.refresh_token, grant.company_id) == ("a2", "r2", COMPANY_ID)
    assert sleeps == [1.0]


def test_retry_delay_is_capped():
    assert retry_delay({"Retry-After": "3600"}, 0) == 15.0
    assert retry_delay({}, 10) == 15.0


@pytest.mark.parametrize(
    ("fake", "error"),
    [
        ({"status": 500, "json": {"message": "oops"}}, GhlUnavailable),
        ({"status": 422, "json": {"message": ["locationId must be a string"]}}, GhlRejected),
        ({"status": 404, "body": "not found"}, GhlRejected),
        ({"status": 200, "body": "<html>"}, GhlResponseInvalid),
        ({"status": 200, "json": [1, 2]}, GhlResponseInvalid),
        ({"body": requests.ConnectionError("refused")}, GhlUnavailable),
        ({"body": requests.ReadTimeout("slow")}, GhlUnavailable),
    ],
)
def test_failures_are_typed(ghl, ghl_api, fake, error):
    ghl_api.get(f"{API}/locations/loc1", **fake)
    with pytest.raises(error):
        ghl.get_location(FakeCredentials(), "loc1")


def test_a_rejection_carries_ghls_reason(ghl, ghl_api):
    ghl_api.get(f"{API}/locations/loc1", status=422, json={"message": ["a", "b"], "traceId": "t-1"})
    with pytest.raises(GhlRejected, match="a; b") as raised:
        ghl.get_location(FakeCredentials(), "loc1")
    assert raised.value.trace_id == "t-1"


def test_installed_locations_follows_every_page(ghl, ghl_api):
    for skip, count in ((0, 100), (100, 100), (200, 7)):
        ghl_api.get(
            f"{API}/oauth/installedLocations",
            match=[matchers.query_param_matcher(
                {"companyId": COMPANY_ID, "appId": APP_ID, "isInstalled": "true", "skip": str(skip), "limit": "100"}
            )],
            json={"locations": [{"_id": f"l{skip + i}", "name": f"N{skip + i}"} for i in range(count)],
                  "count": 207},
        )
    locations = ghl.installed_locations(FakeCredentials(), company_id=COMPANY_ID)
    assert len(locations) == 207 and locations[-1].name == "N206"
    assert all(call.request.headers["Version"] == "2021-07-28" for call in ghl_api.calls)


def test_installed_locations_stops_when_a_page_adds_nothing_new(ghl, ghl_api):
    # A server that ignores skip answers the same page forever; count says there are more.
    page = {"locations": [{"_id": f"l{i}"} for i in range(20)], "count": 500}
    ghl_api.get(f"{API}/oauth/installedLocations", json=page)
    assert len(ghl.installed_locations(FakeCredentials(), company_id=COMPANY_ID)) == 20
    assert len(ghl_api.calls) == 2


def test_the_token_endpoint_refusal_is_a_grant_rejection(ghl, ghl_api):
    ghl_api.post(TOKEN_URL, status=400, json={"statusCode": 400, "message": "Location is not active"})
    with pytest.raises(GhlGrantRejected, match="Location is not active") as raised:
        ghl.refresh("r", user_type="Location")
    assert raised.value.status == 400


def test_a_grant_repr_never_shows_tokens():
    grant = TokenGrant.from_response(load_payload("token_company_bulk"))
    assert grant.access_token not in repr(grant) and grant.refresh_token not in repr(grant)
    assert grant.approved_locations == ("l1C08ntBrFjLS0elLIYU", "yLKVZpNppIdYpah4RjNE", "ezgb5h8dePEYGiwg0WSu")
    assert grant.is_bulk_installation and grant.resource_id == COMPANY_ID


def test_the_client_needs_credentials():
    with pytest.raises(GhlError, match="GHL_CLIENT_ID"):
        GhlClient(api_base=API, client_id="", client_secret="")
