"""Claiming unit reports for a reporting tick: leases, attempt counts and first-offer targets (billing.reporting).

A claim is a leased report with its Stripe target as plain data: the target it recorded at its first offer
while any of its units may be in Stripe (docs/billing-rules.md rule 9), else the client's current one.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import random
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, replace

from sqlalchemy import ColumnElement, and_, bindparam, delete, exists, func, or_, select, text, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite

from billing.aggregation_store import take_write_lock
from billing.models import Agency, ClientSendLease, RebillClient, UnitReport
from billing.states import ReportMode, ReportStatus
from billing.stripe_limits import IDENTIFIER_DEDUPE_WINDOW, METER_EVENT_MAX_AGE, PERIOD_CHECK_AGE, TOTALS_SETTLE
from billing.stripe_target import CLIENT_COLUMNS, REPORT_COLUMNS, StripeTarget
from core.database import UTCDateTime, db, is_postgresql, utcnow

log = logging.getLogger("billing.reporting")

# Longer than the slowest possible Stripe call (timeout x attempts + SDK backoff), so a lease never ends
# while its tick is still talking to Stripe; a crashed tick's rows wait this long before being resent.
LEASE = dt.timedelta(minutes=5)
# Within Stripe's identifier dedupe window, with an hour of margin.
DEDUPE_SAFE_AGE = IDENTIFIER_DEDUPE_WINDOW - dt.timedelta(hours=1)
# A report in doubt is resent under its identifier until this age of its doubt, then waits for the >24 h check
# at DEDUPE_SAFE_AGE: its last resend is then old enough to be in the Stripe total the check reads. A resend
# landing just before the check but not yet in the total would read as missing and go again: billed twice.
LAST_RESEND_AGE = DEDUPE_SAFE_AGE - TOTALS_SETTLE
# Within Stripe's limit for meter event timestamps, with a margin for the call itself.
MAX_EVENT_AGE = METER_EVENT_MAX_AGE - dt.timedelta(minutes=10)
BACKOFF_BASE = dt.timedelta(seconds=30)
BACKOFF_CAP = dt.timedelta(hours=1)
# Rows leased per claim. Small enough that several scheduler processes share a small backlog (a claim is the
# unit of sharing: 2,000 due rows in claims of 1,000 kept two of four processes idle) and each batch's tail, where
# sender threads run out of work, is short; large enough that the claim and record statements stay a small part
# of the tick (bench/README.md, "Reporting with several processes").
CLAIM_BATCH = 250
NEEDS_RECONCILE = "needs reconcile"
QUARANTINED = "quarantined"

_REPORT = UnitReport.__table__
_CLIENT = RebillClient.__table__
_AGENCY = Agency.__table__
_LEASE = ClientSendLease.__table__
# This process, for the sender names of its threads (sender_name). A forked child is another process (its
# main thread would otherwise share the parent's name and holds), so it draws its own.
_PROCESS = uuid.uuid4().hex[:16]


def _name_this_process() -> None:
    global _PROCESS
    _PROCESS = uuid.uuid4().hex[:16]


os.register_at_fork(after_in_child=_name_this_process)
_CLAIM_COLUMNS = (
    *(
        _REPORT.c[name]
        for name in (
            "id",
            "agency_id",
            "client_id",
            "identifier",
            "units",
            "usage_timestamp",
            "attempts",
            "failed_attempts",
            "first_attempt_at",
            "stripe_timestamp",
            "timestamp_shift",
            "units_confirmed",
            "in_doubt_since",
            *REPORT_COLUMNS.values(),
        )
    ),
    *(_CLIENT.c[name] for name in CLIENT_COLUMNS.values()),
    _AGENCY.c.stripe_account_id,
)


@dataclass
class ReportingResult:
    """What one reporting pass did."""

    reports_sent: int = 0
    units_sent: int = 0
    reports_failed: int = 0
    reports_retrying: int = 0
    reports_deferred: int = 0
    reports_quarantined: int = 0
    stripe_calls: int = 0
    agencies_flagged: int = 0
    budget_spent: bool = False


@dataclass(frozen=True)
class Claim:
    """A leased report and its Stripe target, as plain data (sender threads never touch the database)."""

    report_id: int
    agency_id: int
    client_id: int
    identifier: str
    units: int
    units_confirmed: int  # before this attempt
    usage_timestamp: dt.datetime
    timestamp: dt.datetime | None  # what Stripe is given; None until stamped
    timestamp_shift: str | None
    attempt: int
    failed_attempts: int  # offers in a row Stripe did not take, before this one
    previous_in_doubt_since: dt.datetime | None
    claimed_at: dt.datetime
    needs_check: bool  # in doubt beyond the dedupe window: ask Stripe's totals before any resend
    needs_stamp: bool  # the timestamp depends on the customer's current period (asked of Stripe)
    rest_unsent: bool  # every offer answered: no unit after units_confirmed in Stripe
    target_changed: bool  # the client's current target is not the recorded one (the agency edited the client)
    target: StripeTarget  # where the units go: recorded at the first offer (rule 9), else the client's now

    @property
    def send_group(self) -> tuple[str, str]:
        """Claims sharing a customer and meter (or legacy price) must go one at a time, in order."""
        return (self.target.customer_id, self.target.name)

    @property
    def remaining(self) -> int:
        return self.units - self.units_confirmed


def sender_name() -> str:
    """Name the scheduler thread that claims and sends (ticks run one after another in it): unique per process."""
    return f"{_PROCESS}-{threading.get_ident()}"


class TickClock:
    """The tick's notion of now (the caller's ``now`` advanced by the real time elapsed) and its budget."""

    def __init__(self, now: dt.datetime | None, budget: dt.timedelta):
        self._start = now or utcnow()
        self._monotonic = time.monotonic()
        self._budget = budget.total_seconds()

    def now(self) -> dt.datetime:
        return self._start + dt.timedelta(seconds=time.monotonic() - self._monotonic)

    @property
    def start(self) -> dt.datetime:
        return self._start

    def spent(self) -> bool:
        """Tell whether the tick's time budget is used up."""
        return time.monotonic() - self._monotonic >= self._budget

    def slice_deadline(self, share: float) -> float:
        """Return the monotonic time ``share`` of the budget from now."""
        return time.monotonic() + self._budget * share


