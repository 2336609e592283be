"""``POST /webhooks/ghl``: verify over the raw body → store the delivery → commit → process → record outcome.

GHL retries a delivery only when we answer 429 (docs/ghl.md §2.1); any other answer, or none, is
final. So the answer is 429 exactly when the delivery could not be stored, and 200 once it is stored —
whatever processing does, because a stored delivery keeps its error and can be replayed
(``flask --app app ghl replay``).

This module is the route: verification and the checks that need no database. Storing is one of three
paths, all writing the same rows of the delivery log (ghl.deliveries):
- INSTALL / UNINSTALL: two transactions. (1) the INSERT of the raw delivery, committed first — the
  acknowledgement point; (2) processing, which may call GHL (minting a location token) or wait on client
  row locks. If the worker dies or times out during (2), the delivery is already durable ("received") and
  replay finds it.
- Everything else (messages, Location*, PLAN_CHANGE, unknown types): one transaction. The delivery INSERT
  and the processing (a subaccount lookup and one ledger INSERT, local and short) commit together, so it
  pays one commit (one WAL flush) instead of two. The guarantee "stored even if processing fails" still
  holds: if processing raises, the delivery is stored alone, marked failed with the error, in a fresh
  transaction. Only if that store fails too (database down) is the answer 429. The one thing given up is
  a worker killed inside those few milliseconds of local SQL, before the commit: no answer is sent, and
  GHL drops it — the same window a worker killed just before any store has.
- Messages on PostgreSQL (the hot path): the concurrent deliveries of a worker share one SQL statement
  and its commit (ghl.message_ingest), each answered after that commit; MessageWebhookDispatch answers
  them in front of Flask, with this module's checks.

Before any of that, two checks that need no database, so every path sees the same outcome:
- Another app's delivery: GHL signs every app's webhooks with the same key, so a delivery captured from
  another marketplace app verifies. A foreign ``appId``, or none on a type whose documented payload
  carries it, is answered 200 "ignored", stored nowhere, and logged.
- A stale delivery: its ``timestamp`` must lie within DELIVERY_MAX_AGE before now (DELIVERY_MAX_AHEAD
  after); otherwise 400, nothing stored (ghl.deliveries keeps dedupe rows far longer than that window).
"""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, current_app, jsonify, request
from sqlalchemy.exc import SQLAlchemyError

from core.database import db, utcnow
from core.metrics import GHL_WEBHOOKS_RECEIVED, INGEST_DURATION, observe_ingest
from ghl.deliveries import (
    DELIVERY_MAX_AGE,
    DELIVERY_MAX_AHEAD,
    accept_in_one_transaction,
    process_delivery,
    store_delivery,
)
from ghl.events import MESSAGE_DIRECTIONS
from ghl.message_ingest import MessageIngest, StoreUnavailable
from ghl.payloads import timestamp
from ghl.signatures import ED25519_HEADER, RSA_HEADER, HeaderLookup, WebhookVerifier

log = logging.getLogger("ghl.webhooks")

blueprint = Blueprint("ghl_webhooks", __name__)

VERIFIER = "ghl.webhook_verifier"
APP_ID = "ghl.app_id"
INGEST = "ghl.message_ingest"
# What MessageWebhookDispatch found for a delivery it hands on to the route (the body and its verdict), so
# that the route does not check the signature a second time: a flood of forged deliveries would otherwise
# cost two verifications each. A WSGI environ key without the HTTP_ prefix cannot come from the client.
CHECKED = "rebill.ghl_webhook.checked"
# Processing that may call GHL or wait on other rows' locks: stored and committed first (see above).
TWO_PHASE_TYPES = frozenset({"INSTALL", "UNINSTALL"})
# Types whose documented payloads always name the app (AppInstall.md, AppUninstall.md, PlanChange.md in
# GoHighLevel/highlevel-api-docs "docs/webhook events"; docs/ghl.md): a delivery of one without our appId
# is not ours. Other types are compared when they carry an appId (real message deliveries do) and
# accepted without one: a message is counted only for a subaccount that installed Rebill, once per
# messageId, so another copy of it can never count twice, while dropping it would lose usage.
APP_ID_REQUIRED_TYPES = frozenset({"INSTALL", "UNINSTALL", "PLAN_CHANGE"})
# The 200 answers, encoded once: jsonify on every request is a visible share of the hot path's CPU (see
# bench/README.md).
_STORED_ANSWERS = {
    status: json.dumps({"status": status}) for status in ("processed", "ignored", "failed", "received", "duplicate")
}
_STORED_ANSWERS_BYTES = {status: answer.encode() for status, answer in _STORED_ANSWERS.items()}
# The outcome counters, resolved once (a label lookup per request is a lock and a dict search more).
_RECEIVED = {
    outcome: GHL_WEBHOOKS_RECEIVED.labels(outcome)
    for outcome in (*_STORED_ANSWERS, "other_app", "stale", "unauthorized", "bad_request", "unavailable")
}


