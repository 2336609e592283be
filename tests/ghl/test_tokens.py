"""Token lifecycle: encrypted at rest, one refresh under concurrency, needs-reauth, re-mint, the token job."""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
from urllib.parse import parse_qs

import psycopg
import pytest
import responses

from billing.agencies import ensure_agency
from core.database import db, utcnow
from ghl.client import GhlUnavailable
from ghl.installs import record_install_event
from ghl.jobs import refresh_expiring_tokens
from ghl.locations import upsert_location
from ghl.models import GhlCompanyInstall
from ghl.tokens import ReauthRequired, TokenMissing, access_token, refresh_access_token
from tests.ghl.fake_ghl import (
    COMPANY_ID,
    LOCATION_TOKEN_URL,
    TOKEN_URL,
    an_hour_ago,
    load_payload,
    store_token,
    stored_token,
    token_answer,
)
from tests.metrics_support import Deltas

LOCATION_ID = "l1C08ntBrFjLS0elLIYU"
REFRESH_OUTCOMES = ("refreshed", "reauth_required", "unavailable")


def form(call) -> dict[str, str]:
    return {key: values[0] for key, values in parse_qs(call.request.body).items()}


def token_calls(ghl_api) -> list:
    return [call for call in ghl_api.calls if call.request.url == TOKEN_URL]


def test_a_fresh_token_is_served_from_the_database_without_calling_ghl(app_context, ghl_api):
    store_token(COMPANY_ID, access="fresh-access")
    assert access_token(COMPANY_ID) == "fresh-access"
    assert len(ghl_api.calls) == 0


def test_an_expiring_token_is_refreshed_and_the_rotated_pair_stored(app_context, ghl_api):
    store_token(COMPANY_ID, access="old-access", refresh="old-refresh", expires_at=an_hour_ago())
    ghl_api.post(TOKEN_URL, json=token_answer("new-access", "new-refresh", userType="Company"))
    assert access_token(COMPANY_ID) == "new-access"
    assert form(token_calls(ghl_api)[0]) == {
        "grant_type": "refresh_token",
        "refresh_token": "old-refresh",
        "user_type": "Company",
        "client_id": "6650aaaabbbbccccdddd0001-lx1abcde",
        "client_secret": "test-ghl-client-secret",
    }
    token = stored_token(COMPANY_ID)
    assert token.expires_at > utcnow() + dt.timedelta(hours=23)
    assert "new-refresh" not in token.refresh_token_ciphertext
    # The next caller uses the new refresh token, never the consumed one.
    token.expires_at = an_hour_ago()
    db.session.commit()
    ghl_api.replace("POST", TOKEN_URL, json=token_answer("third-access", "third-refresh"))
    assert access_token(COMPANY_ID) == "third-access"
    assert form(token_calls(ghl_api)[-1])["refresh_token"] == "new-refresh"


