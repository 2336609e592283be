"""POST /webhooks/ghl: real signatures, raw-body verification, store-then-process, dedupe, 429 when it cannot store."""

from __future__ import annotations

import datetime as dt
import json
import threading
from unittest import mock

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import select, update
from werkzeug.datastructures import EnvironHeaders

from billing.agencies import ensure_agency, find_agency
from billing.cli import SCHEDULED_JOBS
from billing.models import UsageEvent
from core.config import ConfigError
from core.database import db, utcnow
from ghl.deliveries import DELIVERY_MAX_AGE, DELIVERY_MAX_AHEAD, DELIVERY_RETENTION, prune_deliveries
from ghl.installs import is_agency_installed
from ghl.locations import upsert_location
from ghl.models import GhlCompanyInstall, GhlLocation, GhlWebhookDelivery
from ghl.signatures import WebhookVerifier
from ghl.webhooks import WsgiHeaders
from tests.conftest import drop_connections
from tests.ghl.fake_ghl import (
    APP_ID,
    COMPANY_ID,
    Signer,
    WebhookSender,
    deliveries,
    delivery_count,
    encode,
    load_payload,
    public_pem,
)

LOCATION_ID = "ezgb5h8dePEYGiwg0WSu"  # the real OutboundMessage delivery's subaccount


def install_location(location_id: str = LOCATION_ID, *, installed: bool = True) -> int:
    agency = ensure_agency(COMPANY_ID)
    upsert_location(agency.id, location_id, name="Test subaccount", installed=installed)
    db.session.commit()
    return agency.id


def usage_events() -> list[UsageEvent]:
    db.session.expire_all()
    return list(db.session.scalars(select(UsageEvent).order_by(UsageEvent.id)))


# Signatures ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["ed25519", "rsa"])
def test_a_signed_outbound_message_is_stored_and_recorded_as_usage(app_context, webhooks, scheme):
    agency_id = install_location()
    response = webhooks.send(load_payload("outbound_message"), scheme=scheme)
    assert response.status_code == 200
    assert response.json == {"status": "processed"}
    [delivery] = deliveries()
    assert (delivery.event_type, delivery.signature_scheme, delivery.status) == ("OutboundMessage", scheme, "processed")
    assert delivery.location_id == LOCATION_ID
    [event] = usage_events()
    assert (event.agency_id, event.source, event.source_event_id) == (agency_id, "ghl", "cXcYRmGhooTfw05RZhiK")
    assert (event.location_id, event.messages, event.direction, event.channel_id) == (LOCATION_ID, 1, "outbound", None)
    assert event.input_tokens == event.output_tokens == 0 and event.model is None
    assert event.occurred_at.isoformat() == "2026-02-26T15:40:14.307000+00:00"


def test_the_raw_body_is_verified_not_a_reserialisation(app_context, webhooks, signer):
    install_location()
    payload = load_payload("outbound_message") | {"appId": APP_ID, "timestamp": utcnow().isoformat()}
    body = json.dumps(payload, indent=1).encode()  # odd spacing
    assert webhooks.post(body, signer.headers(body)).status_code == 200
    assert delivery_count() == 1


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"X-GHL-Signature": ""},
        {"X-GHL-Signature": "not base64 at all!!"},
        {"X-GHL-Signature": "c2hvcnQ="},  # valid base64, wrong length
        {"X-WH-Signature": "bm9wZQ=="},
        {"X-Signature": "whatever"},
    ],
    ids=["missing", "empty", "garbled", "short", "rsa-garbage", "other-header"],
)
def test_missing_or_garbled_signatures_are_refused_and_nothing_is_stored(app_context, webhooks, headers):
    install_location()
    response = webhooks.post(encode(load_payload("outbound_message")), headers)
    assert response.status_code == 401
    assert "signature" in response.json["error"]
    assert delivery_count() == 0 and usage_events() == []


