"""Adversarial cases for the batching change (issue 15): each test fails if its attack succeeds.

The promise: a 2xx means the delivery is durably committed, every message is counted exactly once, and a
worker whose batch fails answers 429 (GHL retries) and recovers once the database can take the rows again.
"""

from __future__ import annotations

import psycopg
import pytest

from ghl.webhooks import INGEST
from tests.ghl.fake_ghl import deliveries
from tests.ghl.test_message_group_commit import (
    Deliverer,
    backend_pids_waiting_on_a_lock,
    install_locations,
    message,
    usage_ids,
    wait_until,
)


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
    assert answers == [200, 200, 200], answers  # sent once more on a new connection: the first one is stored
    assert usage_ids() == ["msg-schema-after", "msg-schema-warm"]


def queue_behind_a_waiting_opener(ingest, watcher, opener, opener_body: bytes, rest, cases: dict) -> None:
    """Start ``opener`` (its batch then waits on a lock the caller holds), then each of ``cases`` through
    ``rest``, one at a time, until all of them are queued behind it for the next batch, in this order."""
    opener.start({"opener": opener_body})
    wait_until(lambda: len(backend_pids_waiting_on_a_lock(watcher)) >= 1, "the opener waiting on the lock")
    for queued, (name, body) in enumerate(cases.items(), start=2):
        rest.start({name: body})
        wait_until(lambda queued=queued: ingest.batches.pending == queued, f"{name} queued")


def hold_webhook(session: psycopg.Connection, webhook_id: str) -> None:
    """Insert a delivery row with ``webhook_id`` and leave it uncommitted: another worker's, committing late."""
    session.execute(
        "INSERT INTO ghl_webhook_delivery (webhook_id, event_type, body, signature_scheme, received_at, status,"
        " attempts) VALUES (%s, 'OutboundMessage', '{}', 'ed25519', now(), 'received', 0)",
        (webhook_id,),
    )


@pytest.mark.parametrize("other_end", ["commits", "rolls back"])
@pytest.mark.parametrize("fault", ["statement_timeout", "connection terminated"])
def test_a_follow_up_round_that_fails_keeps_the_first_round_s_answers_and_counts_everything_once(
    make_app, ghl_config, signer, admin_url, fault, other_end
):
    # One batch: A and P in its first round, B (A's message, another webhook) in the second. Another
    # session holds B's webhookId, uncommitted (another worker's delivery of it, its commit late), so only the
    # second round waits. It then fails: cancelled by statement_timeout, or its connection terminated while it
    # waits (the retry on a new connection waits again, until the other session ends). A and P must be 200
    # and committed; B 429 (not stored by this batch) or 200 only if its webhookId is stored; after GHL's
    # retries each message is counted exactly once.
    app = make_app(GHL_WEBHOOK_STORE_TIMEOUT_MS=3000, **ghl_config)
    with app.app_context():
        install_locations()
    ingest = app.extensions[INGEST]
    ingest.batches.max_writers = 1
    cases = {
        "A": message("wh-round-a", "msg-round-1"),
        "P": message("wh-round-p", "msg-round-p"),
        "B": message("wh-round-b", "msg-round-1"),
    }
    opener, rest = Deliverer(app, signer), Deliverer(app, signer, admin_url)
    with (
        psycopg.connect(admin_url) as locker,
        psycopg.connect(admin_url) as other_worker,
        psycopg.connect(admin_url, autocommit=True) as watcher,
    ):
        hold_webhook(other_worker, "wh-round-b")
        hold_webhook(locker, "wh-round-opener")  # the opener's batch waits on it while the cases queue
        opener_body = message("wh-round-opener", "msg-round-opener")
        queue_behind_a_waiting_opener(ingest, watcher, opener, opener_body, rest, cases)
        locker.rollback()
        opener.join()
        # Only the second round waits on B's webhookId (the first does not touch it); the first round's
        # deliveries are committed but answered with the whole batch, once the second round ends.
        wait_until(lambda: len(backend_pids_waiting_on_a_lock(watcher)) >= 1, "the second round waiting on B")
        assert rest.answers == {}
        if fault == "connection terminated":
            [pid] = backend_pids_waiting_on_a_lock(watcher)
            watcher.execute("SELECT pg_terminate_backend(%s, 10000)", (pid,))
            wait_until(lambda: len(backend_pids_waiting_on_a_lock(watcher)) >= 1, "the retried round waiting on B")
            wait_until(lambda: pid not in backend_pids_waiting_on_a_lock(watcher), "the old backend gone")
        else:
            wait_until(lambda: "B" in rest.answers, "B answered after its statement_timeout")
        if other_end == "commits":
            other_worker.commit()
        else:
            other_worker.rollback()
        rest.join()
    assert rest.answers["A"] == (200, {"status": "processed"}) and rest.seen_committed["A"] == "processed"
    assert rest.answers["P"] == (200, {"status": "processed"}) and rest.seen_committed["P"] == "processed"
    code, answer = rest.answers["B"]
    with app.app_context():
        stored = {d.webhook_id: d for d in deliveries()}
        if code == 200:
            assert "wh-round-b" in stored, answer  # acknowledged: its webhookId is stored
        else:
            assert code == 429
            retried = post(app, signer, cases["B"])  # GHL's retry
            assert retried.status_code == 200
            assert "wh-round-b" in {d.webhook_id for d in deliveries()}
        assert usage_ids() == ["msg-round-1", "msg-round-opener", "msg-round-p"]


