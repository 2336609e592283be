"""``POST /webhooks/ghl``: verify over the raw body → store the delivery → commit → process → record outcome.

GHL retries a delivery only when we answer 429 (docs/ghl.md §2.1); any other answer, or none, is
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
- Messages on PostgreSQL: that one transaction is one SQL statement (``accept_message``), sent on its own
  connection in autocommit mode: a single round trip, whose answer arrives only after the commit is
  flushed to the WAL (synchronous_commit stays on), so the 200 still follows a durable commit. On SQLite,
  and for replays, the same outcome comes from the statements above (ghl.events).

Before any of that, two checks that need no database, so every path (two-phase, one transaction, one
statement) sees the same outcome:
- Another app's delivery: GHL signs every app's webhooks with the same key, so a delivery captured from
  another marketplace app verifies. A foreign ``appId``, or none on a type whose documented payload
  carries it, is answered 200 "ignored", stored nowhere, and logged.
- A stale delivery: its ``timestamp`` must lie within DELIVERY_MAX_AGE before now (DELIVERY_MAX_AHEAD
  after); otherwise 400, nothing stored. Dedupe rows are kept DELIVERY_RETENTION (far longer than the
  window) and then pruned (``prune_deliveries``), so a copy of a pruned delivery can only ever be stale.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, current_app, jsonify, request
from sqlalchemy import Row, String, bindparam, case, delete, exists, literal, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from billing.ledger import insert_usage_from
from billing.models import UsageEvent
from core.database import UTCDateTime, db, utcnow
from core.metrics import GHL_WEBHOOKS_RECEIVED, observe_ingest
from ghl.events import (
    MESSAGE_DIRECTIONS,
    already_recorded_note,
    handle_event,
    not_installed_note,
    read_message,
    unknown_subaccount,
)
from ghl.models import GhlLocation, GhlWebhookDelivery
from ghl.payloads import PayloadInvalid, timestamp
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
# Types whose documented payloads always name the app (AppInstall.md, AppUninstall.md, PlanChange.md in
# GoHighLevel/highlevel-api-docs "docs/webhook events"; docs/ghl.md): a delivery of one without our appId
# is not ours. Other types are compared when they carry an appId (real message deliveries do) and
# accepted without one: a message is counted only for a subaccount that installed Rebill, once per
# messageId, so another copy of it can never count twice, while dropping it would lose usage.
APP_ID_REQUIRED_TYPES = frozenset({"INSTALL", "UNINSTALL", "PLAN_CHANGE"})
# GHL retries a delivery only after a 429, at most six times, ten minutes apart plus jitter: about 1 h 10 min
# from the first attempt to the last (https://help.gohighlevel.com/support/solutions/articles/155000007071).
# Whether a retry carries a new timestamp is undocumented, so the window assumes the first one, plus
# margin for clock skew and slow answers. GHL's own guidance is a window "e.g. 5 minutes"
# (docs/oauth/WebhookAuthentication.md), which would drop genuine retries.
DELIVERY_MAX_AGE = dt.timedelta(hours=2)
DELIVERY_MAX_AHEAD = dt.timedelta(minutes=5)  # clock skew; GHL never dates a delivery ahead on purpose
# How long a processed or ignored delivery (its dedupe row) is kept: far beyond the window, so a copy of a
# pruned delivery is always refused as stale. Failed and unfinished ones stay until replayed.
DELIVERY_RETENTION = dt.timedelta(days=7)
PRUNE_BATCH = 5000
_DELIVERY = GhlWebhookDelivery.__table__
_LOCATION = GhlLocation.__table__
_STORED_COLUMNS = (
    "webhook_id", "event_type", "company_id", "location_id", "body", "signature_scheme",
    "received_at", "status", "error", "attempts", "processed_at",
)
# The bound parameter of each stored column. The delivery's own copy of the subaccount id (cut to the
# column, never refused) is named apart from the message's location_id, which the one-statement message
# path binds too (the subaccount lookup and the usage row).
_PARAMETERS = {column: column for column in _STORED_COLUMNS} | {"location_id": "delivery_location_id"}


def _insert_statement(dialect):
    """INSERT … ON CONFLICT (webhook_id) DO NOTHING RETURNING id with bound parameters.

    Built once per dialect, so every request reuses one compiled statement (no per-request compile).
    """
    return (
        dialect.insert(_DELIVERY)
        .values({column: bindparam(parameter) for column, parameter in _PARAMETERS.items()})
        .on_conflict_do_nothing(index_elements=["webhook_id"])
        .returning(_DELIVERY.c.id)
    )


_INSERTS = {"postgresql": _insert_statement(postgresql), "sqlite": _insert_statement(sqlite)}


def _message_statement():
    """Store a message delivery and record its usage in ONE PostgreSQL statement; RETURNING id, status, error.

        WITH location AS (SELECT agency_id, is_installed FROM ghl_location WHERE location_id = :location_id),
             usage AS (INSERT INTO usage_event … SELECT … FROM location
                       WHERE is_installed AND no delivery with :webhook_id is stored
                       ON CONFLICT (agency_id, source, source_event_id) DO NOTHING RETURNING id)
        INSERT INTO ghl_webhook_delivery … SELECT …, <status and error from location and usage>
        ON CONFLICT (webhook_id) DO NOTHING RETURNING id, status, error

    The outcomes are those of ghl.events for the same message: subaccount unknown → "failed" (replayable),
    not installed → "ignored", message recorded before → "ignored", else "processed"; no row → a duplicate
    delivery, which records nothing. The usage INSERT comes first so that its outcome can label the
    delivery; it skips a delivery already stored (a redelivery never records usage). Two copies of one
    message in flight at once are exact too: the second usage INSERT waits on the first's unique-index
    entry, then does nothing, so its delivery reads "already recorded". (Only two different messages
    sharing one webhookId at the same instant — GHL's ids are unique per event — would record both
    messages and keep one delivery.)
    """
    location = (
        select(_LOCATION.c.agency_id, _LOCATION.c.is_installed)
        .where(_LOCATION.c.location_id == bindparam("location_id"))
        .cte("location")
    )
    received_at = bindparam("received_at", type_=UTCDateTime())
    stored_before = exists().where(_DELIVERY.c.webhook_id == bindparam("webhook_id"))
    usage = (
        insert_usage_from(
            select(
                location.c.agency_id,
                literal("ghl"),
                bindparam("message_id", type_=String()),
                None,  # channel_id
                bindparam("location_id"),
                0,  # input_tokens
                0,  # output_tokens
                1,  # messages
                bindparam("direction", type_=String()),
                None,  # model
                bindparam("occurred_at", type_=UTCDateTime()),
                received_at,
            ).where(location.c.is_installed, ~stored_before)
        )
        .returning(UsageEvent.__table__.c.id)
        .cte("usage")
    )
    known = exists(select(location.c.agency_id))
    uninstalled = exists(select(location.c.agency_id).where(~location.c.is_installed))
    recorded = exists(select(usage.c.id))
    delivery = select(
        *(bindparam(_PARAMETERS[column]) for column in _STORED_COLUMNS[:6]),  # webhook_id … signature_scheme
        received_at,
        case((~known, "failed"), (recorded, "processed"), else_="ignored"),  # status
        case(  # error
            (~known, bindparam("unknown_subaccount")),
            (uninstalled, bindparam("not_installed")),
            (~recorded, bindparam("already_recorded")),
        ),
        1,  # attempts
        case((known, received_at)),  # processed_at: not for a failure, which stays replayable
    )
    return (
        postgresql.insert(_DELIVERY)
        .from_select(_STORED_COLUMNS, delivery)
        .on_conflict_do_nothing(index_elements=["webhook_id"])
        .returning(_DELIVERY.c.id, _DELIVERY.c.status, _DELIVERY.c.error)
    )


_MESSAGE_STATEMENT = _message_statement()
# The 200 answers, encoded once: jsonify on every request is a visible share of the hot path's CPU (see
# bench/README.md).
_STORED_ANSWERS = {
    status: json.dumps({"status": status}) for status in ("processed", "ignored", "failed", "received", "duplicate")
}
# The outcome counters, resolved once (a label lookup per request is a lock and a dict search more).
_RECEIVED = {
    outcome: GHL_WEBHOOKS_RECEIVED.labels(outcome)
    for outcome in (*_STORED_ANSWERS, "other_app", "stale", "unauthorized", "bad_request", "unavailable")
}


@blueprint.record_once
def _prepare(state) -> None:
    """Parse the public keys once per app (a bad key stops the start) and remember our appId."""
    state.app.extensions[VERIFIER] = WebhookVerifier.from_config(state.app.config)
    state.app.extensions[APP_ID] = state.app.config.get("GHL_APP_ID")


@blueprint.post("/webhooks/ghl")
@observe_ingest("ghl_webhook")
def receive_webhook():
    """Verify, store, commit, process; answer 200 stored/duplicate, 401, 400 or 429."""
    body = request.get_data(cache=False)
    scheme = current_app.extensions[VERIFIER].verify(body, request.headers)
    if scheme is None:
        _RECEIVED["unauthorized"].inc()
        return jsonify(error="missing or invalid webhook signature"), 401
    try:
        text = body.decode("utf-8")
        event = json.loads(text)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError; absurd nesting recurses
        _RECEIVED["bad_request"].inc()
        return jsonify(error="the webhook body is not UTF-8 JSON"), 400
    if not isinstance(event, dict):
        _RECEIVED["bad_request"].inc()
        return jsonify(error="the webhook body is not a JSON object"), 400
    foreign = other_app_reason(event, current_app.extensions[APP_ID])
    if foreign is not None:
        # Signed by GHL but not for us: acknowledged (a retry would change nothing), dropped, logged.
        log.warning("GHL webhook of another app ignored", extra={"fields": _log_fields(event) | {"reason": foreign}})
        _RECEIVED["other_app"].inc()
        return jsonify(status="ignored", reason=foreign), 200
    stale = staleness_reason(event, utcnow())
    if stale is not None:
        # 400, not 200: nothing was accepted, and the failure shows in GHL's delivery log as well as ours
        # (GHL retries only 429, so this is final either way). A replay of a captured delivery lands here.
        log.warning("stale GHL webhook refused", extra={"fields": _log_fields(event) | {"reason": stale}})
        _RECEIVED["stale"].inc()
        return jsonify(error=f"webhook refused: {stale}"), 400
    try:
        status = accept_delivery(body, text, event, scheme)
    except SQLAlchemyError as error:
        db.session.rollback()
        _RECEIVED["unavailable"].inc()
        log.error("cannot store a GHL webhook; answering 429", extra={"fields": {"error": type(error).__name__}})
        return jsonify(error="cannot store the webhook right now; retry later"), 429
    _RECEIVED[status].inc()
    return current_app.response_class(_STORED_ANSWERS[status], mimetype="application/json")


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


def accept_delivery(body: bytes, text: str, event: dict[str, Any], scheme: str) -> str:
    """Store a verified delivery (once) and process it; return its status or "duplicate".

    Raises SQLAlchemyError only when the delivery could not be stored at all.
    """
    event_type = event.get("type")
    if not isinstance(event_type, str):
        event_type = None  # stored and acknowledged like a body without a type (a list is unhashable, too)
    if event_type in TWO_PHASE_TYPES:
        delivery_id = store_delivery(body, text, event, scheme)
        return "duplicate" if delivery_id is None else process_delivery(delivery_id, event)
    if event_type in MESSAGE_DIRECTIONS and db.engine.dialect.name == "postgresql":
        return accept_message(body, text, event, scheme)
    now = utcnow()  # the delivery's receipt, also the received time of the usage it records (rule 11)
    try:
        delivery_id = _insert_delivery(
            body, text, event, scheme, status="processed", attempts=1, processed_at=now, received_at=now
        )
        if delivery_id is None:
            db.session.rollback()
            return "duplicate"
        note = handle_event(event, now)
        if note is not None:
            _set_outcome(delivery_id, "ignored", note)
        db.session.commit()
        return "processed" if note is None else "ignored"
    except Exception as error:  # processing failed: keep the delivery alone, failed, replayable
        db.session.rollback()
        message = _failure_message(error)
        delivery_id = _insert_delivery(
            body, text, event, scheme, status="failed", error=message, attempts=1, received_at=now
        )
        db.session.commit()
        _log_failure(event, message, delivery_id)
        return "failed" if delivery_id is not None else "duplicate"


def accept_message(body: bytes, text: str, event: dict[str, Any], scheme: str) -> str:
    """Store a message delivery and record its usage in one autocommitted statement (PostgreSQL).

    Same outcomes and fallbacks as accept_delivery: a payload without its ids, or a statement the
    database refuses, stores the delivery alone as failed; raises SQLAlchemyError only when even that fails.
    """
    delivery = _delivery_values(body, text, event, scheme)
    try:
        message = read_message(event)
    except PayloadInvalid as error:
        return _store_failed(delivery, event, error)
    parameters = delivery | {
        "location_id": message.location_id,
        "message_id": message.message_id,
        "direction": message.direction,
        "occurred_at": message.occurred_at,
        "unknown_subaccount": _failure_message(unknown_subaccount(message)),
        "not_installed": not_installed_note(message),
        "already_recorded": already_recorded_note(message),
    }
    try:
        stored = _execute_alone(_MESSAGE_STATEMENT, parameters)
    except SQLAlchemyError as error:  # e.g. a value PostgreSQL refuses: keep the delivery alone, failed
        return _store_failed(delivery, event, error)
    if stored is None:
        return "duplicate"
    if stored.status == "failed":
        _log_failure(event, stored.error, stored.id)
    return stored.status


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


def process_delivery(
    delivery_id: int, event: dict[str, Any], *, force: bool = False, received_at: dt.datetime | None = None
) -> str:
    """Run a stored delivery's handler in its own transaction and record the outcome; never raises.

    Returns the delivery's status: processed, ignored, failed (error kept), or received when even the
    failure could not be written (a replay will retry it). Handlers are idempotent, so a replay racing
    the first attempt does no harm; the conditional UPDATE lets only one of them record the outcome.
    ``received_at``: the stored delivery's receipt, which the usage it records keeps (rule 11).
    """
    try:
        note = handle_event(event, received_at)
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
    query = select(GhlWebhookDelivery.id, GhlWebhookDelivery.body, GhlWebhookDelivery.received_at).order_by(
        GhlWebhookDelivery.id
    )
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
        status = process_delivery(row.id, event, force=delivery_id is not None, received_at=row.received_at)
        summary.replayed += 1
        if status in ("processed", "ignored", "failed"):
            setattr(summary, status, getattr(summary, status) + 1)
    return summary


def prune_deliveries(*, older_than: dt.timedelta = DELIVERY_RETENTION) -> int:
    """Delete processed and ignored deliveries received before ``older_than`` ago; commits per batch.

    Failed and unfinished deliveries stay (replay needs them). ``older_than`` below the stale window would
    let a redelivery of a pruned delivery be processed again, so it is refused.
    """
    if older_than < DELIVERY_MAX_AGE + DELIVERY_MAX_AHEAD:
        raise ValueError(f"deliveries must be kept at least {DELIVERY_MAX_AGE + DELIVERY_MAX_AHEAD}")
    cutoff = utcnow() - older_than
    # Batches in id order (the primary key), so each DELETE is short and holds few locks.
    batch = (
        select(_DELIVERY.c.id)
        .where(_DELIVERY.c.received_at < cutoff, _DELIVERY.c.status.in_(("processed", "ignored")))
        .order_by(_DELIVERY.c.id)
        .limit(PRUNE_BATCH)
        .scalar_subquery()
    )
    pruned = 0
    while True:
        deleted = db.session.execute(delete(_DELIVERY).where(_DELIVERY.c.id.in_(batch))).rowcount
        db.session.commit()
        pruned += deleted
        if deleted < PRUNE_BATCH:
            break
    if pruned:
        log.info("pruned GHL webhook deliveries", extra={"fields": {"pruned": pruned, "before": cutoff.isoformat()}})
    return pruned


def _insert_delivery(body: bytes, text: str, event: dict[str, Any], scheme: str, **outcome: Any) -> int | None:
    """INSERT the delivery unless its webhookId is stored already; flushes nothing else, never commits."""
    connection = db.session.connection()
    values = _delivery_values(body, text, event, scheme) | outcome
    return connection.execute(_INSERTS[connection.dialect.name], values).scalar()


def _delivery_values(body: bytes, text: str, event: dict[str, Any], scheme: str) -> dict[str, Any]:
    """The delivery row as received (status "received", no attempt yet)."""
    event_type = event.get("type")
    location_id = event.get("id") if event_type in ("LocationCreate", "LocationUpdate") else event.get("locationId")
    return {
        "webhook_id": delivery_key(body, event),
        "event_type": _column_text(event_type, 64) or "",
        "company_id": _column_text(event.get("companyId"), 64),
        "delivery_location_id": _column_text(location_id, 64),
        "body": text,
        "signature_scheme": scheme,
        "received_at": utcnow(),
        "status": "received",
        "error": None,
        "attempts": 0,
        "processed_at": None,
    }


def _store_failed(delivery: dict[str, Any], event: dict[str, Any], error: Exception) -> str:
    """Store the delivery alone, failed with ``error`` (replayable), in its own autocommitted statement."""
    message = _failure_message(error)
    stored = _execute_alone(_INSERTS["postgresql"], delivery | {"status": "failed", "error": message, "attempts": 1})
    if stored is None:
        return "duplicate"
    _log_failure(event, message, stored.id)
    return "failed"


def _execute_alone(statement, parameters: dict[str, Any]) -> Row | None:
    """Run one statement as its own transaction (autocommit) and return its first row.

    The server answers only once the commit is durable, so there is no separate BEGIN or COMMIT round
    trip. A pooled connection the database dropped (restart, failover: the pool does not ping busy
    connections, see core.database) is retried once on a fresh one; the statements are idempotent (ON
    CONFLICT DO NOTHING on webhookId and messageId), so a retry after a lost answer stores nothing twice.
    """
    try:
        return _execute_autocommit(statement, parameters)
    except DBAPIError as error:
        if not error.connection_invalidated:
            raise
        return _execute_autocommit(statement, parameters)


def _execute_autocommit(statement, parameters: dict[str, Any]) -> Row | None:
    with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        return connection.execute(statement, parameters).first()


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


def _log_fields(event: dict[str, Any]) -> dict[str, str]:
    """What identifies a delivery in a log line (ids only, cut to length)."""
    return {
        "type": str(event.get("type"))[:64],
        "app_id": str(event.get("appId"))[:64],
        "webhook_id": str(event.get("webhookId"))[:128],
    }


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
