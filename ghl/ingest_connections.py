"""The message ingest's own PostgreSQL connections: made with the store timeout, watched for a stalled server.

ghl.message_ingest sends each batch on a connection of the worker's own, outside SQLAlchemy's pool (no
checkout, no execution context per batch). A batch must be answered, 200 or 429, within a few
GHL_WEBHOOK_STORE_TIMEOUT_MS: GHL retries a 429 but never a delivery that got no answer (docs/ghl.md §2.1).
Two bounds do that:
- the server's: every connection runs with ``statement_timeout`` = the store timeout, so a batch stuck behind a
  lock (a migration's) is cancelled by PostgreSQL; the connection stays usable;
- the worker's own, for a server that cannot cancel anything (frozen, or a network path that stopped carrying
  packets while the connection stays open): a watcher shuts down the socket of a connection whose batch is
  past its deadline and whose statement the server should have cancelled by then, so the wait ends with a
  dropped connection (429) instead of lasting until TCP gives up (minutes) or forever; a batch whose
  deadline passed before it was sent (queued behind a stalled one) is not sent.
A connection dropped under a batch (a restart, a failover) is replaced and the batch sent once more while
its deadline allows: the batch statement is idempotent (ON CONFLICT DO NOTHING on webhookId and messageId).
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import pq
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

# How often the watcher looks for a batch past its deadline; it runs only while batches are in flight.
WATCH_INTERVAL = 0.1
# A sent statement is cut this long after the server should have cancelled it (statement_timeout).
CUT_MARGIN = 0.5
# libpq refuses connect_timeout below 2 s (it reads smaller values as 2).
MIN_CONNECT_TIMEOUT = 2


class StoreStalled(psycopg.OperationalError):
    """The batch's deadline passed before the database answered (or before it was sent): not stored."""


class _Own:
    """What the ingest keeps with each of its connections."""

    __slots__ = ("cursor", "generation", "proven")

    def __init__(self, cursor: psycopg.RawCursor, generation: int):
        self.cursor = cursor  # reused: a cursor made per execution costs ~5 µs of the worker's CPU
        self.generation = generation  # close() retires every connection of an older generation
        # The statement has run on it once: psycopg then keeps its prepared name. A failed *first* execution
        # makes psycopg forget the name without DEALLOCATE and prepare it anew under another, so a connection
        # whose statement never ran is closed after a failure instead of kept (no prepared plan left behind).
        self.proven = False


