"""The database extension, unbound: models import ``db`` from here, never the app."""

from __future__ import annotations

import datetime as dt
import time

from flask_migrate import Migrate
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import BigInteger, DateTime, Integer, MetaData, event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.pool import Pool
from sqlalchemy.types import TypeDecorator

# Stable constraint names so Alembic can alter and drop them on both PostgreSQL and SQLite.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# 64-bit ids on PostgreSQL; SQLite only autoincrements a column declared exactly INTEGER.
BigId = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> dt.datetime:
    """Return the current time as an aware UTC datetime."""
    return dt.datetime.now(dt.UTC)


class UTCDateTime(TypeDecorator):
    """Store aware UTC datetimes; SQLite hands back naive values, which are UTC by construction."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is not None:
            if value.tzinfo is None:
                raise ValueError("naive datetime given; Rebill stores aware UTC datetimes only")
            value = value.astimezone(dt.UTC)
        return value

    def process_result_value(self, value, dialect):
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return value


class Base(DeclarativeBase):
    """Declarative base carrying the naming convention."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class TimestampMixin:
    """Created/updated columns with callable defaults."""

    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow, nullable=False)
    updated_at: Mapped[dt.datetime] = mapped_column(
        UTCDateTime(), default=utcnow, onupdate=utcnow, nullable=False
    )


# No pool_pre_ping: it costs a round trip on every checkout, i.e. on every request, for a connection that
# was in use milliseconds ago. Instead a connection idle for PING_AFTER_IDLE_SECONDS is pinged on checkout
# (below), and pool_recycle replaces connections older than half an hour (server or proxy idle limits).
# A connection that dies while in steady use (a database restart) fails its next statement once;
# SQLAlchemy then invalidates the whole pool, so the others reconnect, and the webhook hot path retries
# that statement (ghl.webhooks). /healthz always runs a real query, so it never reports a dead database up.
db = SQLAlchemy(model_class=Base, engine_options={"pool_recycle": 1800})
migrate = Migrate(compare_type=True, render_as_batch=True)


def is_postgresql() -> bool:
    """Tell whether the bound database is PostgreSQL (row locks, SKIP LOCKED available)."""
    return db.engine.dialect.name == "postgresql"


PING_AFTER_IDLE_SECONDS = 10
_IDLE_SINCE = "rebill_idle_since"


@event.listens_for(Pool, "checkin")
def _note_idle_since(dbapi_connection, connection_record):
    """Remember when a connection went back to the pool."""
    if dbapi_connection is not None:
        connection_record.info[_IDLE_SINCE] = time.monotonic()


@event.listens_for(Pool, "checkout")
def _ping_idle_connection(dbapi_connection, connection_record, connection_proxy):
    """Ping a PostgreSQL connection that sat idle a while; a dead one is replaced (DisconnectionError)."""
    idle_since = connection_record.info.get(_IDLE_SINCE)
    if idle_since is None or time.monotonic() - idle_since < PING_AFTER_IDLE_SECONDS:
        return
    if type(dbapi_connection).__module__.startswith("sqlite3"):
        return  # a local file: nothing can drop it
    try:
        cursor = dbapi_connection.cursor()
        cursor.execute("SELECT 1")
        cursor.close()
        dbapi_connection.rollback()
    except Exception as error:  # whatever the driver raises for a dead connection
        raise DisconnectionError(f"idle connection dropped: {type(error).__name__}") from error


@event.listens_for(Engine, "connect")
def _configure_sqlite(dbapi_connection, connection_record):
    """Turn on SQLite's foreign keys, WAL and a busy timeout so concurrent writers wait, not fail."""
    module = type(dbapi_connection).__module__
    if not module.startswith("sqlite3"):
        return
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()
