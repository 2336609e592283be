"""Connection pool behaviour: no ping on a busy connection, a ping after idling, and honest health checks
when the database has dropped pooled connections (a restart or failover)."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

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
