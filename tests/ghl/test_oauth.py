"""The install flow: /oauth/install builds GHL's choose-location URL; /oauth/callback exchanges the code and
stores the install, or ends on an error page (4xx/502, never 500, never the success page)."""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from cryptography.fernet import Fernet
from responses import matchers
from sqlalchemy import select

from billing.agencies import find_agency
from billing.models import Agency
from core.database import db, utcnow
from ghl.installs import is_agency_installed, is_location_installed
from ghl.locations import list_subaccounts
from ghl.models import GhlCompanyInstall, GhlLocation, GhlToken
from ghl.oauth import issue_state, state_is_valid
from ghl.tokens import access_token
from tests.ghl.fake_ghl import (
    API,
    APP_ID,
    CLIENT_ID,
    COMPANY_ID,
    INSTALLED_LOCATIONS_URL,
    LOCATION_TOKEN_URL,
    TOKEN_URL,
    installed_locations_server,
    load_payload,
    stored_token,
)

LOCATION_ID = "l1C08ntBrFjLS0elLIYU"


def form(call) -> dict[str, str]:
    return {key: values[0] for key, values in parse_qs(call.request.body).items()}


def fake_company_install(ghl_api, locations: list[dict], *, approved=None):
    """A bulk company install: the code exchange, paginated installedLocations, and locationToken."""
    answer = load_payload("token_company_bulk")
    if approved is not None:
        answer["approvedLocations"] = approved
    ghl_api.post(TOKEN_URL, json=answer)
    pages = [locations[i : i + 100] for i in range(0, len(locations), 100)] or [[]]
    for index, page in enumerate(pages):
        ghl_api.get(
            INSTALLED_LOCATIONS_URL,
            match=[
                matchers.query_param_matcher(
                    {"companyId": COMPANY_ID, "appId": APP_ID, "isInstalled": "true", "skip": str(index * 100),
                     "limit": "100"}
                )
            ],
            json={"locations": page, "count": len(locations), "installToFutureLocations": True},
        )
    ghl_api.add_callback("POST", LOCATION_TOKEN_URL, callback=mint_callback)


def mint_callback(request):
    fields = {key: values[0] for key, values in parse_qs(request.body).items()}
    body = load_payload("location_token") | {
        "locationId": fields["locationId"],
        "access_token": f"loc-access-{fields['locationId']}",
        "refresh_token": f"loc-refresh-{fields['locationId']}",
    }
    return 200, {"Content-Type": "application/json"}, json.dumps(body)


# /oauth/install -------------------------------------------------------------------------------------


def test_install_redirects_to_the_v2_choose_location_page_with_a_signed_state(app, client):
    response = client.get("/oauth/install")
    assert response.status_code == 302
    url = urlsplit(response.location)
    assert f"{url.scheme}://{url.netloc}{url.path}" == "https://marketplace.gohighlevel.test/v2/oauth/chooselocation"
    query = parse_qs(url.query)
    assert query["response_type"] == ["code"]
    assert query["client_id"] == [CLIENT_ID]
    assert query["redirect_uri"] == ["https://rebill.test/oauth/callback"]
    assert query["scope"] == [app.config["GHL_SCOPES"]]
    assert "%20" in url.query and "+" not in url.query
    with app.test_request_context():
        assert state_is_valid(query["state"][0])
        assert not state_is_valid(query["state"][0] + "x")


def test_install_without_app_credentials_is_a_clear_503(make_app, ghl_config):
    app = make_app(GHL_CLIENT_ID=None, **ghl_config)
    response = app.test_client().get("/oauth/install")
    assert response.status_code == 503
    assert b"not configured" in response.data


# /oauth/callback: location installs -----------------------------------------------------------------


