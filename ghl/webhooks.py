"""``POST /webhooks/ghl``: verify over the raw body → store the delivery → commit → process → record outcome.

GHL retries a delivery only when we answer 429 (reference/ghl.md §2.1); any other answer, or none, is
final. So the answer is 429 exactly when the delivery could not be stored, and 200 once it is stored —
whatever processing does, because a stored delivery keeps its error and can be replayed
(``flask --app app ghl replay``).

Transactions, per event type:
- INSTALL / UNINSTALL: two. (1) the INSERT of the raw delivery, committed first — the acknowledgement
  point; (2) processing, which may call GHL (minting a location token) or wait on client row locks. If the
  worker dies or times out during (2), the delivery is already durable ("received") and replay finds it.
- Everything else (messages — the hot path —, Location*, PLAN_CHANGE, unknown types): one. The delivery
  INSERT and the processing (a subaccount lookup and one ledger INSERT, local and short) commit together,
  so the hot path pays one commit (one WAL flush) instead of two. The guarantee "stored even if
  processing fails" still holds: if processing raises anything, the transaction is rolled back and the
  delivery is stored alone, marked failed with the error, in a fresh transaction. Only if that store
  fails too (database down) is the answer 429. The one thing given up is a worker killed inside those
  few milliseconds of local SQL, before the commit: no answer is sent, and GHL drops it — the same
  window a worker killed just before any store has.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, current_app, jsonify, request
from sqlalchemy import bindparam, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError

from core.database import db, utcnow
from ghl.client import app_id_of
from ghl.events import handle_event
from ghl.models import GhlWebhookDelivery
from ghl.signatures import WebhookVerifier

log = logging.getLogger("ghl.webhooks")

blueprint = Blueprint("ghl_webhooks", __name__)

VERIFIER = "ghl.webhook_verifier"
APP_ID = "ghl.app_id"
WEBHOOK_ID_MAX_LENGTH = 128
ERROR_MAX_LENGTH = 2000
# A "received" delivery older than this was abandoned by a dead worker; replay picks it up.
STALE_AFTER = dt.timedelta(minutes=5)
# Processing that may call GHL or wait on other rows' locks: stored and committed first (see above).
TWO_PHASE_TYPES = frozenset({"INSTALL", "UNINSTALL"})
_DELIVERY = GhlWebhookDelivery.__table__
_STORED_COLUMNS = (
    "webhook_id", "event_type", "company_id", "location_id", "body", "signature_scheme",
    "received_at", "status", "error", "attempts", "processed_at",
)


def _insert_statement(dialect):
    """INSERT … ON CONFLICT (webhook_id) DO NOTHING RETURNING id with bound parameters.

    Built once per dialect, so every request reuses one compiled statement (no per-request compile).
    """
    return (
        dialect.insert(_DELIVERY)
        .values({column: bindparam(column) for column in _STORED_COLUMNS})
        .on_conflict_do_nothing(index_elements=["webhook_id"])
        .returning(_DELIVERY.c.id)
    )


_INSERTS = {"postgresql": _insert_statement(postgresql), "sqlite": _insert_statement(sqlite)}


@blueprint.record_once
def _prepare(state) -> None:
    """Parse the public keys once per app (a bad key stops the start) and remember our appId."""
    state.app.extensions[VERIFIER] = WebhookVerifier.from_config(state.app.config)
    state.app.extensions[APP_ID] = app_id_of(state.app.config.get("GHL_CLIENT_ID"))


@blueprint.post("/webhooks/ghl")
def receive_webhook():
    """Verify, store, commit, process; answer 200 stored/duplicate, 401, 400 or 429."""
    body = request.get_data(cache=False)
    scheme = current_app.extensions[VERIFIER].verify(body, request.headers)
    if scheme is None:
        return jsonify(error="missing or invalid webhook signature"), 401
    try:
        text = body.decode("utf-8")
        event = json.loads(text)
    except ValueError:  # UnicodeDecodeError is one too
        return jsonify(error="the webhook body is not UTF-8 JSON"), 400
    if not isinstance(event, dict):
        return jsonify(error="the webhook body is not a JSON object"), 400
    app_id = event.get("appId")
    expected = current_app.extensions[APP_ID]
    if app_id and expected and app_id != expected:
        # Signed by GHL but for another app (the SDKs compare appId the same way): acknowledge, drop.
        return jsonify(status="ignored", reason="another app's webhook"), 200
    try:
        status = accept_delivery(body, text, event, scheme)
    except SQLAlchemyError as error:
        db.session.rollback()
        log.error("cannot store a GHL webhook; answering 429", extra={"fields": {"error": type(error).__name__}})
        return jsonify(error="cannot store the webhook right now; retry later"), 429
    return jsonify(status=status), 200


def accept_delivery(body: bytes, text: str, event: dict[str, Any], scheme: str) -> str:
    """Store a verified delivery (once) and process it; return its status or "duplicate".

    Raises SQLAlchemyError only when the delivery could not be stored at all.
    """
    if event.get("type") in TWO_PHASE_TYPES:
        delivery_id = store_delivery(body, text, event, scheme)
        return "duplicate" if delivery_id is None else process_delivery(delivery_id, event)
    now = utcnow()
    try:
        delivery_id = _insert_delivery(body, text, event, scheme, status="processed", attempts=1, processed_at=now)
        if delivery_id is None:
            db.session.rollback()
            return "duplicate"
        note = handle_event(event)
        if note is not None:
            _set_outcome(delivery_id, "ignored", note)
        db.session.commit()
        return "processed" if note is None else "ignored"
    except Exception as error:  # processing failed: keep the delivery alone, failed, replayable
        db.session.rollback()
        message = _failure_message(error)
        delivery_id = _insert_delivery(body, text, event, scheme, status="failed", error=message, attempts=1)
        db.session.commit()
        _log_failure(event, message, delivery_id)
        return "failed" if delivery_id is not None else "duplicate"


def store_delivery(body: bytes, text: str, event: dict[str, Any], scheme: str) -> int | None:
    """Insert the raw delivery once (deduplicated on webhookId) and commit; return its id, None if a duplicate."""
    delivery_id = _insert_delivery(body, text, event, scheme, status="received")
    db.session.commit()
    return delivery_id


def delivery_key(body: bytes, event: dict[str, Any]) -> str:
    """Return the dedupe key: GHL's webhookId, or a hash of the body when it has none (or an odd one)."""
    webhook_id = event.get("webhookId")
    if isinstance(webhook_id, str) and 0 < len(webhook_id) <= WEBHOOK_ID_MAX_LENGTH:
        return webhook_id
    return "sha256:" + hashlib.sha256(body).hexdigest()


