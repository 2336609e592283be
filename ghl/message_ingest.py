"""Message deliveries on PostgreSQL: stored and counted by one multi-row statement per group commit (the hot path).

Concurrent message deliveries of one worker process are written together (core.group_commit): one
statement stores every delivery of the batch and records each message's usage, and since it runs in
autocommit mode it is its own transaction: the server answers only after the commit is flushed to the
WAL (synchronous_commit stays on), so every 200 follows a durable commit of its row. If the batch fails
(the database is down, a lock, a batch not stored within GHL_WEBHOOK_STORE_TIMEOUT_MS, a dropped connection
retried once in vain) every delivery of the batch is answered 429 — GHL retries them — and none is
acknowledged.

The statement writes what ghl.deliveries' one-transaction path writes for the same delivery (the delivery
row with its outcome, the usage row), with ghl.events' outcome texts, so a replay of the stored delivery
records the same outcome (tests/ghl/test_webhooks.py compares them), and copies inside one batch are
deduplicated as copies in separate requests are (tests/ghl/test_message_group_commit.py). It is compiled
once, to psycopg's own SQL text (no SQLAlchemy compile or execution context per batch), and sent on the
worker's own connection, where psycopg prepares it after a few uses; one text serves every batch size, the
rows travel as one JSON array. SQLite, and replays, go through ghl.deliveries and ghl.events.
"""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Any

import psycopg
from sqlalchemy import Engine, Text, bindparam, case, cast, event, exists, func, literal, literal_column, select, true
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import JSONB, distinct_on
from sqlalchemy.dialects.postgresql.psycopg import dialect as psycopg_dialect
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError

from billing.ledger import insert_usage_from
from billing.models import UsageEvent
from billing.states import UsageSource
from core.delivery_log import failure_message
from core.group_commit import Arrival, GroupCommit
from ghl.deliveries import DELIVERIES, INSERTS, STORED_COLUMNS, delivery_values
from ghl.events import already_recorded_note, not_installed_note, read_message, unknown_subaccount
from ghl.ingest_connections import IngestConnections
from ghl.models import GhlLocation, GhlWebhookDelivery
from ghl.payloads import PayloadInvalid

log = logging.getLogger("ghl.message_ingest")

_DELIVERY = GhlWebhookDelivery.__table__
_LOCATION = GhlLocation.__table__
# Up to this many deliveries share one statement; a leader waits at most MAX_WAIT seconds for requests of
# its worker that are still being verified (core.group_commit), never when there are none.
MAX_ROWS = 64
MAX_WAIT = 0.002
# One batch in flight per worker. Under gevent (the Procfile's worker) the worker's other requests go on
# being read and verified while a batch's statement and WAL flush run, and queue for the next batch, so one
# writer loses no throughput and every statement carries about twice the rows it did with two: PostgreSQL's
# CPU per delivery fell from ~160-180 to ~100-120 µs (a statement costs ~200 µs before its first row,
# bench/README.md). Two writers paid off under gthread, where collecting a batch meant waking threads.
MAX_WRITERS = 1
_TIMESTAMP = postgresql.TIMESTAMP(timezone=True)
# The fields of one delivery in the batch's JSON array (element i is row i, itself an array of these fields in
# this order), with their SQL types.
_FIELDS = {
    "webhook_id": Text(),
    "event_type": Text(),
    "company_id": Text(),
    "delivery_location_id": Text(),
    "body": Text(),
    "signature_scheme": Text(),
    "received_at": _TIMESTAMP,
    "location_id": Text(),
    "message_id": Text(),
    "direction": Text(),
    "occurred_at": _TIMESTAMP,
    "unknown_subaccount": Text(),
    "not_installed": Text(),
    "already_recorded": Text(),
}
_TIMESTAMP_POSITIONS = [position for position, type_ in enumerate(_FIELDS.values()) if type_ is _TIMESTAMP]
# psycopg._queries.MAX_CACHED_STATEMENT_LENGTH (psycopg 3.1-3.2): longer query texts are parsed per execution.
PSYCOPG_CACHED_QUERY_LENGTH = 4096
# Errors of a value PostgreSQL refuses (e.g. a NUL in text): one delivery's problem, not the batch's.
_REFUSED_VALUE = (psycopg.DataError, psycopg.IntegrityError)


# Handed by the batch writer to each item of a batch the database refused: its request writes it alone.
_WRITE_ALONE = object()
# A batch's own deadline on the worker's side, in store timeouts: the server cancels a statement at one
# (statement_timeout); this bounds the wait when the server cannot (ghl.ingest_connections).
STALLED_AFTER = 1.5


class StoreUnavailable(Exception):
    """The delivery could not be stored (its batch failed): answer 429, GHL retries."""


