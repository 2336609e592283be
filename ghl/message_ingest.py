"""Message deliveries on PostgreSQL: stored and counted by one multi-row statement per group commit (the hot path).

Concurrent message deliveries of one worker process are written together (core.group_commit): one
statement stores every delivery of the batch and records each message's usage, and since it runs in
autocommit mode it is its own transaction: the server answers only after the commit is flushed to the
WAL (synchronous_commit stays on), so every 200 follows a durable commit of its row. If a statement of the
batch fails (the database is down, a lock, a batch not stored within GHL_WEBHOOK_STORE_TIMEOUT_MS, a dropped
connection retried once in vain), its deliveries and those of any later round (copies, see _rounds) are
answered 429 — GHL retries them — and none of them is acknowledged; rounds already committed keep their
answers.

The statement writes what ghl.deliveries' one-transaction path writes for the same delivery (the delivery
row with its outcome, the usage row), with ghl.events' outcome texts, so a replay of the stored delivery
records the same outcome (tests/ghl/test_webhooks.py compares them). Copies inside one batch (a webhookId
or a messageId twice) are rare; they are sorted out in Python, not by the statement: a later copy goes into
a follow-up statement of the same batch, sent once the first committed, so it reads "duplicate" or
"already recorded" as it would in a request of its own (_rounds; tests/ghl/test_message_group_commit.py).
The statement is compiled once, with its constants written in and one parameter, $1, the rows as one JSON
array (one text serves every batch size), and sent as it is on the worker's own connection, prepared there
(ghl.ingest_connections): no SQLAlchemy compile, execution context or placeholder conversion per batch.
SQLite, and replays, go through ghl.deliveries and ghl.events.
"""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Any

import psycopg
from sqlalchemy import Engine, Text, case, cast, event, func, literal, literal_column, select, true
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import JSONB
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
# Up to this many deliveries share one statement. Before collecting its batch a leader waits at most MAX_WAIT
# seconds for its worker's requests that are being read or verified (core.group_commit: under gevent, until
# no other greenlet can run; alone, one loop turn). 5 ms, not 2: under full load a worker's connections then
# share one batch instead of taking turns in two, and CPU per delivery fell ~15 % (bench/README.md, fourth
# pass); only a saturated worker ever waits that long, and it adds at most that to a delivery's answer.
MAX_ROWS = 64
MAX_WAIT = 0.005
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
# Errors of a value PostgreSQL refuses (e.g. a NUL in text): one delivery's problem, not the batch's.
_REFUSED_VALUE = (psycopg.DataError, psycopg.IntegrityError)


# Handed by the batch writer to each item of a batch the database refused: its request writes it alone.
_WRITE_ALONE = object()
# A batch's own deadline on the worker's side, in store timeouts: the server cancels a statement at one
# (statement_timeout); this bounds the wait when the server cannot (ghl.ingest_connections).
STALLED_AFTER = 1.5


class StoreUnavailable(Exception):
    """The delivery could not be stored (its batch failed): answer 429, GHL retries."""