@pytest.mark.parametrize("case", ["forged", "plan change", "unknown type", "message"])
def test_each_delivery_has_its_signature_checked_once(app_context, webhooks, case):
    # On PostgreSQL the hot-path dispatch in front of Flask checks every delivery and hands what is not a
    # stored message (a refusal, another type) to the route with its verdict; a second check would double
    # the cost of a flood of forged deliveries. A spy that calls the real verifier counts the checks.
    install_location()
    payload = {"plan change": load_payload("plan_change"), "unknown type": {"type": "ContactCreate", "id": "c1"}}.get(
        case, load_payload("outbound_message")
    )
    body = encode(payload)
    headers = (Signer() if case == "forged" else webhooks.signer).headers(body)
    with mock.patch.object(WebhookVerifier, "verify", autospec=True, side_effect=WebhookVerifier.verify) as verify:
        response = webhooks.post(body, headers)
    assert response.status_code == (401 if case == "forged" else 200)
    assert verify.call_count == 1


@pytest.mark.parametrize("scheme", ["ed25519", "rsa"])
def test_a_signature_by_another_key_is_refused(app_context, webhooks, scheme):
    forger = Signer()
    body = encode(load_payload("outbound_message"))
    assert webhooks.post(body, forger.headers(body, scheme)).status_code == 401
    assert delivery_count() == 0


@pytest.mark.parametrize("scheme", ["ed25519", "rsa"])
def test_a_body_altered_after_signing_is_refused(app_context, webhooks, signer, scheme):
    install_location()
    body = encode(load_payload("outbound_message"))
    headers = signer.headers(body, scheme)
    altered = body.replace(b'"Hi there"', b'"Hi there!"')
    assert altered != body
    assert webhooks.post(altered, headers).status_code == 401
    assert delivery_count() == 0 and usage_events() == []


def test_ed25519_is_checked_first_and_never_falls_back_to_rsa(app_context, webhooks, signer):
    body = encode(load_payload("plan_change"))
    valid_rsa_bad_ed = {"X-GHL-Signature": Signer().ed25519(body), "X-WH-Signature": signer.rsa(body)}
    assert webhooks.post(body, valid_rsa_bad_ed).status_code == 401
    valid_ed_bad_rsa = {"X-GHL-Signature": signer.ed25519(body), "X-WH-Signature": "bm9wZQ=="}
    assert webhooks.post(body, valid_ed_bad_rsa).status_code == 200
    assert [d.signature_scheme for d in deliveries()] == ["ed25519"]


def test_the_default_keys_are_ghls_published_ones(make_app, signer):
    app = make_app()  # no key overrides
    body = encode(load_payload("plan_change"))
    assert app.test_client().post("/webhooks/ghl", data=body, headers=signer.headers(body)).status_code == 401


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("GHL_WEBHOOK_ED25519_KEY", "-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n"),
        ("GHL_WEBHOOK_RSA_KEY", "not a pem"),
    ],
)
def test_a_malformed_key_stops_the_start(make_app, setting, value):
    with pytest.raises(ConfigError, match=setting):
        make_app(**{setting: value})


HEADER_NAMES = st.sampled_from(["X-GHL-Signature", "X-WH-Signature", "x-ghl-signature", "X_GHL_Signature",
                                "Content-Type", "content-length", "Authorization"]) | st.text(max_size=12)  # fmt: skip


@given(
    names=st.lists(HEADER_NAMES, max_size=6),
    values=st.lists(st.text(max_size=8), max_size=6),
    lookup=HEADER_NAMES,
    default=st.none() | st.text(max_size=3),
)
def test_the_dispatch_reads_a_header_as_werkzeug_does(names, values, lookup, default):
    # MessageWebhookDispatch reads the signature headers with WsgiHeaders instead of building werkzeug's
    # EnvironHeaders per delivery: the same environ key, so the same value, for any name.
    environ = {"REQUEST_METHOD": "POST"}
    for name, value in zip(names, values, strict=False):
        key = name.upper().replace("-", "_")
        environ[key if key in ("CONTENT_TYPE", "CONTENT_LENGTH") else f"HTTP_{key}"] = value
    assert WsgiHeaders(environ).get(lookup, default) == EnvironHeaders(environ).get(lookup, default)
    assert WsgiHeaders(environ).get(lookup) == EnvironHeaders(environ).get(lookup)


