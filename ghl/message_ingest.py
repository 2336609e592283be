"""Message deliveries on PostgreSQL: stored and counted in ONE autocommitted SQL statement (the hot path).

The statement writes what ghl.deliveries' one-transaction path writes for the same delivery (the delivery
row with its outcome, and the usage row), with ghl.events' outcome texts, so a replay of the stored delivery
records the same outcome (tests/ghl/test_webhooks.py compares them). It is sent on its own connection in
autocommit mode: a single round trip, whose answer arrives only after the commit is flushed to the WAL
(synchronous_commit stays on), so a 200 still follows a durable commit. SQLite, and replays, go through
ghl.deliveries and ghl.events.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Row, String, bindparam, case, exists, literal, select
from sqlalchemy.dialects import postgresql
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from billing.ledger import insert_usage_from
from billing.models import UsageEvent
from core.database import UTCDateTime, db
from core.delivery_log import failure_message
from ghl.deliveries import DELIVERIES, INSERTS, PARAMETERS, STORED_COLUMNS, delivery_values
from ghl.events import already_recorded_note, not_installed_note, read_message, unknown_subaccount
from ghl.models import GhlLocation, GhlWebhookDelivery
from ghl.payloads import PayloadInvalid

_DELIVERY = GhlWebhookDelivery.__table__
_LOCATION = GhlLocation.__table__


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
        *(bindparam(PARAMETERS[column]) for column in STORED_COLUMNS[:6]),  # webhook_id … signature_scheme
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
        .from_select(STORED_COLUMNS, delivery)
        .on_conflict_do_nothing(index_elements=["webhook_id"])
        .returning(_DELIVERY.c.id, _DELIVERY.c.status, _DELIVERY.c.error)
    )


_MESSAGE_STATEMENT = _message_statement()


def accept_message(body: bytes, text: str, event: dict[str, Any], scheme: str) -> str:
    """Store a message delivery and record its usage in one autocommitted statement (PostgreSQL).

    Same outcomes and fallbacks as ghl.deliveries.accept_in_one_transaction: a payload without its ids, or a
    statement the database refuses, stores the delivery alone as failed; raises SQLAlchemyError only when
    even that fails.
    """
    delivery = delivery_values(body, text, event, scheme)
    try:
        message = read_message(event)
    except PayloadInvalid as error:
        return _store_failed(delivery, error)
    parameters = delivery | {
        "location_id": message.location_id,
        "message_id": message.message_id,
        "direction": message.direction,
        "occurred_at": message.occurred_at,
        "unknown_subaccount": failure_message(unknown_subaccount(message)),
        "not_installed": not_installed_note(message),
        "already_recorded": already_recorded_note(message),
    }
    try:
        stored = _execute_alone(_MESSAGE_STATEMENT, parameters)
    except SQLAlchemyError as error:  # e.g. a value PostgreSQL refuses: keep the delivery alone, failed
        return _store_failed(delivery, error)
    if stored is None:
        return "duplicate"
    if stored.status == "failed":
        DELIVERIES.log_failure(stored.id, delivery["event_type"], stored.error)
    return stored.status


def _store_failed(delivery: dict[str, Any], error: Exception) -> str:
    """Store the delivery alone, failed with ``error`` (replayable), in its own autocommitted statement."""
    message = failure_message(error)
    stored = _execute_alone(INSERTS["postgresql"], delivery | {"status": "failed", "error": message, "attempts": 1})
    if stored is None:
        return "duplicate"
    DELIVERIES.log_failure(stored.id, delivery["event_type"], message)
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
