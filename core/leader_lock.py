"""One leader among several processes, for periodic work that only one should do at a time.

Any number of schedulers may run: aggregation and reporting share their work through row claims, but the
housekeeping jobs (token refresh, webhook retries, pruning) are best run by one process at a time.

PostgreSQL: a session-level advisory lock (``pg_try_advisory_lock``, never waiting), taken on a connection
of its own that the leader keeps open. The lock lasts as long as that session: a leader that exits, is
killed (SIGKILL) or loses its connection loses the lock with it, since PostgreSQL ends the session, and the
next process to try takes it over. Before each job the leader checks that its session still answers, so it
never goes on leading on a dead connection. https://www.postgresql.org/docs/current/explicit-locking.html#ADVISORY-LOCKS

SQLite: one scheduler process per database is the norm (SQLite has one writer anyway), so every process
counts as the leader.
"""

from __future__ import annotations

import contextlib
import logging
import threading

from sqlalchemy import Connection, Engine, create_engine, text
from sqlalchemy.pool import NullPool

log = logging.getLogger("rebill.leader_lock")

# Advisory lock keys are one bigint namespace per database; Rebill takes this one ("RBHK", housekeeping).
HOUSEKEEPING_LOCK_KEY = 0x5242484B


class LeaderLock:
    """Leadership held through a PostgreSQL advisory lock on a dedicated connection (always held on SQLite)."""

    def __init__(self, engine: Engine, key: int = HOUSEKEEPING_LOCK_KEY):
        self._url = engine.url
        self._postgresql = engine.dialect.name == "postgresql"
        self._key = key
        self._connection: Connection | None = None
        self._engine: Engine | None = None
        self._mutex = threading.Lock()  # APScheduler runs jobs on several threads; one connection, one user

    def held(self) -> bool:
        """Return whether this process leads now: keep a live lock, or try (without waiting) to take it."""
        if not self._postgresql:
            return True
        with self._mutex:
            if self._connection is not None:
                try:
                    self._connection.execute(text("SELECT 1"))
                    return True  # the session lives, so its session-level lock does too
                except Exception as error:  # a dead connection: its session, and the lock, are gone
                    log.warning("housekeeping lock connection lost", extra={"fields": {"error": type(error).__name__}})
                    self._close()
            return self._try_take()

    def release(self) -> None:
        """Give leadership up (closing the session releases the lock)."""
        with self._mutex:
            self._close()

    def _try_take(self) -> bool:
        connection = None
        try:
            if self._engine is None:
                # Not the app's pool: the app's engine may invalidate or recycle pooled connections, and
                # closing this one must really end the session.
                self._engine = create_engine(self._url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
            connection = self._engine.connect()
            taken = connection.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": self._key}).scalar()
        except Exception as error:  # the database is unreachable now: not the leader; a later run tries again
            log.warning("cannot take the housekeeping lock", extra={"fields": {"error": type(error).__name__}})
            taken = False
        if not taken:
            if connection is not None:
                connection.close()
            return False
        self._connection = connection
        log.info("this process now runs the housekeeping jobs")
        return True

    def _close(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(Exception):  # already dead: nothing left to release
                self._connection.close()
            self._connection = None