def _batch_statement():
    """Store a batch of message deliveries and record their usage in ONE statement; RETURNING webhook_id, id,
    status, error for each stored delivery.

        WITH located AS (SELECT input.*, ghl_location.agency_id, is_installed, <first copy of its webhookId
                                in the batch>, <webhookId stored before>
                         FROM unnest(<one array per field>) WITH ORDINALITY AS input LEFT JOIN ghl_location …),
             candidate AS (SELECT DISTINCT ON (agency_id, message_id) … FROM located
                           WHERE is_installed AND first copy AND not stored before ORDER BY …, ord),
             usage AS (INSERT INTO usage_event … SELECT … FROM candidate ORDER BY agency_id, message_id
                       ON CONFLICT (agency_id, source, source_event_id) DO NOTHING RETURNING agency_id, source_event_id)
        INSERT INTO ghl_webhook_delivery … SELECT …, <status and error from located, candidate and usage>
        FROM located ORDER BY webhook_id, ord ON CONFLICT (webhook_id) DO NOTHING RETURNING …

    The outcomes are those of ghl.events for each message: subaccount unknown → "failed" (replayable), not
    installed → "ignored", message recorded before → "ignored", else "processed"; no row → a duplicate
    delivery, which records nothing. Inside a batch, copies behave as if they came one after another in
    batch order: the first copy of a webhookId is stored (the others are duplicates), and of several
    webhooks carrying one message only the first records it (the others read "already recorded").
    Across batches (other workers) two copies in flight at once count once: the second usage INSERT waits
    on the first's unique-index entry, then does nothing. Rows are inserted in key order (usage by
    agency and message, deliveries by webhookId), so two batches holding the same keys wait for each other
    in one order and cannot deadlock.
    """
    elements = (
        func.jsonb_array_elements(bindparam("rows", type_=JSONB))
        .table_valued("value", with_ordinality="ord")
        .render_derived(name="element")
    )
    def field(position: int, name: str, type_):
        text = elements.c.value.op("->>")(literal_column(str(position)))  # ->> reads element i as text
        return (text if isinstance(type_, Text) else cast(text, type_)).label(name)

    rows = select(
        *(field(position, name, type_) for position, (name, type_) in enumerate(_FIELDS.items())), elements.c.ord
    ).cte("input")
    # Both lookups are LATERAL ... LIMIT 1, i.e. one index probe per row. The plan is generic and lives as
    # long as the connection, often made while the tables are small (a fresh install, a new database): with
    # a join or EXISTS, the planner (which guesses 100 rows for the JSON array) then picks a hash over the
    # whole table, and every later batch pays a scan that grows with the table (bench/README.md).
    location = (
        select(_LOCATION.c.agency_id, _LOCATION.c.is_installed)
        .where(_LOCATION.c.location_id == rows.c.location_id)
        .limit(1)
        .lateral("location")
    )
    stored = select(_DELIVERY.c.id).where(_DELIVERY.c.webhook_id == rows.c.webhook_id).limit(1).lateral("stored")
    located = (
        select(
            rows,
            location.c.agency_id,
            location.c.is_installed,
            (func.row_number().over(partition_by=rows.c.webhook_id, order_by=rows.c.ord) == 1).label("first_copy"),
            stored.c.id.is_not(None).label("stored_before"),
        )
        .select_from(rows.outerjoin(location, true()).outerjoin(stored, true()))
        .cte("located")
    )
    candidate = (
        select(located.c.ord, located.c.agency_id, located.c.message_id, located.c.location_id,
               located.c.direction, located.c.occurred_at, located.c.received_at)
        .where(located.c.is_installed, located.c.first_copy, ~located.c.stored_before)
        .ext(distinct_on(located.c.agency_id, located.c.message_id))
        .order_by(located.c.agency_id, located.c.message_id, located.c.ord)
        .cte("candidate")
    )  # fmt: skip
    usage = (
        insert_usage_from(
            select(
                candidate.c.agency_id,
                literal(UsageSource.GHL_WEBHOOK.value),
                candidate.c.message_id,
                None,  # channel_id
                candidate.c.location_id,
                0,  # input_tokens
                0,  # output_tokens
                1,  # messages
                candidate.c.direction,
                None,  # model
                candidate.c.occurred_at,
                candidate.c.received_at,
            ).order_by(candidate.c.agency_id, candidate.c.message_id)
        )
        .returning(UsageEvent.__table__.c.agency_id, UsageEvent.__table__.c.source_event_id)
        .cte("usage")
    )
    known = located.c.agency_id.is_not(None)
    recorded = exists().where(
        candidate.c.ord == located.c.ord,
        usage.c.agency_id == candidate.c.agency_id,
        usage.c.source_event_id == candidate.c.message_id,
    )
    delivery = select(
        located.c.webhook_id,
        located.c.event_type,
        located.c.company_id,
        located.c.delivery_location_id,
        located.c.body,
        located.c.signature_scheme,
        located.c.received_at,
        case((~known, "failed"), (recorded, "processed"), else_="ignored"),  # status
        case(  # error
            (~known, located.c.unknown_subaccount),
            (~located.c.is_installed, located.c.not_installed),
            (~recorded, located.c.already_recorded),
        ),
        1,  # attempts
        case((known, located.c.received_at)),  # processed_at: not for a failure, which stays replayable
    ).order_by(located.c.webhook_id, located.c.ord)
    statement = (
        postgresql.insert(_DELIVERY)
        .from_select(STORED_COLUMNS, delivery)
        .on_conflict_do_nothing(index_elements=["webhook_id"])
        .returning(_DELIVERY.c.webhook_id, _DELIVERY.c.id, _DELIVERY.c.status, _DELIVERY.c.error)
    )
    compiled = statement.compile(dialect=psycopg_dialect())
    constants = {name: bind.effective_value for bind, name in compiled.bind_names.items() if name != "rows"}
    # psycopg caches the parsing of a query's placeholders only up to MAX_CACHED_STATEMENT_LENGTH characters
    # (4096): above that it re-parses the text on every execution (regular expressions over 4 KB, the
    # largest CPU cost of a batch when measured). So labels that repeat the column's name and runs of
    # whitespace go; the import fails if the text still does not fit.
    text = re.sub(r"\s+", " ", re.sub(r"\b(\w+)\.(\w+) AS \2\b", r"\1.\2", compiled.string))
    if len(text) > PSYCOPG_CACHED_QUERY_LENGTH:
        raise RuntimeError(f"the batch statement has {len(text)} characters: psycopg would parse it per execution")
    return text, constants


