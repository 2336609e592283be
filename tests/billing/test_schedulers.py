"""Several scheduler processes on one database: ticks share the work exactly once, one process does housekeeping.

The ticks run as real `flask --app app rebill tick` subprocesses against the fake Stripe served by this test
process. To prove the processes really share the reporting (and are not just run one after another), the
fake holds every meter event until requests have come from as many client connections as there are
processes (each process sends on one connection: STRIPE_CONCURRENCY=1); a claim is at most 1,000 rows, so
with more than 1,000 x (K - 1) due rows every process must have claimed a batch of its own by then.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from billing.cli import scheduled_job
from billing.ledger import UsageRecord, record_usage
from billing.models import RebillClient, UnitReport
from billing.report_claims import CLAIM_BATCH
from billing.units import report_identifier
from core.database import db, utcnow
from core.leader_lock import LeaderLock
from stripe_fake import FakeStripeServer, FakeStripeState
from tests.billing.stripe_support import StripeWorld
from tests.conftest import TEST_ENCRYPTION_KEY, TEST_SECRET_KEY
from tests.metrics_support import Deltas

REPO = Path(__file__).parents[2]
WAIT = 120  # seconds; only reached if something is broken


class ConnectionBarrier:
    """WSGI middleware holding meter-event POSTs until they have come from ``connections`` client connections."""

    def __init__(self, app, connections: int):
        self.app, self.connections = app, connections
        self.seen: set[str] = set()
        self.lock = threading.Lock()
        self.opened = threading.Event()

    def __call__(self, environ, start_response):
        if environ["PATH_INFO"] == "/v1/billing/meter_events" and not self.opened.is_set():
            with self.lock:
                self.seen.add(environ["REMOTE_PORT"])
                if len(self.seen) >= self.connections:
                    self.opened.set()
            self.opened.wait(WAIT)
        return self.app(environ, start_response)


def clients_with_a_due_report(world: StripeWorld, setups: list, count: int, *, units: int, billing_unit: int):
    """``count`` clients spread over the agencies, each with one due outbox row (as world.client and world.report
    leave them, written in two flushes instead of two per client)."""
    clients = []
    for number in range(count):
        setup = setups[number % len(setups)]
        meter = setup.meter
        channel = f"chan-{uuid.uuid4().hex[:12]}"
        clients.append((setup, RebillClient(
            agency_id=setup.agency.id, nickname=f"Client {number}", provider="capri_api", channel_id=channel,
            source_key=channel, stripe_product_id=setup.product["id"], stripe_price_id=setup.price["id"],
            stripe_customer_id=world.customer(setup), charge_by="tokens", billing_unit=billing_unit,
            report_mode="meter", meter_id=meter["id"], meter_event_name=meter["event_name"],
            meter_customer_key=meter["customer_mapping"]["event_payload_key"],
            meter_value_key=meter["value_settings"]["event_payload_key"],
            meter_formula=meter["default_aggregation"]["formula"], report_sequence=1, units_logged=units,
        )))  # fmt: skip
    db.session.add_all(client for _, client in clients)
    db.session.flush()
    due = world.clock.now() - dt.timedelta(seconds=5)
    db.session.add_all(
        UnitReport(agency_id=client.agency_id, client_id=client.id, units=units, usage_timestamp=due,
                   identifier=report_identifier(client.report_prefix, client.id, 1), status="pending", attempts=0,
                   next_attempt_at=due)
        for _, client in clients
    )  # fmt: skip
    db.session.flush()
    return clients


def start_ticks(database_url: str, stripe_url: str, count: int) -> list[subprocess.Popen]:
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "REBILL_ENV": "test",
        "REBILL_ENCRYPTION_KEYS": TEST_ENCRYPTION_KEY,
        "SECRET_KEY": TEST_SECRET_KEY,
        "STRIPE_API_BASE": stripe_url,
        "STRIPE_NETWORK_ATTEMPTS": "1",
        "STRIPE_CONCURRENCY": "1",
        "REBILL_LOG_LEVEL": "ERROR",
    }
    command = [sys.executable, "-m", "flask", "--app", "app", "rebill", "tick"]
    return [
        subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(count)
    ]


@pytest.mark.parametrize("processes", [2, 3])
def test_several_tick_processes_share_the_work_and_send_every_unit_exactly_once(
    make_app, database_url, postgres_only, stripe_clock, processes
):
    server = FakeStripeServer(FakeStripeState(clock=stripe_clock))
    barrier = ConnectionBarrier(server.app, processes)
    server.app = barrier
    server.start()
    app = make_app(STRIPE_API_BASE=server.url)
    try:
        with app.app_context():
            world = StripeWorld(server, stripe_clock)
            setups = [world.agency() for _ in range(3)]
            rows = CLAIM_BATCH * (processes - 1) + 150
            clients = clients_with_a_due_report(world, setups, rows, units=2, billing_unit=7)
            expected = Counter({client.id: 2 for _, client in clients})
            for number, (setup, client) in enumerate(clients[:60]):  # and usage still to aggregate
                usage = [3 + number % 11 for _ in range(4)]
                record_usage(setup.agency.id, [
                    UsageRecord(source="capri", source_event_id=f"u-{client.id}-{n}", channel_id=client.channel_id,
                                input_tokens=tokens, occurred_at=utcnow())
                    for n, tokens in enumerate(usage)
                ])  # fmt: skip
                expected[client.id] += sum(usage) // 7
            db.session.commit()

            ticks = start_ticks(database_url, server.url, processes)
            outputs = [tick.communicate(timeout=WAIT) for tick in ticks]
            assert [tick.returncode for tick in ticks] == [0] * processes, [err for _, err in outputs]

            assert barrier.opened.is_set()  # every process was sending at the same time
            sent = [int(re.search(r"reports_sent=(\d+)", out).group(1)) for out, _ in outputs]
            assert all(count > 0 for count in sent), sent
            assert sum(sent) == rows + 60  # every row sent once, by one of them
            posted = Counter(call.params["identifier"] for call in world.calls() if call.status == 200)
            assert set(posted.values()) == {1} and len(posted) == rows + 60
            assert len(world.calls()) == rows + 60  # not even attempted twice: the claims were disjoint
            assert {client.id: world.stripe_total(setup, client) for setup, client in clients} == expected
            assert {report.status for report in world.reports()} == {"sent"}
    finally:
        barrier.opened.set()
        server.stop()


LEADER_SCRIPT = """
import sys
from sqlalchemy import create_engine
from core.leader_lock import LeaderLock
lock = LeaderLock(create_engine(sys.argv[1]))
for _ in sys.stdin:
    print(lock.held(), flush=True)