def test_a_key_of_the_wrong_type_stops_the_start(make_app, signer):
    with pytest.raises(ConfigError, match="GHL_WEBHOOK_ED25519_KEY"):
        make_app(GHL_WEBHOOK_ED25519_KEY=public_pem(signer.rsa_key))


# Bad bodies, other apps ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [b"not json", b"[1, 2]", b'"INSTALL"', b"null", b"\xff\xfe{}", b'{"a":' * 200_000 + b"1" + b"}" * 200_000],
    ids=["text", "array", "string", "null", "not-utf8", "absurdly-nested"],
)
def test_a_signed_body_that_is_not_a_json_object_is_a_400_and_stores_nothing(app_context, webhooks, signer, body):
    response = webhooks.post(body, signer.headers(body))
    assert response.status_code == 400
    assert "error" in response.json
    assert delivery_count() == 0


def test_another_apps_webhook_is_acknowledged_and_ignored(app_context, webhooks):
    install_location()
    response = webhooks.send(load_payload("outbound_message"), app_id="698de27f462dc22d054c5cf5")
    assert response.status_code == 200
    assert response.json["status"] == "ignored"
    assert delivery_count() == 0 and usage_events() == []


# Dedupe -------------------------------------------------------------------------------------------


def test_a_redelivered_webhook_is_a_200_duplicate_stored_once(app_context, webhooks):
    install_location()
    first = webhooks.send(load_payload("outbound_message"), webhook_id="wh-same")
    again = webhooks.send(load_payload("outbound_message"), webhook_id="wh-same")
    assert (first.status_code, again.status_code) == (200, 200)
    assert again.json == {"status": "duplicate"}
    assert delivery_count() == 1 and len(usage_events()) == 1


def test_without_a_webhook_id_the_body_hash_dedupes(app_context, webhooks, signer):
    install_location()
    body = encode(load_payload("outbound_message"), webhook_id=None)
    assert webhooks.post(body, signer.headers(body)).status_code == 200
    assert webhooks.post(body, signer.headers(body)).json == {"status": "duplicate"}
    [delivery] = deliveries()
    assert delivery.webhook_id.startswith("sha256:")


def test_a_message_delivered_in_two_webhooks_counts_once(app_context, webhooks):
    install_location()
    assert webhooks.send(load_payload("outbound_message")).json == {"status": "processed"}
    assert webhooks.send(load_payload("outbound_message")).json == {"status": "ignored"}
    assert [d.status for d in deliveries()] == ["processed", "ignored"]
    assert "already recorded" in deliveries()[1].error
    assert len(usage_events()) == 1


@pytest.mark.parametrize("retry_first", [False, True], ids=["in order", "retry delivered first"])
def test_a_retried_message_counts_once_across_its_attempts(app_context, webhooks, retry_first):
    # GHL sends a retried message with a new messageId and originalMessageId naming the first attempt.
    install_location()
    first = load_payload("outbound_message")
    retries = [
        first | {"messageId": f"retryAttempt{n:08d}", "originalMessageId": first["messageId"], "status": "delivered"}
        for n in (1, 2)
    ]
    order = [*retries, first] if retry_first else [first, *retries]
    assert [webhooks.send(payload).json["status"] for payload in order] == ["processed", "ignored", "ignored"]
    [event] = usage_events()
    assert (event.source_event_id, event.messages) == (first["messageId"], 1)
    assert all(f"message {first['messageId']} was already recorded" in d.error for d in deliveries()[1:])


# Processing ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["inbound_message_sms", "inbound_message_email"])
def test_inbound_messages_are_recorded_inbound(app_context, webhooks, fixture):
    payload = load_payload(fixture)
    install_location(payload["locationId"])
    assert webhooks.send(payload).status_code == 200
    [event] = usage_events()
    assert (event.direction, event.source_event_id, event.location_id) == (
        "inbound",
        payload["messageId"],
        payload["locationId"],
    )