def process_delivery(delivery_id: int, event: dict[str, Any], *, force: bool = False) -> str:
    """Run a stored delivery's handler in its own transaction and record the outcome; never raises.

    Returns the delivery's status: processed, ignored, failed (error kept), or received when even the
    failure could not be written (a replay will retry it). Handlers are idempotent, so a replay racing
    the first attempt does no harm; the conditional UPDATE lets only one of them record the outcome.
    """
    try:
        note = handle_event(event)
        status = "processed" if note is None else "ignored"
        pending = ["received", "failed"] + (["processed", "ignored"] if force else [])
        recorded = db.session.execute(
            update(GhlWebhookDelivery)
            .where(GhlWebhookDelivery.id == delivery_id, GhlWebhookDelivery.status.in_(pending))
            .values(
                status=status,
                error=note,
                attempts=GhlWebhookDelivery.attempts + 1,
                processed_at=utcnow(),
            )
        ).rowcount
        if not recorded:
            db.session.rollback()
            return "duplicate"
        db.session.commit()
        return status
    except Exception as error:  # any failure is recorded on the delivery, which stays replayable
        db.session.rollback()
        return _record_failure(delivery_id, event, error)


@dataclass
class ReplaySummary:
    """What a replay run did."""

    replayed: int = 0
    processed: int = 0
    ignored: int = 0
    failed: int = 0


