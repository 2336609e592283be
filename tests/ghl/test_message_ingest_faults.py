"""Adversarial cases for the message ingest on PostgreSQL (ghl.message_ingest): faults a batch can meet.

The promise under test: a delivery whose batch cannot be stored is answered 429 within a few
GHL_WEBHOOK_STORE_TIMEOUT_MS (GHL retries a 429, and drops a delivery never answered), and every 200 has
its row, counted once.
"""

from __future__ import annotations

import socket
import threading
import time
from urllib.parse import urlsplit

import psycopg
import pytest

from ghl.message_ingest import _BATCH_SQL, _rows_json
from ghl.webhooks import INGEST
from tests.ghl.fake_ghl import deliveries, encode, load_payload
from tests.ghl.test_message_group_commit import (
    LOCATION_ID,
    Deliverer,
    install_locations,
    message,
    usage_ids,
    wait_until,
)

STORE_TIMEOUT_MS = 1000
# A stuck batch is answered within a few store timeouts (at worst ~2.5 + 0.5 s for a delivery queued behind a
# stalled batch, ghl.message_ingest._execute): not once per item of the batch (a batch of 64 deliveries,
# written alone one after another, would wait 64 timeouts while GHL gives up on every one).
ANSWERED_WITHIN = 3 * STORE_TIMEOUT_MS / 1000


@pytest.fixture
def admin_url(database_url, postgres_only) -> str:
    return database_url.replace("postgresql+psycopg://", "postgresql://")


def warm(app, signer, count: int = 6) -> None:
    """A worker that has been serving: its connection has sent the batch statement often enough for psycopg
    to prepare it (prepare_threshold 5), as every production worker's has after its first few batches."""
    client = app.test_client()
    for n in range(count):
        body = message(f"wh-warm-{n}", f"msg-warm-{n}")
        assert client.post("/webhooks/ghl", data=body, headers=signer.headers(body)).status_code == 200


def test_a_refused_value_in_a_batch_stuck_behind_a_lock_is_still_answered_within_the_store_timeout(
    make_app, ghl_config, signer, admin_url
):
    # A message whose messageId holds a NUL: PostgreSQL refuses it (DataError) while binding the batch's JSON
    # parameter, before the prepared statement takes its table locks, so the batch fails at once even while a
    # migration holds the table. Every item is then written alone (ghl.message_ingest._write_alone): if those
    # statements run without the store timeout, they wait as long as the lock is held, and with them every
    # delivery of the worker queued behind the one writer.
    app = make_app(GHL_WEBHOOK_STORE_TIMEOUT_MS=STORE_TIMEOUT_MS, **ghl_config)
    with app.app_context():
        install_locations()
    warm(app, signer)
    ingest = app.extensions[INGEST]
    ingest.batches.max_wait = 0.05  # the burst in one batch (the deliverers announce themselves)
    bodies = {"nul": message("wh-nul", "bad\u0000id")}
    bodies |= {f"m{n}": message(f"wh-lock-{n}", f"msg-lock-{n}") for n in range(3)}
    deliverer = Deliverer(app, signer)
    with psycopg.connect(admin_url) as locker:
        locker.execute("LOCK TABLE ghl_webhook_delivery IN SHARE ROW EXCLUSIVE MODE")  # a migration's lock
        started = time.monotonic()
        deliverer.start(bodies)
        try:
            wait_until(lambda: len(deliverer.answers) == len(bodies), "every delivery answered while the lock is held",
                       seconds=ANSWERED_WITHIN)  # fmt: skip
        finally:
            answered_after = time.monotonic() - started
            locker.rollback()
            deliverer.join()
    codes = {name: answer[0] for name, answer in deliverer.answers.items()}
    assert all(code == 429 for code in codes.values()), codes
    assert answered_after < ANSWERED_WITHIN
    with app.app_context():
        assert usage_ids() == sorted(f"msg-warm-{n}" for n in range(6))  # nothing of the failed batch counted