def test_messages_of_an_uninstalled_subaccount_are_stored_not_counted(app_context, webhooks):
    install_location(installed=False)
    response = webhooks.send(load_payload("outbound_message"))
    assert response.json == {"status": "ignored"}
    [delivery] = deliveries()
    assert "not installed" in delivery.error
    assert usage_events() == []


def test_a_processing_error_is_recorded_on_the_stored_delivery_and_answered_200(app_context, webhooks):
    payload = load_payload("inbound_message_sms_doc")  # the doc example: no messageId
    install_location(payload["locationId"])
    response = webhooks.send(payload)
    assert response.status_code == 200
    assert response.json == {"status": "failed"}
    [delivery] = deliveries()
    assert delivery.status == "failed" and delivery.attempts == 1
    assert "messageId" in delivery.error
    assert usage_events() == []


@pytest.mark.parametrize("fixture", ["plan_change", "unknown"])
def test_plan_changes_and_unknown_types_are_stored_and_acknowledged(app_context, webhooks, fixture):
    payload = load_payload("plan_change") if fixture == "plan_change" else {"type": "ContactCreate", "id": "c1"}
    response = webhooks.send(payload)
    assert response.status_code == 200
    [delivery] = deliveries()
    assert delivery.status == "ignored"
    assert json.loads(delivery.body)["type"] == payload["type"]


@pytest.mark.parametrize("payload", [{"hello": "world"}, {"type": ["OutboundMessage"]}, {"type": {"a": 1}}])
def test_a_body_without_a_type_is_stored_and_acknowledged(app_context, webhooks, payload):
    assert webhooks.send(payload).status_code == 200
    [delivery] = deliveries()
    assert (delivery.event_type, delivery.status) == ("", "ignored")


@pytest.mark.parametrize("fixture", ["location_create", "location_update"])
def test_location_events_use_id_as_the_subaccount_and_keep_its_name(app_context, webhooks, fixture):
    assert webhooks.send(load_payload(fixture)).json == {"status": "processed"}
    location = db.session.scalars(select(GhlLocation)).one()
    assert (location.location_id, location.name) == ("ve9EPM428h8vShlRW1KT", "Loram ipsum")
    assert location.is_installed is False  # GHL told us it exists, not that Rebill is installed in it
    renamed = load_payload("location_update") | {"name": "Renamed"}
    webhooks.send(renamed)
    db.session.expire_all()
    assert db.session.scalars(select(GhlLocation)).one().name == "Renamed"
    assert deliveries()[0].location_id == "ve9EPM428h8vShlRW1KT"
    assert webhooks.send(load_payload("location_update") | {"name": "Nul\x00Name"}).json == {"status": "processed"}
    db.session.expire_all()
    assert db.session.scalars(select(GhlLocation)).one().name == "NulName"


def test_an_overlong_id_fails_processing_but_the_delivery_is_kept(app_context, webhooks):
    payload = load_payload("outbound_message") | {"locationId": "x" * 300}
    assert webhooks.send(payload).json == {"status": "failed"}
    [delivery] = deliveries()
    assert delivery.location_id == "x" * 64 and "longer than" in delivery.error


# Cannot persist -----------------------------------------------------------------------------------


def test_when_the_database_is_down_a_signed_webhook_gets_429(make_app, ghl_config, signer, backend, tmp_path):
    broken = (
        "postgresql+psycopg://postgres@127.0.0.1:1/rebill"
        if backend == "postgresql"
        else f"sqlite:///{tmp_path}/missing-directory/rebill.sqlite3"
    )
    app = make_app(DATABASE_URL=broken, **ghl_config)
    body = encode(load_payload("outbound_message"))
    response = app.test_client().post("/webhooks/ghl", data=body, headers=signer.headers(body))
    assert response.status_code == 429
    assert "retry" in response.json["error"]
    unsigned = app.test_client().post("/webhooks/ghl", data=body)
    assert unsigned.status_code == 401  # verification still comes first