def backoff_delay(attempts: int) -> dt.timedelta:
    """Return the wait before attempt ``attempts + 1``: exponential, capped, with 50-100 % jitter."""
    exponent = min(max(attempts, 1) - 1, 16)
    ceiling = min(BACKOFF_BASE * (2**exponent), BACKOFF_CAP)
    return ceiling * random.uniform(0.5, 1.0)


# Claims of several schedulers take turns on PostgreSQL (a transaction-level advisory lock, held for the
# claim's few milliseconds). The round-robin choice below reads due rows without locking them, so it cannot
# skip rows another claim is locking: without turns, a second scheduler chose the same rows, found them
# locked, took its empty claim for "nothing due" and stopped. Taking turns, it sees the first claim's
# leases and chooses among the rows still due. Stripe is called after the claim commits, so schedulers
# still send in parallel. The key is Rebill's own ("RBCL"; core.leader_lock takes "RBHK").
CLAIM_LOCK_KEY = 0x5242434C
# Reads of the agencies' first due rows one claim makes at most (see _choose_due_rows); a batch left short
# by them is filled by the next claim.
CLAIM_ROUNDS = 4
_BEFORE_ANY_ROW = (dt.datetime(1, 1, 1, tzinfo=dt.UTC), 0)  # a cursor before every (next_attempt_at, id)
# Each given agency's first ``per_agency`` due rows after its cursor, in due order: one range of
# ix_unit_report_agency_due per agency (docs/billing-rules.md rule 8).
_FIRST_DUE_ROWS = text(
    """
    SELECT c.agency_id, r.next_attempt_at, r.id
    FROM unnest(CAST(:agency_ids AS integer[]), CAST(:after_times AS timestamptz[]), CAST(:after_ids AS bigint[]))
        AS c(agency_id, after_time, after_id)
    CROSS JOIN LATERAL (
        SELECT next_attempt_at, id FROM unit_report
        WHERE agency_id = c.agency_id AND status = 'pending' AND next_attempt_at <= :start
            AND (next_attempt_at, id) > (c.after_time, c.after_id)
            AND NOT EXISTS (
                SELECT FROM client_send_lease l
                WHERE l.client_id = unit_report.client_id AND l.until > :now AND l.sender <> :sender
            )
        ORDER BY next_attempt_at, id
        LIMIT :per_agency
    ) AS r
    """
).bindparams(bindparam("start", type_=UTCDateTime()), bindparam("now", type_=UTCDateTime()))