def test_batches_refused_on_a_fresh_connection_leave_no_prepared_statements_behind(
    app, app_context, signer, postgres_only
):
    # The worker's connection prepares the batch statement on its first execution. When that execution fails
    # (here a value PostgreSQL refuses, a NUL; as well a statement_timeout behind a migration's lock, a
    # fresh worker's first batches during an outage), psycopg forgets the statement's name without
    # DEALLOCATE and prepares it again under a new name next time: each failure before the first success
    # leaves one more prepared statement (its parse tree and generic plan) in the server session for the
    # connection's lifetime.
    install_locations()
    for n in range(4):
        refused = message(f"wh-leak-{n}", f"bad\u0000id-{n}")
        assert post(app, signer, refused).status_code == 200  # written alone, stored as failed
    assert post(app, signer, message("wh-leak-ok", "msg-leak-ok")).json == {"status": "processed"}
    ingest = app.extensions[INGEST]
    [connection] = ingest.connections._idle
    prepared = connection.execute("SELECT count(*) FROM pg_prepared_statements").fetchone()[0]
    ingest.close()
    assert prepared == 1


def renamed(body: bytes, round_number: int) -> bytes:
    """The body with its webhookId and messageId made this round's own (the signature is made per post)."""
    return body.replace(b"msg-both-", f"msg-r{round_number}-".encode()).replace(
        b'"wh-', f'"wh-{round_number}-'.encode()
    )


def test_two_workers_writing_the_same_messages_in_opposite_orders_neither_deadlock_nor_count_twice(
    make_app, ghl_config, signer, admin_url
):
    # Two workers (each its own group commit and connection) get the same messages at once, through other
    # webhooks and some through the same ones, in opposite orders of webhookId and messageId, with copies
    # inside each worker's batches (follow-up rounds). Every delivery must be answered 200 (a deadlock is a
    # 429), every message counted once, and exactly one delivery of each message answered "processed".
    workers = [make_app(**ghl_config) for _ in range(2)]
    with workers[0].app_context():
        install_locations()
    count = 16
    bodies = [{}, {}]
    for n in range(count):
        reverse = count - 1 - n
        bodies[0][f"x{n}"] = message(f"wh-x-{n:02}", f"msg-both-{reverse:02}")
        bodies[1][f"y{n}"] = message(f"wh-y-{reverse:02}", f"msg-both-{n:02}")
        if n % 3 == 0:  # the other worker's webhook of the same message, and a copy of its own
            bodies[0][f"x{n}-their"] = message(f"wh-y-{reverse:02}", f"msg-both-{n:02}")  # a webhook is one body
            bodies[1][f"y{n}-again"] = message(f"wh-y-{reverse:02}", f"msg-both-{n:02}")
    for round_number in range(3):
        deliverers = [Deliverer(app, signer) for app in workers]
        for deliverer, worker_bodies in zip(deliverers, bodies, strict=True):
            deliverer.start({name: renamed(body, round_number) for name, body in worker_bodies.items()})
        for deliverer in deliverers:
            deliverer.join()
        answers = {name: answer for deliverer in deliverers for name, answer in deliverer.answers.items()}
        assert all(code == 200 for code, _ in answers.values()), answers
        processed = [name for name, (_, answer) in answers.items() if answer == {"status": "processed"}]
        if len(processed) != count:
            with workers[0].app_context():
                rows = [(d.webhook_id, d.status, d.error) for d in deliveries() if f"msg-r{round_number}-" in d.body]
                used = [u for u in usage_ids() if u.startswith(f"msg-r{round_number}-")]
            raise AssertionError((sorted(answers.items()), sorted(rows), used))
    groups = [app.extensions[INGEST].batches for app in workers]
    assert any(group.batches < group.items for group in groups), "no batch held two deliveries: nothing tested"
    with workers[0].app_context():
        assert usage_ids() == sorted(f"msg-r{r}-{n:02}" for r in range(3) for n in range(count))


