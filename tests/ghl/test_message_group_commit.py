"""Message webhooks on PostgreSQL share one statement and one commit per batch (ghl.message_ingest).

Each delivery is answered only after the commit holding its row; a batch that fails is answered 429 for
every delivery in it and stores none of them; deliveries inside one batch get the outcomes they would get
one after another (the general path's, which a replay reproduces). Batches are made deterministic by a
real PostgreSQL table lock held from another connection: the first batch waits on it while the rest queue.
"""

from __future__ import annotations

import threading
import time

import psycopg
import pytest
from sqlalchemy import select

from billing.agencies import ensure_agency
from billing.models import UsageEvent
from core.database import db
from ghl.locations import upsert_location
from ghl.message_ingest import _BATCH_SQL
from ghl.webhooks import INGEST
from tests.ghl.fake_ghl import COMPANY_ID, deliveries, encode, load_payload

LOCATION_ID = "ezgb5h8dePEYGiwg0WSu"  # the real OutboundMessage delivery's subaccount
UNINSTALLED_ID = "uninstalledLocation01"


@pytest.fixture
def admin_url(database_url, postgres_only) -> str:
    return database_url.replace("postgresql+psycopg://", "postgresql://")


def install_locations() -> None:
    agency = ensure_agency(COMPANY_ID)
    upsert_location(agency.id, LOCATION_ID, name="Installed", installed=True)
    upsert_location(agency.id, UNINSTALLED_ID, name="Uninstalled", installed=False)
    db.session.commit()
    db.session.close()  # the pool's connections are the app's from here on


def message(webhook_id: str, message_id: str, location_id: str = LOCATION_ID) -> bytes:
    return encode(load_payload("outbound_message") | {"messageId": message_id, "locationId": location_id},
                  webhook_id=webhook_id)  # fmt: skip


def usage_ids() -> list[str]:
    db.session.expire_all()
    return sorted(db.session.scalars(select(UsageEvent.source_event_id)))


class Deliverer:
    """Post signed bodies from threads, each with its own test client; keep every answer."""

    def __init__(self, app, signer, admin_url: str | None = None):
        self.app, self.signer, self.admin_url = app, signer, admin_url
        self.answers: dict[str, tuple[int, dict]] = {}
        self.seen_committed: dict[str, str | None] = {}
        self.threads: list[threading.Thread] = []

    def start(self, bodies: dict[str, bytes]) -> None:
        barrier = threading.Barrier(len(bodies))
        for name, body in bodies.items():
            thread = threading.Thread(target=self._deliver, args=(name, body, barrier))
            thread.start()
            self.threads.append(thread)

    def _deliver(self, name: str, body: bytes, barrier: threading.Barrier) -> None:
        client = self.app.test_client()
        barrier.wait()
        response = client.post("/webhooks/ghl", data=body, headers=self.signer.headers(body))
        if self.admin_url is not None and response.status_code == 200:
            # Right after the answer, another session must see the row: it was committed before the answer.
            with psycopg.connect(self.admin_url, autocommit=True) as other:
                row = other.execute(
                    "SELECT status FROM ghl_webhook_delivery WHERE body = %s", (body.decode(),)
                ).fetchone()
            self.seen_committed[name] = row[0] if row else None
        self.answers[name] = (response.status_code, response.json)

    def join(self) -> None:
        for thread in self.threads:
            thread.join()