def test_concurrent_callers_make_exactly_one_refresh_call(app, app_context, ghl_api, postgres_only, database_url):
    """N threads find the same expired token; the row lock + re-read lets exactly one of them refresh."""
    store_token(COMPANY_ID, access="old-access", refresh="old-refresh", expires_at=an_hour_ago())
    callers = 6
    barrier = threading.Barrier(callers)
    watcher = psycopg.connect(database_url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True)

    def token_endpoint(request):
        # Hold the refresh until every other caller is blocked on the row lock (a lock-free version would
        # have them all here instead, and the call count below would be N).
        deadline = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=10)
        while dt.datetime.now(dt.UTC) < deadline:
            waiting = watcher.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
            ).fetchone()[0]
            if waiting >= callers - 1:
                break
        return 200, {"Content-Type": "application/json"}, json.dumps(token_answer("new-access", "new-refresh"))

    ghl_api.add_callback("POST", TOKEN_URL, callback=token_endpoint)
    results, errors = [], []

    def caller():
        with app.app_context():
            try:
                barrier.wait()
                results.append(access_token(COMPANY_ID))
            except Exception as error:  # surfaced by the assertion below
                errors.append(error)
            finally:
                db.session.remove()

    threads = [threading.Thread(target=caller) for _ in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    watcher.close()
    assert errors == []
    assert len(token_calls(ghl_api)) == 1
    assert results == ["new-access"] * callers


def test_a_refused_refresh_marks_needs_reauth_and_keeps_the_row(app_context, ghl_api):
    store_token(COMPANY_ID, expires_at=an_hour_ago())
    ghl_api.post(TOKEN_URL, status=400, json={"message": "Location is not active"})
    with pytest.raises(ReauthRequired, match="Location is not active"):
        access_token(COMPANY_ID)
    token = stored_token(COMPANY_ID)
    assert token.needs_reauth is True and "Location is not active" in token.reauth_reason
    with pytest.raises(ReauthRequired):
        access_token(COMPANY_ID)
    assert len(token_calls(ghl_api)) == 1  # a dead token is not retried against GHL


def test_ghl_being_down_during_refresh_leaves_the_token_for_a_later_try(app_context, ghl_api):
    store_token(COMPANY_ID, expires_at=an_hour_ago())
    ghl_api.post(TOKEN_URL, status=502, body="bad gateway")
    with pytest.raises(GhlUnavailable):
        access_token(COMPANY_ID)
    assert stored_token(COMPANY_ID).needs_reauth is False


def test_a_location_whose_refresh_is_refused_is_reminted_from_the_company_token(app_context, ghl_api):
    store_token(COMPANY_ID, access="company-access")
    store_token(LOCATION_ID, user_type="Location", expires_at=an_hour_ago())
    ghl_api.post(TOKEN_URL, status=401, json={"error": "invalid_grant"})
    ghl_api.post(LOCATION_TOKEN_URL, json=load_payload("location_token") | {"access_token": "reminted"})
    assert access_token(LOCATION_ID) == "reminted"
    mint = next(call for call in ghl_api.calls if call.request.url == LOCATION_TOKEN_URL)
    assert mint.request.headers["Authorization"] == "Bearer company-access"
    assert form(mint) == {"companyId": COMPANY_ID, "locationId": LOCATION_ID}
    assert stored_token(LOCATION_ID).needs_reauth is False


def test_a_location_with_no_way_back_needs_reauth(app_context, ghl_api):
    store_token(COMPANY_ID, access="company-access")
    store_token(LOCATION_ID, user_type="Location", expires_at=an_hour_ago())
    ghl_api.post(TOKEN_URL, status=401, json={"error": "invalid_grant"})
    ghl_api.post(LOCATION_TOKEN_URL, status=400, json={"message": "app not installed"})
    with pytest.raises(ReauthRequired):
        access_token(LOCATION_ID)
    assert stored_token(LOCATION_ID).needs_reauth is True
    assert stored_token(COMPANY_ID).needs_reauth is False


def test_a_401_rejected_token_is_refreshed_unless_someone_already_did(app_context, ghl_api):
    store_token(COMPANY_ID, access="current")
    assert refresh_access_token(COMPANY_ID, rejected="older") == "current"
    assert len(ghl_api.calls) == 0
    ghl_api.post(TOKEN_URL, json=token_answer("after-401", "r2"))
    assert refresh_access_token(COMPANY_ID, rejected="current") == "after-401"


def test_unknown_resources_have_no_token(app_context):
    with pytest.raises(TokenMissing):
        access_token("nobody")


def test_tokens_never_reach_the_logs(app_context, ghl_api, caplog):
    store_token(COMPANY_ID, access="plain-old-access", refresh="plain-old-refresh", expires_at=an_hour_ago())
    ghl_api.post(TOKEN_URL, json=token_answer("plain-new-access", "plain-new-refresh"))
    with caplog.at_level(logging.DEBUG):
        for name in ("ghl", "ghl.tokens", "ghl.client"):
            logging.getLogger(name).addHandler(caplog.handler)
        try:
            access_token(COMPANY_ID)
            ghl_api.replace("POST", TOKEN_URL, status=400, json={"message": "dead"})
            stored = stored_token(COMPANY_ID)
            stored.expires_at = an_hour_ago()
            db.session.commit()
            with pytest.raises(ReauthRequired):
                access_token(COMPANY_ID)
        finally:
            for name in ("ghl", "ghl.tokens", "ghl.client"):
                logging.getLogger(name).removeHandler(caplog.handler)
    logged = "\n".join(record.getMessage() + str(getattr(record, "fields", "")) for record in caplog.records)
    assert "GHL token refreshed" in logged
    for secret in ("plain-old-access", "plain-old-refresh", "plain-new-access", "plain-new-refresh"):
        assert secret not in logged


def test_the_token_job_refreshes_expiring_tokens_and_mints_missing_ones(app_context, ghl_api):
    agency = ensure_agency(COMPANY_ID)
    db.session.add(GhlCompanyInstall(agency_id=agency.id))
    upsert_location(agency.id, LOCATION_ID, installed=True)
    upsert_location(agency.id, "uninstalledLocation0", installed=False)
    db.session.commit()
    store_token(COMPANY_ID, access="company-access", expires_at=utcnow() + dt.timedelta(minutes=30))
    store_token("otherCompany", company_id="otherCompany")  # fresh: left alone
    store_token("deadCompany", company_id="deadCompany", expires_at=an_hour_ago())
    stored_token("deadCompany").needs_reauth = True
    db.session.commit()
    ghl_api.post(TOKEN_URL, json=token_answer("company-refreshed", "r2"))
    ghl_api.post(LOCATION_TOKEN_URL, json=load_payload("location_token"))
    summary = refresh_expiring_tokens()
    assert (summary.refreshed, summary.minted, summary.needs_reauth, summary.unavailable) == (1, 1, 0, 0)
    assert len(token_calls(ghl_api)) == 1
    assert stored_token(LOCATION_ID).user_type == "Location"
    assert stored_token("uninstalledLocation0") is None
    again = refresh_expiring_tokens()
    assert (again.refreshed, again.minted) == (0, 0)
    assert len(ghl_api.calls) == 2


def test_the_token_job_counts_dead_and_unreachable_tokens(app_context, ghl_api):
    store_token("companyA", company_id="companyA", refresh="refresh-a", expires_at=an_hour_ago())
    store_token("companyB", company_id="companyB", refresh="refresh-b", expires_at=an_hour_ago())

    def by_token(request):
        if parse_qs(request.body)["refresh_token"] == ["refresh-a"]:
            return 401, {}, json.dumps({"error": "invalid_grant"})
        return 503, {}, "unavailable"

    ghl_api.add_callback("POST", TOKEN_URL, callback=by_token)
    summary = refresh_expiring_tokens()
    assert (summary.needs_reauth, summary.unavailable, summary.refreshed) == (1, 1, 0)
    assert stored_token("companyA").needs_reauth and not stored_token("companyB").needs_reauth


def test_an_install_webhook_mints_with_a_company_token_that_needs_refreshing(app_context, ghl_api):
    store_token(COMPANY_ID, expires_at=an_hour_ago())
    ghl_api.post(TOKEN_URL, json=token_answer("company-refreshed", "r2"))
    ghl_api.post(LOCATION_TOKEN_URL, json=load_payload("location_token"))
    record_install_event(load_payload("install_location") | {"companyId": COMPANY_ID, "locationId": LOCATION_ID})
    db.session.commit()
    mint = next(call for call in ghl_api.calls if call.request.url == LOCATION_TOKEN_URL)
    assert mint.request.headers["Authorization"] == "Bearer company-refreshed"
    assert stored_token(LOCATION_ID) is not None


def test_token_refreshes_are_counted_by_outcome(app_context, ghl_api):
    deltas = Deltas(*(("rebill_ghl_token_refreshes_total", {"outcome": o}) for o in REFRESH_OUTCOMES))
    store_token(COMPANY_ID, expires_at=an_hour_ago())
    ghl_api.post(TOKEN_URL, status=502, body="bad gateway")
    with pytest.raises(GhlUnavailable):
        access_token(COMPANY_ID)
    ghl_api.replace(responses.POST, TOKEN_URL, json=token_answer("new-access", "new-refresh", userType="Company"))
    assert access_token(COMPANY_ID) == "new-access"
    store_token(LOCATION_ID, user_type="Location", expires_at=an_hour_ago())
    ghl_api.replace(responses.POST, TOKEN_URL, status=401, json={"error": "invalid_grant"})
    ghl_api.post(LOCATION_TOKEN_URL, status=400, json={"message": "Location is not active"})
    with pytest.raises(ReauthRequired):
        access_token(LOCATION_ID)
    assert deltas() == [1, 1, 1]