def test_a_batch_whose_first_round_is_refused_writes_its_copies_alone_counting_each_message_once(
    app, app_context, signer, admin_url
):
    # One batch whose first round holds a value PostgreSQL refuses (a NUL): every item of every round is
    # then written alone, each by its own request and at the same time, copies included (no rounds any
    # more). Each message must still be counted once, with exactly one delivery of it answered "processed",
    # and every 200 must have its webhookId stored.
    install_locations()
    ingest = app.extensions[INGEST]
    ingest.batches.max_writers = 1
    cases = {
        "refused": message("wh-refused-first", "bad\u0000id"),
        "A": message("wh-alone-a", "msg-alone-1"),
        "B same message": message("wh-alone-b", "msg-alone-1"),
        "C same message": message("wh-alone-c", "msg-alone-1"),
        "A again": message("wh-alone-a", "msg-alone-1"),
        "D": message("wh-alone-d", "msg-alone-2"),
        "D again": message("wh-alone-d", "msg-alone-2"),
    }
    opener, rest = Deliverer(app, signer), Deliverer(app, signer, admin_url)
    with psycopg.connect(admin_url) as locker, psycopg.connect(admin_url, autocommit=True) as watcher:
        locker.execute("LOCK TABLE ghl_webhook_delivery IN SHARE ROW EXCLUSIVE MODE")
        batches_before = ingest.batches.batches
        opener_body = message("wh-alone-opener", "msg-alone-opener")
        queue_behind_a_waiting_opener(ingest, watcher, opener, opener_body, rest, cases)
        locker.rollback()
        opener.join()
        rest.join()
    assert ingest.batches.batches - batches_before == 2
    assert all(code == 200 for code, _ in rest.answers.values()), rest.answers
    statuses = {name: answer["status"] for name, (_, answer) in rest.answers.items()}
    assert statuses["refused"] == "failed"
    ones = sorted(statuses[name] for name in ("A", "B same message", "C same message", "A again"))
    assert ones.count("processed") == 1, statuses
    assert sorted(statuses[name] for name in ("D", "D again")) == ["duplicate", "processed"]
    stored = {d.webhook_id for d in deliveries()}
    assert {"wh-alone-a", "wh-alone-b", "wh-alone-c", "wh-alone-d"} <= stored
    assert usage_ids() == ["msg-alone-1", "msg-alone-2", "msg-alone-opener"]


MIGRATIONS = {
    "column added": (
        "ALTER TABLE ghl_webhook_delivery ADD COLUMN attack_note text",
        "ALTER TABLE ghl_webhook_delivery DROP COLUMN attack_note",
    ),
    "index added": (
        "CREATE INDEX attack_received ON ghl_webhook_delivery (received_at)",
        "DROP INDEX attack_received",
    ),
    "usage column widened": (
        "ALTER TABLE usage_event ALTER COLUMN source_event_id TYPE varchar(300)",
        "ALTER TABLE usage_event ALTER COLUMN source_event_id TYPE varchar(255)",
    ),
}


@pytest.mark.parametrize("migration_name", list(MIGRATIONS))
def test_a_migration_that_leaves_the_returned_columns_alone_does_not_disturb_the_prepared_statement(
    app, app_context, signer, admin_url, migration_name
):
    migration, undo = MIGRATIONS[migration_name]
    install_locations()
    assert post(app, signer, message("wh-mig-warm", "msg-mig-warm")).json == {"status": "processed"}
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(migration)
        try:
            answer = post(app, signer, message("wh-mig-after", "msg-mig-after")).json
        finally:
            admin.execute(undo)
            app.extensions[INGEST].close()
    assert answer == {"status": "processed"}
    assert usage_ids() == ["msg-mig-after", "msg-mig-warm"]


def test_closing_the_ingest_while_a_batch_is_in_flight_leaves_no_connection_open(app, app_context, signer, admin_url):
    # ingest.close() runs with the engine's dispose (the app's end, a test's teardown). A batch in flight at
    # that moment holds its connection outside the idle list; when it ends, _release puts the connection
    # (and its cached RawCursor) back among the idle ones of an ingest that was closed: a server session
    # that outlives the dispose.
    install_locations()
    ingest = app.extensions[INGEST]
    deliverer = Deliverer(app, signer)
    with psycopg.connect(admin_url) as locker, psycopg.connect(admin_url, autocommit=True) as watcher:
        locker.execute("LOCK TABLE ghl_webhook_delivery IN SHARE ROW EXCLUSIVE MODE")
        deliverer.start({"in flight": message("wh-close-1", "msg-close-1")})
        wait_until(lambda: len(backend_pids_waiting_on_a_lock(watcher)) >= 1, "the batch waiting on the lock")
        ingest.close()
        locker.rollback()
        deliverer.join()
    assert deliverer.answers["in flight"] == (200, {"status": "processed"})
    left_open = [connection.info.backend_pid for connection in ingest.connections._idle if not connection.closed]
    ingest.close()
    assert left_open == []
