"""Adversarial review 4: agency ranges (d6aeb92), chunked writes (270ad6a), threaded marking (5290e2d, 2156453).

Each test plays a scenario built to break the aggregation invariants: every event leaves ``pending`` in the
transaction that adds it to its client's counters (rule 2), units == floor(usage / N) with the remainder
carried and one outbox row per client per pass (rules 1, 7), one agency's fault never stalls another (rule 8),
a client's status when the event was received decides (rule 11). Faults come from data (a clashing outbox
identifier, a database trigger standing for a server-side failure), never from patching our functions; sizes
are set through parameters or module constants the code reads at call time (``billing.units.WRITE_CHUNK``).

A test here FAILS on main when it proves a problem; its docstring states the scenario and the mechanism.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading

import pytest
from sqlalchemy import func, select, text

from billing import units as units_module
from billing.agencies import ensure_agency
from billing.aggregation_store import aggregation_store
from billing.models import RebillClient, RebillClientTerm, UnitReport, UsageEvent
from billing.units import aggregate_pending_usage, report_identifier
from core.database import db
from tests.billing.factories import (
    NOW,
    event_states,
    fresh,
    make_client,
    pending_count,
    record,
    reports_of,
    tokens,
)

N = 10


def usage(number: int) -> int:
    return number * 7 % 19 + 1


def assert_exact(client: RebillClient, expected_usage: int) -> None:
    """Rule 1 and 7 for one client after one pass from zero: counters exact, one outbox row with the units."""
    client = fresh(client)
    assert client.counted_usage == expected_usage
    assert (client.units_logged, client.remainder) == divmod(expected_usage, client.billing_unit)
    reports = reports_of(client)
    assert sum(report.units for report in reports) == client.units_logged
    assert len(reports) == (1 if client.units_logged else 0)


# ---- 270ad6a: chunked writes --------------------------------------------------------------------------------


def take_the_first_report_identifier_of(client: RebillClient) -> None:
    """Store a report under the identifier the client's next outbox row will want, so that insert fails."""
    db.session.add(
        UnitReport(
            agency_id=client.agency_id,
            client_id=client.id,
            identifier=report_identifier(client.report_prefix, client.id, 1),
            units=1,
            usage_timestamp=NOW,
        )
    )


def test_attack_4_1_a_chunk_failing_after_an_earlier_chunk_rolls_both_back_and_only_its_agency_waits(
    app_context, monkeypatch
):
    """WRITE_CHUNK = 1: the round writes the good agency's client first (lower id, its chunk succeeds), then the
    bad agency's client, whose outbox row clashes with an identifier already in the table (damaged data: its
    report_sequence was reset). The pass must roll back the first chunk's counters with it, then run agency by
    agency: the good agency counted exactly once (not twice: its first chunk's write must be gone), the bad
    agency's events still pending and its counters untouched."""
    monkeypatch.setattr(units_module, "WRITE_CHUNK", 1)
    good, bad = ensure_agency("company-chunk-good"), ensure_agency("company-chunk-bad")
    good_client = make_client(good, source_key="chan-g", billing_unit=N)
    bad_client = make_client(bad, source_key="chan-b", billing_unit=N)
    for n in range(6):
        record(good, tokens(f"g{n}", usage(n), channel="chan-g"))
        record(bad, tokens(f"b{n}", usage(n), channel="chan-b"))
    take_the_first_report_identifier_of(bad_client)
    db.session.commit()

    result = aggregate_pending_usage(batch_size=4)
    db.session.commit()

    assert result.failed_agencies == (bad.id,)
    total = sum(usage(n) for n in range(6))
    assert_exact(good_client, total)
    assert set(event_states(good).values()) == {"counted"}
    assert set(event_states(bad).values()) == {"pending"}
    assert (fresh(bad_client).counted_usage, fresh(bad_client).units_logged) == (0, 0)
    assert len(reports_of(bad_client)) == 1  # only the damaged row, nothing the failed pass wrote


