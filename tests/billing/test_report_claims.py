"""Reporting's claim: round-robin across agencies without ranking every due row (rule 8), disjoint across schedulers.

The choice reads each agency's next few due rows in rounds (billing.report_claims._choose_due_rows); these tests
hold it to what ranking every due row gives (each agency's longest-due row first, then each one's second...),
and check that concurrent claims on PostgreSQL lease every due row once.
"""

from __future__ import annotations

import datetime as dt
import os
import random
import threading
from collections import Counter, defaultdict

import pytest
from sqlalchemy import insert, select, update

from billing import report_claims, report_sending, reporting
from billing.models import UnitReport
from billing.report_claims import CLAIM_BATCH, ReportingResult, TickClock, claim_batch, sender_name
from billing.units import report_identifier
from core.database import db
from tests.billing.test_reporting_concurrency import run_together


def insert_rows(client, count: int, *, due: dt.datetime, spread: int = 0, rng=None, **values) -> None:
    """``count`` outbox rows of one client, due at ``due`` (or up to ``spread`` seconds before it, some tied)."""
    rows = [
        {
            "agency_id": client.agency_id,
            "client_id": client.id,
            "identifier": report_identifier(client.report_prefix, client.id, client.report_sequence + n),
            "units": 1,
            "usage_timestamp": due,
            "next_attempt_at": due - dt.timedelta(seconds=rng.randrange(spread) if spread else 0),
            **values,
        }
        for n in range(1, count + 1)
    ]
    client.report_sequence += count
    if rows:
        db.session.execute(insert(UnitReport), rows)


def ranked_due_rows(start: dt.datetime, agencies_ok: set[int]) -> list[int]:
    """Every due row ranked as the claim used to rank them: turn within its agency, then due time, then id."""
    rows = db.session.execute(
        select(UnitReport.agency_id, UnitReport.next_attempt_at, UnitReport.id).where(
            UnitReport.status == "pending", UnitReport.next_attempt_at <= start
        )
    ).all()
    by_agency = defaultdict(list)
    for agency_id, due_at, row_id in rows:
        if agency_id in agencies_ok:
            by_agency[agency_id].append((due_at, row_id))
    ranked = sorted((turn, due) for rows in by_agency.values() for turn, due in enumerate(sorted(rows)))
    return [row_id for _, (_, row_id) in ranked]