@pytest.mark.parametrize("other_batch", ["commits", "rolls back"])
@pytest.mark.parametrize("copy", ["same webhook", "another webhook of the message"])
def test_a_copy_waiting_on_another_workers_batch_past_the_store_timeout_is_429_and_counted_once(
    make_app, ghl_config, signer, admin_url, other_batch, copy
):
    # Worker A's batch holds the message's usage (and delivery) index entries, uncommitted, longer than the
    # store timeout; worker B gets a copy. B's statement waits on A's entries: it must be cancelled and
    # answered 429 (never 200 without its row), and after A's end and GHL's retry of B's copy the message
    # is counted exactly once.
    app = make_app(GHL_WEBHOOK_STORE_TIMEOUT_MS=STORE_TIMEOUT_MS, **ghl_config)
    with app.app_context():
        install_locations()
    other_worker = make_app(**ghl_config)
    original = message("wh-race-1", "msg-race")
    duplicate = original if copy == "same webhook" else message("wh-race-2", "msg-race")
    with psycopg.connect(admin_url) as worker_a:
        # Worker A's batch statement runs in a transaction that stays open: its commit is late.
        other_worker.extensions[INGEST]._execute = lambda items, deadline: (
            psycopg.RawCursor(worker_a).execute(_BATCH_SQL, (_rows_json(items),)).fetchall()
        )
        a = other_worker.test_client().post("/webhooks/ghl", data=original, headers=signer.headers(original))
        assert a.json == {"status": "processed"}  # A's rows, not committed yet (the stand-in answers early)
        b = Deliverer(app, signer)
        started = time.monotonic()
        b.start({"copy": duplicate})
        try:
            wait_until(lambda: "copy" in b.answers, "worker B's copy answered while A's batch is open",
                       seconds=ANSWERED_WITHIN)  # fmt: skip
        finally:
            waited = time.monotonic() - started
            if other_batch == "commits":
                worker_a.commit()
            else:
                worker_a.rollback()
            b.join()
    assert b.answers["copy"][0] == 429, (b.answers, waited)
    assert waited >= 0.9 * STORE_TIMEOUT_MS / 1000  # it waited on A's entries until its statement was cancelled
    with app.app_context():
        retried = app.test_client().post("/webhooks/ghl", data=duplicate, headers=signer.headers(duplicate))
        assert retried.status_code == 200
        assert usage_ids() == ["msg-race"]  # once: by A when it committed, else by the retried copy
        stored = sorted(d.webhook_id for d in deliveries())
    expected = {"wh-race-1"} if other_batch == "commits" else set()
    expected.add("wh-race-1" if copy == "same webhook" else "wh-race-2")
    assert stored == sorted(expected)


class StallingProxy:
    """A TCP relay to PostgreSQL that can stop relaying while keeping every connection open: a database that
    stalls (a frozen server, a failover whose old address stops answering) as seen from the worker."""

    def __init__(self, host: str, port: int):
        self.target = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.flowing = threading.Event()
        self.flowing.set()
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._relay, args=(source, sink), daemon=True).start()

    def _relay(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                self.flowing.wait()  # stalled: the bytes are taken and held, nothing answers
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                end.close()

    def close(self) -> None:
        self.flowing.set()
        self.listener.close()
        for end in self.sockets:
            end.close()


def test_a_batch_sent_to_a_stalled_database_is_answered_429_within_the_store_timeout(
    make_app, ghl_config, signer, database_url, postgres_only
):
    # statement_timeout is enforced by the server: a server that does not run (or a path to it that no
    # longer carries packets) never cancels anything, and the worker's one writer waits on its socket with
    # every other webhook queued behind it, none answered (GHL drops them all).
    address = urlsplit(database_url.replace("postgresql+psycopg://", "postgresql://"))
    proxy = StallingProxy(address.hostname, address.port or 5432)
    proxied = database_url.replace(address.netloc.split("@")[-1], f"127.0.0.1:{proxy.port}")
    try:
        app = make_app(DATABASE_URL=proxied, GHL_WEBHOOK_STORE_TIMEOUT_MS=STORE_TIMEOUT_MS, **ghl_config)
        with app.app_context():
            install_locations()
        warm(app, signer, count=1)  # the worker's own connection is open
        bodies = {f"m{n}": message(f"wh-stall-{n}", f"msg-stall-{n}") for n in range(3)}
        deliverer = Deliverer(app, signer)
        proxy.flowing.clear()
        deliverer.start(bodies)
        try:
            wait_until(lambda: len(deliverer.answers) == len(bodies), "every delivery answered while stalled",
                       seconds=ANSWERED_WITHIN)  # fmt: skip
        finally:
            proxy.flowing.set()
            deliverer.join()
        assert {name: answer[0] for name, answer in deliverer.answers.items()} == {name: 429 for name in bodies}
    finally:
        proxy.close()


def test_a_dropped_ingest_connection_is_replaced_without_waiting_for_the_busy_pool(
    make_app, ghl_config, signer, admin_url
):
    # The worker's own connection was dropped (a restart, a failover, an idle-connection reaper) while the
    # worker's other requests hold every pooled connection (5 + 10 overflow; a gevent worker serves 256
    # requests). The retry must not wait for a pooled connection (SQLAlchemy's pool timeout, 30 s) while
    # holding the one writer's lead: every webhook of the worker would wait with it.
    app = make_app(GHL_WEBHOOK_STORE_TIMEOUT_MS=STORE_TIMEOUT_MS, **ghl_config)
    with app.app_context():
        install_locations()
        warm(app, signer, count=1)
        ingest = app.extensions[INGEST]
        [own] = ingest.connections._idle
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s, 10000)", (own.info.backend_pid,))
        engine = ingest.engine
        held = [engine.connect() for _ in range(engine.pool.size() + engine.pool._max_overflow)]  # the busy pool
        bodies = {"m": message("wh-busy-pool", "msg-busy-pool")}
        deliverer = Deliverer(app, signer)
        deliverer.start(bodies)
        try:
            wait_until(lambda: len(deliverer.answers) == len(bodies), "the delivery answered while the pool is busy",
                       seconds=ANSWERED_WITHIN)  # fmt: skip
        finally:
            for connection in held:
                connection.close()
            deliverer.join()
        assert deliverer.answers["m"] == (200, {"status": "processed"})