class IngestConnections:
    """The worker's own connections for the batch statement, one per writer of the group commit."""

    def __init__(self, engine: Engine, store_timeout_ms: int):
        self.engine = engine
        self.store_timeout_ms = store_timeout_ms
        self._idle: list[psycopg.Connection] = []  # list.pop and append are atomic: writers share it unlocked
        self._own: dict[psycopg.Connection, _Own] = {}
        self._generation = 0
        self._deadlines: dict[psycopg.Connection, float] = {}  # connections in use -> when they count as stalled
        self._watch_lock = threading.Lock()
        self._watcher_pid: int | None = None  # the process whose watcher runs (a forked worker has none)

    def run(self, statement: str, parameters: Sequence[Any], deadline: float) -> list[tuple]:
        """Run ``statement`` (PostgreSQL's own $1, $2 … placeholders) on an own connection and return its rows;
        give up at ``deadline`` (monotonic), or, once it is sent, when the server should have cancelled it
        (statement_timeout) and did not.

        The text goes to the server as it is (a RawCursor, the connection's own: no placeholder conversion
        and no new cursor per execution) and is prepared on its first execution on each connection; the server
        plans it once (force_generic_plan).

        Raises psycopg.OperationalError when the server refused in time (statement_timeout), the connection
        dropped twice, or the server did not answer before the deadline (StoreStalled when it was not even
        sent); psycopg's other errors as they come.
        """
        for attempt in (1, 2):
            if time.monotonic() >= deadline:  # e.g. queued behind a batch that stalled: the server is not answering
                raise StoreStalled("the database did not answer in time")
            connection = self._connection(deadline)
            try:
                # Never cut before the server's own statement_timeout could fire: a statement the server
                # cancels stored nothing, while one cut on our side may still commit once its lock is free
                # (its 429 then brings a retry that reads "duplicate": nothing lost or doubled, but avoided).
                self._watch(connection, max(deadline, time.monotonic() + self.store_timeout_ms / 1000 + CUT_MARGIN))
                own = self._own[connection]
                own.cursor.execute(statement, parameters, prepare=True)
                rows = own.cursor.fetchall()
                own.proven = True
            except psycopg.OperationalError:
                dropped = connection.closed  # before _release, which also closes a connection it does not keep
                cut = self._release(connection)
                if not dropped and not cut:
                    raise  # e.g. statement_timeout: the connection is fine (kept, unless its statement never ran)
                if attempt == 2 or cut:  # cut: the deadline has passed, and the server is not answering
                    raise
                self.close()  # the restart that dropped this one dropped the idle ones too: retry on a new one
                self._let_the_pool_notice()
            except psycopg.errors.FeatureNotSupported:
                # "cached plan must not change result type": a migration changed a column the prepared statement
                # returns (a rolling deploy). PostgreSQL refuses every later EXECUTE of it on this connection and
                # psycopg keeps the name, so the connection and the idle ones, prepared alike, are closed and
                # the batch (nothing of it stored) is sent once more on a new connection, prepared afresh.
                self.close()
                self._release(connection)  # retired by close(): closed too
                if attempt == 2:
                    raise
            except BaseException:
                self._release(connection)
                raise
            else:
                self._release(connection)
                return rows
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Close the idle connections, and the ones in use once their batch ends (with the engine's pool: the
        app's end, or a test's; or after one was dropped or refused its prepared statement). Connections
        made afterwards are kept as usual."""
        self._generation += 1
        while True:
            try:
                connection = self._idle.pop()
            except IndexError:  # two writers may empty it at once
                return
            self._discard(connection)

    def _connection(self, deadline: float) -> psycopg.Connection:
        """An idle connection, or a new one with the session settings the batch statement relies on."""
        try:
            return self._idle.pop()
        except IndexError:
            pass
        arguments, options = self.engine.dialect.create_connect_args(self.engine.url)
        remaining = max(deadline - time.monotonic(), 0)
        # The session settings travel in the startup message (covered by connect_timeout, no round trip of
        # their own that a stalled server could leave unanswered), after any options the URL gives:
        # - plan_cache_mode: one statement whose plan does not depend on its parameter (a JSON array), planned
        #   once, not on each execution (PostgreSQL re-plans while custom plans look cheaper);
        # - statement_timeout: a statement stuck behind a lock is cancelled by the server, the connection
        #   staying usable. It stored nothing (each statement is its own transaction); a 429 for a delivery
        #   that did commit (the answer lost on the way) only brings a retry that reads "duplicate".
        settings = f"-c plan_cache_mode=force_generic_plan -c statement_timeout={int(self.store_timeout_ms)}"
        options = options | {
            "connect_timeout": max(MIN_CONNECT_TIMEOUT, math.ceil(remaining)),
            "options": f"{options['options']} {settings}" if options.get("options") else settings,
        }
        connection = psycopg.connect(*arguments, **options, autocommit=True)
        self._own[connection] = _Own(psycopg.RawCursor(connection), self._generation)
        return connection

    def _release(self, connection: psycopg.Connection) -> bool:
        """Stop watching ``connection``; keep it if it is idle and whole, its statement has run on it and no
        close() retired it meanwhile, else close it. True if the watcher cut it (its batch's deadline
        passed)."""
        with self._watch_lock:
            cut = self._deadlines.pop(connection, None) is None  # the watcher took it: its socket is shut down
        own = self._own.get(connection)
        if (
            cut
            or own is None
            or not own.proven
            or own.generation != self._generation
            or connection.closed
            or connection.info.transaction_status != pq.TransactionStatus.IDLE
        ):
            self._discard(connection)  # broken, cut, or interrupted mid-statement: never reused
            return cut
        self._idle.append(connection)
        if own.generation != self._generation:  # close() ran since the check (another thread): take it back
            try:
                self._idle.remove(connection)
            except ValueError:
                return cut  # close() took it first and closed it, or a writer did and will discard it
            self._discard(connection)
        return cut

    def _discard(self, connection: psycopg.Connection) -> None:
        self._own.pop(connection, None)
        connection.close()

    def _watch(self, connection: psycopg.Connection, deadline: float) -> None:
        with self._watch_lock:
            self._deadlines[connection] = deadline
            if self._watcher_pid == os.getpid():
                return
            self._watcher_pid = os.getpid()
        # A thread, or a greenlet in a gevent worker (threading is patched there); it ends when nothing is
        # in flight and starts again with the next batch.
        threading.Thread(target=self._cut_stalled, name="ingest-stall-watch", daemon=True).start()

    def _cut_stalled(self) -> None:
        try:
            self._watch_until_idle()
        except BaseException:  # the next batch starts a new watcher
            with self._watch_lock:
                self._watcher_pid = None
            raise

    def _watch_until_idle(self) -> None:
        while True:
            time.sleep(WATCH_INTERVAL)
            now = time.monotonic()
            with self._watch_lock:
                if not self._deadlines:
                    self._watcher_pid = None
                    return
                stalled = [connection for connection, deadline in self._deadlines.items() if deadline <= now]
                for connection in stalled:
                    del self._deadlines[connection]
            for connection in stalled:
                _shut_down(connection)

    def _let_the_pool_notice(self) -> None:
        """After a restart dropped our connection, have SQLAlchemy's pool meet it too, in the background.

        SQLAlchemy invalidates every pooled connection on the first disconnect it sees, so the worker's other
        requests (and /healthz) get fresh ones instead of each failing once on a dead one (core.database). In
        the background: with the pool busy, a checkout waits up to the pool's timeout, and the batch's retry
        must not wait with it.
        """
        threading.Thread(target=self._probe_the_pool, name="ingest-pool-probe", daemon=True).start()

    def _probe_the_pool(self) -> None:
        try:
            with self.engine.connect() as probe:
                probe.exec_driver_sql("SELECT 1")
        except SQLAlchemyError:
            pass  # the pool has seen it, or the database is down (then later requests fail on their own)


def _shut_down(connection: psycopg.Connection) -> None:
    """End a stalled connection's wait: shut its socket down (through a duplicate descriptor, so the connection's
    own descriptor is closed by psycopg alone, never reused under it). psycopg then reads a dropped connection."""
    try:
        descriptor = os.dup(connection.pgconn.socket)
    except (OSError, psycopg.Error):
        return  # closed meanwhile
    try:
        duplicate = socket.socket(fileno=descriptor)
    except OSError:
        os.close(descriptor)
        return
    with duplicate, contextlib.suppress(OSError):
        duplicate.shutdown(socket.SHUT_RDWR)