def _batch_statement() -> str:
    """Store one round of a batch (no two deliveries with one webhookId or one messageId, see _rounds) and
    record its usage in ONE statement; RETURNING webhook_id, id, status, error for each stored delivery.

        WITH located AS (SELECT <the fields of each element>, ghl_location.agency_id, is_installed,
                                <webhookId stored before>
                         FROM jsonb_array_elements($1) LEFT JOIN LATERAL <location> LEFT JOIN LATERAL <stored>),
             usage AS (INSERT INTO usage_event … SELECT … FROM located WHERE is_installed AND NOT stored before
                       ORDER BY agency_id, message_id
                       ON CONFLICT (agency_id, source, source_event_id) DO NOTHING RETURNING agency_id, source_event_id)
        INSERT INTO ghl_webhook_delivery … SELECT …, <status and error from located and the usage it recorded>
        FROM located LEFT JOIN usage ON <its agency and message> ORDER BY webhook_id
        ON CONFLICT (webhook_id) DO NOTHING RETURNING …

    The outcomes are those of ghl.events for each message: subaccount unknown → "failed" (replayable), not
    installed → "ignored", message recorded before → "ignored", else "processed"; no row → a duplicate
    delivery, which records nothing. "Processed" means this statement's usage INSERT returned the message's
    key (one delivery per message in a round, so the join finds at most one). Across batches (other workers)
    two copies in flight at once count once: the second usage INSERT waits on the first's unique-index
    entry, then does nothing.

    No deadlock between workers: every statement takes its index entries in one global order, usage keys
    first, by (agency, message) (the unique index's order), then delivery keys by webhookId. The ORDER BY
    of the usage SELECT orders the first; the Sort under the delivery INSERT orders the second and, since a
    sort emits nothing before it has read all of its input (the join, hence the whole usage CTE), no
    delivery is inserted before the last usage row. Keys are distinct within a statement, so these orders
    are total. (Sorting in Python instead cannot serve both: webhookId and messageId orders are
    independent; and without the Sort the phases interleave in a nested-loop plan. bench/README.md.)
    """
    elements = (
        func.jsonb_array_elements(cast(literal_column("$1"), JSONB))
        .table_valued("value")
        .render_derived(name="element")
    )

    def field(position: int, name: str, type_):
        text = elements.c.value.op("->>")(literal_column(str(position)))  # ->> reads element i as text
        return (text if isinstance(type_, Text) else cast(text, type_)).label(name)

    fields = (field(position, name, type_) for position, (name, type_) in enumerate(_FIELDS.items()))
    rows = select(*fields).subquery("input")
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
        select(rows, location.c.agency_id, location.c.is_installed, stored.c.id.is_not(None).label("stored_before"))
        .select_from(rows.outerjoin(location, true()).outerjoin(stored, true()))
        .cte("located")
    )
    usage = (
        insert_usage_from(
            select(
                located.c.agency_id,
                literal(UsageSource.GHL_WEBHOOK.value),
                located.c.message_id,
                None,  # channel_id
                located.c.location_id,
                0,  # input_tokens
                0,  # output_tokens
                1,  # messages
                located.c.direction,
                None,  # model
                located.c.occurred_at,
                located.c.received_at,
            )
            .where(located.c.is_installed, ~located.c.stored_before)
            .order_by(located.c.agency_id, located.c.message_id)
        )
        .returning(UsageEvent.__table__.c.agency_id, UsageEvent.__table__.c.source_event_id)
        .cte("usage")
    )
    known = located.c.agency_id.is_not(None)
    recorded = usage.c.source_event_id.is_not(None)
    delivery = (
        select(
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
        )
        .select_from(
            located.outerjoin(
                usage,
                (usage.c.agency_id == located.c.agency_id) & (usage.c.source_event_id == located.c.message_id),
            )
        )
        .order_by(located.c.webhook_id)
    )
    statement = (
        postgresql.insert(_DELIVERY)
        .from_select(STORED_COLUMNS, delivery)
        .on_conflict_do_nothing(index_elements=["webhook_id"])
        .returning(_DELIVERY.c.webhook_id, _DELIVERY.c.id, _DELIVERY.c.status, _DELIVERY.c.error)
    )
    # The constants are written into the text (literal_binds): the one parameter left is the rows ($1).
    compiled = statement.compile(dialect=psycopg_dialect(), compile_kwargs={"literal_binds": True})
    # Labels that repeat the column's name and runs of whitespace go: less for the server to parse once,
    # and for a reader of pg_stat_activity.
    text = re.sub(r"\s+", " ", re.sub(r"\b(\w+)\.(\w+) AS \2\b", r"\1.\2", compiled.string))
    if text.count("$") != 1 or "%" in text:  # one server-side parameter, no pyformat escapes
        raise RuntimeError(f"the batch statement is not a one-parameter text: {text}")
    return text


def _rounds(items: list[dict[str, Any]]) -> list[list[int]]:
    """The positions of the batch's items, in the statements that write them one after another.

    A statement holds no two items with one webhookId or one messageId: a later copy goes into a later
    statement than every earlier item it shares a key with, so it is written after they committed and reads
    as it would in a request of its own after theirs ("duplicate", "already recorded"). Items that share no
    key do not see each other, so each outcome is the one of the items written one by one in batch order.
    Copies inside one batch are rare: most batches are one statement.
    """
    webhooks = {item["webhook_id"] for item in items}
    messages = {item["message_id"] for item in items}
    if len(webhooks) == len(messages) == len(items):
        return [list(range(len(items)))]
    rounds: list[list[int]] = []
    round_of: dict[tuple[str, str], int] = {}  # the last round holding a key
    for position, item in enumerate(items):
        keys = (("webhook", item["webhook_id"]), ("message", item["message_id"]))
        number = max((round_of[key] + 1 for key in keys if key in round_of), default=0)
        for key in keys:
            round_of[key] = number
        if number == len(rounds):
            rounds.append([])
        rounds[number].append(position)
    return rounds


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
    """(id, status, error) of each item's stored delivery, None for a duplicate, from the RETURNING rows of
    one statement (whose items have distinct webhookIds)."""
    stored = {webhook_id: (delivery_id, status, error) for webhook_id, delivery_id, status, error in rows}
    return [stored.get(item["webhook_id"]) for item in items]