def due_again(resume: dict[int, tuple[dt.datetime, int]], agency_id: int, next_attempt_at: dt.datetime, row_id: int):
    """Note a row of the agency made due again in this tick (a count-meter slice's progress) for its next claim.

    Its place (next_attempt_at = the tick's start, id) may lie at or behind the agency's resume cursor (the row
    itself was the last one chosen): the cursor moves to just before it, so the row keeps its turn in the very
    next claim instead of waiting behind every agency's backlog (rule 8). Only rows due again at the tick's
    start lie between the two places, so the next read steps over no more than those.
    """
    cursor = resume.get(agency_id)
    if cursor is not None and cursor >= (next_attempt_at, row_id):
        resume[agency_id] = (next_attempt_at, row_id - 1)


@dataclass(frozen=True)
class _Held:
    """Who chooses due rows, and when: rows of clients another sender holds until after ``now`` are passed over."""

    sender: str
    now: dt.datetime


def hold_clients(claims: list[Claim], sender: str, until: dt.datetime) -> None:
    """Hold the claims' clients for ``sender`` until ``until``: other schedulers pass their rows over meanwhile."""
    values = [{"client_id": client_id, "sender": sender, "until": until} for client_id in {c.client_id for c in claims}]
    if not values:
        return
    dialect = postgresql if is_postgresql() else sqlite
    statement = dialect.insert(_LEASE)
    db.session.execute(
        statement.on_conflict_do_update(
            index_elements=[_LEASE.c.client_id],
            set_={"sender": statement.excluded.sender, "until": statement.excluded.until},
        ),
        values,
    )


def release_clients(claims: list[Claim], sender: str) -> None:
    """Let other schedulers claim the clients of a recorded batch again (none of their rows is in flight here)."""
    client_ids = list({claim.client_id for claim in claims})
    if client_ids:
        db.session.execute(delete(_LEASE).where(_LEASE.c.client_id.in_(client_ids), _LEASE.c.sender == sender))


def release_own_holds() -> None:
    """Release every client this thread holds, for a tick that failed between its claim and its record.

    Call it only once nothing this thread sent is in flight: a tick's sends run in pools it has joined by then.
    Ticks on one thread run one after another, so every hold of this sender is the failed tick's.
    """
    db.session.execute(delete(_LEASE).where(_LEASE.c.sender == sender_name()))


def release_holds_of_ended_threads() -> None:
    """Release the holds of this process's threads that have ended (a tick that died without its release).

    A thread's tick joins its send pools before it ends, so nothing such a hold covers is in flight; without
    this the process's next tick, on another thread (APScheduler's pool), would pass the client over for LEASE.
    """
    alive = [f"{_PROCESS}-{thread.ident}" for thread in threading.enumerate()]
    db.session.execute(
        delete(_LEASE).where(_LEASE.c.sender.startswith(f"{_PROCESS}-", autoescape=True), _LEASE.c.sender.not_in(alive))
    )


def _serialise_claims() -> None:
    if is_postgresql():
        db.session.execute(select(func.pg_advisory_xact_lock(CLAIM_LOCK_KEY)))