def test_a_location_install_stores_the_encrypted_token_and_the_subaccount(app_context, client, ghl_api):
    answer = load_payload("token_location")
    ghl_api.post(TOKEN_URL, json=answer)
    ghl_api.get(f"{API}/locations/{LOCATION_ID}", json={"location": {"id": LOCATION_ID, "name": "Downtown Dental"}})
    response = client.get("/oauth/callback?code=abc123", follow_redirects=True)
    assert [r.status_code for r in response.history] == [303] and response.status_code == 200
    assert b"Rebill is installed" in response.data
    exchange = form(ghl_api.calls[0])
    assert exchange == {  # no user_type: the code decides the token type (GHL's app template sends none)
        "grant_type": "authorization_code",
        "code": "abc123",
        "redirect_uri": "https://rebill.test/oauth/callback",
        "client_id": CLIENT_ID,
        "client_secret": "test-ghl-client-secret",
    }
    assert ghl_api.calls[0].request.headers["Content-Type"].startswith("application/x-www-form-urlencoded")
    lookup = ghl_api.calls[1].request
    assert lookup.headers["Authorization"] == f"Bearer {answer['access_token']}"
    assert lookup.headers["Version"] == "2021-07-28"
    token = stored_token(LOCATION_ID)
    assert (token.user_type, token.company_id, token.location_id) == ("Location", COMPANY_ID, LOCATION_ID)
    assert answer["access_token"] not in token.access_token_ciphertext
    assert answer["refresh_token"] not in token.refresh_token_ciphertext
    agency = find_agency(COMPANY_ID)
    assert [(loc.location_id, loc.name) for loc in list_subaccounts(agency.id)] == [(LOCATION_ID, "Downtown Dental")]
    assert is_location_installed(LOCATION_ID) and is_location_installed(LOCATION_ID, company_id=COMPANY_ID)
    assert not is_location_installed(LOCATION_ID, company_id="another-company")
    assert not is_agency_installed(COMPANY_ID)  # a subaccount install is not an agency install


@pytest.mark.parametrize("state", [None, "valid"])
def test_callbacks_with_or_without_state_are_accepted(app_context, client, ghl_api, state):
    ghl_api.post(TOKEN_URL, json=load_payload("token_location"))
    ghl_api.get(f"{API}/locations/{LOCATION_ID}", status=403, json={"message": "no scope"})
    query = "code=abc" + (f"&state={issue_state_in(app_context)}" if state else "")
    response = client.get(f"/oauth/callback?{query}", follow_redirects=True)
    assert response.status_code == 200
    assert b"could not be read" in response.data  # the name lookup failed; the install still stands
    assert is_location_installed(LOCATION_ID)


def issue_state_in(app) -> str:
    with app.test_request_context():
        return issue_state()


# /oauth/callback: company (bulk) installs -----------------------------------------------------------


def test_a_bulk_company_install_mints_location_tokens_and_syncs_every_page(app_context, client, ghl_api):
    locations = [{"_id": f"loc{i:03d}", "name": f"Subaccount {i:03d}", "isInstalled": True} for i in range(130)]
    approved = ["loc000", "loc001", "loc129"]
    fake_company_install(ghl_api, locations, approved=approved)
    response = client.get("/oauth/callback?code=bulk", follow_redirects=True)
    assert response.status_code == 200
    assert b"130" in response.data
    company = stored_token(COMPANY_ID)
    assert (company.user_type, company.location_id) == ("Company", None)
    agency = find_agency(COMPANY_ID)
    assert is_agency_installed(COMPANY_ID)
    subaccounts = list_subaccounts(agency.id)
    assert len(subaccounts) == 130
    assert {loc.name for loc in subaccounts if loc.location_id == "loc129"} == {"Subaccount 129"}
    mints = [form(call) for call in ghl_api.calls if call.request.url == LOCATION_TOKEN_URL]
    assert sorted(m["locationId"] for m in mints) == approved
    assert {m["companyId"] for m in mints} == {COMPANY_ID}
    mint_request = next(call.request for call in ghl_api.calls if call.request.url == LOCATION_TOKEN_URL)
    assert mint_request.headers["Version"] == "2021-07-28"
    assert mint_request.headers["Authorization"].startswith("Bearer ")
    for location_id in approved:
        assert stored_token(location_id).user_type == "Location"
    assert stored_token("loc050") is None  # minted later by the token job, not in the callback
    assert db.session.query(GhlToken).count() == 4