def replay_deliveries(
    *, failed_only: bool = False, delivery_id: int | None = None, max_attempts: int | None = None
) -> ReplaySummary:
    """Process stored deliveries again: one by id (whatever its status), the failed ones, or every one
    not processed (failed, or received and abandoned for longer than STALE_AFTER). Commits per delivery."""
    query = select(GhlWebhookDelivery.id, GhlWebhookDelivery.body).order_by(GhlWebhookDelivery.id)
    if delivery_id is not None:
        query = query.where(GhlWebhookDelivery.id == delivery_id)
    elif failed_only:
        query = query.where(GhlWebhookDelivery.status == "failed")
    else:
        stale = utcnow() - STALE_AFTER
        query = query.where(
            or_(
                GhlWebhookDelivery.status == "failed",
                (GhlWebhookDelivery.status == "received") & (GhlWebhookDelivery.received_at < stale),
            )
        )
    if max_attempts is not None:
        query = query.where(GhlWebhookDelivery.attempts < max_attempts)
    rows = db.session.execute(query).all()
    db.session.rollback()
    summary = ReplaySummary()
    for row in rows:
        event = json.loads(row.body)
        status = process_delivery(row.id, event, force=delivery_id is not None)
        summary.replayed += 1
        if status in ("processed", "ignored", "failed"):
            setattr(summary, status, getattr(summary, status) + 1)
    return summary


def _insert_delivery(body: bytes, text: str, event: dict[str, Any], scheme: str, **outcome: Any) -> int | None:
    """INSERT the delivery unless its webhookId is stored already; flushes nothing else, never commits."""
    event_type = event.get("type")
    location_id = event.get("id") if event_type in ("LocationCreate", "LocationUpdate") else event.get("locationId")
    connection = db.session.connection()
    values = {
        "webhook_id": delivery_key(body, event),
        "event_type": _column_text(event_type, 64) or "",
        "company_id": _column_text(event.get("companyId"), 64),
        "location_id": _column_text(location_id, 64),
        "body": text,
        "signature_scheme": scheme,
        "received_at": utcnow(),
        "error": None,
        "attempts": 0,
        "processed_at": None,
    } | outcome
    return connection.execute(_INSERTS[connection.dialect.name], values).scalar()


def _set_outcome(delivery_id: int, status: str, error: str | None) -> None:
    db.session.connection().execute(
        update(_DELIVERY).where(_DELIVERY.c.id == delivery_id).values(status=status, error=error)
    )


def _record_failure(delivery_id: int, event: dict[str, Any], error: Exception) -> str:
    message = _failure_message(error)
    _log_failure(event, message, delivery_id)
    try:
        db.session.execute(
            update(GhlWebhookDelivery)
            .where(GhlWebhookDelivery.id == delivery_id, GhlWebhookDelivery.status != "processed")
            .values(status="failed", error=message, attempts=GhlWebhookDelivery.attempts + 1)
        )
        db.session.commit()
    except SQLAlchemyError:
        db.session.rollback()
        log.error("cannot record a webhook failure", extra={"fields": {"delivery_id": delivery_id}})
        return "received"
    return "failed"


def _failure_message(error: Exception) -> str:
    return _column_text(f"{type(error).__name__}: {error}", ERROR_MAX_LENGTH) or type(error).__name__


def _log_failure(event: dict[str, Any], message: str, delivery_id: int | None = None) -> None:
    log.warning(
        "GHL webhook processing failed",
        extra={"fields": {"delivery_id": delivery_id, "type": str(event.get("type"))[:64], "error": message}},
    )


def _column_text(value: Any, max_length: int) -> str | None:
    """A string safe for a text column: NULs dropped (PostgreSQL refuses them), cut to length."""
    if not isinstance(value, str) or not value:
        return None
    return value.replace("\x00", "")[:max_length] or None