def _choose_due_rows(start: dt.datetime, resume: dict[int, tuple[dt.datetime, int]] | None = None) -> list[int]:
    """Choose up to CLAIM_BATCH due rows round-robin across agencies with a working key; return their ids.

    Each agency's longest-due row first (``next_attempt_at``, then id), then each one's second...: a backlog
    of one agency fills a batch only when no other agency has rows due (rule 8). The choice reads a few rows
    per agency, never every due row: in rounds, each agency still in play gives its next
    ceil(room / agencies in play) due rows after what it gave before; an agency that has no more drops out,
    and the rows are taken in turn order until the batch is full. The agencies left in a round all gave the
    same number of rows in every round before, so the turns of a round follow those of the one before, and
    the batch is exactly the first CLAIM_BATCH due rows in turn order, as ranking every due row would give
    (tests/billing/test_report_claims.py), unless CLAIM_ROUNDS end it short (the next claim goes on).

    ``resume`` (a tick's own, kept across its claims and updated here): each agency's last chosen row, where
    its next read starts. Rows a claim leased or sent leave index entries behind until VACUUM (every lease
    moves ``next_attempt_at``), so reading from each agency's first row on every claim would step over all
    the rows the tick already handled: quadratic again. A row the tick itself makes due again (a count-meter
    slice) moves its agency's place back to just before it (due_again), so it keeps its turn in the next claim.
    When nothing is due after those places, the agencies are read once more from their first row: rows due
    again behind them that the tick did not see coming (a lapsed lease of another scheduler, a row skipped
    while locked, a late insert) are still claimed in this tick.

    Rows of clients another scheduler thread holds (ClientSendLease, until after the tick's start) are passed
    over, so a customer's meter gets one call at a time across schedulers.
    """
    held = _Held(sender=sender_name(), now=start)
    agencies = db.session.scalars(select(Agency.id).where(Agency.stripe_key_status == "ok")).all()
    if resume:
        chosen = _choose_after({agency_id: resume.get(agency_id, _BEFORE_ANY_ROW) for agency_id in agencies},
                               start, resume, held)  # fmt: skip
        if chosen:
            return chosen
    return _choose_after(dict.fromkeys(agencies, _BEFORE_ANY_ROW), start, resume, held)