def wait_until(condition, what: str, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"


def backend_pids_waiting_on_a_lock(watcher: psycopg.Connection) -> list[int]:
    return [row[0] for row in watcher.execute(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )]  # fmt: skip


def backends_waiting_on_a_lock(watcher: psycopg.Connection) -> int:
    return len(backend_pids_waiting_on_a_lock(watcher))


def test_concurrent_deliveries_share_a_commit_and_each_is_answered_after_it(app, app_context, signer, admin_url):
    install_locations()
    ingest = app.extensions[INGEST]
    count = 8
    bodies = {f"m{n}": message(f"wh-group-{n}", f"msg-group-{n}") for n in range(count)}
    deliverer = Deliverer(app, signer, admin_url)
    with psycopg.connect(admin_url) as locker, psycopg.connect(admin_url, autocommit=True) as watcher:
        locker.execute("LOCK TABLE ghl_webhook_delivery IN SHARE ROW EXCLUSIVE MODE")  # inserts wait
        batches_before = ingest.batches.batches
        deliverer.start(bodies)
        wait_until(lambda: ingest.batches.pending == count, "every delivery submitted")
        wait_until(lambda: backends_waiting_on_a_lock(watcher) >= 1, "the first batch waiting on the lock")
        assert deliverer.answers == {}  # nothing is answered while its commit cannot happen
        locker.rollback()  # the lock goes: the batches commit
        deliverer.join()
    assert deliverer.answers == {name: (200, {"status": "processed"}) for name in bodies}
    assert deliverer.seen_committed == {name: "processed" for name in bodies}
    assert sorted(d.webhook_id for d in deliveries()) == sorted(f"wh-group-{n}" for n in range(count))
    assert usage_ids() == sorted(f"msg-group-{n}" for n in range(count))
    # The first batches (one per writer) waited on the lock while the others queued: those shared statements.
    assert ingest.batches.batches - batches_before < count


def test_a_failed_batch_acknowledges_none_of_its_deliveries(make_app, ghl_config, signer, admin_url, database_url):
    # A real PostgreSQL error at the database boundary: the app's sessions give up waiting for a lock after
    # 1.5 s (lock_timeout, SQLSTATE 55P03) while another session holds the delivery table.
    app = make_app(DATABASE_URL=f"{database_url}?options=-c%20lock_timeout%3D1500", **ghl_config)
    with app.app_context():
        install_locations()
    ingest = app.extensions[INGEST]
    count = 6
    bodies = {f"m{n}": message(f"wh-fail-{n}", f"msg-fail-{n}") for n in range(count)}
    deliverer = Deliverer(app, signer)
    with psycopg.connect(admin_url) as locker:
        locker.execute("LOCK TABLE ghl_webhook_delivery IN SHARE ROW EXCLUSIVE MODE")
        batches_before, items_before = ingest.batches.batches, ingest.batches.items
        deliverer.start(bodies)
        deliverer.join()
        locker.rollback()
    assert {name: answer[0] for name, answer in deliverer.answers.items()} == {name: 429 for name in bodies}
    assert all("retry" in answer[1]["error"] for answer in deliverer.answers.values())
    batches = ingest.batches.batches - batches_before
    assert ingest.batches.items - items_before == count and batches < count  # batches of several failed whole
    with app.app_context():
        assert deliveries() == [] and usage_ids() == []  # nothing of any failed batch was stored
        # GHL retries a 429: the same deliveries are stored and counted once the database can take them.
        client = app.test_client()
        for body in bodies.values():
            assert client.post("/webhooks/ghl", data=body, headers=signer.headers(body)).json == {"status": "processed"}
        assert usage_ids() == sorted(f"msg-fail-{n}" for n in range(count))


def test_a_batch_stuck_behind_a_lock_is_answered_429_within_the_store_timeout(
    make_app, ghl_config, signer, admin_url
):
    # No lock_timeout here: only GHL_WEBHOOK_STORE_TIMEOUT_MS bounds the wait. Without it the deliveries would
    # wait as long as the lock is held, and GHL, which never retries an answer that did not come, drops them.
    app = make_app(GHL_WEBHOOK_STORE_TIMEOUT_MS=1000, **ghl_config)
    with app.app_context():
        install_locations()
    bodies = {f"m{n}": message(f"wh-stuck-{n}", f"msg-stuck-{n}") for n in range(4)}
    deliverer = Deliverer(app, signer)
    with psycopg.connect(admin_url) as locker:
        locker.execute("LOCK TABLE ghl_webhook_delivery IN SHARE ROW EXCLUSIVE MODE")  # held until the end
        deliverer.start(bodies)
        wait_until(lambda: len(deliverer.answers) == len(bodies), "every delivery answered while the lock is held")
        locker.rollback()
    deliverer.join()
    assert {name: answer[0] for name, answer in deliverer.answers.items()} == {name: 429 for name in bodies}
    with app.app_context():
        assert deliveries() == [] and usage_ids() == []
        client = app.test_client()  # GHL's retry, once the lock is gone: stored and counted once
        for body in bodies.values():
            assert client.post("/webhooks/ghl", data=body, headers=signer.headers(body)).json == {"status": "processed"}
        assert usage_ids() == sorted(f"msg-stuck-{n}" for n in range(4))


def test_copies_inside_one_batch_get_the_outcomes_of_the_general_path(app, app_context, signer, admin_url, runner):
    install_locations()
    ingest = app.extensions[INGEST]
    ingest.batches.max_writers = 1  # one batch in flight at a time, so that the one after the opener's is known
    cases = {
        "first of a webhook delivered twice": message("wh-twice", "msg-twice"),
        "second of a webhook delivered twice": message("wh-twice", "msg-twice"),
        "first webhook of a message": message("wh-same-message-1", "msg-shared"),
        "second webhook of a message": message("wh-same-message-2", "msg-shared"),
        "unknown subaccount": message("wh-unknown", "msg-unknown", "unknownLocation0001"),
        "uninstalled subaccount": message("wh-uninstalled", "msg-uninstalled", UNINSTALLED_ID),
        "plain": message("wh-plain", "msg-plain"),
    }
    opener, rest = Deliverer(app, signer), Deliverer(app, signer)
    with psycopg.connect(admin_url) as locker, psycopg.connect(admin_url, autocommit=True) as watcher:
        locker.execute("LOCK TABLE ghl_webhook_delivery IN SHARE ROW EXCLUSIVE MODE")
        batches_before = ingest.batches.batches
        opener.start({"opener": message("wh-opener", "msg-opener")})  # the first batch: it waits on the lock
        wait_until(lambda: backends_waiting_on_a_lock(watcher) >= 1, "the opener waiting on the lock")
        rest.start(cases)
        wait_until(lambda: ingest.batches.pending == len(cases) + 1, "every case queued behind the opener")
        locker.rollback()
        opener.join()
        rest.join()
    assert ingest.batches.batches - batches_before == 2  # the opener's batch, then every case in one batch
    answers = {name: answer[1] for name, answer in rest.answers.items()}
    twice = sorted(answers[name]["status"] for name in cases if "delivered twice" in name)
    assert twice == ["duplicate", "processed"]
    shared = sorted(answers[name]["status"] for name in cases if "of a message" in name)
    assert shared == ["ignored", "processed"]
    assert answers["unknown subaccount"] == {"status": "failed"}
    assert answers["uninstalled subaccount"] == {"status": "ignored"}
    assert answers["plain"] == {"status": "processed"}
    assert usage_ids() == ["msg-opener", "msg-plain", "msg-shared", "msg-twice"]
    stored = {d.webhook_id: d for d in deliveries()}
    assert "already recorded" in next(d.error for w, d in stored.items() if w.startswith("wh-same") and d.error)
    assert "does not know" in stored["wh-unknown"].error and stored["wh-unknown"].processed_at is None
    assert "not installed" in stored["wh-uninstalled"].error
    # The general path (ghl.events, run by a replay) records the same outcome for each delivery it did not
    # count (a processed one replayed reads "already recorded": it is counted once, checked below).
    for webhook_id, delivery in stored.items():
        if delivery.status == "processed":
            continue
        outcome = (delivery.status, delivery.error, delivery.processed_at is None)
        assert runner.invoke(args=["ghl", "replay", "--id", str(delivery.id)]).exit_code in (0, 1)
        replayed = next(d for d in deliveries() if d.id == delivery.id)
        assert (replayed.status, replayed.error, replayed.processed_at is None) == outcome, webhook_id
    assert usage_ids() == ["msg-opener", "msg-plain", "msg-shared", "msg-twice"]  # nothing counted twice


def test_a_batch_of_chained_copies_gets_the_outcomes_of_its_deliveries_one_after_another(
    app, app_context, signer, admin_url
):
    # One batch, in a known order, whose copies chain: B shares A's message, C shares B's webhook, D shares
    # C's message. One after another: B reads "already recorded", C is a duplicate of B (so C's message is
    # NOT counted by C), and D counts it. A statement that held B and C together, or that deduplicated by
    # webhookId first and by message second (C stored and counting msg-chain-2, B a duplicate), would answer
    # otherwise. The last item repeats D's webhook with a value PostgreSQL refuses (a NUL): its statement
    # fails after the others committed, which must keep their outcomes (it is written alone: a duplicate).
    install_locations()
    ingest = app.extensions[INGEST]
    ingest.batches.max_writers = 1  # the queued deliveries form one batch, in the order they queued
    cases = {
        "A": (message("wh-chain-a", "msg-chain-1"), "processed"),
        "B same message as A": (message("wh-chain-b", "msg-chain-1"), "ignored"),
        "C same webhook as B": (message("wh-chain-b", "msg-chain-2"), "duplicate"),
        "D same message as C": (message("wh-chain-d", "msg-chain-2"), "processed"),
        "E copy of A": (message("wh-chain-a", "msg-chain-1"), "duplicate"),
        "F uninstalled": (message("wh-chain-f", "msg-chain-3", UNINSTALLED_ID), "ignored"),
        "G same message as F": (message("wh-chain-g", "msg-chain-3"), "processed"),
        "H plain": (message("wh-chain-h", "msg-chain-4"), "processed"),
        "I refused copy of D": (message("wh-chain-d", "bad\u0000id"), "duplicate"),
    }
    opener, rest = Deliverer(app, signer), Deliverer(app, signer, admin_url)
    with psycopg.connect(admin_url) as locker, psycopg.connect(admin_url, autocommit=True) as watcher:
        locker.execute("LOCK TABLE ghl_webhook_delivery IN SHARE ROW EXCLUSIVE MODE")
        batches_before = ingest.batches.batches
        opener.start({"opener": message("wh-chain-opener", "msg-chain-opener")})
        wait_until(lambda: backends_waiting_on_a_lock(watcher) >= 1, "the opener waiting on the lock")
        for queued, (name, (body, _)) in enumerate(cases.items(), start=2):  # one at a time: the batch's order
            rest.start({name: body})
            wait_until(lambda queued=queued: ingest.batches.pending == queued, f"{name} queued")
        locker.rollback()
        opener.join()
        rest.join()
    assert ingest.batches.batches - batches_before == 2  # the opener's batch, then every case in one batch
    assert {name: answer for name, answer in rest.answers.items()} == {
        name: (200, {"status": status}) for name, (_, status) in cases.items()
    }
    committed = {name: seen for name, seen in rest.seen_committed.items() if cases[name][1] != "duplicate"}
    assert committed == {name: status for name, (_, status) in cases.items() if status != "duplicate"}
    assert usage_ids() == ["msg-chain-1", "msg-chain-2", "msg-chain-3", "msg-chain-4", "msg-chain-opener"]
    stored = {d.webhook_id: d for d in deliveries()}
    assert sorted(stored) == sorted(f"wh-chain-{name}" for name in ("opener", "a", "b", "d", "f", "g", "h"))
    assert '"msg-chain-1"' in stored["wh-chain-b"].body and "already recorded" in stored["wh-chain-b"].error
    assert '"msg-chain-2"' in stored["wh-chain-d"].body and stored["wh-chain-d"].status == "processed"
    assert "not installed" in stored["wh-chain-f"].error


def scans_of(plan: dict, tables: set[str], ancestors: tuple[dict, ...] = ()):
    """Each node of an EXPLAIN (FORMAT JSON) plan that reads one of ``tables``, with the nodes above it."""
    if plan.get("Relation Name") in tables and plan["Node Type"] != "ModifyTable":
        yield plan, ancestors
    for child in plan.get("Plans", ()):
        yield from scans_of(child, tables, (*ancestors, plan))


def generic_plan(admin_url: str) -> dict:
    """The batch statement's plan as the worker's connections make it (generic, here on empty tables)."""
    with psycopg.connect(admin_url, autocommit=True) as connection:
        connection.execute("SET plan_cache_mode = force_generic_plan")  # as the worker's connections plan it
        connection.execute(f"PREPARE batch AS {_BATCH_SQL}")  # its one parameter is $1, the rows
        return connection.execute("EXPLAIN (FORMAT JSON) EXECUTE batch('[]')").fetchone()[0][0]


def nodes(plan: dict):
    yield plan
    for child in plan.get("Plans", ()):
        yield from nodes(child)


def test_the_batch_statement_takes_usage_keys_then_delivery_keys_each_in_key_order(admin_url):
    # Two workers' batches holding the same keys must wait for each other in one order, never deadlock
    # (ghl.message_ingest._batch_statement): usage rows are inserted sorted by (agency, message), and the
    # delivery rows come out of a Sort by webhookId over the join with the usage CTE, which reads every
    # usage row before the first delivery row is inserted.
    plan = generic_plan(admin_url)["Plan"]
    insert_usage = next(node for node in nodes(plan) if node.get("Relation Name") == "usage_event")
    usage_sorts = [node for node in nodes(insert_usage) if node["Node Type"] == "Sort"]
    assert [[key.split(".")[-1] for key in sort["Sort Key"]] for sort in usage_sorts] == [["agency_id", "message_id"]]
    [delivery_input] = [child for child in plan["Plans"] if child.get("Parent Relationship") == "Outer"]
    sort = next(node for node in nodes(delivery_input) if node["Node Type"] == "Sort")
    assert [key.split(".")[-1] for key in sort["Sort Key"]] == ["webhook_id"]
    assert any(node.get("CTE Name") == "usage" for node in nodes(sort)), "the sort is over the join with usage"


def test_the_batch_statement_probes_an_index_per_row_even_when_planned_on_empty_tables(admin_url):
    # The worker's connections plan the batch statement once (generic plan), often while the tables are
    # small (a fresh install). A plan that hashes a whole table then makes every later batch scan a table
    # that only grows: each batch's cost grew with the stored rows (bench/README.md, before a36eeb2).
    # Planned here on empty tables, as the worker plans it, each read of the delivery and subaccount tables
    # must be an index probe for one row of the batch, under a nested loop: never a scan, a bitmap or a hash.
    plan = generic_plan(admin_url)
    tables = {"ghl_webhook_delivery", "ghl_location"}
    reads = list(scans_of(plan["Plan"], tables))
    assert {node["Relation Name"] for node, _ in reads} == tables
    for node, ancestors in reads:
        shape = (node["Relation Name"], node["Node Type"], [above["Node Type"] for above in ancestors])
        assert node["Node Type"] in ("Index Scan", "Index Only Scan"), shape
        assert "Nested Loop" in shape[2] and "Hash" not in shape[2], shape
        assert not any(above.get("Subplan Name", "").startswith("hashed") for above in ancestors), shape
