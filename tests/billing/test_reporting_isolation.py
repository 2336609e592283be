"""One agency's backlog, bad rows or slow Stripe never stall another agency's reporting (rule 8, scenario 8)."""

from __future__ import annotations

import datetime as dt
import time
import tracemalloc

from sqlalchemy import insert

from billing.models import UnitReport
from billing.reporting import report_pending_units
from billing.tick_reads import SLOW_FLOOR_SECONDS
from billing.units import report_identifier
from core.database import db

BUDGET = dt.timedelta(seconds=2)
# One Stripe call may be in flight when the budget runs out, and the last outcomes are still recorded.
SLACK = dt.timedelta(seconds=2)


def timed_tick(world, budget=BUDGET, **shift):
    """Commit, run one reporting pass with a time budget; return its result and wall time."""
    if shift:
        world.clock.advance(**shift)
    db.session.commit()
    started = time.monotonic()
    result = report_pending_units(world.clock.now(), budget=budget)
    return result, dt.timedelta(seconds=time.monotonic() - started)


def test_a_count_meter_backlog_and_a_raising_row_never_hold_up_another_agency(world):
    a = world.agency(formula="count")
    backlog = world.client(a)
    world.report(backlog, 10**7)  # N = 1 and 10^7 tokens
    broken = world.client(a)
    corrupt = world.report(broken, 1)
    corrupt.units = 0  # a row that cannot be sent: processing it raises
    b = world.agency()
    b_client = world.client(b)
    world.report(b_client, 2)

    tracemalloc.start()
    try:
        _, elapsed = timed_tick(world)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert world.stripe_total(b, b_client) == 2  # B's units reached Stripe within one tick
    assert elapsed < BUDGET + SLACK
    assert peak < 50 * 2**20  # no list of 10^7 events was built
    big, bad, b_row = world.reports()
    assert b_row.status == "sent"
    assert (
        bad.status == "pending" and bad.last_error.startswith("quarantined") and bad.next_attempt_at > world.clock.now()
    )
    first = big.units_confirmed
    assert 0 < first < 10**7 and big.status == "pending" and big.in_doubt_since is None
    assert world.stripe_total(a, backlog) == first

    world.report(b_client, 3)  # B has new units again; A's backlog is still there
    _, elapsed = timed_tick(world, minutes=1)

    assert world.stripe_total(b, b_client) == 5 and elapsed < BUDGET + SLACK
    big = world.reports()[0]
    assert big.units_confirmed > first  # A makes progress every tick
    assert world.stripe_total(a, backlog) == big.units_confirmed


def test_rows_are_claimed_round_robin_so_a_backlog_of_rows_never_pushes_another_agency_out(world):
    a = world.agency()
    a_client = world.client(a)
    now = world.clock.now()
    rows = [
        {
            "agency_id": a.agency.id,
            "client_id": a_client.id,
            "identifier": report_identifier(a_client.report_prefix, a_client.id, sequence),
            "units": 1,
            "usage_timestamp": now - dt.timedelta(seconds=5),
            "next_attempt_at": now - dt.timedelta(seconds=5),
        }
        for sequence in range(1, 2501)
    ]
    db.session.execute(insert(UnitReport), rows)
    b = world.agency()
    b_client = world.client(b)
    world.report(b_client, 7)  # newer than all of A's rows

    _, elapsed = timed_tick(world)

    assert world.stripe_total(b, b_client) == 7
    assert elapsed < BUDGET + SLACK
    assert 0 < world.stripe_total(a, a_client) < 2500  # A's backlog goes on next tick


def test_an_agency_whose_period_reads_fail_is_read_once_and_backs_off_while_another_s_backlog_goes(world):
    """Rule 8: A's Stripe times out on the reads that stamp its backlog; B's backlog also needs reads."""
    a, b = world.agency(), world.agency()
    old = world.clock.now() - dt.timedelta(hours=2)  # older than PERIOD_CHECK_AGE: the period is read
    a_clients = [world.client(a) for _ in range(3)]
    for client in a_clients:
        world.report(client, 1, at=old)
    b_clients = [world.client(b) for _ in range(2)]
    for client in b_clients:
        world.report(client, 2, at=old)
    world.state.inject("/v1/subscriptions", "timeout", times=10, seconds=1.5, api_key=a.key)

    for _ in range(2):  # at most one tick's delay: B may wait for A's one read in the first
        _, took = timed_tick(world)
        assert took < BUDGET + SLACK

    assert [world.stripe_total(b, client) for client in b_clients] == [2, 2]
    a_reads = [c for c in world.state.calls if c.path.startswith("/v1/subscriptions") and c.api_key == a.key]
    assert len(a_reads) == 1  # the failed read is remembered: A's other rows wait with backoff, not re-read
    rows = [row for row in world.reports() if row.agency_id == a.agency.id]
    assert all(row.status == "pending" and row.in_doubt_since is None for row in rows)
    assert all(row.next_attempt_at > world.clock.now() and row.last_error for row in rows)

    world.state.clear_faults()  # A's Stripe recovers: its rows go once their backoff is over
    timed_tick(world, hours=2)
    assert [world.stripe_total(a, client) for client in a_clients] == [1, 1, 1]


def test_an_agency_whose_period_reads_are_slow_reads_once_a_tick_and_never_holds_up_another(world):
    """Rule 8: A's Stripe answers its period reads, but slowly (longer than SLOW_FLOOR_SECONDS each)."""
    a, b = world.agency(), world.agency()
    old = world.clock.now() - dt.timedelta(hours=2)
    a_clients = [world.client(a) for _ in range(3)]
    for client in a_clients:
        world.report(client, 1, at=old)
    b_client = world.client(b)
    world.report(b_client, 2)
    world.state.inject("/v1/subscriptions", "slow", times=10, seconds=SLOW_FLOOR_SECONDS + 0.2, api_key=a.key)

    _, took = timed_tick(world)

    assert took < BUDGET + SLACK and world.stripe_total(b, b_client) == 2
    a_reads = [c for c in world.state.calls if c.path.startswith("/v1/subscriptions") and c.api_key == a.key]
    assert len(a_reads) == 1  # the slow read is remembered for the tick: A's other rows back off
    assert sum(world.stripe_total(a, client) for client in a_clients) == 1  # the row it was read for went
    waiting = [r for r in world.reports() if r.agency_id == a.agency.id and r.status == "pending"]
    assert len(waiting) == 2 and all(r.next_attempt_at > world.clock.now() for r in waiting)
