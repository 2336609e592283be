"""INSTALL / UNINSTALL webhooks, in any order relative to the OAuth callback; install state queries."""

from __future__ import annotations

import json
from urllib.parse import parse_qs

from sqlalchemy import select

from billing.agencies import ensure_agency, find_agency
from billing.models import RebillClient, UsageEvent
from core.database import db
from ghl.installs import is_agency_installed, is_location_installed
from ghl.locations import list_subaccounts, upsert_location
from ghl.models import GhlCompanyInstall, GhlLocation
from ghl.tokens import UNINSTALLED_REASON
from tests.ghl.fake_ghl import (
    COMPANY_ID,
    INSTALLED_LOCATIONS_URL,
    LOCATION_TOKEN_URL,
    TOKEN_URL,
    deliveries,
    load_payload,
    store_token,
    stored_token,
)

APPROVED = ["l1C08ntBrFjLS0elLIYU", "yLKVZpNppIdYpah4RjNE", "ezgb5h8dePEYGiwg0WSu"]


def install_event(location_id: str | None = None, company_id: str = COMPANY_ID) -> dict:
    if location_id is None:
        return load_payload("install_company") | {"companyId": company_id}
    return load_payload("install_location") | {"companyId": company_id, "locationId": location_id}


def fake_bulk_install(ghl_api) -> None:
    ghl_api.post(TOKEN_URL, json=load_payload("token_company_bulk"))
    ghl_api.get(
        INSTALLED_LOCATIONS_URL,
        json={"locations": [{"_id": loc, "name": f"Name of {loc}", "isInstalled": True} for loc in APPROVED],
              "count": 3},
    )
    ghl_api.add_callback("POST", LOCATION_TOKEN_URL, callback=_mint)


def _mint(request):
    location_id = parse_qs(request.body)["locationId"][0]
    body = load_payload("location_token") | {"locationId": location_id, "access_token": f"access-{location_id}"}
    return 200, {"Content-Type": "application/json"}, json.dumps(body)


def mint_calls(ghl_api) -> list[str]:
    calls = [call for call in ghl_api.calls if call.request.url == LOCATION_TOKEN_URL]
    return sorted(parse_qs(call.request.body)["locationId"][0] for call in calls)


def make_ghl_client(agency_id: int, location_id: str) -> RebillClient:
    client = RebillClient(
        agency_id=agency_id,
        nickname=f"Client of {location_id}",
        provider="ghl",
        location_id=location_id,
        source_key=location_id,
        stripe_product_id="prod_test",
        stripe_price_id="price_test",
        stripe_customer_id="cus_test",
        charge_by="messages",
        billing_unit=10,
        message_source="ghl_outbound",
        status="active",
    )
    db.session.add(client)
    db.session.commit()
    return client


def client_statuses() -> dict[str, str]:
    db.session.expire_all()
    return {c.location_id: c.status for c in db.session.scalars(select(RebillClient))}


# Ordering ----------------------------------------------------------------------------------------


def test_install_webhooks_before_the_callback_then_the_callback_mints_tokens(app_context, client, webhooks, ghl_api):
    fake_bulk_install(ghl_api)
    assert webhooks.send(install_event()).json == {"status": "processed"}
    for location_id in APPROVED:
        assert webhooks.send(install_event(location_id)).json == {"status": "processed"}
    assert len(ghl_api.calls) == 0  # no company token yet: nothing to mint with
    agency = find_agency(COMPANY_ID)
    assert (agency.name, agency.whitelabel_domain) == ("Example Company", "example.com")
    assert is_agency_installed(COMPANY_ID)
    assert sorted(loc.location_id for loc in list_subaccounts(agency.id)) == sorted(APPROVED)

    assert client.get("/oauth/callback?code=bulk").status_code == 303
    assert mint_calls(ghl_api) == sorted(APPROVED)
    db.session.expire_all()
    assert {loc.name for loc in list_subaccounts(agency.id)} == {f"Name of {loc}" for loc in APPROVED}
    assert all(stored_token(loc).user_type == "Location" for loc in APPROVED)
    plan = db.session.scalars(select(GhlCompanyInstall.plan_id)).one()
    assert plan == "66a0419a0dffa47fb5f8b22f"


def test_install_webhooks_after_the_callback_do_not_mint_again(app_context, client, webhooks, ghl_api):
    fake_bulk_install(ghl_api)
    assert client.get("/oauth/callback?code=bulk").status_code == 303
    minted = mint_calls(ghl_api)
    assert minted == sorted(APPROVED)
    for location_id in APPROVED:
        assert webhooks.send(install_event(location_id)).json == {"status": "processed"}
    assert mint_calls(ghl_api) == minted
    assert len(list_subaccounts(find_agency(COMPANY_ID).id)) == 3


