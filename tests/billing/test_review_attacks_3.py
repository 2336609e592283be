"""Third adversarial review: reporting's claim path after 5f95f8a (LATERAL rounds), b6a186f (a tick's claims
resume each agency where the last one left it, claims of 250, at most 1,000 gateways) and 1ef3b0c (no wave
barrier between an agency's first and other send groups).

Each test plays a scenario a reviewer (not the author) built to break an invariant: units in Stripe per client
== floor(usage / N) - already reported, never doubled, never lost; one agency never stalls another (rule 8);
Stripe sees one call at a time per customer and meter. Faults are injected only at the HTTP boundary
(stripe_fake); Rebill's own functions are not patched (only its size constants, as tests/billing/
test_report_claims.py does, so a backlog of a few dozen rows spans several claims).

A test here FAILS on main when it proves a problem; its docstring states the scenario and the mechanism.
"""

from __future__ import annotations

import datetime as dt
import io
import threading
from collections import Counter, defaultdict
from urllib.parse import parse_qsl

from sqlalchemy import update

from billing import report_claims, reporting
from billing.models import UnitReport
from billing.report_claims import ReportingResult, TickClock, claim_batch
from billing.report_sending import process_batch
from billing.reporting import _record_outcomes, report_pending_units
from billing.tick_reads import TickReads
from core.database import db
from stripe_fake.app import FakeStripeApp
from tests.billing.stripe_support import tick as tick_within
from tests.billing.test_reporting_concurrency import run_together
from tests.billing.test_reporting_over_time import reconnect, roll_key

LONG_BUDGET = dt.timedelta(minutes=5)  # no tick here ends on time: what is sent, and in which order, is decided by
# the claims alone


def tick(world, **shift):
    return tick_within(world, budget=LONG_BUDGET, **shift)


def meter_event_posts(world):
    """Meter events Stripe applied (2xx), in the order the fake answered them."""
    return [call for call in world.calls() if call.status == 200]


def test_a_count_report_s_third_slice_is_not_held_behind_another_agency_s_whole_backlog(world, monkeypatch):
    """Agency S has one count-meter report of 350 units (four slices of COUNT_EVENTS_PER_CLAIM = 100 events);
    agency B has a backlog of 40 rows. Rule 8: agencies are served round-robin in every claim, so S's report
    (S's only due row, its turn 0 in every claim) gets a slice in each claim and is done within four claims,
    while B's backlog drains beside it. With b6a186f each claim resumes each agency after its last chosen row
    (next_attempt_at, id). A slice's PROGRESS makes the row due again at the tick's start: after its first
    slice the row's key (start, id) lies after S's cursor (its first due time) and is chosen once more; after
    the second, S's cursor *is* (start, id), the row is no longer "after" it, and it is read again only when
    no agency has anything due after its cursor: behind B's whole backlog. With a backlog larger than a tick,
    S's report makes two slices (200 events) per tick instead of one per claim: a 100,000-unit count report of
    a small agency waits 500 ticks behind a big agency. Fix: a row due again behind its agency's cursor must
    reset that agency's cursor (e.g. compare the row's new key with the cursor when recording PROGRESS and drop
    the agency from ``resume``), or resume from (cursor time, -1) so a row re-due at the cursor's time is seen.
    """
    monkeypatch.setattr(report_claims, "CLAIM_BATCH", 4)
    small = world.agency(formula="count", event_name="ai_count")
    world.report(world.client(small), 350)
    big = world.agency()
    big_clients = [world.client(big) for _ in range(10)]
    for _ in range(4):
        for client in big_clients:
            world.report(client, 1)
    db.session.commit()

    tick(world)

    posts = meter_event_posts(world)
    small_at = [n for n, call in enumerate(posts) if call.params["event_name"] == "ai_count"]
    big_at = [n for n, call in enumerate(posts) if call.params["event_name"] == "ai_units"]
    assert len(small_at) == 350 and len(big_at) == 40  # everything went in the end (the budget is long)
    big_before = sum(1 for n in big_at if n < small_at[-1])
    # Round-robin: S's row is in each of the first four claims, beside at most 3 of B's rows each.
    assert big_before <= 12, (
        f"agency S's 350-unit count report finished only after {big_before} of agency B's 40 rows: its later "
        "slices waited behind B's backlog (the claim's resume cursor had passed the row)"
    )