def test_a_database_error_while_processing_still_stores_the_delivery(app_context, webhooks, backend):
    install_location()
    # PostgreSQL refuses NUL characters in text; the delivery body keeps the JSON escape, so it can be stored.
    payload = load_payload("outbound_message") | {"messageId": "bad\u0000id"}
    response = webhooks.send(payload)
    assert response.status_code == 200
    [delivery] = deliveries()
    if backend == "postgresql":
        assert response.json == {"status": "failed"}
        assert delivery.status == "failed" and "DataError" in delivery.error
        assert usage_events() == []
    else:  # SQLite stores NULs
        assert response.json == {"status": "processed"}
        assert len(usage_events()) == 1


def test_a_connection_the_database_dropped_is_retried_not_answered_429(app_context, webhooks, database_url, backend):
    install_location()
    assert webhooks.send(load_payload("outbound_message") | {"messageId": "before"}).json == {"status": "processed"}
    if backend == "postgresql":
        db.session.close()  # the test's own session gives its connection back: every pooled one is the app's
        assert drop_connections(database_url) >= 1  # a database restart: the pool still holds the dead connections
    assert webhooks.send(load_payload("outbound_message") | {"messageId": "after"}).json == {"status": "processed"}
    assert [d.status for d in deliveries()] == ["processed", "processed"]
    assert [e.source_event_id for e in usage_events()] == ["before", "after"]


# The one-statement path (PostgreSQL) --------------------------------------------------------------


@pytest.mark.parametrize("case", ["unknown subaccount", "not installed", "message recorded before"])
def test_a_webhook_stores_the_outcome_a_replay_of_it_records(app_context, webhooks, runner, case):
    # PostgreSQL stores and records a message in one statement; replays (and SQLite) go through ghl.events.
    # Both must leave the same status and error, and a replay must not count anything again.
    if case != "unknown subaccount":
        install_location(installed=case != "not installed")
    if case == "message recorded before":
        webhooks.send(load_payload("outbound_message"))
    webhooks.send(load_payload("outbound_message"))
    stored = deliveries()[-1]
    outcome = (stored.status, stored.error, stored.attempts, stored.processed_at is None)
    assert outcome[0] == ("failed" if case == "unknown subaccount" else "ignored")
    assert outcome[3] == (case == "unknown subaccount")  # a failure is not processed: it stays replayable
    counted = len(usage_events())
    assert runner.invoke(args=["ghl", "replay", "--id", str(stored.id)]).exit_code in (0, 1)
    replayed = deliveries()[-1]
    assert (replayed.status, replayed.error, replayed.processed_at is None) == (outcome[0], outcome[1], outcome[3])
    assert replayed.attempts == outcome[2] + 1
    assert len(usage_events()) == counted