def test_a_new_subaccount_install_after_the_callback_mints_its_token(app_context, client, webhooks, ghl_api):
    fake_bulk_install(ghl_api)
    client.get("/oauth/callback?code=bulk")
    assert webhooks.send(install_event("newLocation000000001")).json == {"status": "processed"}
    assert "newLocation000000001" in mint_calls(ghl_api)
    assert stored_token("newLocation000000001").access_token_ciphertext
    assert is_location_installed("newLocation000000001")


def test_a_failed_mint_on_install_keeps_the_install_for_the_token_job(app_context, webhooks, ghl_api):
    store_token(COMPANY_ID)
    ghl_api.post(LOCATION_TOKEN_URL, status=503, json={"message": "busy"})
    assert webhooks.send(install_event("l1C08ntBrFjLS0elLIYU")).json == {"status": "processed"}
    assert is_location_installed("l1C08ntBrFjLS0elLIYU")
    assert stored_token("l1C08ntBrFjLS0elLIYU") is None


def test_an_install_without_company_for_an_unknown_subaccount_fails_and_replays_later(app_context, webhooks, runner):
    payload = load_payload("install_location")
    del payload["companyId"]
    assert webhooks.send(payload).json == {"status": "failed"}
    assert webhooks.send(load_payload("location_create") | {"id": payload["locationId"]}).status_code == 200
    result = runner.invoke(args=["ghl", "replay", "--failed"])
    assert result.exit_code == 0, result.output
    assert "processed=1" in result.output
    assert is_location_installed(payload["locationId"])


def test_install_webhooks_are_idempotent(app_context, webhooks):
    for _ in range(2):
        webhooks.send(install_event())
        webhooks.send(install_event("l1C08ntBrFjLS0elLIYU"))
    assert db.session.query(GhlCompanyInstall).count() == 1
    assert db.session.query(GhlLocation).count() == 1
    assert {d.status for d in deliveries()} == {"processed"}


# Uninstall ---------------------------------------------------------------------------------------


def test_a_location_uninstall_deactivates_it_pauses_its_clients_and_keeps_history(app_context, webhooks):
    agency = ensure_agency(COMPANY_ID)
    for location_id in APPROVED[:2]:
        upsert_location(agency.id, location_id, name=location_id, installed=True)
        store_token(location_id, user_type="Location")
        make_ghl_client(agency.id, location_id)
    store_token(COMPANY_ID)
    gone, kept = APPROVED[:2]
    assert webhooks.send(load_payload("uninstall_location") | {"locationId": gone}).json == {"status": "processed"}
    assert not is_location_installed(gone) and is_location_installed(kept)
    assert client_statuses() == {gone: "paused", kept: "active"}
    location = db.session.scalars(select(GhlLocation).where(GhlLocation.location_id == gone)).one()
    assert location.uninstalled_at is not None  # the row (and its history) stays
    assert (stored_token(gone).needs_reauth, stored_token(gone).reauth_reason) == (True, UNINSTALLED_REASON)
    assert stored_token(kept).needs_reauth is False and stored_token(COMPANY_ID).needs_reauth is False
    message = load_payload("outbound_message") | {"locationId": gone}
    assert webhooks.send(message).json == {"status": "ignored"}
    assert db.session.query(UsageEvent).count() == 0


def test_a_company_uninstall_deactivates_every_subaccount(app_context, webhooks):
    webhooks.send(install_event())
    agency = find_agency(COMPANY_ID)
    for location_id in APPROVED:
        webhooks.send(install_event(location_id))
        make_ghl_client(agency.id, location_id)
    api_channel_client = make_ghl_client(agency.id, "unused")
    api_channel_client.provider, api_channel_client.location_id = "capri_api", None
    api_channel_client.channel_id = api_channel_client.source_key = "support-bot"
    db.session.commit()
    store_token(COMPANY_ID)
    assert webhooks.send(load_payload("uninstall_company") | {"companyId": COMPANY_ID}).json == {
        "status": "processed"
    }
    db.session.expire_all()
    assert api_channel_client.status == "paused"  # nothing keeps billing an agency that left
    assert not is_agency_installed(COMPANY_ID)
    assert not any(is_location_installed(loc) for loc in APPROVED)
    assert list_subaccounts(agency.id) == []
    assert set(client_statuses().values()) == {"paused"}
    assert db.session.query(GhlLocation).count() == 3
    assert stored_token(COMPANY_ID).needs_reauth is True
    # Reinstalling brings the agency back; the subaccounts come back with their own INSTALLs.
    webhooks.send(install_event())
    assert is_agency_installed(COMPANY_ID)


def test_uninstalls_for_unknown_installs_are_acknowledged(app_context, webhooks):
    assert webhooks.send(load_payload("uninstall_location")).json == {"status": "ignored"}
    assert webhooks.send(load_payload("uninstall_company")).json == {"status": "ignored"}
    assert webhooks.send({"type": "UNINSTALL"}).json == {"status": "failed"}


def test_install_state_for_unknown_ids_is_false(app_context):
    assert not is_agency_installed("nobody")
    assert not is_location_installed("nowhere")