def test_three_schedulers_at_once_on_mixed_backlogs_bill_every_unit_exactly_once(world, stripe_app, postgres_only,
                                                                                 monkeypatch):  # fmt: skip
    """Three schedulers report at once (PostgreSQL: advisory-lock turns, SKIP LOCKED, leases, the per-tick resume
    cursors), in claims of 7 so they interleave, over: four agencies' sum rows, two count-meter reports that
    take several slices (due again at each scheduler's own tick start, behind its cursor), a 500 on some events
    (the row backs off in doubt) and a 429. Then ticks an hour apart until nothing is due. Every client's
    Stripe total equals its units and no identifier is applied twice (held: tried as a regression net for the
    resume cursor across schedulers whose tick starts differ).
    """
    monkeypatch.setattr(report_claims, "CLAIM_BATCH", 7)
    setups = [world.agency() for _ in range(4)]
    expected: dict[tuple, int] = defaultdict(int)
    clients = []
    for setup in setups:
        for _ in range(3):
            client = world.client(setup)
            clients.append((setup, client))
            for units in (1, 2, 3, 4, 5):
                world.report(client, units)
                expected[(setup.agency.id, client.id)] += units
    counting = world.agency(formula="count", event_name="ai_count")
    for units in (230, 170):
        client = world.client(counting)
        clients.append((counting, client))
        world.report(client, units)
        expected[(counting.agency.id, client.id)] += units
    db.session.commit()
    world.state.inject("/v1/billing/meter_events", "server_error", times=3, after=40)
    world.state.inject("/v1/billing/meter_events", "rate_limit", times=2, after=90)

    run_together(stripe_app, lambda: report_pending_units(world.clock.now(), LONG_BUDGET), count=3)
    for _ in range(6):
        tick(world, hours=1)

    rows = world.reports()
    assert {row.status for row in rows} == {"sent"}, [
        (r.id, r.status, r.last_error) for r in rows if r.status != "sent"
    ]
    applied = Counter(call.params["identifier"] for call in meter_event_posts(world))
    assert set(applied.values()) == {1}
    for setup, client in clients:
        assert world.stripe_total(setup, client) == expected[(setup.agency.id, client.id)]


def test_an_evicted_gateway_of_an_agency_whose_key_was_refused_does_not_buy_it_more_refused_calls(world, monkeypatch):
    """A tick keeps at most GATEWAYS_KEPT gateways (b6a186f); past it, those of agencies not in the batch just
    sent are dropped. Agency X's key was revoked: its first offer in the tick is refused (401). With claims of
    one row and a bound of one gateway, X's refused gateway is evicted by the next agency's batch. X has three
    more rows due. Held if X costs one refused call per tick and its rows wait for the key: the skip does not
    live in the gateway but in the agency's flag (needs_attention, committed with the batch's outcomes), which
    the claim reads. Tried with the key refused on the send (401) and with no key at all (gateway_for raises).
    """
    monkeypatch.setattr(report_claims, "CLAIM_BATCH", 1)
    monkeypatch.setattr(reporting, "GATEWAYS_KEPT", 1)
    revoked = world.agency()
    keyless = world.agency()
    keyless.agency.stripe_key_ciphertext = None
    others = [world.agency() for _ in range(3)]
    clients = {setup.agency.id: world.client(setup) for setup in [revoked, keyless, *others]}
    for client in clients.values():
        for _ in range(4):
            world.report(client, 2)
    db.session.commit()
    world.state.revoke_key(revoked.agency_key)

    result = tick(world)

    refused = [call for call in world.calls() if call.api_key == revoked.agency_key]
    assert len(refused) == 1, f"{len(refused)} calls with the refused key in one tick"
    assert world.agency_row(revoked).stripe_key_status == "needs_attention"
    assert world.agency_row(keyless).stripe_key_status == "needs_attention"
    assert result.agencies_flagged == 2
    for setup in (revoked, keyless):
        assert all(row.status == "pending" for row in world.reports(clients[setup.agency.id]))
    for setup in others:
        assert world.stripe_total(setup, clients[setup.agency.id]) == 8


