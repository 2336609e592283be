"""The billing instruments: a tick's durations and counts, Stripe calls by outcome, and the backlog gauges."""

from __future__ import annotations

import datetime as dt

from prometheus_client.parser import text_string_to_metric_families

from billing.backlog import backlog_gauges
from billing.jobs import run_tick
from billing.ledger import UsageRecord, record_usage
from core.database import db, utcnow
from tests.metrics_support import Deltas


def gauges() -> dict[tuple[str, tuple], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in backlog_gauges()
        for sample in family.samples
    }


def test_the_backlog_gauges_show_pending_and_failed_rows_and_the_oldest_pending_age(world):
    setup = world.agency()
    first, second = world.client(setup), world.client(setup)
    world.report(first, 3)
    old = world.report(second, 4)
    failed = world.report(second, 5)
    failed.status = "failed"
    old.created_at = utcnow() - dt.timedelta(minutes=10)
    sent = world.report(first, 7)
    sent.status = "sent"
    record_usage(setup.agency.id, [
        UsageRecord(source="capri", source_event_id=f"e{n}", channel_id=first.channel_id, input_tokens=1,
                    occurred_at=utcnow())
        for n in range(2)
    ])  # fmt: skip
    db.session.commit()

    values = gauges()

    assert values[("rebill_outbox_units", (("status", "pending"),))] == 7
    assert values[("rebill_outbox_units", (("status", "failed"),))] == 5
    assert values[("rebill_outbox_reports", (("status", "pending"),))] == 2
    assert values[("rebill_outbox_reports", (("status", "failed"),))] == 1
    assert 600 <= values[("rebill_outbox_oldest_pending_age_seconds", ())] < 660
    assert values[("rebill_usage_events_pending", ())] == 2
    assert values[("rebill_usage_oldest_pending_age_seconds", ())] < 60


def test_an_empty_backlog_reads_zero(app_context):
    assert set(gauges().values()) == {0}


def test_a_tick_counts_what_it_did_and_how_long_it_took(world):
    setup = world.agency()
    client = world.client(setup, billing_unit=10)
    record_usage(setup.agency.id, [
        UsageRecord(source="capri", source_event_id=f"e{n}", channel_id=client.channel_id, input_tokens=12,
                    occurred_at=utcnow())
        for n in range(5)
    ])  # fmt: skip
    db.session.commit()
    deltas = Deltas(
        ("rebill_usage_events_aggregated_total", {}),
        ("rebill_units_logged_total", {}),
        ("rebill_units_sent_total", {}),
        ("rebill_unit_reports_total", {"outcome": "sent"}),
        ("rebill_stripe_calls_total", {"outcome": "ok"}),
        ("rebill_aggregation_duration_seconds_count", {}),
        ("rebill_reporting_duration_seconds_count", {}),
    )
    run_tick(world.clock.now())
    assert deltas() == [5, 6, 6, 1, 1, 1, 1]


def test_stripe_calls_are_counted_by_outcome(world):
    healthy, broken = world.agency(), world.agency(register_key=False)
    world.report(world.client(healthy), 1)
    world.report(world.client(broken), 1)
    db.session.commit()
    deltas = Deltas(*(("rebill_stripe_calls_total", {"outcome": o}) for o in ("ok", "unavailable", "key_rejected")))
    run_tick(world.clock.now())
    assert deltas() == [1, 0, 1]

    world.report(world.client(healthy), 1)
    world.state.inject("/v1/billing/meter_events", "rate_limit")  # the next meter event answers 429
    db.session.commit()
    run_tick(world.clock.now())
    assert deltas() == [1, 1, 1]


def test_the_gauges_are_served_on_metrics(make_app, world):
    world.report(world.client(world.agency()), 3)
    db.session.commit()
    response = make_app(REBILL_METRICS_TOKEN="t").test_client().get("/metrics", headers={"Authorization": "Bearer t"})
    families = {family.name: family for family in text_string_to_metric_families(response.get_data(as_text=True))}
    assert {s.labels["status"]: s.value for s in families["rebill_outbox_units"].samples} == {"pending": 3, "failed": 0}
