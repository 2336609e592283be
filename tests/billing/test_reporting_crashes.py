"""A tick killed (SIGKILL) at each step of talking to Stripe, then a new tick: Stripe's ledger is exact.

The tick runs as a real `flask --app app rebill tick` subprocess against the fake Stripe served by this test
process. A gate in front of the fake holds one meter-event request at a chosen point (threading.Event, no
sleeping), the test kills the subprocess there, then lets the fake drop or apply the request.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest

from billing.report_claims import LEASE
from billing.report_sending import COUNT_EVENTS_PER_CLAIM
from billing.reporting import report_pending_units, retry_failed_reports
from core.database import db, utcnow
from stripe_fake import FakeStripeServer, FakeStripeState
from tests.billing.stripe_support import StripeWorld
from tests.conftest import TEST_ENCRYPTION_KEY, TEST_SECRET_KEY

REPO = Path(__file__).parents[2]
WAIT = 60  # seconds; only reached if something is broken


class Gate:
    """WSGI middleware holding the n-th meter-event POST before or after the fake applies it."""

    def __init__(self, app, *, hold: str, nth: int = 1):
        self.app, self.hold, self.remaining = app, hold, nth
        self.reached, self.release, self.finished = threading.Event(), threading.Event(), threading.Event()
        self.apply_late = False  # for hold="before_apply": does Stripe still apply it after the client died?

    def __call__(self, environ, start_response):
        if environ["PATH_INFO"] != "/v1/billing/meter_events" or environ["REQUEST_METHOD"] != "POST":
            return self.app(environ, start_response)
        self.remaining -= 1
        if self.remaining != 0:
            return self.app(environ, start_response)
        try:
            body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
            environ["wsgi.input"] = io.BytesIO(body)
            if self.hold == "before_apply":
                self.reached.set()
                self.release.wait(WAIT)
                if not self.apply_late:
                    start_response("500 Internal Server Error", [("Content-Type", "application/json")])
                    return [b'{"error": {"type": "api_error", "message": "never applied"}}']
                return self.app(environ, start_response)
            answer = self.app(environ, start_response)  # applied by Stripe, answer not yet sent
            self.reached.set()
            self.release.wait(WAIT)
            return answer
        finally:
            self.finished.set()


@pytest.fixture
def gated(stripe_clock):
    """A fake Stripe behind a Gate; the test sets the gate up before the first request."""
    server = FakeStripeServer(FakeStripeState(clock=stripe_clock))
    holder = {}

    def arm(**gate_args) -> Gate:
        holder["gate"] = Gate(server.app, **gate_args)
        server.app = holder["gate"]
        server.start()
        return holder["gate"]

    yield server, arm
    if "gate" in holder:
        holder["gate"].release.set()
    server.stop()


def run_tick_until_gate(database_url: str, server: FakeStripeServer, gate: Gate) -> None:
    """Start `rebill tick` in a subprocess, wait until its request reaches the gate, then SIGKILL it."""
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "REBILL_ENV": "test",
        "REBILL_ENCRYPTION_KEYS": TEST_ENCRYPTION_KEY,
        "SECRET_KEY": TEST_SECRET_KEY,
        "STRIPE_API_BASE": server.url,
        "STRIPE_NETWORK_ATTEMPTS": "1",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "flask", "--app", "app", "rebill", "tick"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        reached = gate.reached.wait(WAIT)
        exited = process.poll()
        assert reached, f"the tick never reached Stripe (exit {exited}): {process.stderr.read() if exited else ''}"
        process.send_signal(signal.SIGKILL)
        assert process.wait(WAIT) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
        process.stderr.close()


@pytest.mark.parametrize(
    ("hold", "apply_late"),
    [
        ("before_apply", False),  # killed while its request was in flight; Stripe never applied it
        ("before_apply", True),  # killed while in flight; Stripe applied it after the client was gone
        ("after_apply", None),  # Stripe applied it, the process died before reading the answer
    ],
)
def test_a_tick_killed_mid_request_loses_and_doubles_nothing(
    make_app, database_url, gated, stripe_clock, hold, apply_late
):
    server, arm = gated
    gate = arm(hold=hold)
    gate.apply_late = bool(apply_late)
    app = make_app(STRIPE_API_BASE=server.url, STRIPE_NETWORK_ATTEMPTS=1)
    with app.app_context():
        world = StripeWorld(server, stripe_clock)
        setup = world.agency()
        crashed, other = world.client(setup), world.client(setup)
        world.report(crashed, 5)
        world.report(other, 2)
        db.session.commit()

        run_tick_until_gate(database_url, server, gate)
        gate.release.set()
        assert gate.finished.wait(WAIT)

        first = world.reports()
        # Both rows were claimed (leased) together; the crash left them pending with their attempt counted.
        assert [(r.status, r.attempts) for r in first] == [("pending", 1), ("pending", 1)]
        assert report_pending_units().stripe_calls == 0  # leased: nobody resends before the lease ends

        report_pending_units(utcnow() + LEASE + LEASE)

        assert [r.status for r in world.reports()] == ["sent", "sent"]
        assert world.stripe_total(setup, crashed) == 5 and world.stripe_total(setup, other) == 2
        events = world.state.meter_events(setup.key)
        assert sorted(e["identifier"] for e in events) == sorted(r.identifier for r in first)


def test_a_tick_killed_between_the_events_of_a_count_meter_finishes_them_once(
    make_app, database_url, gated, stripe_clock
):
    server, arm = gated
    gate = arm(hold="after_apply", nth=2)
    app = make_app(STRIPE_API_BASE=server.url, STRIPE_NETWORK_ATTEMPTS=1)
    with app.app_context():
        world = StripeWorld(server, stripe_clock)
        setup = world.agency(formula="count")
        client = world.client(setup)
        report = world.report(client, 4)
        db.session.commit()

        run_tick_until_gate(database_url, server, gate)
        gate.release.set()
        assert gate.finished.wait(WAIT)
        assert world.stripe_total(setup, client) == 2  # events 1 and 2 applied before the kill

        report_pending_units(utcnow() + LEASE + LEASE)

        assert world.stripe_total(setup, client) == 4 and world.reports()[0].status == "sent"
        identifiers = [e["identifier"] for e in world.state.meter_events(setup.key)]
        assert identifiers == [f"{report.identifier}-{n}" for n in (1, 2, 3, 4)]


def test_a_tick_killed_in_a_later_slice_of_a_count_meter_row_resumes_after_the_recorded_progress(
    make_app, database_url, gated, stripe_clock
):
    # 150 events go in slices of COUNT_EVENTS_PER_CLAIM; the kill comes after event 102 was applied, in the
    # second slice, when the row had recorded the first slice as confirmed.
    server, arm = gated
    gate = arm(hold="after_apply", nth=COUNT_EVENTS_PER_CLAIM + 2)
    app = make_app(STRIPE_API_BASE=server.url, STRIPE_NETWORK_ATTEMPTS=1)
    with app.app_context():
        world = StripeWorld(server, stripe_clock)
        setup = world.agency(formula="count")
        client = world.client(setup)
        report = world.report(client, 150)
        db.session.commit()

        run_tick_until_gate(database_url, server, gate)
        gate.release.set()
        assert gate.finished.wait(WAIT)
        (row,) = world.reports()
        recorded = row.units_confirmed  # the first slice (it may end early when slow)
        assert 0 < recorded <= COUNT_EVENTS_PER_CLAIM and row.in_doubt_since is not None

        report_pending_units(utcnow() + LEASE + LEASE)

        (row,) = world.reports()
        assert row.status == "sent" and row.units_confirmed == 150 and world.stripe_total(setup, client) == 150
        identifiers = [e["identifier"] for e in world.state.meter_events(setup.key)]
        assert identifiers == [f"{report.identifier}-{n}" for n in range(1, 151)]
        # The resend started after the recorded progress: events up to it were offered once, the killed
        # slice's events twice (Stripe deduplicated them), the rest once.
        posted = Counter(c.params["identifier"] for c in world.state.calls if c.path == "/v1/billing/meter_events")
        offers = [posted[f"{report.identifier}-{n}"] for n in range(1, 151)]
        killed_slice = COUNT_EVENTS_PER_CLAIM + 2 - recorded
        assert offers == [1] * recorded + [2] * killed_slice + [1] * (150 - recorded - killed_slice)


def test_a_tick_killed_while_stripe_refuses_a_count_row_mid_way_loses_and_doubles_nothing(
    make_app, database_url, gated, stripe_clock
):
    # Events 1-2 are applied; the customer is deleted while event 3 is in flight, Stripe refuses it, and the
    # tick dies before recording anything. Later the agency moves the client to another customer: the rest
    # is split off to a fresh row (billing.unsent_remainder) only once Stripe's totals prove it unsent.
    server, arm = gated
    gate = arm(hold="before_apply", nth=3)
    gate.apply_late = True
    app = make_app(STRIPE_API_BASE=server.url, STRIPE_NETWORK_ATTEMPTS=1)
    with app.app_context():
        world = StripeWorld(server, stripe_clock)
        setup = world.agency(formula="count")
        client = world.client(setup)
        customer_a = client.stripe_customer_id
        world.report(client, 4)
        db.session.commit()

        run_tick_until_gate(database_url, server, gate)
        world.state.delete_customer(setup.key, customer_a)
        gate.release.set()
        assert gate.finished.wait(WAIT)
        (row,) = world.reports()
        assert world.stripe_total(setup, client) == 2 and row.in_doubt_since is not None

        report_pending_units(stripe_clock.now() + LEASE + LEASE)  # 1-2 deduplicated, 3 refused: in doubt still
        (row,) = world.reports()
        assert row.status == "failed" and "No such customer" in row.last_error and row.units == 4

        stripe_clock.advance(hours=25)
        client = db.session.get(type(client), client.id)
        client.stripe_customer_id = customer_b = world.customer(setup)
        retry_failed_reports(client.agency, client.id)
        db.session.commit()
        report_pending_units(stripe_clock.now())

        closed, rest = world.reports()
        assert (closed.status, closed.units, closed.target_customer) == ("sent", 2, customer_a)
        assert (rest.status, rest.units, rest.target_customer) == ("sent", 2, customer_b), rest.last_error
        assert world.state.total_units(setup.key, customer_a, "ai_units") == 2
        assert world.state.total_units(setup.key, customer_b, "ai_units") == 2
