"""POST /webhooks/ghl counts every delivery by outcome and times it, without touching the database for it."""

from __future__ import annotations

from billing.agencies import ensure_agency
from core.database import db
from ghl.locations import upsert_location
from tests.ghl.fake_ghl import COMPANY_ID, encode, load_payload
from tests.metrics_support import Deltas

LOCATION_ID = "ezgb5h8dePEYGiwg0WSu"  # the subaccount of the recorded OutboundMessage


def received(outcome: str) -> tuple[str, dict]:
    return "rebill_ghl_webhooks_received_total", {"outcome": outcome}


def timed(code: str) -> tuple[str, dict]:
    return "rebill_ingest_request_duration_seconds_count", {"endpoint": "ghl_webhook", "code": code}


def test_webhooks_are_counted_by_outcome_and_timed_by_status(app_context, webhooks, signer):
    upsert_location(ensure_agency(COMPANY_ID).id, LOCATION_ID, name="Subaccount", installed=True)
    db.session.commit()
    deltas = Deltas(
        received("processed"), received("duplicate"), received("unauthorized"), received("bad_request"),
        received("other_app"), received("stale"), timed("200"), timed("401"), timed("400"),
    )  # fmt: skip
    body = encode(load_payload("outbound_message"))
    assert webhooks.post(body, signer.headers(body)).status_code == 200
    assert webhooks.post(body, signer.headers(body)).status_code == 200  # GHL delivered it twice
    assert webhooks.post(body, {}).status_code == 401
    assert webhooks.post(b"[1]", signer.headers(b"[1]")).status_code == 400
    assert webhooks.send(load_payload("outbound_message"), app_id="someOtherApp").status_code == 200
    stale = load_payload("outbound_message") | {"timestamp": "2019-05-01T00:00:00Z"}
    assert webhooks.send(stale).status_code == 400
    assert deltas() == [1, 1, 1, 1, 1, 1, 3, 1, 2]


def test_a_stored_but_failed_delivery_is_counted_failed(app_context, webhooks):
    deltas = Deltas(received("failed"))
    assert webhooks.send(load_payload("outbound_message")).json == {"status": "failed"}  # subaccount unknown
    assert deltas() == [1]