@blueprint.record_once
def _prepare(state) -> None:
    """Parse the public keys once per app (a bad key stops the start), remember our appId, and on PostgreSQL
    set up the worker's group commit for message deliveries (ghl.message_ingest)."""
    state.app.extensions[VERIFIER] = WebhookVerifier.from_config(state.app.config)
    state.app.extensions[APP_ID] = state.app.config.get("GHL_APP_ID")
    with state.app.app_context():
        engine = db.engine
    if engine.dialect.name == "postgresql":
        state.app.extensions[INGEST] = MessageIngest(
            engine, store_timeout_ms=state.app.config["GHL_WEBHOOK_STORE_TIMEOUT_MS"]
        )


@dataclass(frozen=True, slots=True)
class Verified:
    """A delivery signed by GHL, for this app, dated inside the window: to be stored."""

    scheme: str
    text: str
    event: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Refused:
    """A delivery answered without storing it: the answer, the outcome counted, and what to log (if anything)."""

    code: int
    answer: dict[str, str]
    outcome: str
    warning: str | None = None
    fields: dict[str, str] | None = None


def check_delivery(
    body: bytes, headers: HeaderLookup, verifier: WebhookVerifier, app_id: str | None
) -> Verified | Refused:
    """The checks that need no database: signature over the raw body, a JSON object, our app, the window."""
    scheme = verifier.verify(body, headers)
    if scheme is None:
        return Refused(401, {"error": "missing or invalid webhook signature"}, "unauthorized")
    try:
        text = body.decode("utf-8")
        event = json.loads(text)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError; absurd nesting recurses
        return Refused(400, {"error": "the webhook body is not UTF-8 JSON"}, "bad_request")
    if not isinstance(event, dict):
        return Refused(400, {"error": "the webhook body is not a JSON object"}, "bad_request")
    foreign = other_app_reason(event, app_id)
    if foreign is not None:
        # Signed by GHL but not for us: acknowledged (a retry would change nothing), dropped, logged.
        return Refused(
            200, {"status": "ignored", "reason": foreign}, "other_app",
            "GHL webhook of another app ignored", _log_fields(event) | {"reason": foreign},
        )  # fmt: skip
    stale = staleness_reason(event, utcnow())
    if stale is not None:
        # 400, not 200: nothing was accepted, and the failure shows in GHL's delivery log as well as ours
        # (GHL retries only 429, so this is final either way). A replay of a captured delivery lands here.
        return Refused(
            400, {"error": f"webhook refused: {stale}"}, "stale",
            "stale GHL webhook refused", _log_fields(event) | {"reason": stale},
        )  # fmt: skip
    return Verified(scheme, text, event)


@blueprint.post("/webhooks/ghl")
@observe_ingest("ghl_webhook")
def receive_webhook():
    """Verify, store, commit, process; answer 200 stored/duplicate, 401, 400 or 429."""
    body = request.get_data(cache=False)
    extensions = current_app.extensions
    checked = request.environ.pop(CHECKED, None)
    if checked is not None and checked[0] == body:
        verdict = checked[1]
    else:
        verdict = check_delivery(body, request.headers, extensions[VERIFIER], extensions[APP_ID])
    if isinstance(verdict, Refused):
        if verdict.warning is not None:
            log.warning(verdict.warning, extra={"fields": verdict.fields})
        _RECEIVED[verdict.outcome].inc()
        return jsonify(verdict.answer), verdict.code
    try:
        status = accept_delivery(body, verdict, extensions.get(INGEST))
    except (SQLAlchemyError, StoreUnavailable) as error:
        db.session.rollback()
        return jsonify(_unavailable(error)), 429
    _RECEIVED[status].inc()
    return current_app.response_class(_STORED_ANSWERS[status], mimetype="application/json")


class MessageWebhookDispatch:
    """WSGI in front of Flask for the one hot route: a signed message delivery, on PostgreSQL.

    ``POST /webhooks/ghl`` with a Content-Length is read and checked here with the route's own
    check_delivery; a message (In/OutboundMessage) that passes is stored through the worker's group commit
    (ghl.message_ingest) and answered here — no Flask request, app context, session cookie or response
    object per message. Everything else (refusals, other event types, SQLite, other routes) goes to
    Flask unchanged, the body handed on as read with the verdict reached for it (CHECKED), so it is answered,
    counted and logged by the route above without being verified again.
    """

    def __init__(self, app, wsgi_app):
        self.flask = wsgi_app
        self.verifier = app.extensions[VERIFIER]
        self.app_id = app.extensions[APP_ID]
        self.ingest: MessageIngest | None = app.extensions.get(INGEST)
        self.max_length = app.config["MAX_CONTENT_LENGTH"]
        self.timed = {code: INGEST_DURATION.labels("ghl_webhook", code) for code in ("200", "429", "500")}

    def __call__(self, environ, start_response):
        if (
            self.ingest is None
            or environ.get("PATH_INFO") != "/webhooks/ghl"
            or environ.get("REQUEST_METHOD") != "POST"
            or "HTTP_TRANSFER_ENCODING" in environ
        ):
            return self.flask(environ, start_response)
        try:
            length = int(environ.get("CONTENT_LENGTH") or "")
        except ValueError:
            return self.flask(environ, start_response)
        if not 0 <= length <= self.max_length:
            return self.flask(environ, start_response)
        started = time.perf_counter()
        code = "500"
        try:
            with self.ingest.batches.arrival() as arrival:
                body = environ["wsgi.input"].read(length)
                verdict = check_delivery(body, WsgiHeaders(environ), self.verifier, self.app_id)
                if isinstance(verdict, Verified) and isinstance(event_type := verdict.event.get("type"), str) and (
                    event_type in MESSAGE_DIRECTIONS
                ):
                    try:
                        status = self.ingest.accept(body, verdict.text, verdict.event, verdict.scheme, arrival)
                    except StoreUnavailable as error:
                        code, answer = "429", json.dumps(_unavailable(error)).encode()
                    else:
                        _RECEIVED[status].inc()
                        code, answer = "200", _STORED_ANSWERS_BYTES[status]
                else:
                    environ[CHECKED] = (body, verdict)
                    verdict = None
            if verdict is None:
                code = None  # Flask answers and times it
                environ["wsgi.input"] = io.BytesIO(body)
                return self.flask(environ, start_response)
            start_response(
                "200 OK" if code == "200" else "429 Too Many Requests",
                [("Content-Type", "application/json"), ("Content-Length", str(len(answer)))],
            )
            return [answer]
        finally:
            if code is not None:
                self.timed[code].observe(time.perf_counter() - started)