def _choose_after(
    cursors: dict[int, tuple[dt.datetime, int]],
    start: dt.datetime,
    resume: dict[int, tuple[dt.datetime, int]] | None,
    held: _Held,
) -> list[int]:
    """The rounds of _choose_due_rows from each agency's cursor; notes each agency's last chosen row in ``resume``."""
    chosen: list[int] = []
    for _ in range(CLAIM_ROUNDS):
        room = CLAIM_BATCH - len(chosen)
        if room <= 0 or not cursors:
            break
        per_agency = -(-room // len(cursors))
        given = _first_due_rows(cursors, per_agency, start, held)
        in_turn = sorted((turn, due, agency_id) for agency_id, rows in given.items() for turn, due in enumerate(rows))
        for _, due, agency_id in in_turn[:room]:
            chosen.append(due[1])
            if resume is not None:
                resume[agency_id] = due  # taken in turn order: each agency's rows in due order
        cursors = {agency_id: rows[-1] for agency_id, rows in given.items() if len(rows) == per_agency}
    return chosen


def _first_due_rows(
    cursors: dict[int, tuple[dt.datetime, int]], per_agency: int, start: dt.datetime, held: _Held
) -> dict[int, list[tuple[dt.datetime, int]]]:
    """Each agency's first ``per_agency`` due rows after its cursor, as (next_attempt_at, id) in due order."""
    given: dict[int, list[tuple[dt.datetime, int]]] = defaultdict(list)
    if is_postgresql():  # one statement: a lateral index range per agency
        rows = db.session.execute(
            _FIRST_DUE_ROWS,
            {
                "agency_ids": list(cursors),
                "after_times": [after for after, _ in cursors.values()],
                "after_ids": [row_id for _, row_id in cursors.values()],
                "per_agency": per_agency,
                "start": start,
                "now": held.now,
                "sender": held.sender,
            },
        )
        for agency_id, due_at, row_id in rows:
            given[agency_id].append((due_at, row_id))
        return given
    for agency_id, after in cursors.items():  # SQLite (one process, in-process calls): a query per agency
        rows = db.session.execute(
            select(_REPORT.c.next_attempt_at, _REPORT.c.id)
            .where(
                _REPORT.c.agency_id == agency_id,
                _REPORT.c.status == ReportStatus.PENDING,
                _REPORT.c.next_attempt_at <= start,
                tuple_(_REPORT.c.next_attempt_at, _REPORT.c.id) > after,  # typed as the columns
                ~exists().where(
                    _LEASE.c.client_id == _REPORT.c.client_id, _LEASE.c.until > held.now, _LEASE.c.sender != held.sender
                ),
            )
            .order_by(_REPORT.c.next_attempt_at, _REPORT.c.id)
            .limit(per_agency)
        )
        given[agency_id].extend((due_at, row_id) for due_at, row_id in rows)
    return {agency_id: rows for agency_id, rows in given.items() if rows}


def claim_batch(
    clock: TickClock, result: ReportingResult, resume: dict[int, tuple[dt.datetime, int]] | None = None
) -> list[Claim]:
    """Lease up to CLAIM_BATCH due rows, round-robin across agencies with a working key, and commit.

    ``resume``: where this tick's previous claims left each agency (see _choose_due_rows); a tick passes the
    same dict to each of its claims.

    The choice (_choose_due_rows), then one read of the chosen rows with their clients (locked on PostgreSQL,
    skipping rows another tick holds, and re-checked as due; on SQLite this transaction is the writer from the
    start), then the leases, attempt counts and first-offer targets written row by row in one executemany,
    and the rows not sent now (future timestamp, client incomplete, quarantined) likewise. A claim whose every
    row was set aside so is followed by the next one at once: [] means nothing (more) is due for this tick.
    """
    while True:
        claims = _claim_chosen(clock, result, resume)
        if claims is None:
            return []
        # A claim whose every row was set aside (failed, deferred or quarantined: all out of the due range now)
        # is no sign that nothing is due: another agency's bad rows must not end this tick (rule 8).
        if claims or clock.spent():
            return claims


def _claim_chosen(
    clock: TickClock, result: ReportingResult, resume: dict[int, tuple[dt.datetime, int]] | None
) -> list[Claim] | None:
    """One claim of claim_batch: the claims to send (possibly none, every row set aside), or None if none was due."""
    now = clock.now()
    take_write_lock()
    _serialise_claims()
    chosen = _choose_due_rows(clock.start, resume)
    if not chosen:
        db.session.rollback()
        return None
    due = (
        _REPORT.c.status == ReportStatus.PENDING,
        _REPORT.c.next_attempt_at <= clock.start,
        _AGENCY.c.stripe_key_status == "ok",  # the agency joined below
    )
    statement = (
        select(*_CLAIM_COLUMNS)
        .join_from(_REPORT, _CLIENT, _CLIENT.c.id == _REPORT.c.client_id)
        .join(_AGENCY, _AGENCY.c.id == _REPORT.c.agency_id)
        .where(_REPORT.c.id.in_(chosen), *due)
        .order_by(_REPORT.c.id)
    )
    if is_postgresql():
        # Rows another tick is claiming right now are skipped, not waited for; client and agency rows are
        # not locked. A row locked here is re-checked against the conditions in its newest version.
        statement = statement.with_for_update(skip_locked=True, of=_REPORT)
    rows = db.session.execute(statement).all()
    if not rows:  # every chosen row claimed by another tick meanwhile, or flagged: they decide (rare)
        db.session.rollback()
        return None
    claims, writes = [], []
    for row in rows:
        try:
            claim = _prepare(row, now, result, writes)
        except Exception as error:  # one bad row never stops the batch (rule 8)
            log.exception("report quarantined", extra={"fields": {"report_id": row.id}})
            writes.append(quarantine_values(row.id, row.attempts + 1, now, f"{type(error).__name__}: {error}"))
            writes[-1]["failed_attempts"] = row.failed_attempts + 1
            result.reports_quarantined += 1
            continue
        if claim is not None:
            claims.append(claim)
            writes.append(_claim_values(claim, row, now))
    write_rows(writes)
    hold_clients(claims, sender_name(), now + LEASE)
    db.session.commit()
    return claims


def _prepare(row, now: dt.datetime, result: ReportingResult, writes: list[dict]) -> Claim | None:
    """Decide what to do with a due row: a claim to send now, or the row's new values in ``writes``."""
    recorded = StripeTarget.from_columns(row, REPORT_COLUMNS)
    # The client's target now, in the agency's account; a legacy subscription item is read from the customer's
    # current period when the row is stamped (rule 10), never taken from the client's copy.
    current = replace(
        StripeTarget.from_columns(row, CLIENT_COLUMNS), account=row.stripe_account_id, subscription_item_id=None
    )
    if recorded is not None and (row.in_doubt_since is not None or row.units_confirmed > 0):
        if account_moved(recorded.account, current.account):
            writes.append(
                {
                    "b_id": row.id,
                    "status": ReportStatus.FAILED,
                    "last_error": account_moved_reason(recorded.account, current.account),
                }
            )
            result.reports_failed += 1
            return None
        needs_check = row.in_doubt_since is not None and row.in_doubt_since <= now - DEDUPE_SAFE_AGE
        stale = row.stripe_timestamp is None or row.stripe_timestamp < now - MAX_EVENT_AGE
        resends_over = row.in_doubt_since is not None and row.in_doubt_since <= now - LAST_RESEND_AGE
        if (stale or resends_over) and row.in_doubt_since is not None and not needs_check:
            # Only Stripe's totals can tell whether the doubtful offer landed, and only once the dedupe window
            # is over and the last resend has settled in them; then the rest goes with a new timestamp (rule 10:
            # never left unbillable).
            writes.append({"b_id": row.id, "next_attempt_at": row.in_doubt_since + DEDUPE_SAFE_AGE})
            result.reports_deferred += 1
            return None
        # The timestamp offered: the >24 h check reads Stripe's window around it. A doubtful row is resent as
        # offered (while that time bills on an open invoice: report_sending._decide) or settled by the check,
        # never re-stamped; one not in doubt is kept only for its confirmed count events.
        target, timestamp, shift, doubt = recorded, row.stripe_timestamp, row.timestamp_shift, row.in_doubt_since
        needs_stamp, rest_unsent, target_changed = False, row.in_doubt_since is None, _target_changed(recorded, current)
    else:
        if row.usage_timestamp > now:
            writes.append({"b_id": row.id, "next_attempt_at": row.usage_timestamp})  # never a future timestamp
            result.reports_deferred += 1
            return None
        problem = _target_problem(current)
        if problem:
            writes.append({"b_id": row.id, "status": ReportStatus.FAILED, "last_error": problem})
            result.reports_failed += 1
            return None
        target, shift, doubt, needs_check = current, None, None, False
        needs_stamp = current.is_legacy or row.usage_timestamp < now - PERIOD_CHECK_AGE
        timestamp = None if needs_stamp else row.usage_timestamp
        rest_unsent = target_changed = False
    return Claim(
        report_id=row.id,
        agency_id=row.agency_id,
        client_id=row.client_id,
        identifier=row.identifier,
        units=row.units,
        units_confirmed=row.units_confirmed,
        usage_timestamp=row.usage_timestamp,
        timestamp=timestamp,
        timestamp_shift=shift,
        attempt=row.attempts + 1,
        failed_attempts=row.failed_attempts,
        previous_in_doubt_since=doubt,
        claimed_at=now,
        needs_check=needs_check,
        needs_stamp=needs_stamp,
        rest_unsent=rest_unsent,
        target_changed=target_changed,
        target=target.with_payload_defaults(),
    )


def _claim_values(claim: Claim, row, now: dt.datetime) -> dict:
    """The row's lease, attempt and, when about to be offered, its target and doubt (written before sending)."""
    values = {
        "b_id": claim.report_id,
        "next_attempt_at": now + LEASE,
        "attempts": claim.attempt,  # read under the row's lock: the claim counts exactly one attempt
        "first_attempt_at": row.first_attempt_at or now,
        "stripe_timestamp": claim.timestamp,
        "timestamp_shift": claim.timestamp_shift,
        **claim.target.columns(REPORT_COLUMNS),
    }
    if not (claim.needs_stamp or claim.needs_check or claim.rest_unsent):
        values["in_doubt_since"] = claim.previous_in_doubt_since or now  # offered right after this commit
    return values


def account_moved(recorded: str | None, current: str | None) -> bool:
    """Tell whether the agency's key now opens another Stripe account than the one a row was offered to."""
    return bool(recorded and current and recorded != current)


def offered_to_customer(customer_id: str, account: str | None) -> ColumnElement[bool]:
    """The unit reports offered to Stripe customer ``customer_id``, whichever agency offered them (a condition).

    Stripe's totals for a customer's meter hold every writer's units, and two agencies may connect one Stripe
    account (one business with two GHL companies; nothing forbids it), so the ledger side of a comparison with
    them is every report to the customer, whichever agency offered it, including an agency that has since
    moved to another account. A customer id names one customer of one account, so the customer and the
    account select them; a report recorded for another account than a known ``account`` is not in its totals,
    and one recorded without an account (offered before Rebill recorded it) is counted: counting a report that
    is not in the total only raises "known", which leads to "needs reconcile", never to "delivered". Served by
    ix_unit_report_customer_time: one customer's reports in a window, however many other agencies' rows
    the table holds.
    """
    same_account = []
    if account is not None:
        same_account.append(or_(UnitReport.target_account.is_(None), UnitReport.target_account == account))
    return and_(UnitReport.target_customer == customer_id, *same_account)


def account_moved_reason(recorded: str | None, current: str | None) -> str:
    """Why a row whose units may be in its first account is failed "needs reconcile", never sent to another."""
    return (
        f"{NEEDS_RECONCILE}: first offered to Stripe account {recorded}, but the agency's key now opens {current}; "
        "some units may be in the first account"
    )


def _target_changed(recorded: StripeTarget, current: StripeTarget) -> bool:
    """Tell whether the client's settings now send units elsewhere than the row's recorded target."""
    return (recorded.mode, recorded.customer_id, recorded.price_id, recorded.event_name) != (
        current.mode,
        current.customer_id,
        current.price_id,
        current.event_name,
    )


def _target_problem(target: StripeTarget) -> str | None:
    """Say what is missing for sending to the client's target, or None."""
    if not target.customer_id:
        return "the client has no Stripe customer; edit the client"
    if target.is_legacy:
        return None if target.price_id else "the client has no Stripe price; edit the client"
    if target.mode != ReportMode.METER or not (target.event_name and target.formula):
        return "the client's price has no usable billing meter on record; edit the client to pick a metered price"
    if target.formula not in ("sum", "count"):
        return f"the client's meter formula '{target.formula}' cannot carry units; pick another price"
    return None


def quarantine_values(report_id: int, attempt: int, now: dt.datetime, problem: str) -> dict:
    """Set a row aside after an unexpected error: visible reason, retried later with backoff (rule 8)."""
    return {
        "b_id": report_id,
        "next_attempt_at": now + backoff_delay(attempt),
        "last_error": f"{QUARANTINED}: Rebill could not process this report ({problem}); retried automatically",
    }


# A claimed row whose outcome may be written: still pending under the identifier the claim offered, and not
# claimed since. A meter error may flag the row while a tick holds it (billing.meter_errors: failed, or
# re-opened under a fresh identifier); what that tick's offer got must then not overwrite the flag. A tick
# stalled past its LEASE may find the row claimed again by another tick (``attempts`` counted up): that tick's
# outcome is newer, and a late write would forget its confirmed events or clear its doubt (billed twice). A
# claim's writes count only while it holds the row (docs/billing-rules.md, rule 6).
STILL_CLAIMED = (
    _REPORT.c.id == bindparam("b_id"),
    _REPORT.c.status == ReportStatus.PENDING,
    _REPORT.c.identifier == bindparam("b_identifier"),
    _REPORT.c.attempts == bindparam("b_attempt"),
)


def claim_params(claim: Claim) -> dict:
    """The bind parameters STILL_CLAIMED checks for ``claim``."""
    return {"b_id": claim.report_id, "b_identifier": claim.identifier, "b_attempt": claim.attempt}


def write_rows(rows: list[dict], *, claimed: bool = False) -> None:
    """Update outbox rows one by one with their own values (``b_id`` names the row), grouped by column set.

    ``claimed``: each row also gives ``b_identifier`` and ``b_attempt`` (claim_params), and is written only while
    its claim still holds it (STILL_CLAIMED).
    """
    by_columns: dict[tuple[str, ...], list[dict]] = defaultdict(list)
    for row in rows:
        by_columns[tuple(sorted(key for key in row if not key.startswith("b_")))].append(row)
    where = STILL_CLAIMED if claimed else (_REPORT.c.id == bindparam("b_id"),)
    for columns, group in by_columns.items():
        db.session.execute(update(_REPORT).where(*where).values({c: bindparam(c) for c in columns}), group)
