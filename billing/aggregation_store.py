"""The batch SQL of aggregation (billing.units): one interface, a PostgreSQL and a SQLite implementation.

``aggregation_store()`` picks the implementation for the session's database once per pass; billing.units
then reads as its algorithm and never asks which database it runs on. Both implementations take and return
the same shapes and write the same rows. PostgreSQL sends each batch in one statement over ``unnest`` arrays
and reads the claim as plain DBAPI tuples with times as integer microseconds (the bench's hot path, see
bench/README.md); SQLite uses SQLAlchemy's executemany and datetimes.
"""

from __future__ import annotations

import datetime as dt
import itertools
import threading
from collections.abc import Iterator, Sequence
from typing import NamedTuple

from sqlalchemy import BigInteger, bindparam, cast, extract, func, insert, select, text, tuple_, update
from sqlalchemy.orm.util import identity_key

from billing.models import RebillClient, RebillClientTerm, UnitReport, UsageEvent
from billing.sources import ClientKey, source_field
from billing.states import ReportStatus, UsageState
from core.database import db

KEY_LOOKUP_CHUNK = 500
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)

_EVENT = UsageEvent.__table__.c
_CLIENT = RebillClient.__table__.c


class ClaimedEvent(NamedTuple):
    """A claimed pending event, in the claim's column order.

    The claim returns plain tuples of this shape (building a named tuple per row costs more than the rest of
    the per-event work); read them by unpacking into these names. ``occurred`` and ``received`` are moments
    in the store's own unit (``AggregationStore.moment``).
    """

    id: int
    agency_id: int
    source: str
    channel_id: str | None
    location_id: str | None
    input_tokens: int
    output_tokens: int
    messages: int
    direction: str | None
    occurred: dt.datetime | int
    received: dt.datetime | int


class LiveClient(NamedTuple):
    id: int
    agency_id: int
    provider: str
    source_key: str


class ClientCounters(NamedTuple):
    """A client's counters after a pass (rule 1)."""

    id: int
    counted_usage: int
    units_logged: int
    remainder: int
    report_sequence: int


class NewReport(NamedTuple):
    """One outbox row a pass writes (written ``pending``, no attempts yet)."""

    agency_id: int
    client_id: int
    identifier: str
    units: int
    usage_timestamp: dt.datetime


class EventMarks(NamedTuple):
    """The new state of a batch of events, as parallel lists (client id 0: no client)."""

    ids: list[int]
    states: list[str]
    client_ids: list[int]
    counted: list[int]


# What aggregation reads of a client it locks (billing.client_tally.ClientTally).
TALLY_FIELDS = (
    "id",
    "agency_id",
    "provider",
    "source_key",
    "charge_by",
    "message_source",
    "status",
    "billing_unit",
    "counted_usage",
    "units_logged",
    "remainder",
    "report_sequence",
    "report_prefix",
    "quarantine_reason",
    "term_started_at",
    "monthly_cap_units",
)
_CLAIM_COLUMNS = (
    _EVENT.id,
    _EVENT.agency_id,
    _EVENT.source,
    _EVENT.channel_id,
    _EVENT.location_id,
    _EVENT.input_tokens,
    _EVENT.output_tokens,
    _EVENT.messages,
    _EVENT.direction,
)


class Marking:
    """A marking statement (``AggregationStore.start_marking``) running, or done if made without a thread."""

    def __init__(self, run=None):
        self.error: BaseException | None = None
        self.thread = None
        if run is not None:
            self.thread = threading.Thread(target=self._run, args=(run,), name="aggregation-marking", daemon=True)
            self.thread.start()

    def _run(self, run) -> None:
        try:
            run()
        except BaseException as error:  # handed to the aggregating thread by wait()
            self.error = error

    def join(self) -> None:
        """Wait until the statement is done, whatever its outcome."""
        if self.thread is not None:
            self.thread.join()

    def wait(self) -> None:
        """Wait until the statement is done; raise its error, if any."""
        self.join()
        if self.error is not None:
            raise self.error


