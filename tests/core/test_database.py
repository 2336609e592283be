"""Connection pool behaviour: no ping on a busy connection, a ping after idling, and honest health checks
when the database has dropped pooled connections (a restart or failover)."""

from __future__ import annotations

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.exc import NotSupportedError, OperationalError

import core.database
from core.database import db
from tests.conftest import drop_connections


def select_one() -> int:
    value = db.session.execute(text("SELECT 1")).scalar()
    db.session.commit()  # back to the pool
    return value


def test_a_busy_pooled_connection_is_not_pinged_and_a_dropped_one_invalidates_the_pool(
    app_context, database_url, postgres_only
):
    select_one()
    assert drop_connections(database_url) >= 1
    # No round trip before each statement (the point: the hot path pays none), so the dead connection shows...
    with pytest.raises(OperationalError) as error:
        select_one()
    assert error.value.connection_invalidated
    db.session.rollback()
    # ...once: the pool was invalidated, so the next checkout connects afresh.
    assert select_one() == 1


def test_an_idle_pooled_connection_is_pinged_and_replaced_when_dropped(
    app_context, database_url, postgres_only, monkeypatch
):
    monkeypatch.setattr(core.database, "PING_AFTER_IDLE_SECONDS", 0)  # every pooled connection counts as idle
    select_one()
    assert drop_connections(database_url) >= 1
    assert select_one() == 1  # the checkout's ping found it dead and handed out a fresh connection


def test_healthz_stays_honest_after_the_database_dropped_pooled_connections(client, database_url, postgres_only):
    assert client.get("/healthz").status_code == 200
    assert drop_connections(database_url) >= 1
    response = client.get("/healthz")
    assert response.status_code == 200  # the database is up: a connection it dropped earlier is not news
    assert response.get_json() == {"status": "ok", "database": "ok"}


def test_pooled_connections_whose_prepared_statements_a_migration_invalidated_are_replaced(
    app_context, database_url, postgres_only
):
    # psycopg prepares a statement on a connection after 5 executions. A migration that then changes the type
    # of a column it returns (run while workers serve: a rolling deploy) makes PostgreSQL refuse the prepared
    # statement ("cached plan must not change result type"). A pooled connection recovers by itself: the
    # failed request's ROLLBACK makes psycopg deallocate its prepared statements. (The message ingest's own
    # connections run in autocommit and never roll back: ghl.ingest_connections replaces them instead.)
    admin_url = database_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute("CREATE TABLE plan_probe (label varchar(5))")
        admin.execute("INSERT INTO plan_probe VALUES ('a')")
        try:
            for _ in range(6):
                assert read_label() == "a"
            admin.execute("ALTER TABLE plan_probe ALTER COLUMN label TYPE varchar(10)")
            with pytest.raises(NotSupportedError):
                read_label()  # the request that meets it fails once...
            db.session.rollback()
            assert read_label() == "a"  # ...once: its rollback cleared the connection's prepared statements
        finally:
            db.session.rollback()
            db.engine.dispose()
            admin.execute("DROP TABLE plan_probe")


def read_label() -> str:
    value = db.session.execute(text("SELECT label FROM plan_probe")).scalar()
    db.session.commit()
    return value