@pytest.mark.parametrize("count", [True, False], ids=["with count", "without count"])
def test_a_server_capping_pages_below_our_limit_still_syncs_every_subaccount(app_context, client, ghl_api, count):
    locations = [{"_id": f"loc{i:03d}", "name": f"Subaccount {i:03d}", "isInstalled": True} for i in range(45)]
    ghl_api.post(TOKEN_URL, json=load_payload("token_company_bulk") | {"approvedLocations": []})
    ghl_api.add_callback("GET", INSTALLED_LOCATIONS_URL, callback=installed_locations_server(
        locations, page_cap=20, count=count))
    assert client.get("/oauth/callback?code=capped").status_code == 303
    assert len(list_subaccounts(find_agency(COMPANY_ID).id)) == 45
    skips = [parse_qs(urlsplit(call.request.url).query)["skip"][0]
             for call in ghl_api.calls if call.request.url.startswith(INSTALLED_LOCATIONS_URL)]
    assert skips == ["0", "20", "40"] + ([] if count else ["45"])  # without a count: until an empty page


def test_the_code_exchange_asks_for_no_token_type_and_refreshes_send_the_tokens_own(app_context, client, ghl_api):
    fake_company_install(ghl_api, [], approved=[])
    assert client.get("/oauth/callback?code=bulk").status_code == 303
    assert "user_type" not in form(ghl_api.calls[0])
    token = stored_token(COMPANY_ID)
    assert token.user_type == "Company"
    token.expires_at = utcnow() - dt.timedelta(minutes=1)
    db.session.commit()
    ghl_api.replace("POST", TOKEN_URL, json={"access_token": "a2", "refresh_token": "r2", "expires_in": 86399})
    assert access_token(COMPANY_ID) == "a2"
    assert form(ghl_api.calls[-1])["user_type"] == "Company"


def test_a_failing_location_sync_still_completes_the_install(app_context, client, ghl_api):
    ghl_api.post(TOKEN_URL, json=load_payload("token_company_bulk"))
    ghl_api.get(INSTALLED_LOCATIONS_URL, status=500, json={"message": "boom"})
    ghl_api.post(LOCATION_TOKEN_URL, status=422, json={"message": "not approved"})
    response = client.get("/oauth/callback?code=bulk", follow_redirects=True)
    assert response.status_code == 200
    assert b"could not be read" in response.data
    agency = find_agency(COMPANY_ID)
    assert len(list_subaccounts(agency.id)) == 3  # the approved locations
    assert stored_token(COMPANY_ID) is not None


# /oauth/callback: failures --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "status"),
    [("", 400), ("code=", 400), ("error=access_denied&error_description=User+cancelled", 400)],
)
def test_a_callback_without_a_code_is_a_400_error_page(app_context, client, ghl_api, query, status):
    response = client.get(f"/oauth/callback?{query}")
    assert response.status_code == status
    assert b"could not be installed" in response.data
    assert len(ghl_api.calls) == 0


def test_a_state_we_did_not_sign_is_refused_before_any_exchange(app_context, client, ghl_api):
    response = client.get("/oauth/callback?code=abc&state=forged")
    assert response.status_code == 400
    assert b"not issued by Rebill" in response.data
    assert len(ghl_api.calls) == 0


