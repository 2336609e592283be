"""The rebill CLI: tick, reconcile and the scheduler process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from billing.ledger import UsageRecord, record_usage
from core.database import db, utcnow
from tests.conftest import TEST_ENCRYPTION_KEY, TEST_SECRET_KEY

REPO = Path(__file__).parents[2]


def test_tick_aggregates_reports_and_prints_what_it_did(world, stripe_app):
    setup = world.agency()
    client = world.client(setup, billing_unit=100)
    record_usage(setup.agency.id, [
        UsageRecord(source="capri", source_event_id="e1", channel_id=client.channel_id, input_tokens=250,
                    occurred_at=utcnow())
    ])  # fmt: skip
    db.session.commit()

    result = stripe_app.test_cli_runner().invoke(args=["rebill", "tick"])

    assert result.exit_code == 0, result.output
    assert "events_aggregated=1 units_logged=2 reports_sent=1 units_sent=2" in result.output
    assert "stripe_calls=1" in result.output
    assert world.stripe_total(setup, client) == 2


def test_reconcile_prints_each_client_and_exits_1_on_drift(world, stripe_app):
    setup = world.agency()
    client = world.client(setup)
    world.report(client, 3)
    db.session.commit()
    runner = stripe_app.test_cli_runner()
    runner.invoke(args=["rebill", "tick"])

    clean = runner.invoke(args=["rebill", "reconcile"])
    assert clean.exit_code == 0, clean.output
    assert f"clients={client.id}" in clean.output and "sent=3" in clean.output and "drift=0 ok" in clean.output
    assert "Nothing was resent" in clean.output

    world.server.client(setup.key).v1.billing.meter_events.create(
        {"event_name": "ai_units", "payload": {"stripe_customer_id": client.stripe_customer_id, "value": "2"}}
    )
    drifted = runner.invoke(args=["rebill", "reconcile", "--company", setup.agency.company_id])
    assert drifted.exit_code == 1 and "stripe=5 drift=2 DRIFT" in drifted.output

    other = runner.invoke(args=["rebill", "reconcile", "--company", "nobody"])
    assert other.exit_code == 0 and "no clients to reconcile" in other.output


def test_the_scheduler_process_runs_a_tick_at_start(database_url, stripe_server):
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "REBILL_ENV": "test",
        "REBILL_ENCRYPTION_KEYS": TEST_ENCRYPTION_KEY,
        "SECRET_KEY": TEST_SECRET_KEY,
        "STRIPE_API_BASE": stripe_server.url,
        "REBILL_TICK_SECONDS": "3600",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "flask", "--app", "app", "rebill", "scheduler"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        lines = []
        for line in process.stdout:  # blocks until the process writes; no sleeping
            lines.append(line)
            if "tick finished" in line:
                break
        started = next(line for line in lines if line.startswith("scheduler:"))
        assert "rebill-tick every 3600s" in started
        # The factory composes GHL upkeep into the same single scheduler process.
        assert "ghl-refresh-tokens every 600s" in started and "ghl-retry-deliveries every 600s" in started
        assert process.poll() is None  # still running, waiting for the next tick
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