def test_refused_message_webhooks_write_nothing_and_leave_no_caller_announced(app, app_context, signer):
    # Through the dispatch in front of Flask (ghl.webhooks.MessageWebhookDispatch): each request announces
    # itself to the group commit before its signature is checked. A refusal must store nothing, and must
    # end its announcement: one left counted makes every later batch of the worker wait for it.
    install_locations()
    ingest = app.extensions.get(INGEST)  # PostgreSQL; on SQLite the route alone answers
    client = app.test_client()
    good = message("wh-refused-1", "msg-refused-1")
    stale_payload = load_payload("outbound_message") | {"messageId": "msg-refused-2", "locationId": LOCATION_ID}
    stale = encode(stale_payload | {"timestamp": "2020-01-01T00:00:00Z"}, webhook_id="wh-refused-2")
    other_app = encode(stale_payload | {"messageId": "msg-refused-3"}, webhook_id="wh-refused-3", app_id="someone")
    answers = [
        client.post("/webhooks/ghl", data=good, headers=signer.headers(good[:-1] + b" ")).status_code,  # bad signature
        client.post("/webhooks/ghl", data=good).status_code,  # none
        client.post("/webhooks/ghl", data=stale, headers=signer.headers(stale)).status_code,
        client.post("/webhooks/ghl", data=other_app, headers=signer.headers(other_app)).status_code,
        client.post("/webhooks/ghl", data=b"[]", headers=signer.headers(b"[]")).status_code,
    ]
    assert answers == [401, 401, 400, 200, 400]
    if ingest is not None:
        assert ingest.batches._announced == 0 and ingest.batches.pending == 0
    assert deliveries() == [] and usage_ids() == []


def test_a_fresh_worker_s_first_batch_behind_a_lock_is_answered_429_after_one_store_timeout_and_not_resent(
    make_app, ghl_config, signer, admin_url
):
    # The batch statement is prepared on its first execution; one that fails on a fresh connection leaves a
    # prepared statement psycopg has forgotten, so that connection is closed rather than kept. Closed by us
    # after a statement_timeout, it must still read as a refusal (429 at once, GHL retries), not as a
    # connection the database dropped, which is sent once more: a second store timeout behind the same lock.
    app = make_app(GHL_WEBHOOK_STORE_TIMEOUT_MS=STORE_TIMEOUT_MS, **ghl_config)
    with app.app_context():
        install_locations()
    ingest = app.extensions[INGEST]
    deliverer = Deliverer(app, signer)
    with psycopg.connect(admin_url) as locker:
        locker.execute("LOCK TABLE ghl_webhook_delivery IN SHARE ROW EXCLUSIVE MODE")  # a migration's lock
        started = time.monotonic()
        deliverer.start({"first": message("wh-fresh-1", "msg-fresh-1")})
        try:
            wait_until(lambda: "first" in deliverer.answers, "the first batch answered", seconds=ANSWERED_WITHIN)
        finally:
            answered_after = time.monotonic() - started
            locker.rollback()
            deliverer.join()
    assert deliverer.answers["first"][0] == 429
    assert answered_after < 2 * STORE_TIMEOUT_MS / 1000  # one store timeout, not two
    assert ingest.connections._idle == []  # its statement never ran there: closed, no stale prepared name kept
    body = message("wh-fresh-1", "msg-fresh-1")
    assert app.test_client().post("/webhooks/ghl", data=body, headers=signer.headers(body)).json == {
        "status": "processed"
    }  # GHL's retry, once the lock is gone
    with app.app_context():
        assert usage_ids() == ["msg-fresh-1"]
    ingest.close()