@pytest.mark.parametrize(
    ("fake", "status"),
    [
        ({"status": 400, "json": {"error": "invalid_grant", "error_description": "Invalid code"}}, 400),
        ({"status": 401, "json": {"message": "Unauthorized"}}, 400),
        ({"status": 422, "json": {"message": ["code expired"]}}, 400),
        ({"status": 200, "json": {"error": "invalid_grant"}}, 400),
        ({"status": 500, "json": {"message": "Internal"}}, 502),
        ({"status": 503, "body": "<html>maintenance</html>"}, 502),
        ({"status": 200, "body": "not json"}, 502),
        ({"status": 200, "json": {"token_type": "Bearer"}}, 502),
        ({"status": 200, "json": load_payload("token_location") | {"locationId": "l" * 65}}, 502),
        ({"status": 200, "json": load_payload("token_company_bulk") | {"companyId": "c" * 65}}, 502),
        ({"status": 200, "body": json.dumps(load_payload("token_location") | {"expires_in": 1e400})}, 502),
        ({"body": requests.ConnectionError("down")}, 502),
        ({"body": requests.Timeout("slow")}, 502),
    ],
    ids=[
        "400", "401", "422", "200-error", "500", "503-html", "not-json", "no-token", "long-location-id",
        "long-company-id", "infinite-lifetime", "network", "timeout",
    ],
)
def test_a_failed_exchange_ends_on_an_error_page_and_stores_nothing(app_context, client, ghl_api, fake, status):
    ghl_api.post(TOKEN_URL, **fake)
    response = client.get("/oauth/callback?code=bad")
    assert response.status_code == status
    assert b"could not be installed" in response.data
    assert b"Rebill is installed" not in response.data
    assert db.session.scalars(select(Agency)).all() == []
    assert db.session.scalars(select(GhlToken)).all() == []


def test_a_huge_token_lifetime_is_clamped_not_a_500(app_context, client, ghl_api):
    ghl_api.post(TOKEN_URL, json=load_payload("token_location") | {"expires_in": 10**30})
    ghl_api.get(f"{API}/locations/{LOCATION_ID}", json={"location": {"id": LOCATION_ID, "name": "Downtown Dental"}})
    assert client.get("/oauth/callback?code=abc123").status_code == 303
    assert stored_token(LOCATION_ID).expires_at - utcnow() < dt.timedelta(days=367)  # refreshed within a year


@pytest.mark.parametrize("approved", [5, "loc0"], ids=["a-number", "a-string"])
def test_approved_locations_that_are_not_a_list_are_ignored(app_context, client, ghl_api, approved):
    fake_company_install(ghl_api, [], approved=approved)
    assert client.get("/oauth/callback?code=bulk").status_code == 303
    assert is_agency_installed(COMPANY_ID)
    assert db.session.scalars(select(GhlLocation)).all() == []  # not one subaccount per character
    assert [call.request.url for call in ghl_api.calls if call.request.url == LOCATION_TOKEN_URL] == []


def test_a_callback_that_cannot_store_is_a_503_page_not_a_500(make_app, ghl_config, ghl_api, backend, tmp_path):
    broken = (
        "postgresql+psycopg://postgres@127.0.0.1:1/rebill"
        if backend == "postgresql"
        else f"sqlite:///{tmp_path}/missing/rebill.sqlite3"
    )
    app = make_app(DATABASE_URL=broken, **ghl_config)
    ghl_api.post(TOKEN_URL, json=load_payload("token_location"))
    response = app.test_client().get("/oauth/callback?code=abc")
    assert response.status_code == 503
    assert b"could not save" in response.data


def test_reinstalling_replaces_the_token_and_reactivates_the_agency(app_context, client, ghl_api):
    fake_company_install(ghl_api, [])
    assert client.get("/oauth/callback?code=one").status_code == 303
    install = db.session.scalars(select(GhlCompanyInstall)).one()
    install.is_installed = False
    db.session.commit()
    assert not is_agency_installed(COMPANY_ID)
    second = load_payload("token_company_bulk") | {"access_token": "second-access", "approvedLocations": []}
    ghl_api.replace("POST", TOKEN_URL, json=second)
    assert client.get("/oauth/callback?code=two").status_code == 303
    assert is_agency_installed(COMPANY_ID)
    assert db.session.scalars(select(GhlToken).where(GhlToken.resource_id == COMPANY_ID)).one()
    assert db.session.query(GhlLocation).count() == 3