def _rows_json(items: list[dict[str, Any]]) -> str:
    """The batch as one JSON array of arrays, each the item's _FIELDS in order (one C-level encode; psycopg's
    text arrays escape every element in Python). Positions, not names: less to encode, and PostgreSQL reads
    an array element by index instead of searching an object's keys, 14 times a row."""
    rows = [[item[name] for name in _FIELDS] for item in items]
    for row in rows:
        for position in _TIMESTAMP_POSITIONS:
            row[position] = row[position].isoformat()
    return json.dumps(rows)


def _results(items: list[dict[str, Any]], rows: list[tuple]) -> list[Any]:
    """(id, status, error) of each item's stored delivery, None for a duplicate, from the RETURNING rows."""
    stored = {webhook_id: (delivery_id, status, error) for webhook_id, delivery_id, status, error in rows}
    # The first copy of a webhookId in the batch is the one stored; later copies are duplicates.
    return [stored.pop(item["webhook_id"], None) for item in items]


# Compiled once, to psycopg's %(name)s text; the constants are the statement's own literals.
_BATCH_SQL, _BATCH_CONSTANTS = _batch_statement()


class MessageIngest:
    """Accept message deliveries through one worker's group commit (PostgreSQL)."""

    def __init__(
        self,
        engine: Engine,
        *,
        store_timeout_ms: int = 5000,
        max_rows: int = MAX_ROWS,
        max_wait: float = MAX_WAIT,
        max_writers: int = MAX_WRITERS,
    ):
        self.engine = engine
        self.store_timeout_ms = store_timeout_ms
        self.connections = IngestConnections(engine, store_timeout_ms)
        event.listen(engine, "engine_disposed", lambda _engine: self.close())
        self.batches: GroupCommit[dict[str, Any], Any] = GroupCommit(
            self._write, max_rows=max_rows, max_wait=max_wait, max_writers=max_writers
        )

    def accept(
        self, body: bytes, text: str, event: dict[str, Any], scheme: str, arrival: Arrival | None = None
    ) -> str:
        """Store a message delivery and record its usage; return its status or "duplicate".

        Same outcomes and fallbacks as ghl.deliveries.accept_in_one_transaction: a payload without its ids,
        or a value the database refuses, stores the delivery alone as failed. Raises StoreUnavailable when
        the delivery's batch could not be written (nothing of it is stored or acknowledged).
        """
        delivery = delivery_values(body, text, event, scheme)
        try:
            message = read_message(event)
        except PayloadInvalid as error:
            return self._outcome(self._failed_alone(delivery, error), delivery)
        item = delivery | {
            "location_id": message.location_id,
            "message_id": message.message_id,
            "direction": message.direction,
            "occurred_at": message.occurred_at,
            "unknown_subaccount": failure_message(unknown_subaccount(message)),
            "not_installed": not_installed_note(message),
            "already_recorded": already_recorded_note(message),
            "arrived": time.monotonic(),  # its batch's deadline counts from the oldest arrival
        }
        try:
            stored = self.batches.submit(item, arrival)
        except Exception as error:  # the batch failed (the database, BatchInterrupted, a bug): none of it stored
            raise StoreUnavailable(type(error).__name__) from error
        if stored is _WRITE_ALONE:  # in this request's own thread or greenlet, not in the writer's lead
            stored = self._write_alone(item)
        return self._outcome(stored, item)

    @staticmethod
    def _outcome(stored: Any, delivery: dict[str, Any]) -> str:
        if isinstance(stored, BaseException):  # its own write failed, and so did storing its failure
            raise StoreUnavailable(type(stored).__name__) from stored
        if stored is None:
            return "duplicate"
        delivery_id, status, error = stored
        if status == "failed":
            DELIVERIES.log_failure(delivery_id, delivery["event_type"], error)
        return status

    def _write(self, items: list[dict[str, Any]]) -> list[Any]:
        """Write a batch: (id, status, error) per item, None for a duplicate; raises when the batch failed.

        A value the database refuses fails the whole statement: then every item is to be written alone
        (_WRITE_ALONE), each by its own request once the batch is over, so that the worker's next batch need
        not wait for them (one of them may wait on a lock up to the store timeout); the refused one is stored
        alone as failed (as in ghl.deliveries), and an item whose own write fails is answered 429 alone.
        """
        try:
            rows = self._execute(items)
        except _REFUSED_VALUE:
            return [_WRITE_ALONE] * len(items)
        return _results(items, rows)

    def _write_alone(self, item: dict[str, Any]) -> Any:
        """One item of a refused batch, in its own statement through SQLAlchemy (its errors read as elsewhere)."""
        try:
            rows = self._execute_alone(_BATCH_SQL, _BATCH_CONSTANTS | {"rows": _rows_json([item])})
        except (DataError, IntegrityError) as error:
            return self._failed_alone(item, error)
        except Exception as error:  # e.g. text psycopg cannot encode: this delivery alone is answered 429
            return error
        return _results([item], rows)[0]

    def _failed_alone(self, delivery: dict[str, Any], error: Exception) -> Any:
        """Store the delivery alone, failed with ``error`` (replayable): (id, "failed", message), None for a
        duplicate, or the exception when even that could not be stored."""
        message = failure_message(error)
        values = delivery | {"status": "failed", "error": message, "attempts": 1}
        try:
            stored = self._execute_alone(INSERTS["postgresql"], values)
        except Exception as store_error:  # the database is down, or a value cannot even be stored as failed
            return store_error
        return None if stored is None else (stored.id, "failed", message)

    def _execute(self, items: list[dict[str, Any]]) -> list[tuple]:
        """Run the batch statement on one of the worker's own connections (ghl.ingest_connections), in
        autocommit: the statement is its transaction. Whatever the server does, the batch is answered or given
        up and raised: the server cancels it one store timeout after it is sent (a lock), and the worker cuts it
        STALLED_AFTER store timeouts after its oldest delivery arrived, or one store timeout + 0.5 s (CUT_MARGIN)
        after it was sent if that is later; a batch whose deadline passed in the queue is not even sent. So a delivery
        that queued behind a stalled batch is answered up to ~2.5 store timeouts after it arrived."""
        deadline = min(item["arrived"] for item in items) + STALLED_AFTER * self.store_timeout_ms / 1000
        return self.connections.run(_BATCH_SQL, _BATCH_CONSTANTS | {"rows": _rows_json(items)}, deadline)

    def close(self) -> None:
        """Close the worker's own idle connections (with the engine's pool: the app's end, or a test's)."""
        self.connections.close()

    def _execute_alone(self, statement, parameters: dict[str, Any]):
        """Run one statement as its own transaction; retried once on a dropped connection."""
        try:
            return self._execute_in_own_transaction(statement, parameters)
        except DBAPIError as error:
            if not error.connection_invalidated:
                raise
            return self._execute_in_own_transaction(statement, parameters)

    def _execute_in_own_transaction(self, statement, parameters: dict[str, Any]):
        """One statement in its own transaction on a pooled connection, cancelled after the store timeout as
        the batch statement is (SET LOCAL: the pooled connection keeps its own settings)."""
        with self.engine.begin() as connection:
            connection.exec_driver_sql(f"SET LOCAL statement_timeout = {int(self.store_timeout_ms)}")
            if isinstance(statement, str):  # the batch statement, one refused item at a time
                return connection.exec_driver_sql(statement, parameters).all()
            return connection.execute(statement, parameters).first()