class MarkingPipeline:
    """A pass's batches marked one step behind its claims (``with store.marking_pipeline() as pipeline``).

    ``queue`` hands over a classified batch once the previous batch's marking is done; ``start`` (given to
    the next claim as ``meanwhile``) sends it as soon as the server has answered that claim, so the UPDATE
    runs in the server while this process reads, locks the clients of and classifies the next batch. The
    last batch is marked when the block ends. A block that fails waits for a running marking (the
    transaction must never roll back under a statement still running) and, if that marking failed, raises
    its error: the cause, which the aggregating thread's own statement then met as an aborted transaction.
    """

    def __init__(self, store: AggregationStore):
        self.store = store
        self.ready: object | None = None  # the batch classified last, its marking statement built
        self.running: Marking | None = None  # the previous batch's marking

    def start(self) -> None:
        if self.ready is not None:
            self.running, self.ready = self.store.start_marking(self.ready), None

    def queue(self, first_id: int, last_id: int, marks: EventMarks) -> None:
        if self.running is not None:
            self.running.wait()
            self.running = None
        if marks.ids:
            self.ready = self.store.marking(first_id, last_id, marks)

    def __enter__(self) -> MarkingPipeline:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if error is None:
            self.start()
            if self.running is not None:
                self.running.wait()
        elif self.running is not None:
            self.running.join()
            if self.running.error is not None and isinstance(error, Exception):
                raise self.running.error