# POST/redirect/GET and access logs ------------------------------------------------------------------


def test_a_successful_callback_redirects_so_reloading_never_spends_the_code_again(app_context, client, ghl_api):
    ghl_api.post(TOKEN_URL, json=load_payload("token_location"))
    ghl_api.get(f"{API}/locations/{LOCATION_ID}", json={"location": {"id": LOCATION_ID, "name": "Downtown Dental"}})
    response = client.get("/oauth/callback?code=single-use-code")
    assert response.status_code == 303
    assert response.location.startswith("/oauth/installed?outcome=") and "single-use-code" not in response.location
    calls = len(ghl_api.calls)
    for _ in range(2):  # the page and a reload of it
        page = client.get(response.location)
        assert page.status_code == 200 and b"Rebill is installed in your subaccount" in page.data
        assert (page.headers["Cache-Control"], page.headers["Referrer-Policy"]) == ("no-store", "no-referrer")
    assert len(ghl_api.calls) == calls  # no second exchange, no GHL call at all
    assert response.headers["Referrer-Policy"] == "no-referrer"


def test_an_altered_success_link_claims_no_install(app_context, client):
    page = client.get("/oauth/installed?outcome=eyJ1c2VyX3R5cGUiOiJDb21wYW55In0.forged.sig")
    assert page.status_code == 200
    assert b"installed" not in page.data.split(b"<body>")[1].split(b"Open Rebill")[0]
    assert b"expired" in page.data


def test_the_production_access_log_never_shows_the_oauth_code(tmp_path):
    # Black box: gunicorn exactly as the Procfile starts it, from the repository root (gunicorn.conf.py).
    root = Path(__file__).resolve().parents[2]
    web = next(line for line in (root / "Procfile").read_text().splitlines() if line.startswith("web:"))
    port = free_port()
    command = web.removeprefix("web:").strip().replace("${PORT:-8000}", str(port)).replace("0.0.0.0", "127.0.0.1")
    environ = {
        "PATH": os.environ["PATH"],
        "REBILL_ENV": "production",
        "DATABASE_URL": f"sqlite:///{tmp_path}/rebill.sqlite3",
        "SECRET_KEY": secrets.token_urlsafe(32),  # production refuses a short one
        "REBILL_ENCRYPTION_KEYS": Fernet.generate_key().decode(),
        "GHL_CLIENT_ID": CLIENT_ID,
        "GHL_CLIENT_SECRET": "secret",
        "GHL_API_BASE": "http://127.0.0.1:9",  # never reached: the unsigned state is refused first
    }
    log = tmp_path / "gunicorn.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            ["bash", "-c", f"exec {command}"], cwd=root, env=environ | {"PATH": f"{sys.prefix}/bin:{environ['PATH']}"},
            stdout=out, stderr=subprocess.STDOUT,
        )
        try:
            wait_for_port(port, server)
            answer = requests.get(
                f"http://127.0.0.1:{port}/oauth/callback?code=SECRET-CODE-123&state=x",
                headers={"Referer": "https://app.gohighlevel.com/?code=SECRET-CODE-456"},
                timeout=30,
            )
            assert answer.status_code == 400  # the unsigned state is refused: the code is never even sent
        finally:
            server.terminate()
            server.wait(timeout=30)
    text = log.read_text()
    # gunicorn's access lines are JSON lines too (core.logs): the request line is their message.
    messages = [json.loads(line)["message"] for line in text.splitlines() if line.startswith("{")]
    assert any('"GET /oauth/callback HTTP/1.1" 400' in message for message in messages)
    assert "SECRET-CODE" not in text


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_port(port: int, server: subprocess.Popen, *, seconds: float = 60) -> None:
    """Return once the server accepts connections; fail if it exits or never does."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert server.poll() is None, "gunicorn exited at start"
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    pytest.fail("gunicorn did not start listening")