class WsgiHeaders:
    """A request's headers read straight from its WSGI environ, as werkzeug's EnvironHeaders.get reads them
    (``X-GHL-Signature`` is ``HTTP_X_GHL_SIGNATURE``), for the one thing check_delivery does with headers
    (``get``): building a werkzeug Headers object per delivery costs more than the lookups themselves."""

    __slots__ = ("environ",)

    def __init__(self, environ: Mapping[str, Any]):
        self.environ = environ

    def get(self, name: str, default: str | None = None) -> str | None:
        key = _ENVIRON_KEYS.get(name)
        if key is None:
            key = name.upper().replace("-", "_")
            if key not in ("CONTENT_TYPE", "CONTENT_LENGTH"):  # the two headers without the HTTP_ prefix
                key = f"HTTP_{key}"
        return self.environ.get(key, default)


_ENVIRON_KEYS = {name: "HTTP_" + name.upper().replace("-", "_") for name in (ED25519_HEADER, RSA_HEADER)}


def other_app_reason(event: dict[str, Any], app_id: str | None) -> str | None:
    """Why a verified delivery is not for this app (``app_id``), or None when it is."""
    carried = event.get("appId")
    if carried is None:
        event_type = event.get("type")
        if isinstance(event_type, str) and event_type in APP_ID_REQUIRED_TYPES:
            return f"{event_type} without an appId"
        return None
    if not app_id or carried != app_id:
        return "another app's webhook"
    return None


def staleness_reason(event: dict[str, Any], now: dt.datetime) -> str | None:
    """Why a delivery's ``timestamp`` is outside the accepted window (or missing), or None when it is inside."""
    sent_at = timestamp(event, "timestamp")
    if sent_at is None:
        return "no readable timestamp (GHL dates every delivery)"
    if sent_at < now - DELIVERY_MAX_AGE:
        return f"timestamp older than {DELIVERY_MAX_AGE.total_seconds() / 3600:g} h"
    if sent_at > now + DELIVERY_MAX_AHEAD:
        return f"timestamp more than {DELIVERY_MAX_AHEAD.total_seconds() / 60:g} min ahead"
    return None


def accept_delivery(body: bytes, delivery: Verified, ingest: MessageIngest | None) -> str:
    """Store a verified delivery (once) and process it; return its status or "duplicate".

    Raises SQLAlchemyError or StoreUnavailable only when the delivery could not be stored at all.
    """
    event = delivery.event
    event_type = event.get("type")
    if not isinstance(event_type, str):
        event_type = None  # stored and acknowledged like a body without a type (a list is unhashable, too)
    if event_type in TWO_PHASE_TYPES:
        delivery_id = store_delivery(body, delivery.text, event, delivery.scheme)
        return "duplicate" if delivery_id is None else process_delivery(delivery_id)
    if event_type in MESSAGE_DIRECTIONS and ingest is not None:
        return ingest.accept(body, delivery.text, event, delivery.scheme)
    return accept_in_one_transaction(body, delivery.text, event, delivery.scheme)


def _unavailable(error: Exception) -> dict[str, str]:
    """Count and log a delivery that could not be stored; the 429 answer's body (GHL retries a 429)."""
    _RECEIVED["unavailable"].inc()
    log.error("cannot store a GHL webhook; answering 429", extra={"fields": {"error": type(error).__name__}})
    return {"error": "cannot store the webhook right now; retry later"}


def _log_fields(event: dict[str, Any]) -> dict[str, str]:
    """What identifies a delivery in a log line (ids only, cut to length)."""
    return {
        "type": str(event.get("type"))[:64],
        "app_id": str(event.get("appId"))[:64],
        "webhook_id": str(event.get("webhookId"))[:128],
    }