class AggregationStore:
    """What both databases share; the subclasses write the batch statements their own way."""

    def moment(self, value: dt.datetime) -> dt.datetime | int:
        """Return a datetime in the unit the claim reads times in."""
        return value

    def as_datetime(self, value: dt.datetime | int | None) -> dt.datetime | None:
        """Return an aware UTC datetime for a moment in the claim's unit."""
        return value

    def take_write_lock(self) -> None:
        """Make this transaction the database's writer now, where the database needs that (SQLite)."""

    def newest_event_id(self) -> int | None:
        return db.session.scalar(select(func.max(_EVENT.id)))

    def agencies_with_pending_usage(self) -> list[int]:
        query = select(_EVENT.agency_id).where(_EVENT.state == UsageState.PENDING).distinct().order_by(_EVENT.agency_id)
        return list(db.session.scalars(query))

    def agency_ranges(self, clients_per_range: int) -> list[tuple[int | None, int | None]]:
        """Split agency ids into consecutive ranges [low, high) of at most ``clients_per_range`` live clients.

        The first range starts and the last ends open (None), so every event falls in exactly one range,
        whatever its agency (one with no client, one created meanwhile). An agency with more clients than a
        range holds gets a range of its own. One range, (None, None), when every client fits.
        """
        query = (
            select(_CLIENT.agency_id, func.count())
            .where(_CLIENT.deleted_at.is_(None))
            .group_by(_CLIENT.agency_id)
            .order_by(_CLIENT.agency_id)
        )
        starts, held = [], 0
        for agency_id, clients in db.session.execute(query):
            if held and held + clients > clients_per_range:
                starts.append(agency_id)
                held = 0
            held += clients
        bounds = [None, *starts, None]
        return list(itertools.pairwise(bounds))

    def claim(
        self, *, after: int, newest: int, limit: int, where: Sequence, skip_locked: bool, meanwhile=None
    ) -> list[tuple]:
        """Return up to ``limit`` pending events with after < id <= newest, in id order (``ClaimedEvent`` tuples).

        ``meanwhile``: called once the server has answered, before its rows are read into Python objects.
        """
        rows = db.session.execute(self._claim(after, newest, limit, where)).all()
        if meanwhile is not None:
            meanwhile()
        return rows

    def _claim(self, after: int, newest: int, limit: int, where: Sequence, columns=()):
        columns = columns or (_EVENT.occurred_at, _EVENT.received_at)
        return (
            select(*_CLAIM_COLUMNS, *columns)
            .where(_EVENT.state == UsageState.PENDING, _EVENT.id > after, _EVENT.id <= newest, *where)
            .order_by(_EVENT.id)
            .limit(limit)
        )

    def find_live_clients(self, keys: list[ClientKey]) -> list[LiveClient]:
        """Return the live clients of these keys (no lock)."""
        found = []
        for start in range(0, len(keys), KEY_LOOKUP_CHUNK):
            found += db.session.execute(
                select(_CLIENT.id, _CLIENT.agency_id, _CLIENT.provider, _CLIENT.source_key).where(
                    _CLIENT.deleted_at.is_(None),
                    tuple_(_CLIENT.agency_id, _CLIENT.provider, _CLIENT.source_key).in_(
                        keys[start : start + KEY_LOOKUP_CHUNK]
                    ),
                )
            ).all()
        return [LiveClient(*row) for row in found]

    def lock_clients(self, ids: list[int], *, skip_locked: bool) -> Iterator[list]:
        """Lock these live clients in id order and yield their ``TALLY_FIELDS``, a chunk at a time.

        Consistent id order; SKIP LOCKED so aggregation never waits (see billing.units' docstring).
        """
        for start in range(0, len(ids), KEY_LOOKUP_CHUNK):
            yield db.session.execute(
                select(*(_CLIENT[name] for name in TALLY_FIELDS))
                .where(_CLIENT.id.in_(ids[start : start + KEY_LOOKUP_CHUNK]), _CLIENT.deleted_at.is_(None))
                .order_by(_CLIENT.id)
                .with_for_update(skip_locked=skip_locked)
            ).all()

    def closed_terms(self, client_id: int) -> list:
        """Return the client's closed terms (starts_at, ends_at, status, provider, source_key)."""
        term = RebillClientTerm.__table__.c
        return db.session.execute(
            select(term.starts_at, term.ends_at, term.status, term.provider, term.source_key).where(
                term.client_id == client_id
            )
        ).all()

    def write_quarantine(self, client_id: int, reason: str, now: dt.datetime) -> None:
        """Record why a client stopped counting (rare: one statement per client)."""
        db.session.execute(
            update(RebillClient.__table__)
            .where(_CLIENT.id == client_id)
            .values(quarantine_reason=reason, updated_at=now)
        )
        _expire_client(client_id)

    @staticmethod
    def expire_loaded(client_ids: list[int]) -> None:
        """Expire loaded clients and events written behind the session's back, so they reload on next access."""
        for client_id in client_ids:
            _expire_client(client_id)
        for obj in list(db.session.identity_map.values()):
            if isinstance(obj, UsageEvent):
                db.session.expire(obj)

    def marking(self, first_id: int, last_id: int, marks: EventMarks) -> object:
        """Return the statement moving a batch of events (ids between first_id and last_id) out of pending."""
        return first_id, last_id, marks

    def marking_pipeline(self) -> MarkingPipeline:
        return MarkingPipeline(self)

    def start_marking(self, marking: object) -> Marking:
        """Run a ``marking`` statement; here at once: the returned Marking is done."""
        self.mark_events(*marking)
        return Marking()

    def mark_events(self, first_id: int, last_id: int, marks: EventMarks) -> None:
        """Move a batch of events (ids between first_id and last_id) out of pending."""
        db.session.execute(
            update(UsageEvent.__table__)
            .where(_EVENT.id == bindparam("b_id"))
            .values(state=bindparam("b_state"), client_id=bindparam("b_client_id"), counted=bindparam("b_counted")),
            [
                {"b_id": event_id, "b_state": state, "b_client_id": client_id or None, "b_counted": quantity}
                for event_id, state, client_id, quantity in zip(*marks, strict=True)
            ],
        )

    def write_counters(self, rows: list[ClientCounters], now: dt.datetime) -> None:
        """Store the new counters of every client a pass changed."""
        db.session.execute(
            update(RebillClient.__table__)
            .where(_CLIENT.id == bindparam("b_id"))
            .values(
                counted_usage=bindparam("b_counted_usage"),
                units_logged=bindparam("b_units_logged"),
                remainder=bindparam("b_remainder"),
                report_sequence=bindparam("b_report_sequence"),
                updated_at=now,
            ),
            [{f"b_{name}": value for name, value in row._asdict().items()} for row in rows],
        )

    def write_reports(self, rows: list[NewReport], now: dt.datetime) -> None:
        """Insert a pass's outbox rows."""
        fresh = {
            "status": ReportStatus.PENDING,
            "attempts": 0,
            "next_attempt_at": now,
            "created_at": now,
            "updated_at": now,
        }
        db.session.execute(insert(UnitReport.__table__), [{**row._asdict(), **fresh} for row in rows])


