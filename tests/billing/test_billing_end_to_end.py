"""End to end: usage → ledger → aggregation → outbox → the fake Stripe, through the real tick and the real SDK.

The property: whatever the order of usage, duplicates, changes of N, pauses, ticks and Stripe faults,
Stripe's total per client equals the rebilling rule (docs/billing-rules.md) and the remainder carries.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from billing.clients import create_client, update_client
from billing.jobs import run_tick
from billing.ledger import UsageRecord, record_usage
from billing.models import RebillClient, UnitReport
from core.database import db, utcnow

FAULTS = [None, None, "rate_limit", "server_error", "accept_then_drop", "accept_then_500"]
COUNT_METER_MIN_UNIT = 40  # keeps a count meter's k events per tick small


@dataclass
class ClientModel:
    """The rebilling rule, applied event by event at the moment usage is received."""

    billing_unit: int
    active: bool = True
    remainder: int = 0
    units: int = 0

    def receive(self, quantity: int) -> None:
        if self.active:
            self.remainder += quantity
            self.units += self.remainder // self.billing_unit
            self.remainder %= self.billing_unit

    def set_unit(self, billing_unit: int) -> None:
        self.billing_unit = billing_unit
        self.units += self.remainder // billing_unit
        self.remainder %= billing_unit


def make_clients(world, units: tuple[int, int]):
    """One client on a sum meter and one on a count meter, created through billing.clients (Stripe-checked)."""
    setup = world.agency()
    count_meter = world.state.create_meter(setup.key, "ai_count", formula="count")
    count_price = world.state.create_price(setup.key, setup.product, 3, meter=count_meter)
    clients = []
    for index, price in enumerate((setup.price, count_price)):
        clients.append(
            create_client(
                setup.agency,
                {
                    "nickname": f"client {index}", "provider": "capri_api", "channel_id": f"chan-{index}",
                    "stripe_product_id": setup.product["id"], "stripe_price_id": price["id"],
                    "stripe_customer_id": world.customer(setup), "charge_by": "tokens",
                    "billing_unit": units[index],
                },
            )
        )
    db.session.commit()
    return setup, clients, {0: "ai_units", 1: "ai_count"}


operation = st.one_of(
    st.tuples(st.just("usage"), st.integers(0, 1), st.integers(0, 7), st.integers(0, 250)),
    st.tuples(st.just("unit"), st.integers(0, 1), st.integers(1, 300)),
    st.tuples(st.just("pause"), st.integers(0, 1)),
    st.tuples(st.just("resume"), st.integers(0, 1)),
    st.tuples(st.just("tick"), st.sampled_from(FAULTS)),
)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    first_units=st.tuples(st.integers(1, 300), st.integers(COUNT_METER_MIN_UNIT, 300)),
    operations=st.lists(operation, min_size=4, max_size=30),
)
def test_stripe_totals_follow_the_rebilling_rule_whatever_happens(world, first_units, operations):
    setup, clients, event_names = make_clients(world, first_units)
    models = [ClientModel(n) for n in first_units]
    seen: set[tuple[int, int]] = set()

    for op in operations:
        kind, index = op[0], op[1] if len(op) > 1 else None
        client = clients[index] if isinstance(index, int) and kind != "tick" else None
        if kind == "usage":
            _, _, event_no, tokens = op
            record = UsageRecord(
                source="capri", source_event_id=f"{client.id}-e{event_no}", channel_id=client.channel_id,
                input_tokens=tokens // 3, output_tokens=tokens - tokens // 3, occurred_at=utcnow(),
            )  # fmt: skip
            record_usage(setup.agency.id, [record])
            if (index, event_no) not in seen:  # a duplicate event id counts once
                seen.add((index, event_no))
                models[index].receive(tokens)
        elif kind == "unit":
            unit = max(op[2], COUNT_METER_MIN_UNIT) if index == 1 else op[2]
            update_client(setup.agency, client.id, {"billing_unit": unit})
            models[index].set_unit(unit)
        elif kind in ("pause", "resume"):
            update_client(setup.agency, client.id, {"status": "paused" if kind == "pause" else "active"})
            models[index].active = kind == "resume"
        else:
            if op[1]:
                world.state.inject("/v1/billing/meter_events", op[1], api_key=setup.key)
            world.clock.advance(minutes=5)
            db.session.commit()
            run_tick(world.clock.now())
            world.state.clear_faults()
        db.session.commit()

    _drain(world)

    for index, client in enumerate(clients):
        expected = models[index]
        assert world.state.total_units(setup.key, client.stripe_customer_id, event_names[index]) == expected.units
        row = db.session.get(RebillClient, client.id)
        assert (row.units_logged, row.remainder) == (expected.units, expected.remainder)
        sent = db.session.scalar(
            select(func.coalesce(func.sum(UnitReport.units), 0)).where(
                UnitReport.client_id == client.id, UnitReport.status == "sent"
            )
        )
        assert sent == expected.units
    assert db.session.scalar(select(func.count()).where(UnitReport.status != "sent")) == 0


def _drain(world) -> None:
    """Tick (without faults) until the outbox is empty; stays well inside Stripe's 24 h dedupe window."""
    for _ in range(12):
        world.clock.advance(hours=1)
        db.session.commit()
        run_tick(world.clock.now())
        db.session.expire_all()
        if not db.session.scalar(select(func.count()).where(UnitReport.status == "pending")):
            return
    raise AssertionError("the outbox did not drain")


def test_a_tick_turns_usage_into_units_and_sends_them(world):
    setup, clients, _ = make_clients(world, (1000, 50))
    sum_client = clients[0]
    record_usage(setup.agency.id, [
        UsageRecord(source="capri", source_event_id=f"e{n}", channel_id=sum_client.channel_id, input_tokens=700,
                    output_tokens=550, occurred_at=utcnow() - dt.timedelta(seconds=n))
        for n in range(2)
    ])  # fmt: skip
    db.session.commit()

    summary = run_tick(world.clock.now())

    assert (summary.events_aggregated, summary.units_logged, summary.reports_sent) == (2, 2, 1)
    assert summary.stripe_calls == 1 and summary.units_sent == 2
    assert world.state.total_units(setup.key, sum_client.stripe_customer_id, "ai_units") == 2
    assert db.session.get(RebillClient, sum_client.id).remainder == 500
