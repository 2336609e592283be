"""The GHL delivery log: store a verified webhook delivery once, process it, replay it, prune it.

Every delivery Rebill acknowledges is a row of ``ghl_webhook_delivery``, deduplicated on GHL's
``webhookId`` (or the body's hash). Processing, replay and failure records are core.delivery_log's, with
ghl.events as the handler. Two ways in (ghl.webhooks picks one per delivery):
- ``store_delivery`` then ``process_delivery``: two transactions, the delivery committed first (INSTALL,
  UNINSTALL: processing may call GHL or wait on other rows' locks);
- ``accept_in_one_transaction``: the INSERT and the processing commit together (one WAL flush); if
  processing raises, the delivery is stored alone, failed, in a fresh transaction.
(PostgreSQL's one-statement path for messages, ghl.message_ingest, writes the same rows.)

A delivery is accepted only inside DELIVERY_MAX_AGE before now (DELIVERY_MAX_AHEAD after; ghl.webhooks
refuses the rest), and its dedupe row is kept DELIVERY_RETENTION, far longer, then pruned: a copy of a
pruned delivery can only ever be stale.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from typing import Any

from sqlalchemy import Row, bindparam, delete, select, update
from sqlalchemy.dialects import postgresql, sqlite

from core.database import db, utcnow
from core.delivery_log import DeliveryLog, ReplaySummary, failure_message
from ghl.events import handle_event
from ghl.models import GhlWebhookDelivery

log = logging.getLogger("ghl.deliveries")

WEBHOOK_ID_MAX_LENGTH = 128
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
STORED_COLUMNS = (
    "webhook_id", "event_type", "company_id", "location_id", "body", "signature_scheme",
    "received_at", "status", "error", "attempts", "processed_at",
)
# The bound parameter of each stored column. The delivery's own copy of the subaccount id (cut to the
# column, never refused) is named apart from the message's location_id, which the one-statement message
# path binds too (the subaccount lookup and the usage row).
PARAMETERS = {column: column for column in STORED_COLUMNS} | {"location_id": "delivery_location_id"}


def _insert_statement(dialect):
    """INSERT … ON CONFLICT (webhook_id) DO NOTHING RETURNING id with bound parameters.

    Built once per dialect, so every request reuses one compiled statement (no per-request compile).
    """
    return (
        dialect.insert(_DELIVERY)
        .values({column: bindparam(parameter) for column, parameter in PARAMETERS.items()})
        .on_conflict_do_nothing(index_elements=["webhook_id"])
        .returning(_DELIVERY.c.id)
    )


INSERTS = {"postgresql": _insert_statement(postgresql), "sqlite": _insert_statement(sqlite)}


def _handle_stored(delivery: Row) -> str | None:
    """Process a stored delivery with ghl.events; the usage it records keeps the delivery's receipt (rule 11)."""
    return handle_event(json.loads(delivery.body), delivery.received_at)


DELIVERIES = DeliveryLog(
    GhlWebhookDelivery,
    _handle_stored,
    columns=(GhlWebhookDelivery.body, GhlWebhookDelivery.received_at),
    name="GHL webhook",
    log=log,
)


def store_delivery(body: bytes, text: str, event: dict[str, Any], scheme: str) -> int | None:
    """Insert the raw delivery once (deduplicated on webhookId) and commit; return its id, None if a duplicate."""
    delivery_id = _insert_delivery(delivery_values(body, text, event, scheme))
    db.session.commit()
    return delivery_id


def process_delivery(delivery_id: int) -> str:
    """Process a stored delivery in its own transaction (core.delivery_log); never raises."""
    return DELIVERIES.process(delivery_id)


def accept_in_one_transaction(body: bytes, text: str, event: dict[str, Any], scheme: str) -> str:
    """Store a delivery (once) and process it in one transaction; return its status or "duplicate".

    If processing raises anything, the transaction is rolled back and the delivery is stored alone, failed
    with the error (replayable), in a fresh transaction. Raises SQLAlchemyError only when even that fails.
    """
    delivery = delivery_values(body, text, event, scheme)
    now = delivery["received_at"]  # the delivery's receipt, also the received time of the usage it records
    try:
        delivery_id = _insert_delivery(delivery | {"status": "processed", "attempts": 1, "processed_at": now})
        if delivery_id is None:
            db.session.rollback()
            return "duplicate"
        note = handle_event(event, now)
        if note is not None:
            db.session.connection().execute(
                update(_DELIVERY).where(_DELIVERY.c.id == delivery_id).values(status="ignored", error=note)
            )
        db.session.commit()
        return "processed" if note is None else "ignored"
    except Exception as error:  # processing failed: keep the delivery alone, failed, replayable
        db.session.rollback()
        message = failure_message(error)
        delivery_id = _insert_delivery(delivery | {"status": "failed", "error": message, "attempts": 1})
        db.session.commit()
        DELIVERIES.log_failure(delivery_id, delivery["event_type"], message)
        return "failed" if delivery_id is not None else "duplicate"


def replay_deliveries(
    *, failed_only: bool = False, delivery_id: int | None = None, max_attempts: int | None = None
) -> ReplaySummary:
    """Process stored deliveries again (core.delivery_log); commits per delivery."""
    return DELIVERIES.replay(failed_only=failed_only, delivery_id=delivery_id, max_attempts=max_attempts)


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


def delivery_key(body: bytes, event: dict[str, Any]) -> str:
    """Return the dedupe key: GHL's webhookId, or a hash of the body when it has none (or an odd one)."""
    webhook_id = event.get("webhookId")
    if isinstance(webhook_id, str) and 0 < len(webhook_id) <= WEBHOOK_ID_MAX_LENGTH:
        return webhook_id
    return "sha256:" + hashlib.sha256(body).hexdigest()


def delivery_values(body: bytes, text: str, event: dict[str, Any], scheme: str) -> dict[str, Any]:
    """The delivery row as received (status "received", no attempt yet), keyed by bound parameter."""
    event_type = event.get("type")
    location_id = event.get("id") if event_type in ("LocationCreate", "LocationUpdate") else event.get("locationId")
    return {
        "webhook_id": delivery_key(body, event),
        "event_type": column_text(event_type, 64) or "",
        "company_id": column_text(event.get("companyId"), 64),
        "delivery_location_id": column_text(location_id, 64),
        "body": text,
        "signature_scheme": scheme,
        "received_at": utcnow(),
        "status": "received",
        "error": None,
        "attempts": 0,
        "processed_at": None,
    }


def _insert_delivery(values: dict[str, Any]) -> int | None:
    """INSERT the delivery unless its webhookId is stored already; flushes nothing else, never commits."""
    connection = db.session.connection()
    return connection.execute(INSERTS[connection.dialect.name], values).scalar()


def column_text(value: Any, max_length: int) -> str | None:
    """A string safe for a text column: NULs dropped (PostgreSQL refuses them), cut to length."""
    if not isinstance(value, str) or not value:
        return None
    return value.replace("\x00", "")[:max_length] or None