"""


def test_exactly_one_of_three_scheduler_processes_leads_housekeeping_and_a_killed_leader_is_replaced(
    database_url, postgres_only
):
    processes = [
        subprocess.Popen([sys.executable, "-c", LEADER_SCRIPT, database_url], cwd=REPO, text=True,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        for _ in range(3)
    ]  # fmt: skip

    def ask(process: subprocess.Popen) -> bool:
        process.stdin.write("held?\n")
        process.stdin.flush()
        return process.stdout.readline().strip() == "True"

    try:
        first = [ask(process) for process in processes]
        assert first.count(True) == 1
        leader = processes[first.index(True)]
        assert ask(leader) is True  # it keeps leading
        assert [ask(p) for p in processes if p is not leader] == [False, False]

        leader.send_signal(signal.SIGKILL)  # PostgreSQL ends its session, and with it the lock
        leader.wait(WAIT)
        others = [p for p in processes if p is not leader]
        answers: list[bool] = []
        deadline = time.monotonic() + WAIT
        while not any(answers) and time.monotonic() < deadline:  # the server ends the session asynchronously
            answers = [ask(p) for p in others]
        assert answers.count(True) == 1
    finally:
        for process in processes:
            if process.poll() is None:
                process.stdin.close()
                process.wait(WAIT)


def test_housekeeping_runs_only_in_the_leading_scheduler(make_app, postgres_only):
    first, second = make_app(), make_app()
    calls = []
    with first.app_context():
        first_lock = LeaderLock(db.engine)
    with second.app_context():
        second_lock = LeaderLock(db.engine)
    deltas = Deltas(*(("rebill_scheduler_job_runs_total", {"job": "upkeep", "outcome": o}) for o in ("ok", "skipped")))
    try:
        assert scheduled_job(first, "upkeep", lambda: calls.append("first"), first_lock)() == "ok"
        assert scheduled_job(second, "upkeep", lambda: calls.append("second"), second_lock)() == "skipped"
        first_lock.release()  # the leader stops
        assert scheduled_job(second, "upkeep", lambda: calls.append("second"), second_lock)() == "ok"
        assert scheduled_job(first, "upkeep", lambda: calls.append("first"), first_lock)() == "skipped"
    finally:
        first_lock.release()
        second_lock.release()
    assert calls == ["first", "second"]
    assert deltas() == [2, 2]


def test_on_sqlite_the_one_scheduler_always_runs_housekeeping(make_app, backend):
    if backend != "sqlite":
        pytest.skip("SQLite only")
    app = make_app()
    with app.app_context():
        locks = [LeaderLock(db.engine), LeaderLock(db.engine)]
    assert [lock.held() for lock in locks] == [True, True]


def test_a_failing_job_is_logged_counted_and_does_not_stop_the_scheduler(app):
    deltas = Deltas(("rebill_scheduler_job_runs_total", {"job": "broken", "outcome": "failed"}))

    def broken():
        raise RuntimeError("boom")

    assert scheduled_job(app, "broken", broken)() == "failed"
    assert deltas() == [1]
