"""Second adversarial review: the fixes of 7ec18e5, c8fcba8, f19a614 and 6acb05b, with the clock played forward.

Each test plays a scenario a reviewer (not the author) built to break the invariant: units in Stripe per client
== floor(usage / N) - already reported, never doubled, never lost. Faults are injected only at the HTTP boundary
(stripe_fake); the clock moves for Rebill and the fake together. A scheduler that stalls between its claim and
its send is played by running the body of report_pending_units' loop (claim_batch, process_batch,
_record_outcomes) for it later, unpatched.

A test here FAILS on main when it proves a problem; its docstring states the scenario and the mechanism.
"""

from __future__ import annotations

import datetime as dt

from billing.report_claims import ReportingResult, TickClock, claim_batch
from billing.report_sending import process_batch
from billing.reporting import _record_outcomes, report_pending_units
from billing.tick_reads import TickReads
from core.database import db


def tick(world, **shift):
    if shift:
        world.clock.advance(**shift)
    db.session.commit()
    return report_pending_units(world.clock.now())


def test_a_stalled_scheduler_s_late_progress_does_not_forget_count_events_another_scheduler_confirmed(world):
    """A count-meter report of 300 units. Scheduler A claims it (lease 5 min) and stalls before sending (a
    paused process, a long GC). The lease expires; scheduler B claims the row, sends events 1-200 (confirmed,
    recorded) and meets a 500 on event 201 (the row is in doubt, pending, same identifier). Scheduler A wakes,
    sends its slice (events 1-100: Stripe deduplicates them) and records its outcome: PROGRESS, units_confirmed
    = 0 + 100, doubt cleared. STILL_CLAIMED lets it through (still pending under the same identifier), so the
    row forgets 100 confirmed events and says its rest (units 101-300) is provably not in Stripe. The agency
    then points the client at another customer: the rest, "provably unsent", moves to a fresh report
    (billing.unsent_remainder) that goes to the new customer: events 101-200 are billed twice. Mechanism:
    the guard checks status and identifier, not that the row is still in the state the claim read
    (attempts, units_confirmed): a late outcome overwrites a later one with absolute values. Fix: write only
    while attempts == the claim's attempt (or never lower units_confirmed).
    """
    setup = world.agency(formula="count", event_name="ai_count")
    client = world.client(setup)
    world.report(client, 300)
    db.session.commit()
    a_clock = TickClock(world.clock.now(), dt.timedelta(seconds=45))
    a_claims = claim_batch(a_clock, ReportingResult())  # scheduler A: claimed, then stalls
    assert len(a_claims) == 1

    world.state.inject("/v1/billing/meter_events", "server_error", after=200)
    tick(world, minutes=6)  # scheduler B, after A's lease: events 1-200 confirmed, 201 answered 500
    (row,) = world.reports(client)
    assert (row.status, row.units_confirmed) == ("pending", 200)
    assert world.stripe_total(setup, client) == 200

    # Scheduler A wakes: the rest of report_pending_units' loop for its claim.
    outcomes = process_batch(a_claims, {}, a_clock, TickReads(45), None)
    _record_outcomes(outcomes, a_clock, ReportingResult())
    (row,) = world.reports(client)
    old_customer = client.stripe_customer_id

    client.stripe_customer_id = world.customer(setup)  # the agency edits the client
    db.session.commit()
    tick(world, minutes=10)
    tick(world, minutes=10)

    old = world.state.total_units(setup.key, old_customer, "ai_count")
    new = world.state.total_units(setup.key, client.stripe_customer_id, "ai_count")
    assert old + new == 300, (
        f"a 300-unit report billed {old} + {new} = {old + new} units; after scheduler A's late write the row said "
        f"{row.units_confirmed} confirmed"
    )