@pytest.mark.parametrize("same_webhook", [True, False], ids=["one webhook twice", "one message in two webhooks"])
def test_two_copies_in_flight_at_once_count_once(app, signer, postgres_only, same_webhook):
    with app.app_context():
        install_location()
    bodies = [
        encode(load_payload("outbound_message"), webhook_id="wh-race" if same_webhook else f"wh-race-{n}")
        for n in range(2)
    ]
    barrier = threading.Barrier(2)
    answers: list[str] = []

    def deliver(body: bytes) -> None:
        client = app.test_client()
        barrier.wait()
        answers.append(client.post("/webhooks/ghl", data=body, headers=signer.headers(body)).json["status"])

    threads = [threading.Thread(target=deliver, args=(body,)) for body in bodies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with app.app_context():
        assert len(usage_events()) == 1
        if same_webhook:
            assert sorted(answers) == ["duplicate", "processed"] and delivery_count() == 1
        else:
            # The second usage INSERT waits on the first's unique-index entry, so its delivery says why.
            assert sorted(answers) == ["ignored", "processed"]
            [ignored] = [d for d in deliveries() if d.status == "ignored"]
            assert "already recorded" in ignored.error


def test_a_message_date_beyond_year_9999_in_utc_still_counts_the_message(app_context, webhooks):
    install_location()
    payload = load_payload("outbound_message") | {"dateAdded": "9999-12-31T23:59:59-05:00"}
    assert webhooks.send(payload).json == {"status": "processed"}
    [event] = usage_events()
    assert event.occurred_at.year == dt.datetime.now(dt.UTC).year  # unreadable: the time it arrived


def test_an_install_whose_company_name_holds_a_nul_is_processed(app_context, webhooks):
    payload = load_payload("install_company") | {"companyName": "Acme\u0000 Agency"}
    assert webhooks.send(payload).json == {"status": "processed"}
    assert find_agency(payload["companyId"]).name == "Acme Agency"


# Only this app's deliveries (appId) ------------------------------------------------------------------


@pytest.mark.parametrize("app_id", [None, "698de27f462dc22d054c5cf5", ""], ids=["missing", "another app", "empty"])
@pytest.mark.parametrize("fixture", ["install_company", "install_location", "uninstall_company", "plan_change"])
def test_installs_uninstalls_and_plan_changes_need_our_app_id(app_context, webhooks, caplog, fixture, app_id):
    install_company(COMPANY_ID)
    payload = load_payload(fixture) | {"companyId": COMPANY_ID}
    payload.pop("appId")
    response = webhooks.send(payload, app_id=app_id)
    assert (response.status_code, response.json["status"]) == (200, "ignored")
    assert delivery_count() == 0
    assert [loc.location_id for loc in db.session.scalars(select(GhlLocation))] == []
    assert is_agency_installed(COMPANY_ID)  # the UNINSTALL changed nothing
    assert find_agency("otg8dTQqGLh3Q6iQI55w") is None  # nor did the INSTALL create anything
    [record] = [r for r in caplog.records if r.name == "ghl.webhooks"]
    assert record.fields["type"] == payload["type"] and record.fields["reason"]


def test_an_install_with_our_app_id_is_processed(app_context, webhooks):
    assert webhooks.send(load_payload("install_company")).json == {"status": "processed"}
    assert is_agency_installed(load_payload("install_company")["companyId"])


def test_messages_without_an_app_id_still_count_and_another_apps_never(app_context, webhooks):
    # Message types are compared only when they carry an appId: a copy of a message can never count twice
    # (messageId), and dropping GHL's own delivery would lose usage.
    install_location()
    without_app_id = load_payload("outbound_message")
    del without_app_id["appId"]  # the recorded delivery names the app it was captured from
    assert webhooks.send(without_app_id, app_id=None).json == {"status": "processed"}
    other = load_payload("outbound_message") | {"messageId": "from-another-app"}
    assert webhooks.send(other, app_id="698de27f462dc22d054c5cf5").json["status"] == "ignored"
    assert [e.source_event_id for e in usage_events()] == ["cXcYRmGhooTfw05RZhiK"]


def test_ghl_app_id_overrides_the_id_taken_from_the_client_id(make_app, ghl_config, signer):
    app = make_app(GHL_APP_ID="the-real-app-id", **ghl_config)
    sender = WebhookSender(app.test_client(), signer)
    with app.app_context():
        assert sender.send(load_payload("install_company")).json["status"] == "ignored"  # APP_ID is not it
        assert sender.send(load_payload("install_company"), app_id="the-real-app-id").json == {"status": "processed"}


# Stale deliveries ----------------------------------------------------------------------------------


def ghl_time(delta: dt.timedelta) -> str:
    return (utcnow() + delta).isoformat().replace("+00:00", "Z")


# One fixture per intake path: a message (one statement on PostgreSQL), LocationUpdate (one transaction)
# and an INSTALL (stored, committed, then processed). Every path must answer the same.
PATHS = ["outbound_message", "location_update", "install_location"]


@pytest.mark.parametrize(
    "sent",
    [
        "2019-06-01T12:00:00.000Z",
        -DELIVERY_MAX_AGE - dt.timedelta(minutes=1),  # offsets from now, taken when the test runs
        DELIVERY_MAX_AHEAD + dt.timedelta(minutes=1),
        None,
        "yesterday",
        12345,
    ],
    ids=["2019", "just-past-the-window", "ahead", "missing", "unreadable", "not-a-string"],
)
@pytest.mark.parametrize("fixture", PATHS)
def test_a_stale_or_undated_delivery_is_refused_on_every_path(app_context, webhooks, signer, caplog, fixture, sent):
    install_location()
    payload = load_payload(fixture) | {"webhookId": "wh-fresh-id", "appId": APP_ID}
    if sent is not None:
        payload["timestamp"] = ghl_time(sent) if isinstance(sent, dt.timedelta) else sent
    body = json.dumps(payload, separators=(",", ":")).encode()
    response = webhooks.post(body, signer.headers(body))
    assert response.status_code == 400
    assert "timestamp" in response.json["error"]
    assert delivery_count() == 0 and usage_events() == []
    [record] = [r for r in caplog.records if r.name == "ghl.webhooks"]
    assert record.fields["webhook_id"] == "wh-fresh-id"


@pytest.mark.parametrize("fixture", PATHS)
def test_a_delivery_retried_late_within_the_window_is_processed(app_context, webhooks, fixture):
    # GHL's last retry comes ~1 h 10 min after the first attempt, perhaps with the first timestamp.
    install_location()
    payload = load_payload(fixture) | {"timestamp": ghl_time(-dt.timedelta(hours=1, minutes=15))}
    assert webhooks.send(payload).json == {"status": "processed"}
    ahead = load_payload(fixture) | {"timestamp": ghl_time(dt.timedelta(minutes=4)), "messageId": "m2"}
    assert webhooks.send(ahead).status_code == 200


def test_dedupe_rows_outlive_the_window_and_are_pruned_after_it(app_context, webhooks, signer, runner):
    install_location()
    kept = webhooks.send(load_payload("outbound_message"), webhook_id="wh-old")
    assert kept.json == {"status": "processed"}
    webhooks.send(load_payload("inbound_message_sms_doc") | {"locationId": LOCATION_ID}, webhook_id="wh-failed")
    webhooks.send(load_payload("outbound_message") | {"messageId": "recent"}, webhook_id="wh-recent")
    assert [d.status for d in deliveries()] == ["processed", "failed", "processed"]
    backdate(["wh-old", "wh-failed"], DELIVERY_RETENTION + dt.timedelta(hours=1))
    # Six days on, a copy is still a duplicate: rows are kept far longer than the stale window.
    assert webhooks.send(load_payload("outbound_message"), webhook_id="wh-recent").json == {"status": "duplicate"}
    result = runner.invoke(args=["ghl", "prune-deliveries"])
    assert result.exit_code == 0 and result.output.strip() == "pruned=1"
    assert [d.webhook_id for d in deliveries()] == ["wh-failed", "wh-recent"]  # failed ones wait for replay
    # A copy of the pruned delivery carries its old timestamp: refused as stale, never counted again.
    old = load_payload("outbound_message") | {"timestamp": ghl_time(-DELIVERY_RETENTION)}
    assert webhooks.send(old, webhook_id="wh-old").status_code == 400
    assert len(usage_events()) == 2


def test_pruning_inside_the_window_is_refused(app_context, runner):
    result = runner.invoke(args=["ghl", "prune-deliveries", "--older-than-days", "0.05"])
    assert result.exit_code == 1 and "at least" in result.output
    with pytest.raises(ValueError):
        prune_deliveries(older_than=DELIVERY_MAX_AGE)


def test_the_scheduler_prunes_deliveries(app):
    assert "ghl-prune-deliveries" in [job_id for job_id, _, _ in app.extensions[SCHEDULED_JOBS]]


def backdate(webhook_ids: list[str], age: dt.timedelta) -> None:
    db.session.execute(
        update(GhlWebhookDelivery)
        .where(GhlWebhookDelivery.webhook_id.in_(webhook_ids))
        .values(received_at=utcnow() - age)
    )
    db.session.commit()


def install_company(company_id: str) -> None:
    agency = ensure_agency(company_id)
    db.session.add(GhlCompanyInstall(agency_id=agency.id, is_installed=True))
    db.session.commit()