class SqliteAggregationStore(AggregationStore):
    def take_write_lock(self) -> None:
        db.session.execute(update(RebillClient.__table__).where(_CLIENT.id == -1).values(remainder=_CLIENT.remainder))


def _microseconds(column):
    return cast(extract("epoch", column) * 1_000_000, BigInteger)


def _array_literal(values: Sequence[int | str]) -> str:
    """Return a PostgreSQL array literal of integers or plain words (no quoting needed)."""
    return "{" + ",".join(map(str, values)) + "}"


def _expire_client(client_id: int) -> None:
    client = db.session.identity_map.get(identity_key(RebillClient, client_id))
    if client is not None:
        db.session.expire(client)


def _columns(rows: Sequence[NamedTuple]) -> dict[str, tuple]:
    """Return a non-empty batch of named tuples as {field name: the column of its values}."""
    return dict(zip(rows[0]._fields, zip(*rows, strict=True), strict=True))


# The id range keeps the join on the primary key instead of a scan of the whole ledger.
_MARK_EVENTS = (
    "UPDATE usage_event AS e SET state = v.state, client_id = NULLIF(v.client_id, 0), counted = v.counted "
    "FROM unnest(CAST(%(ids)s AS bigint[]), CAST(%(states)s AS text[]), CAST(%(client_ids)s AS integer[]), "
    "CAST(%(counted)s AS bigint[])) AS v(id, state, client_id, counted) "
    "WHERE e.id = v.id AND e.id BETWEEN %(first_id)s AND %(last_id)s"
)


class PostgresAggregationStore(AggregationStore):
    """One statement per batch; the claim takes its rows with FOR UPDATE (SKIP LOCKED for passes)."""

    def moment(self, value: dt.datetime) -> int:
        # Formatting every timestamp in the server and parsing it into a datetime was a measurable part of
        # the claim reads (bench/README.md): the claim reads integer microseconds since the epoch instead.
        delta = value - EPOCH
        return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds

    def as_datetime(self, value: dt.datetime | int | None) -> dt.datetime | None:
        return EPOCH + dt.timedelta(microseconds=value) if isinstance(value, int) else value

    def claim(
        self, *, after: int, newest: int, limit: int, where: Sequence, skip_locked: bool, meanwhile=None
    ) -> list[tuple]:
        # SKIP LOCKED: two passes at once claim disjoint events. A flush waits instead, so it sees every
        # pending event of its client (LockRows sits under LIMIT: rows that stopped being pending while we
        # waited are skipped, not returned, so an empty batch means done).
        times = (_microseconds(_EVENT.occurred_at), _microseconds(_EVENT.received_at))
        statement = self._claim(after, newest, limit, where, times).with_for_update(skip_locked=skip_locked)
        # Plain DBAPI tuples: streaming a million ledger rows through SQLAlchemy's per-row result processing
        # costs seconds, and the values read here (ids, strings, integers) need none of it.
        compiled = statement.compile(dialect=db.engine.dialect)
        connection = db.session.connection().connection.dbapi_connection
        with connection.cursor() as cursor:
            cursor.execute(str(compiled), compiled.params)
            if meanwhile is not None:
                meanwhile()  # the answer is here: the connection is free while its rows are converted
            return cursor.fetchall()

    def find_live_clients(self, keys: list[ClientKey]) -> list[LiveClient]:
        # One statement for any number of keys; the join uses the live-source unique index.
        agencies, providers, source_keys = zip(*keys, strict=True) if keys else ((), (), ())
        rows = db.session.execute(
            text(
                "SELECT c.id, c.agency_id, c.provider, c.source_key FROM rebill_client AS c "
                "JOIN unnest(CAST(:agencies AS integer[]), CAST(:providers AS text[]), CAST(:keys AS text[])) "
                "AS k(agency_id, provider, source_key) ON c.agency_id = k.agency_id "
                "AND c.provider = k.provider AND c.source_key = k.source_key WHERE c.deleted_at IS NULL"
            ),
            {"agencies": list(agencies), "providers": list(providers), "keys": list(source_keys)},
        ).all()
        return [LiveClient(*row) for row in rows]

    def marking(self, first_id: int, last_id: int, marks: EventMarks) -> object:
        # Arrays as text literals (integers and fixed state words only): far cheaper to build than adapting
        # Python lists element by element. Built here, while the previous batch's UPDATE runs.
        return {
            **{name: _array_literal(values) for name, values in marks._asdict().items()},
            "first_id": first_id,
            "last_id": last_id,
        }

    def start_marking(self, marking: object) -> Marking:
        # On the session's own connection (the pass's transaction), from a thread: psycopg waits for the
        # server without the GIL, so this process classifies the next batch meanwhile. psycopg serialises
        # statements on a connection, so any statement this process sends meanwhile waits for this one.
        connection = db.session.connection().connection.dbapi_connection

        def run() -> None:
            with connection.cursor() as cursor:
                cursor.execute(_MARK_EVENTS, marking)

        return Marking(run)

    def write_counters(self, rows: list[ClientCounters], now: dt.datetime) -> None:
        db.session.execute(
            text(
                "UPDATE rebill_client AS c SET counted_usage = v.counted_usage, units_logged = v.units_logged, "
                "remainder = v.remainder, report_sequence = v.report_sequence, updated_at = :now "
                "FROM unnest(CAST(:id AS integer[]), CAST(:counted_usage AS bigint[]), "
                "CAST(:units_logged AS bigint[]), CAST(:remainder AS bigint[]), CAST(:report_sequence AS integer[])) "
                "AS v(id, counted_usage, units_logged, remainder, report_sequence) WHERE c.id = v.id"
            ),
            {
                **{name: _array_literal(column) for name, column in _columns(rows).items()},
                "now": now,
            },
        )

    def write_reports(self, rows: list[NewReport], now: dt.datetime) -> None:
        db.session.execute(
            text(
                "INSERT INTO unit_report (agency_id, client_id, identifier, units, usage_timestamp, status, "
                "attempts, next_attempt_at, created_at, updated_at) "
                "SELECT v.agency_id, v.client_id, v.identifier, v.units, v.usage_timestamp, CAST(:pending AS text), 0, "
                ":now, :now, :now FROM unnest(CAST(:agency_id AS integer[]), CAST(:client_id AS integer[]), "
                "CAST(:identifier AS text[]), CAST(:units AS bigint[]), CAST(:usage_timestamp AS timestamptz[])) "
                "AS v(agency_id, client_id, identifier, units, usage_timestamp)"
            ),
            {
                **{name: list(column) for name, column in _columns(rows).items()},
                "now": now,
                "pending": ReportStatus.PENDING,
            },
        )


