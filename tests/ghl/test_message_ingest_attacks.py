"""Adversarial cases for the batching change (issue 15): each test fails if its attack succeeds.

The promise: a 2xx means the delivery is durably committed, every message is counted exactly once, and a
worker whose batch fails answers 429 (GHL retries) and recovers once the database can take the rows again.
"""

from __future__ import annotations

import psycopg
import pytest

from ghl.webhooks import INGEST
from tests.ghl.test_message_group_commit import install_locations, message, usage_ids


@pytest.fixture
def admin_url(database_url, postgres_only) -> str:
    return database_url.replace("postgresql+psycopg://", "postgresql://")


def post(app, signer, body: bytes):
    return app.test_client().post("/webhooks/ghl", data=body, headers=signer.headers(body))


def test_a_migration_changing_a_returned_column_s_type_does_not_break_the_ingest_for_good(
    app, app_context, signer, admin_url
):
    # A migration run while workers serve (a rolling deploy) widens ghl_webhook_delivery.status, one of the
    # batch statement's RETURNING columns. The worker's own connection prepared the statement on first use
    # and runs in autocommit: PostgreSQL refuses every later EXECUTE of that prepared statement with
    # "cached plan must not change result type" (0A000, not an OperationalError, so the connection is kept),
    # and psycopg forgets a prepared name only after a failed *first* execution, or on ROLLBACK/DISCARD
    # ALL, which an autocommit connection never sends. Every message webhook of the worker would then be
    # answered 429 until the process restarts. A retried delivery (GHL retries a 429) must be stored and
    # counted once the migration is over.
    install_locations()
    warm = message("wh-schema-warm", "msg-schema-warm")
    assert post(app, signer, warm).json == {"status": "processed"}  # the worker's connection has prepared it
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute("ALTER TABLE ghl_webhook_delivery ALTER COLUMN status TYPE varchar(16)")
        try:
            body = message("wh-schema-after", "msg-schema-after")
            answers = [post(app, signer, body).status_code for _ in range(3)]  # the delivery, then GHL's retries
        finally:
            admin.execute("ALTER TABLE ghl_webhook_delivery ALTER COLUMN status TYPE varchar(12)")
            app.extensions[INGEST].close()  # no connection with the changed plan outlives the test
    assert 200 in answers, answers
    assert usage_ids() == ["msg-schema-after", "msg-schema-warm"]