class _InFlight:
    """Meter-event requests the fake is serving, per customer and event name (the most at once, and when)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.now: Counter = Counter()
        self.most: Counter = Counter()

    def wrap(self, serve):
        recorder = self

        def call(app, environ, start_response):
            if environ.get("PATH_INFO") != "/v1/billing/meter_events":
                return serve(app, environ, start_response)
            length = int(environ.get("CONTENT_LENGTH") or 0)
            body = environ["wsgi.input"].read(length)
            environ["wsgi.input"] = io.BytesIO(body)
            params = dict(parse_qsl(body.decode()))
            key = (params.get("payload[stripe_customer_id]"), params.get("event_name"))
            with recorder.lock:
                recorder.now[key] += 1
                recorder.most[key] = max(recorder.most[key], recorder.now[key])
            try:
                return list(serve(app, environ, start_response))
            finally:
                with recorder.lock:
                    recorder.now[key] -= 1

        return call


def test_two_schedulers_never_call_stripe_for_one_customer_and_meter_at_once(world, stripe_app, monkeypatch):
    """Stripe takes one call at a time per customer and meter (a second concurrent one is refused, 429). One
    tick keeps a customer's rows in one send group on one thread. Two schedulers (the deployment runs several)
    each claim CLAIM_BATCH rows; b6a186f cut the claim from 1,000 to 250 rows precisely so that several
    processes share a backlog. A client that built up 400 rows during an outage (a row per aggregation pass)
    is then split between the schedulers, and both send to its customer and meter at the same time: Stripe
    refuses one side (429 on every overlapping call), the refused rows back off in doubt, and the backlog
    drains at a fraction of the rate while counting retries. Before b6a186f the same backlog was one claim of
    one scheduler. The fake does not refuse concurrent calls, so the test watches them at the HTTP boundary:
    the most meter-event requests in flight at once for one customer and meter. Fix: a claim should take a
    send group (customer+meter) whole, or skip rows of a group another scheduler holds a lease on.
    """
    recorder = _InFlight()
    monkeypatch.setattr(FakeStripeApp, "__call__", recorder.wrap(FakeStripeApp.__call__))
    world.state.inject("/v1/billing/meter_events", "slow", times=1000, seconds=0.005)  # every call takes a moment
    setup = world.agency()
    client = world.client(setup)
    for _ in range(400):
        world.report(client, 1)
    db.session.commit()

    run_together(stripe_app, lambda: report_pending_units(world.clock.now(), LONG_BUDGET), count=2)

    assert world.stripe_total(setup, client) == 400
    key = (client.stripe_customer_id, "ai_units")
    assert recorder.most[key] == 1, (
        f"{recorder.most[key]} meter-event calls for one customer and meter were in flight at once "
        "(two schedulers each holding part of the client's backlog)"
    )


def test_rows_due_again_or_inserted_behind_a_tick_s_cursors_are_claimed_once_in_the_same_tick(world, monkeypatch):
    """The per-tick resume cursors (b6a186f) against rows that become due behind them: a row inserted later
    with a due time before the agency's cursor (an aggregation pass that began before the tick committed now),
    a leased row whose lease ran out (another scheduler died holding it), and a row made due at the tick's start
    with a lower id than the cursor's row. Held: when nothing is due after the cursors the claim reads every
    agency from its first row again, so each is claimed in the same tick, exactly once (the lease moves a
    claimed row out of the due range, so the reread never repeats one).
    """
    monkeypatch.setattr(report_claims, "CLAIM_BATCH", 3)
    now = world.clock.now()
    setups = [world.agency() for _ in range(3)]
    clients = [world.client(setup) for setup in setups]
    for client in clients:
        for _ in range(4):
            world.report(client, 1)
    db.session.commit()
    clock, resume, claimed = TickClock(now, dt.timedelta(minutes=1)), {}, []

    def claim() -> list[int]:
        ids = [c.report_id for c in claim_batch(clock, ReportingResult(), resume)]
        claimed.extend(ids)
        return ids

    claim()
    claim()
    late = world.report(clients[0], 1)  # committed now, due since before the rows the cursor passed
    late.next_attempt_at = now - dt.timedelta(minutes=3)
    first = db.session.get(UnitReport, claimed[0])
    first.next_attempt_at = now - dt.timedelta(seconds=1)  # its lease ran out: due again (attempts says 1)
    db.session.commit()
    while claim():
        pass

    assert Counter(claimed)[late.id] == 1
    assert Counter(claimed)[first.id] == 2  # once per lease
    assert set(claimed) == {row.id for row in world.reports()}
    assert all(n == 1 for row_id, n in Counter(claimed).items() if row_id != first.id)


def test_a_scheduler_stalled_past_its_lease_does_not_bill_a_restamped_legacy_report_twice(world):
    """Lease expiry mid-send. A legacy (usage-record) report whose usage is older than Stripe's 35 days is
    stamped at its offer with ``now`` (report_sending._stamp), and a re-stamped usage record's idempotency key
    is ``<identifier>@<timestamp>`` (StripeGateway.send_units). Scheduler A claims it (needs_stamp: no doubt
    is written at the claim) and stalls before stamping (a GC pause, a slow read of another agency). Its lease
    ends; scheduler B claims the row (attempt 2), stamps it with its own now, records target and doubt, sends
    it (key X@tB) and marks it sent. Scheduler A wakes: record_targets writes nothing (STILL_CLAIMED: attempts
    moved on) but nothing checks that, so A stamps with its own now and sends key X@tA: a different key,
    so Stripe applies the usage record again. A's outcome is dropped by STILL_CLAIMED; the ledger says 5 units
    sent, Stripe bills 10. Fix: send only claims whose record_targets write landed (check the rowcount; drop
    the claims it did not write), or make the re-stamped key independent of the moment of the stamp.
    """
    setup = world.agency(legacy=True)
    client = world.client(setup)
    world.report(client, 5, at=world.clock.now() - dt.timedelta(days=40))  # waited for a key fix, say
    db.session.commit()
    a_clock = TickClock(world.clock.now(), dt.timedelta(seconds=45))
    a_claims = claim_batch(a_clock, ReportingResult())  # scheduler A: claimed, then stalls
    assert len(a_claims) == 1 and a_claims[0].needs_stamp

    tick(world, minutes=6)  # scheduler B, after A's lease
    (row,) = world.reports(client)
    assert row.status == "sent" and world.stripe_total(setup, client) == 5

    outcomes = process_batch(a_claims, {}, a_clock, TickReads(45), None)  # scheduler A wakes
    _record_outcomes(outcomes, a_clock, ReportingResult())

    (row,) = world.reports(client)
    assert (row.status, row.units_confirmed) == ("sent", 5)
    assert world.stripe_total(setup, client) == 5, (
        f"Stripe bills {world.stripe_total(setup, client)} units of a 5-unit report: the stalled scheduler sent it "
        "again under a re-stamped idempotency key"
    )


def test_a_revoked_key_costs_one_refused_call_per_tick_without_the_wave_barrier(world):
    """1ef3b0c sends an agency's other send groups as soon as its own first group is answered, no longer after
    every agency's first group. Agency X's key was rolled (401); it has six customers (six groups), agency Y
    six healthy ones, two sender threads. Held: X's first group is refused, its stop flag is set before the
    group's future completes, and its five other groups are skipped without a call; Y's go in full.
    """
    rolled, healthy = world.agency(), world.agency()
    clients = {setup.agency.id: [world.client(setup) for _ in range(6)] for setup in (rolled, healthy)}
    for group in clients.values():
        for client in group:
            world.report(client, 3)
    db.session.commit()
    world.state.revoke_key(rolled.agency_key)

    tick(world)

    assert len([call for call in world.calls() if call.api_key == rolled.agency_key]) == 1
    assert world.agency_row(rolled).stripe_key_status == "needs_attention"
    assert all(world.stripe_total(healthy, client) == 3 for client in clients[healthy.agency.id])


def test_an_agency_that_reconnects_its_key_during_a_tick_is_not_flagged_again_by_the_tick_s_old_gateway(
    world, monkeypatch
):
    """A tick builds each agency's gateway once and keeps it (up to GATEWAYS_KEPT, b6a186f); past the bound it
    rebuilds an evicted one from the current key, below it never. Agency X rolled its key: X's first batch is
    refused (401) and X is flagged needs_attention. A moment later (same tick) the agency pastes its new key in
    the portal: status ok. X's next row, due since the tick began, is claimed in the same tick and sent with the
    gateway kept from before, on the old key: 401 again, and X is flagged needs_attention again with the old
    key's reason, although its key now works. X's rows then wait until the agency notices and reconnects a
    second time (rule 8: an agency's own fix is undone by a stale cache). The tick's loop is played claim by
    claim (report_pending_units' body: claim_batch, process_batch, _record_outcomes with one gateways dict).
    Fix: rebuild an agency's gateway when its key changed (key the cache by the ciphertext or updated_at), or
    drop a gateway whose call was refused so the next batch reads the key again.
    """
    setup = world.agency()
    client = world.client(setup)
    first = world.report(client, 2)
    first.next_attempt_at -= dt.timedelta(seconds=1)  # claimed first
    second = world.report(client, 3)
    db.session.commit()
    new = roll_key(world, setup)
    clock, gateways, resume = TickClock(world.clock.now(), dt.timedelta(seconds=45)), {}, {}
    reads, result = TickReads(45), ReportingResult()

    def batch():
        claims = claim_batch(clock, result, resume)
        _record_outcomes(process_batch(claims, gateways, clock, reads, None), clock, result)
        return claims

    monkeypatch.setattr(report_claims, "CLAIM_BATCH", 1)
    assert [claim.report_id for claim in batch()] == [first.id]
    assert world.agency_row(setup).stripe_key_status == "needs_attention"
    reconnect(world, new)  # the agency fixes its key while the tick runs
    assert world.agency_row(setup).stripe_key_status == "ok"
    assert [claim.report_id for claim in batch()] == [second.id]

    agency = world.agency_row(setup)
    assert agency.stripe_key_status == "ok", (
        f"the agency's freshly connected key was flagged {agency.stripe_key_status!r} ({agency.stripe_key_problem}) "
        "by the tick's gateway on the old key"
    )
    assert world.state.total_units(new.key, client.stripe_customer_id, "ai_units") == 3


def test_many_small_agencies_are_each_claimed_within_the_first_claims_beside_a_huge_backlog(world, monkeypatch):
    """Fairness of the LATERAL rounds with resume cursors (5f95f8a, b6a186f): one agency with 400 due rows,
    older than everyone's, and 60 agencies with one or two rows each (90 rows), in claims of 25. Round-robin per
    claim gives every agency with rows due one turn-0 row per claim (taken in due order), so the big agency
    takes one row per claim until the small ones are done. Held: every small agency's rows are all claimed in
    the first four claims (90 rows at 24 a claim, then the big backlog fills the fourth).
    """
    monkeypatch.setattr(report_claims, "CLAIM_BATCH", 25)
    big_client = world.client(world.agency())
    for _ in range(400):
        world.report(big_client, 1, at=world.clock.now() - dt.timedelta(minutes=30))
    small_rows = []
    for number in range(60):
        client = world.client(world.agency())
        small_rows.append([world.report(client, 1).id for _ in range(1 + number % 2)])
    db.session.execute(update(UnitReport).where(UnitReport.client_id == big_client.id).values(
        next_attempt_at=world.clock.now() - dt.timedelta(minutes=30)))  # fmt: skip
    db.session.commit()
    clock, resume, claims = TickClock(world.clock.now(), dt.timedelta(minutes=1)), {}, []
    while batch := claim_batch(clock, ReportingResult(), resume):
        claims.append([claim.report_id for claim in batch])

    position = {row_id: n for n, batch in enumerate(claims) for row_id in batch}
    assert sum(len(batch) for batch in claims) == 400 + sum(len(rows) for rows in small_rows)
    assert max(position[row_id] for rows in small_rows for row_id in rows) <= 3


def test_another_agency_s_rows_set_aside_at_the_claim_do_not_end_the_tick_for_a_count_report(world, monkeypatch):
    """Rule 8: a failing report row is set aside with a visible reason and the pass continues. Agency X has 10
    rows of a client that lost its Stripe customer (the claim fails them: "the client has no Stripe customer");
    agency G one count-meter report of 400 units (four slices of 100 events). Claims of 4. A claim returns only
    the rows it will send, and the tick stops at the first empty claim. Before b6a186f every claim held G's row
    (its turn 0) beside three of X's, so the tick sent all four slices and failed X's rows. With the resume
    cursors, after two slices G's row lies behind G's cursor (attack 3.1); the third claim reads after the
    cursors, finds only X's last four rows, fails them all and returns nothing: the tick ends with G's report
    half sent, though it was due all along and the budget was far from spent. X's bad rows end G's tick.
    Fix: claim_batch should go on choosing (or report "nothing sendable, but rows were set aside") when every
    chosen row was set aside at the claim; and attack 3.1's fix.
    """
    monkeypatch.setattr(report_claims, "CLAIM_BATCH", 4)
    good = world.agency(formula="count", event_name="ai_count")
    counted = world.client(good)
    world.report(counted, 400)
    broken = world.agency()
    lost = world.client(broken)
    for _ in range(10):
        world.report(lost, 1)
    lost.stripe_customer_id = ""  # the agency removed the customer; the client waits for an edit
    db.session.commit()

    result = tick(world)

    assert not result.budget_spent
    assert [row.status for row in world.reports(lost)] == ["failed"] * 10
    (row,) = world.reports(counted)
    assert (row.status, row.units_confirmed) == ("sent", 400), (
        f"agency G's count report stopped at {row.units_confirmed} of 400 events in a tick with time to spare "
        "(the tick ended on a claim whose every row was agency X's, set aside)"
    )