@pytest.mark.parametrize("seed", range(6))
def test_the_claim_chooses_the_first_due_rows_in_round_robin_order_without_ranking_them_all(world, monkeypatch, seed):
    rng = random.Random(seed)
    batch = rng.choice([5, 13, 40])
    monkeypatch.setattr(report_claims, "CLAIM_BATCH", batch)
    now = world.clock.now()
    setups = [world.agency() for _ in range(5)]
    for setup in setups:
        client = world.client(setup)
        # Backlogs from none to many times the batch; due times spread over a minute, with ties (same second).
        insert_rows(client, rng.choice([0, 1, 2, batch // 2, batch, 3 * batch, 10 * batch]), due=now, spread=60,
                    rng=rng)  # fmt: skip
        insert_rows(client, rng.randrange(4), due=now + dt.timedelta(minutes=5))  # leased or backing off
        insert_rows(client, rng.randrange(4), due=now - dt.timedelta(minutes=5), status="sent")
        insert_rows(client, rng.randrange(4), due=now - dt.timedelta(minutes=5), status="failed")
    setups[0].agency.stripe_key_status = "needs_attention"  # its rows wait for the key
    db.session.flush()
    expected = ranked_due_rows(now, {setup.agency.id for setup in setups[1:]})

    monkeypatch.setattr(report_claims, "CLAIM_ROUNDS", 100)  # enough rounds: exactly the ranked prefix
    assert report_claims._choose_due_rows(now) == expected[:batch]
    monkeypatch.setattr(report_claims, "CLAIM_ROUNDS", 1)  # fewer: still a prefix, never empty while rows are due
    chosen = report_claims._choose_due_rows(now)
    assert chosen == expected[: len(chosen)] and (len(chosen) > 0) == (len(expected) > 0)


def test_an_agency_with_a_large_backlog_leaves_room_for_every_other_agency_in_one_claim(world):
    now = world.clock.now()
    big = world.agency()
    insert_rows(world.client(big), 3 * CLAIM_BATCH, due=now - dt.timedelta(minutes=10))  # older than all others
    small = [world.agency() for _ in range(3)]
    small_clients = [world.client(setup) for setup in small]
    for number, client in enumerate(small_clients):
        insert_rows(client, 2 + number, due=now - dt.timedelta(seconds=5))
    db.session.commit()

    claims = claim_batch(TickClock(now, dt.timedelta(minutes=1)), ReportingResult())

    by_agency = defaultdict(int)
    for claim in claims:
        by_agency[claim.agency_id] += 1
    assert len(claims) == CLAIM_BATCH
    assert [by_agency[setup.agency.id] for setup in small] == [2, 3, 4]  # all of theirs, in the first claim
    assert by_agency[big.agency.id] == CLAIM_BATCH - 9


def test_three_concurrent_claim_loops_lease_every_due_row_exactly_once(world, stripe_app, postgres_only, monkeypatch):
    """PostgreSQL: three schedulers claiming at once (small batches, so they interleave) never share a row."""
    monkeypatch.setattr(report_claims, "CLAIM_BATCH", 50)
    now = world.clock.now()
    rng = random.Random(7)
    for count in (900, 120, 7, 1):
        insert_rows(world.client(world.agency()), count, due=now, spread=30, rng=rng)
    db.session.commit()
    due = set(db.session.scalars(select(UnitReport.id)))
    leased: list[list[int]] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(3)

    def scheduler():
        mine = []
        with stripe_app.app_context():
            try:
                barrier.wait()
                while claims := claim_batch(TickClock(now, dt.timedelta(minutes=1)), ReportingResult()):
                    mine.extend(claim.report_id for claim in claims)
            except BaseException as error:  # surfaced below
                errors.append(error)
            finally:
                db.session.remove()
        leased.append(mine)

    threads = [threading.Thread(target=scheduler) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    every = [row_id for mine in leased for row_id in mine]
    assert len(every) == len(set(every)) == len(due) and set(every) == due  # each row leased once, none missed
    db.session.expire_all()
    assert {report.attempts for report in db.session.scalars(select(UnitReport))} == {1}


def test_a_tick_drops_gateways_of_agencies_past_its_bound_and_still_counts_their_calls(world, monkeypatch):
    monkeypatch.setattr(report_claims, "CLAIM_BATCH", 1)  # a batch per row: one agency per batch
    monkeypatch.setattr(reporting, "GATEWAYS_KEPT", 1)
    held: list[int] = []
    drop = reporting._drop_gateways

    def watching(gateways, keep):
        calls = drop(gateways, keep)
        held.append(len(gateways))
        return calls

    monkeypatch.setattr(reporting, "_drop_gateways", watching)
    setups = [world.agency() for _ in range(3)]
    clients = [world.client(setup) for setup in setups for _ in range(2)]
    for client in clients:
        world.report(client, 3)
    db.session.commit()

    result = reporting.report_pending_units(world.clock.now())

    assert result.reports_sent == 6 and result.stripe_calls == len(world.calls()) == 6
    assert max(held) == 1  # never more than the bound between batches
    assert all(world.stripe_total(setup, client) == 3 for setup in setups for client in clients
               if client.agency_id == setup.agency.id)  # fmt: skip


def test_a_tick_s_claims_go_on_where_the_last_one_left_each_agency_and_come_back_for_rows_due_again(
    world, monkeypatch
):
    monkeypatch.setattr(report_claims, "CLAIM_BATCH", 2)
    now = world.clock.now()
    client = world.client(world.agency())
    insert_rows(client, 6, due=now - dt.timedelta(minutes=1))
    db.session.commit()
    rows = list(db.session.scalars(select(UnitReport.id).order_by(UnitReport.id)))
    clock, resume = TickClock(now, dt.timedelta(minutes=1)), {}

    def claim() -> list[int]:
        return [claim.report_id for claim in claim_batch(clock, ReportingResult(), resume)]

    assert claim() == rows[:2]
    # The first row is due again (as a count-meter slice is after its progress): behind where the tick is.
    db.session.execute(update(UnitReport).where(UnitReport.id == rows[0]).values(next_attempt_at=now))
    db.session.commit()
    assert claim() == rows[2:4]  # the tick goes on after the rows it already took
    assert claim() == rows[4:6]
    assert claim() == rows[:1]  # nothing after them: read from the first rows once more
    assert claim() == []


def test_three_schedulers_with_small_claims_lost_answers_and_429s_send_every_unit_exactly_once(
    world, stripe_app, postgres_only, monkeypatch
):
    """PostgreSQL: three ticks at once, again and again until all is sent; claims of 7 rows (many rounds, resumed
    claims and read-again passes), count-meter slices due again within the tick, sends in parallel, and Stripe
    applying some events without answering (in doubt, resent, "already exists") or refusing some with 429."""
    monkeypatch.setattr(report_claims, "CLAIM_BATCH", 7)
    monkeypatch.setattr(report_sending, "COUNT_EVENTS_PER_CLAIM", 3)
    sums = [world.agency() for _ in range(3)]
    count = world.agency(formula="count", event_name="ai_count")
    clients = [(setup, world.client(setup)) for setup in sums for _ in range(4)]
    clients += [(count, world.client(count)) for _ in range(2)]
    expected = Counter()
    for setup, client in clients:
        for units in (5, 4) if setup is count else (1, 2, 3):  # several rows of one customer: sent in order
            world.report(client, units)
            expected[client.id] += units
    db.session.commit()
    world.state.inject("/v1/billing/meter_events", "accept_then_500", times=3, after=5)
    world.state.inject("/v1/billing/meter_events", "rate_limit", times=3, after=12)

    for _ in range(10):
        run_together(stripe_app, lambda: reporting.report_pending_units(world.clock.now()), 3)
        if {report.status for report in world.reports()} == {"sent"}:
            break
        world.clock.advance(minutes=10)  # past any lease and backoff

    assert {report.status for report in world.reports()} == {"sent"}
    assert {client.id: world.stripe_total(setup, client) for setup, client in clients} == expected
    posted = Counter(call.params["identifier"] for call in world.calls() if call.status == 200)
    assert set(posted.values()) == {1}  # no event answered 2xx twice
    # The faults did happen: 429s, and events applied without an answer that were resent ("already exists").
    assert {429, 400} <= {call.status for call in world.calls()}


def test_rows_chosen_before_another_scheduler_leased_them_are_not_claimed_again(world, monkeypatch):
    """The choice reads without locks; the locking read re-checks that each chosen row is still due."""
    now = world.clock.now()
    insert_rows(world.client(world.agency()), 3, due=now - dt.timedelta(minutes=1))
    db.session.commit()
    chosen = report_claims._choose_due_rows(now)
    db.session.rollback()
    assert len(claim_batch(TickClock(now, dt.timedelta(minutes=1)), ReportingResult())) == 3  # another scheduler

    monkeypatch.setattr(report_claims, "_choose_due_rows", lambda start, resume=None: chosen)  # the stale choice
    assert claim_batch(TickClock(now, dt.timedelta(minutes=1)), ReportingResult()) == []
    db.session.expire_all()
    assert {report.attempts for report in db.session.scalars(select(UnitReport))} == {1}


def test_a_forked_child_names_its_senders_apart_from_its_parent():
    """A forked child's main thread has the parent's thread id: its sender name (and so its client holds)
    must still be its own, or the child could pass as the parent's sender (finding of review attack 5)."""
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # the child: report its name and leave at once (no cleanup of the parent's resources)
        os.write(write, sender_name().encode())
        os._exit(0)
    os.waitpid(child, 0)
    os.close(write)
    assert os.read(read, 200).decode() not in ("", sender_name())
