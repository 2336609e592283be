"""Two ticks at once (two schedulers started by mistake): every unit reaches Stripe exactly once."""

from __future__ import annotations

import threading
from collections import Counter

from billing.jobs import run_tick
from billing.ledger import UsageRecord, record_usage
from billing.reporting import report_pending_units
from core.database import db, utcnow


def run_together(app, job, count: int = 2) -> list:
    """Run `job` in `count` threads, each in its own app context (own session), released by one barrier."""
    barrier = threading.Barrier(count)
    results, errors = [], []

    def worker():
        with app.app_context():
            barrier.wait()
            try:
                results.append(job())
            except Exception as error:  # surfaced below; a thread's exception would otherwise vanish
                errors.append(error)

    threads = [threading.Thread(target=worker) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    return results


def test_two_reporting_passes_at_once_send_every_row_exactly_once(world, stripe_app):
    setups = [world.agency() for _ in range(3)]
    clients = [(setup, world.client(setup)) for setup in setups for _ in range(8)]
    reports = [world.report(client, units) for units in (1, 2) for _, client in clients]
    db.session.commit()

    results = run_together(stripe_app, lambda: report_pending_units(world.clock.now()))

    posts = Counter(call.params["identifier"] for call in world.calls() if call.status == 200)
    assert posts == Counter({report.identifier: 1 for report in reports})  # no row was sent twice
    assert len(world.calls()) == len(reports)  # not even attempted twice: the claims were disjoint
    assert sum(result.reports_sent for result in results) == len(reports)
    assert all(world.stripe_total(setup, client) == 3 for setup, client in clients)


def test_two_ticks_at_once_with_usage_arriving_count_every_unit_once(world, stripe_app):
    setup = world.agency()
    clients = [world.client(setup, billing_unit=10) for _ in range(6)]
    db.session.commit()
    expected = Counter()

    def write_usage(batch: int):
        for client in clients:
            record_usage(setup.agency.id, [
                UsageRecord(source="capri", source_event_id=f"{batch}-{client.id}-{n}", channel_id=client.channel_id,
                            input_tokens=7, output_tokens=6, occurred_at=utcnow())
                for n in range(5)
            ])  # fmt: skip
            expected[client.id] += 5 * 13
        db.session.commit()

    for batch in range(3):
        write_usage(batch)
        run_together(stripe_app, lambda: run_tick(world.clock.now()))
    world.clock.advance(minutes=1)
    run_tick(world.clock.now())

    for client in clients:
        assert world.stripe_total(setup, client) == expected[client.id] // 10
    identifiers = Counter(call.params["identifier"] for call in world.calls() if call.status == 200)
    assert set(identifiers.values()) == {1}