def _answering_the_rest(results: list[Any], rounds: list[list[int]], answer: Any) -> list[Any]:
    """``results`` with ``answer`` for every item of ``rounds`` (the rounds not written)."""
    for positions in rounds:
        for position in positions:
            results[position] = answer
    return results


# Compiled once, with its constants written in: one parameter, $1, the rows' JSON array. The worker's own
# connections send it through a RawCursor (no placeholder conversion on our side, ghl.ingest_connections);
# SQLAlchemy's connections, which write a refused batch's items alone, take it with psycopg's %(rows)s.
_BATCH_SQL = _batch_statement()
_BATCH_SQL_NAMED = _BATCH_SQL.replace("$1", "%(rows)s")


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
        item = delivery_values(body, text, event, scheme)
        try:
            message = read_message(event)
        except PayloadInvalid as error:
            return self._outcome(self._failed_alone(item, error), item)
        # The delivery's own dict, completed in place (a merged copy per delivery is work for nothing).
        item["location_id"] = message.location_id
        item["message_id"] = message.message_id
        item["direction"] = message.direction
        item["occurred_at"] = message.occurred_at
        item["unknown_subaccount"] = failure_message(unknown_subaccount(message))
        item["not_installed"] = not_installed_note(message)
        item["already_recorded"] = already_recorded_note(message)
        item["arrived"] = time.monotonic()  # its batch's deadline counts from the oldest arrival
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

        One statement per round (_rounds: one, unless the batch holds copies), each committed before the
        next is sent. A value the database refuses fails the whole statement: then every item of that round
        and the later ones is to be written alone (_WRITE_ALONE), each by its own request once the batch is
        over, so that the worker's next batch need not wait for them (one of them may wait on a lock up to
        the store timeout); the refused one is stored alone as failed (as in ghl.deliveries), and an item
        whose own write fails is answered 429 alone. When a later round fails otherwise, its items and the
        following ones get the error (429) while the committed rounds keep their outcomes.
        """
        deadline = min(item["arrived"] for item in items) + STALLED_AFTER * self.store_timeout_ms / 1000
        rounds = _rounds(items)
        results: list[Any] = [None] * len(items)
        for number, positions in enumerate(rounds):
            written = [items[position] for position in positions]
            try:
                rows = self._execute(written, deadline)
            except _REFUSED_VALUE:
                return _answering_the_rest(results, rounds[number:], _WRITE_ALONE)
            except Exception as error:
                if number == 0:
                    raise  # nothing of the batch is stored: every delivery of it is answered 429
                return _answering_the_rest(results, rounds[number:], error)
            for position, result in zip(positions, _results(written, rows), strict=True):
                results[position] = result
        return results

    def _write_alone(self, item: dict[str, Any]) -> Any:
        """One item of a refused batch, in its own statement through SQLAlchemy (its errors read as elsewhere)."""
        try:
            rows = self._execute_alone(_BATCH_SQL_NAMED, {"rows": _rows_json([item])})
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

    def _execute(self, items: list[dict[str, Any]], deadline: float) -> list[tuple]:
        """Run the batch statement for ``items`` (one round) on one of the worker's own connections
        (ghl.ingest_connections), in autocommit: the statement is its transaction. Whatever the server does, the
        batch is answered or given up and raised: the server cancels it one store timeout after it is sent (a
        lock), and the worker cuts it at ``deadline`` (STALLED_AFTER store timeouts after the batch's oldest
        delivery arrived), or one store timeout + 0.5 s (CUT_MARGIN) after it was sent if that is later; a
        statement whose deadline passed in the queue is not even sent. So a delivery that queued behind a
        stalled batch is answered up to ~2.5 store timeouts after it arrived."""
        return self.connections.run(_BATCH_SQL, (_rows_json(items),), deadline)

    def close(self) -> None:
        """Retire the worker's own connections: the idle ones are closed now, those in use once their batch ends
        (with the engine's pool: the app's end, or a test's)."""
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
