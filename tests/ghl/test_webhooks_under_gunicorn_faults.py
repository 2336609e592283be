"""Black box, adversarial: GHL message webhooks sent to gunicorn started as the Procfile's web line (gevent
workers) while the database drops the workers' connections and gunicorn restarts its workers.

The promises: every 200 has its delivery row, committed; an answer is 200 or 429 (GHL retries a 429 and
nothing else); a message is counted once, however many copies and retries; a graceful worker restart
(SIGHUP to the arbiter, SIGTERM to one worker) leaves no request unanswered. The faults are driven by the
count of answers so far, not by timers.
"""

from __future__ import annotations

import os
import signal
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import psycopg
import requests
from sqlalchemy import select

from billing.models import UsageEvent
from core.database import db
from tests.ghl.fake_ghl import deliveries, encode, load_payload
from tests.ghl.test_message_group_commit import wait_until
from tests.ghl.test_webhooks_under_gunicorn import (  # noqa: F401 (procfile_web is the fixture used)
    LOCATION_ID,
    procfile_web,
)

MESSAGES = 4000  # at most: the senders stop once every fault has happened (~1800 here, measured)
SENDERS = 24


def message(number: int) -> bytes:
    payload = load_payload("outbound_message") | {"messageId": f"msg-fault-{number:03d}", "locationId": LOCATION_ID}
    return encode(payload, webhook_id=f"wh-fault-{number:03d}")


def arbiter_pid(log) -> int:
    [line] = [line for line in log.read_text().splitlines() if "Starting gunicorn" in line]
    return int(line.split("[")[2].split("]")[0])


def worker_pids(log) -> list[int]:
    return [int(line.rsplit(" ", 1)[1]) for line in log.read_text().splitlines() if "Booting worker with pid" in line]


def terminate_backends(admin_url: str) -> int:
    """pg_terminate_backend every other session on the test database: the ingest's and the pools'."""
    with psycopg.connect(admin_url, autocommit=True) as admin:
        return admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchone()[0]


def test_every_200_is_stored_and_every_other_answer_is_a_429_while_connections_drop_and_workers_restart(
    postgres_only,
    procfile_web,  # noqa: F811 (the imported fixture)
    make_app,
    signer,
    database_url,
):
    url, log = procfile_web
    admin_url = database_url.replace("postgresql+psycopg://", "postgresql://")
    arbiter = arbiter_pid(log)
    bodies = [message(n) for n in range(MESSAGES)]
    answers: dict[int, list] = {n: [] for n in range(MESSAGES)}
    answered = Counter()
    lock = threading.Lock()
    chaos_done = threading.Event()

    def numbers():
        # Each message once, and every tenth again a few later: a copy (same webhookId) racing its original.
        for n in range(MESSAGES):
            if chaos_done.is_set():
                return
            yield n
            if n % 10 == 5:
                yield n - 5

    def deliver(number: int) -> None:
        body = bodies[number]
        try:
            response = requests.post(f"{url}/webhooks/ghl", data=body, headers=signer.headers(body), timeout=30)
            outcome = (response.status_code, response.json().get("status"))
        except requests.RequestException as error:  # no answer: GHL drops the delivery
            outcome = ("no answer", type(error).__name__)
        with lock:
            answers[number].append(outcome)
            answered["all"] += 1

    def exited(pid: int) -> bool:
        return f"Worker exiting (pid: {pid})" in log.read_text()

    def after(count: int, what: str) -> None:
        target = answered["all"] + count
        wait_until(lambda: answered["all"] >= target, f"{count} more answers before {what}", seconds=60)

    faults = []

    def chaos() -> None:
        try:
            after(50, "dropping the connections")
            faults.append(("terminate", terminate_backends(admin_url)))
            after(50, "SIGHUP")
            old = worker_pids(log)
            os.kill(arbiter, signal.SIGHUP)  # graceful: new workers start, the old ones finish what they hold
            wait_until(lambda: len(worker_pids(log)) == len(old) + 2 and all(exited(pid) for pid in old),
                       "the workers replaced", seconds=60)  # fmt: skip
            faults.append(("SIGHUP", old))
            after(50, "dropping the connections again")
            faults.append(("terminate", terminate_backends(admin_url)))
            after(50, "SIGTERM to a worker")
            booted = worker_pids(log)
            victim = booted[-1]
            os.kill(victim, signal.SIGTERM)  # graceful stop of one worker; the arbiter starts another
            # (and the replacement has booted before the end: the fixture's SIGTERM to gunicorn while a
            # worker boots made gunicorn's stop take its whole 30 s graceful timeout)
            wait_until(lambda: exited(victim) and len(worker_pids(log)) == len(booted) + 1,
                       "the worker stopped and replaced", seconds=60)  # fmt: skip
            faults.append(("SIGTERM", victim))
            after(50, "the end")
        finally:
            chaos_done.set()

    chaos_thread = threading.Thread(target=chaos)
    chaos_thread.start()
    pending = numbers()

    def send() -> None:
        while True:
            with lock:
                number = next(pending, None)
            if number is None:
                return
            deliver(number)

    with ThreadPoolExecutor(max_workers=SENDERS) as pool:
        for sender in [pool.submit(send) for _ in range(SENDERS)]:
            sender.result()
    chaos_thread.join()
    assert [name for name, _ in faults] == ["terminate", "SIGHUP", "terminate", "SIGTERM"], faults

    outcomes = Counter(outcome for per_message in answers.values() for outcome in per_message)
    acknowledged = {n for n, per_message in answers.items() if any(code == 200 for code, _ in per_message)}
    with make_app(**signer.config()).app_context():
        stored = Counter(delivery.webhook_id for delivery in deliveries())
        counted = Counter(db.session.scalars(select(UsageEvent.source_event_id)))

    sent = {n for n, per_message in answers.items() if per_message}
    missing = sorted(n for n in acknowledged if stored[f"wh-fault-{n:03d}"] != 1)
    assert missing == [], (missing, outcomes, faults)  # a 200 without its row
    assert all(times == 1 for times in counted.values()), counted  # nothing counted twice
    assert set(code for code, _ in outcomes) <= {200, 429}, (outcomes, faults)  # no lost (unanswered) delivery

    # GHL retries every 429: then every message is stored and counted exactly once.
    for number in sorted(sent - acknowledged):
        body = bodies[number]
        retried = requests.post(f"{url}/webhooks/ghl", data=body, headers=signer.headers(body), timeout=30)
        assert retried.status_code == 200, (number, retried.status_code, retried.text)
    with make_app(**signer.config()).app_context():
        counted = Counter(db.session.scalars(select(UsageEvent.source_event_id)))
        stored = Counter(delivery.webhook_id for delivery in deliveries())
    assert counted == Counter(f"msg-fault-{n:03d}" for n in sent)
    assert stored == Counter(f"wh-fault-{n:03d}" for n in sent)