def take_write_lock() -> None:
    """On SQLite, make this transaction the database's writer now, so concurrent writers serialise.

    A read-then-write SQLite transaction can fail with "database is locked" when another writer commits in
    between; a first (empty) write takes the lock up front and later writers wait on the busy timeout.
    PostgreSQL uses row locks instead, so nothing happens there.
    """
    aggregation_store().take_write_lock()


def agency_filter(agency_id: int) -> tuple:
    """Return the WHERE terms selecting one agency's usage events."""
    return (_EVENT.agency_id == agency_id,)


def agency_range_filter(low: int | None, high: int | None) -> tuple:
    """Return the WHERE terms selecting the usage events of agencies low <= id < high (None: no bound).

    On ``agency_id + 0``, an expression, not the column: the claim must keep walking the pending index in id
    order. A plan on the agency index would read and sort all of a range's pending events for every batch.
    """
    agency = _EVENT.agency_id + 0
    return (*(() if low is None else (agency >= low,)), *(() if high is None else (agency < high,)))


def source_filter(agency_id: int, provider: str, source_key: str) -> tuple:
    """Return the WHERE terms selecting usage events of one channel (capri_api) or subaccount (ghl)."""
    return (_EVENT.agency_id == agency_id, _EVENT[source_field(provider)] == source_key)


_STORES: dict[str, AggregationStore] = {"postgresql": PostgresAggregationStore(), "sqlite": SqliteAggregationStore()}


def aggregation_store() -> AggregationStore:
    """Return the implementation for the session's database (the one place that asks which it is)."""
    return _STORES[db.engine.dialect.name]