@pytest.mark.parametrize("clients", [2, 3, 4, 5])
def test_attack_4_2_write_chunk_boundaries_write_every_client_once(app_context, monkeypatch, clients):
    """WRITE_CHUNK = 2 standing for 5,000: exactly one chunk (2), one more than a chunk (3), two full chunks (4),
    two and one (5). Every client with usage gets its counters and exactly one outbox row; the result counts
    every report and unit once."""
    monkeypatch.setattr(units_module, "WRITE_CHUNK", 2)
    agency = ensure_agency("company-chunks")
    made = [make_client(agency, source_key=f"chan-{i}", billing_unit=N) for i in range(clients)]
    quiet = make_client(agency, source_key="chan-quiet", billing_unit=N)  # locked by the round, no usage
    expected = {}
    for i in range(clients):
        amounts = [usage(i * 5 + k) + 10 for k in range(3)]
        expected[i] = sum(amounts)
        record(agency, *[tokens(f"e{i}-{k}", amount, channel=f"chan-{i}") for k, amount in enumerate(amounts)])
    record(agency, tokens("q0", 0, channel="chan-quiet"))
    db.session.commit()

    result = aggregate_pending_usage(batch_size=3)
    db.session.commit()

    for i, client in enumerate(made):
        assert_exact(client, expected[i])
    assert (fresh(quiet).counted_usage, reports_of(quiet)) == (0, [])
    assert result.reports == clients
    assert result.units == sum(total // N for total in expected.values())
    assert pending_count() == 0


# ---- d6aeb92: agency ranges ----------------------------------------------------------------------------------


def test_attack_4_3_an_agency_with_more_clients_than_a_round_alone_is_counted_exactly(app_context):
    """clients_per_round = 2; agency "big" has 5 live clients (a range of its own, three rounds within it), a
    small agency 1 client, an agency with no client but pending usage (unmapped), and one whose only client is
    deleted. Events interleave every source in id order, batches of 3 cut across rounds. Every event leaves
    pending once: exact counters, one outbox row per client, unknown sources unmapped."""
    small, big = ensure_agency("company-r-small"), ensure_agency("company-r-big")
    nobody, gone = ensure_agency("company-r-nobody"), ensure_agency("company-r-gone")
    clients = {(small.id, "s0"): make_client(small, source_key="s0", billing_unit=N)}
    for j in range(5):
        clients[(big.id, f"b{j}")] = make_client(big, source_key=f"b{j}", billing_unit=N)
    deleted = make_client(gone, source_key="d0", billing_unit=N)
    deleted.deleted_at = NOW
    db.session.flush()
    sources = [*clients, (nobody.id, "n0"), (nobody.id, "n1"), (gone.id, "d0")]
    agencies = {a.id: a for a in (small, big, nobody, gone)}
    expected = dict.fromkeys(sources, 0)
    for n in range(45):
        agency_id, channel = sources[n % len(sources)]
        record(agencies[agency_id], tokens(f"e{n}", usage(n), channel=channel))
        expected[(agency_id, channel)] += usage(n)
    db.session.commit()

    result = aggregate_pending_usage(batch_size=3, clients_per_round=2)
    db.session.commit()

    for key, client in clients.items():
        assert_exact(client, expected[key])
    assert set(event_states(nobody).values()) == {"unmapped"}
    assert set(event_states(gone).values()) == {"unmapped"}
    assert pending_count() == 0
    assert result.reports == sum(1 for key in clients if expected[key] >= N)
    assert result.failed_agencies == ()


def test_attack_4_4_rule11_events_of_a_closed_paused_term_in_a_later_range_stay_unbilled(app_context):
    """clients_per_round = 1 so each agency is its own range and the client sits in the last one. The client was
    active, then paused for two hours, then resumed 10 minutes ago: events received while it was paused (which
    committed late, so they are pending now) must get state "paused", the others count; the round that reads
    them is a later range's, whose tallies see the client's closed terms."""
    first, second = ensure_agency("company-t-first"), ensure_agency("company-t-second")
    other = make_client(first, source_key="o0", billing_unit=N)
    client = make_client(second, source_key="c0", billing_unit=N)
    client.term_started_at = NOW - dt.timedelta(minutes=10)
    db.session.add_all(
        [
            RebillClientTerm(
                client_id=client.id,
                starts_at=NOW - dt.timedelta(hours=3),
                ends_at=NOW - dt.timedelta(hours=2),
                status="active",
                provider=client.provider,
                source_key=client.source_key,
            ),
            RebillClientTerm(
                client_id=client.id,
                starts_at=NOW - dt.timedelta(hours=2),
                ends_at=NOW - dt.timedelta(minutes=10),
                status="paused",
                provider=client.provider,
                source_key=client.source_key,
            ),
        ]
    )
    received = {"a": NOW - dt.timedelta(minutes=150), "p": NOW - dt.timedelta(hours=1), "n": NOW}
    for n in range(9):
        kind = "apn"[n % 3]
        record(second, tokens(f"{kind}{n}", 11, channel="c0"))
        record(first, tokens(f"o{n}", 11, channel="o0"))
        db.session.execute(
            text("UPDATE usage_event SET received_at = :at WHERE source_event_id = :id"),
            {"at": received[kind], "id": f"{kind}{n}"},
        )
    db.session.commit()

    aggregate_pending_usage(batch_size=2, clients_per_round=1)
    db.session.commit()

    states = event_states(second)
    assert {state for key, state in states.items() if key[0] == "p"} == {"paused"}
    assert {state for key, state in states.items() if key[0] != "p"} == {"counted"}
    assert_exact(client, 6 * 11)
    assert_exact(other, 9 * 11)


def test_attack_4_5_a_client_created_mid_pass_for_a_source_the_full_round_found_clientless(
    app, app_context, postgres_only, monkeypatch
):
    """clients_per_round = 1, batches of 2. The round first meets source "late" with no client (clientless,
    unmapped), then fills up with client "a". After the first claim, another transaction creates and commits a
    client for "late" (its term starts now). The full round looks "late" up again, finds the new client, has no
    room and postpones it; the next round counts... nothing: every "late" event was received before the client
    existed, so rule 3/11 make them unmapped, never billed, whichever round reads them."""
    agency = ensure_agency("company-midpass")
    a = make_client(agency, source_key="a", billing_unit=N)
    for n in range(8):
        record(agency, tokens(f"late{n}", 13, channel="late"), tokens(f"a{n}", 13, channel="a"))
    db.session.commit()
    created = {}
    store = type(aggregation_store())
    claim = store.claim

    def claim_then_create_a_client_elsewhere(self, **arguments):
        rows = claim(self, **arguments)
        if not created:
            created["done"] = True
            with app.app_context():  # another session, another transaction
                late = make_client(ensure_agency("company-midpass"), source_key="late", billing_unit=N)
                db.session.commit()
                created["id"] = late.id
        return rows

    monkeypatch.setattr(store, "claim", claim_then_create_a_client_elsewhere)

    aggregate_pending_usage(batch_size=2, clients_per_round=1)
    db.session.commit()

    late = db.session.get(RebillClient, created["id"])
    states = event_states(agency)
    assert {state for key, state in states.items() if key.startswith("late")} == {"unmapped"}
    assert (fresh(late).counted_usage, reports_of(late)) == (0, [])
    assert_exact(a, 8 * 13)


# ---- 5290e2d / 2156453: the marking UPDATE from a thread ----------------------------------------------------


@pytest.fixture
def usage_event_trigger(app_context, postgres_only):
    """Install a BEFORE UPDATE trigger on usage_event running ``body`` for one agency's rows; dropped after."""
    installed = []

    def install(agency_id: int, body: str) -> None:
        db.session.execute(
            text(
                "CREATE FUNCTION attack4_fault() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                f"IF NEW.agency_id = {int(agency_id)} AND NEW.state <> 'pending' THEN {body} END IF; "
                "RETURN NEW; END $$"
            )
        )
        db.session.execute(
            text(
                "CREATE TRIGGER attack4_fault BEFORE UPDATE ON usage_event "
                "FOR EACH ROW EXECUTE FUNCTION attack4_fault()"
            )
        )
        db.session.commit()
        installed.append(True)

    yield install
    if installed:
        db.session.rollback()
        db.session.execute(text("DROP TRIGGER IF EXISTS attack4_fault ON usage_event"))
        db.session.execute(text("DROP FUNCTION IF EXISTS attack4_fault()"))
        db.session.commit()


def many_sources(agency, prefix: str, count: int) -> list[RebillClient]:
    return [make_client(agency, source_key=f"{prefix}{i}", billing_unit=N) for i in range(count)]


def test_attack_4_6_a_marking_failing_in_the_server_while_the_next_batch_locks_clients_fails_only_its_agency(
    app_context, usage_event_trigger, caplog
):
    """Every batch brings new sources, so while the marking UPDATE of batch k runs (thread), the aggregating
    thread sends its lookups and locks for batch k+1 on the same connection. The UPDATE fails in the server for
    agency "bad" (a trigger standing for a server-side data fault). The pass must roll back and rerun agency by
    agency: "good" counted exactly, "bad" pending; and the log must name the real cause, not only "current
    transaction is aborted" from the aggregating thread's statement that ran after it."""
    bad, good = ensure_agency("company-m-bad"), ensure_agency("company-m-good")
    good_clients = many_sources(good, "g", 12)
    bad_client = make_client(bad, source_key="b0", billing_unit=N)
    for n in range(12):
        record(good, tokens(f"g{n}", usage(n), channel=f"g{n}"))
        if n == 1:
            record(bad, tokens("b1", 17, channel="b0"))
    db.session.commit()
    usage_event_trigger(bad.id, "RAISE EXCEPTION 'attack4 data fault in agency %', NEW.agency_id;")

    with caplog.at_level(logging.ERROR):
        result = aggregate_pending_usage(batch_size=2)
    db.session.commit()

    assert result.failed_agencies == (bad.id,)
    for n, client in enumerate(good_clients):
        assert_exact(client, usage(n))
    assert set(event_states(bad).values()) == {"pending"}
    assert (fresh(bad_client).counted_usage, reports_of(bad_client)) == (0, [])
    failed_pass = [r for r in caplog.records if r.getMessage().startswith("aggregation pass failed")]
    assert failed_pass and "attack4 data fault" in "".join(
        str(r.exc_info[1]) + str(r.exc_info[1].__cause__ or "") + str(r.exc_info[1].__context__ or "")
        for r in failed_pass
    ), [str(r.exc_info[1]) for r in failed_pass]


def test_attack_4_7_a_connection_dropped_mid_marking_fails_the_pass_and_the_next_one_counts_once(
    app_context, usage_event_trigger
):
    """The marking UPDATE's backend dies mid-statement (a trigger terminates it, as a database restart would).
    The aggregating thread must not hang waiting on the connection; the pass fails (raised, or the session left
    to roll back), the caller rolls back as run_tick does, and once the fault is gone the next pass counts
    every event exactly once (nothing of the dropped transaction survived)."""
    bad, good = ensure_agency("company-d-bad"), ensure_agency("company-d-good")
    good_clients = many_sources(good, "g", 6)
    bad_client = make_client(bad, source_key="b0", billing_unit=N)
    for n in range(6):
        record(good, tokens(f"g{n}", usage(n), channel=f"g{n}"))
    record(bad, tokens("b1", 17, channel="b0"))
    db.session.commit()
    usage_event_trigger(bad.id, "PERFORM pg_terminate_backend(pg_backend_pid());")

    done = threading.Event()
    outcome = {}

    def watchdog():
        if not done.wait(60):
            outcome["hung"] = True

    threading.Thread(target=watchdog, daemon=True).start()
    try:
        aggregate_pending_usage(batch_size=2)
        db.session.commit()
    except Exception as error:  # any failure is acceptable; a hang or a partial commit is not
        outcome["error"] = error
    finally:
        done.set()
    db.session.rollback()
    assert "hung" not in outcome
    db.session.execute(text("DROP TRIGGER attack4_fault ON usage_event"))
    db.session.commit()

    if "error" in outcome:  # nothing was committed: the next pass counts all of it
        aggregate_pending_usage(batch_size=2)
        db.session.commit()
    for n, client in enumerate(good_clients):
        assert_exact(client, usage(n))
    assert_exact(bad_client, 17)
    assert pending_count() == 0


def test_attack_4_8_two_aggregators_at_once_count_every_event_once(app, app_context, postgres_only):
    """Two passes run at once (two scheduler processes, leader handover), each with threaded marking, small
    batches and rounds of 2 clients over 3 agencies of 3 clients plus an unmapped source. Neither may wait
    (lock_timeout 2 s fails a waiter), and after a third pass every event is counted once: exact counters,
    sum of outbox units == units_logged, unique identifiers."""
    from tests.billing.test_units_concurrency import run_threads

    agencies = [ensure_agency(f"company-two-{i}") for i in range(3)]
    clients, expected = {}, {}
    for i, agency in enumerate(agencies):
        for j in range(3):
            clients[(i, j)] = make_client(agency, source_key=f"c{j}", billing_unit=N)
            expected[(i, j)] = 0
    for n in range(120):
        i, j = n % 3, (n // 3) % 4
        channel = f"c{j}" if j < 3 else "nobody"
        record(agencies[i], tokens(f"e{n}", usage(n), channel=channel))
        if j < 3:
            expected[(i, j)] += usage(n)
    db.session.commit()

    def one_pass():
        with app.app_context():
            db.session.execute(text("SET LOCAL lock_timeout = '2s'"))
            result = aggregate_pending_usage(batch_size=5, clients_per_round=2)
            db.session.commit()
            assert result.failed_agencies == ()

    run_threads(one_pass, one_pass)
    aggregate_pending_usage(batch_size=5, clients_per_round=2)
    db.session.commit()

    for key, client in clients.items():
        client = fresh(client)
        assert client.counted_usage == expected[key]
        assert (client.units_logged, client.remainder) == divmod(expected[key], N)
        assert sum(report.units for report in reports_of(client)) == client.units_logged
    identifiers = db.session.scalars(select(UnitReport.identifier)).all()
    assert len(identifiers) == len(set(identifiers))
    assert pending_count() == 0
    unmapped = db.session.scalar(select(func.count()).select_from(UsageEvent).where(UsageEvent.state == "unmapped"))
    assert unmapped == 30


def test_attack_4_9_a_client_paused_by_another_session_mid_pass_counts_what_it_received_before(
    app, app_context, postgres_only, monkeypatch
):
    """clients_per_round = 1, so each agency is a range of its own and client X sits in the last one. After
    the pass's first claim another session pauses X (its row lock, flush_client_usage, a new term), racing the
    pass for X's events: whichever of the two counts them, every event received before the pause counts once,
    and the pass never waits (lock_timeout 2 s). Events received after the pause are "paused", never billed."""
    from billing.client_terms import set_client_status

    agencies = [ensure_agency(f"company-pause-{i}") for i in range(3)]
    others = [make_client(agency, source_key="o", billing_unit=N) for agency in agencies[:2]]
    x = make_client(agencies[2], source_key="x", billing_unit=N)
    for n in range(12):
        record(agencies[n % 3], tokens(f"e{n}", usage(n), channel="x" if n % 3 == 2 else "o"))
    db.session.commit()
    x_id, pauses = x.id, []
    store = type(aggregation_store())
    claim = store.claim

    def pause_x():
        with app.app_context():
            client = db.session.scalars(select(RebillClient).where(RebillClient.id == x_id).with_for_update()).one()
            set_client_status(client, "paused")
            db.session.commit()

    def claim_then_pause_elsewhere(self, **arguments):
        rows = claim(self, **arguments)
        if not pauses:
            thread = threading.Thread(target=pause_x)
            thread.start()
            pauses.append(thread)
        return rows

    monkeypatch.setattr(store, "claim", claim_then_pause_elsewhere)
    db.session.execute(text("SET LOCAL lock_timeout = '2s'"))
    result = aggregate_pending_usage(batch_size=2, clients_per_round=1)
    db.session.commit()
    pauses[0].join(60)
    assert not pauses[0].is_alive()
    monkeypatch.undo()
    assert result.failed_agencies == ()

    aggregate_pending_usage()  # whatever the pass deferred
    db.session.commit()
    record(agencies[2], tokens("after", 50, channel="x"))
    db.session.commit()
    aggregate_pending_usage()
    db.session.commit()

    before = sum(usage(n) for n in range(12) if n % 3 == 2)
    x = fresh(db.session.get(RebillClient, x_id))
    assert x.status == "paused"
    assert (x.counted_usage, x.units_logged, x.remainder) == (before, before // N, before % N)
    assert sum(report.units for report in reports_of(x)) == x.units_logged
    assert event_states(agencies[2])["after"] == "paused"
    for i, client in enumerate(others):
        assert_exact(client, sum(usage(n) for n in range(12) if n % 3 == i))


def test_attack_4_10_an_interrupt_while_a_marking_runs_leaves_nothing_and_the_next_pass_counts_once(
    app_context, postgres_only, monkeypatch
):
    """Ctrl-C (or a job timeout raising in the aggregating thread) arrives right after the third claim, while
    the second batch's marking UPDATE runs in its thread. KeyboardInterrupt is not an Exception: no agency-by-
    agency retry, it goes up through the savepoint. The pass must join the statement before anything rolls back
    (no "another command is already in progress", no half-marked batch), the session must roll back cleanly,
    and the next pass counts every event exactly once."""
    import _thread

    agency = ensure_agency("company-interrupt")
    clients = many_sources(agency, "c", 8)
    for n in range(8):
        record(agency, tokens(f"e{n}", usage(n), channel=f"c{n}"))
    db.session.commit()
    claims = []
    store = type(aggregation_store())
    claim = store.claim

    def claim_then_interrupt(self, **arguments):
        rows = claim(self, **arguments)
        claims.append(len(rows))
        if len(claims) == 3:
            _thread.interrupt_main()
        return rows

    monkeypatch.setattr(store, "claim", claim_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        aggregate_pending_usage(batch_size=2)
    db.session.rollback()
    monkeypatch.undo()
    assert pending_count() == 8

    result = aggregate_pending_usage(batch_size=2)
    db.session.commit()
    assert result.events == 8
    for n, client in enumerate(clients):
        assert_exact(client, usage(n))


def test_attack_4_11_the_agency_by_agency_rerun_of_an_agency_bigger_than_a_round_counts_it_once(
    app_context, monkeypatch
):
    """The pass fails (the bad agency's outbox row clashes with an existing identifier) after earlier ranges and
    chunks of the good agency were written. The rerun takes the good agency alone: 5 live clients with rounds of 2,
    so its rerun is three rounds over one agency filter, chunks of 1. Exact counters, one outbox row each, no
    event of the bad agency leaves pending."""
    monkeypatch.setattr(units_module, "WRITE_CHUNK", 1)
    good, bad = ensure_agency("company-rerun-good"), ensure_agency("company-rerun-bad")
    good_clients = many_sources(good, "g", 5)
    bad_client = make_client(bad, source_key="b", billing_unit=N)
    expected = [0] * 5
    for n in range(30):
        record(good, tokens(f"g{n}", usage(n) + 5, channel=f"g{n % 5}"))
        expected[n % 5] += usage(n) + 5
        if n % 6 == 0:
            record(bad, tokens(f"b{n}", 12, channel="b"))
    take_the_first_report_identifier_of(bad_client)
    db.session.commit()

    result = aggregate_pending_usage(batch_size=4, clients_per_round=2)
    db.session.commit()

    assert result.failed_agencies == (bad.id,)
    for client, total in zip(good_clients, expected, strict=True):
        assert_exact(client, total)
    assert set(event_states(bad).values()) == {"pending"}
    assert fresh(bad_client).counted_usage == 0
