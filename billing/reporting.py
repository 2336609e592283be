"""Reporting: drain the unit outbox (UnitReport rows) into each agency's Stripe, every unit exactly once.

How a tick sends (docs/billing-rules.md rules 6-10; docs/stripe.md):

- Claim: due rows (``pending``, ``next_attempt_at <=`` the tick's start, agency key ``ok``) are leased in a
  short transaction: ``next_attempt_at = now + LEASE`` and the attempt counted (``attempts + 1``,
  ``first_attempt_at`` kept from the first). Attempt history is append-only: nothing lowers ``attempts`` or
  clears ``first_attempt_at``. Rows are taken round-robin across agencies (each agency's oldest row, then
  each agency's second...), so one agency's backlog never pushes another's rows out of a batch. On
  PostgreSQL the claim locks with ``FOR UPDATE SKIP LOCKED``; on SQLite the claiming transaction takes the
  write lock before it reads. Two ticks never hold the same row; no database lock is held while Stripe is
  called.
- Target (rule 9): a row's first offer records where it goes (the agency's Stripe account, meter event name
  and payload keys or legacy subscription item, customer, price, timestamp) in the row, committed before
  Stripe is called. While any of its units may be in Stripe (``in_doubt_since`` set, or some count-meter
  events confirmed) every retry, the >24 h check and reconcile use that record, never the client's current
  settings. Once Stripe answered every offer with a refusal, none of it is in Stripe and the next offer
  records the client's (fixed) settings afresh. A count-meter row whose confirmed events are in Stripe and
  whose rest provably is not (every offer answered, or the >24 h check shows none of it) goes on with the
  recorded target and timestamp only while the client's settings are unchanged and the timestamp still bills
  on an open invoice; when Stripe refuses the rest, or those no longer hold, the row is closed at its
  confirmed units and the rest moves to a fresh row (billing.unsent_remainder) that is offered like a new one.
- Timestamp (rule 10): the usage time, unless it lies before the customer's current billing period (whose
  previous invoice may be finalized: usage stamped there is billed nowhere, or refused for legacy usage
  records) or beyond Stripe's 35 days; then the start of the current period (or now), and the row says so
  in ``timestamp_shift``. Usage younger than PERIOD_CHECK_AGE is sent as is without asking Stripe: it lies in
  the current period or in the previous one's finalization grace (an hour by default).
- Send: rows of one customer and meter go in order on one thread (Stripe allows one concurrent call per
  customer per meter); different customers go in parallel. A sum meter gets one event of value k, a legacy
  price one usage record of k. A count meter gets k events ``<identifier>-<n>``, at most
  COUNT_EVENTS_PER_CLAIM per claim, and the row records how many Stripe confirmed (``units_confirmed``), so a
  resend, a crash or a lease expiry resumes after the last confirmed event, and a huge row goes back in line
  between slices instead of holding the tick.
- Budget (rule 8): a tick stops claiming and sending when its time budget is spent (a call in flight is
  finished) and leaves the rest, untouched, for the next tick. Reads before sending (a billing period, the
  >24 h check) never hold up reports that need none: those are sent first, in the background, while the
  reads go round-robin across agencies within a share of the budget; an agency whose read failed or was slow
  is not read again in that tick, and its reports that need a read back off (billing.tick_reads). An
  unexpected error on one row quarantines that row (visible reason, retried with backoff); the tick goes on.
- Record: a row is ``sent`` only after Stripe answered, or answered "an event already exists with
  identifier" (delivered before). A crash before this commit leaves the row leased and in doubt; after the
  lease the same identifiers go again and Stripe deduplicates them (~24 h).
- Errors: StripeUnavailable (429/5xx/connection/timeout) → retried with exponential backoff and jitter;
  StripeKeyRejected (401/403) → the agency is flagged ``needs_attention`` and its rows wait for the key;
  StripeRequestRejected (unknown customer, no subscription item, no active meter…) → ``failed`` with
  Stripe's reason, re-offered after the agency fixes the client or key (``retry_failed_reports``); a
  refused timestamp (before the current period, older than 35 days) is re-stamped and re-offered at once.
- Past Stripe's ~24 h dedupe window a row in doubt is never resent blindly: Stripe's totals for its target
  and window (meter event summaries, or the legacy usage-record summary) are compared with what the ledger
  knows is there; exactly this row's missing units extra → delivered; nothing extra → the rest is provably
  unsent and goes as above (a row with nothing confirmed is offered afresh to the client's current target,
  with a valid timestamp); anything else → ``failed`` "needs reconcile".
"""

from __future__ import annotations

import datetime as dt
import itertools
import logging
import random
import threading
import time
from collections import defaultdict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from flask import current_app
from sqlalchemy import bindparam, func, select, update

from billing.models import Agency, RebillClient, UnitReport
from billing.states import OutcomeKind, ReportStatus
from billing.stripe_gateway import (
    StripeGateway,
    StripeKeyRejected,
    StripeRequestRejected,
    StripeUnavailable,
    SubscriptionPeriod,
    count_event_identifier,
    gateway_for,
)
from billing.stripe_limits import IDENTIFIER_DEDUPE_WINDOW, METER_EVENT_MAX_AGE
from billing.tick_reads import NotCached, ReadDeferred, TickReads
from billing.units import take_write_lock
from billing.unsent_remainder import move_unsent_remainder
from core.database import db, is_postgresql, utcnow

log = logging.getLogger("billing.reporting")

# Longer than the slowest possible Stripe call (timeout x attempts + SDK backoff), so a lease never ends
# while its tick is still talking to Stripe; a crashed tick's rows wait this long before being resent.
LEASE = dt.timedelta(minutes=5)
# Within Stripe's identifier dedupe window, with an hour of margin.
DEDUPE_SAFE_AGE = IDENTIFIER_DEDUPE_WINDOW - dt.timedelta(hours=1)
# Within Stripe's limit for meter event timestamps, with a margin for the call itself.
MAX_EVENT_AGE = METER_EVENT_MAX_AGE - dt.timedelta(minutes=10)
# Usage younger than this is in the customer's current period or in the previous period's finalization grace
# (one hour unless the account changed it: docs.stripe.com/billing/subscriptions/usage-based/configure-grace-
# period), so it is sent with its own time without reading the subscription.
PERIOD_CHECK_AGE = dt.timedelta(minutes=30)
# A count-meter row sends at most this many events, or for at most this share of the tick's budget, per
# claim; then it records its progress and goes back in line behind every other row due.
COUNT_EVENTS_PER_CLAIM = 100
COUNT_SLICE_SHARE = 0.1
# Share of the scheduler interval a tick's reporting may take (the rest is aggregation and slack).
BUDGET_SHARE = 0.75
BACKOFF_BASE = dt.timedelta(seconds=30)
BACKOFF_CAP = dt.timedelta(hours=1)
CLAIM_BATCH = 1000
NEEDS_RECONCILE = "needs reconcile"
QUARANTINED = "quarantined"
# Stripe's refusals of a timestamp: a meter event older than 35 days (code as in docs/stripe.md), a legacy
# usage record before the current period ("Cannot create the usage record with this timestamp because
# timestamps must be after the subscription's last invoice period (or current period start time).").
STALE_TIMESTAMP_CODES = ("timestamp_too_far_in_past",)
STALE_TIMESTAMP_TEXT = "usage record with this timestamp"

_REPORT = UnitReport.__table__
_CLIENT = RebillClient.__table__
_AGENCY = Agency.__table__
_TARGET_FROM_CLIENT = {
    "target_mode": "report_mode",
    "target_customer": "stripe_customer_id",
    "target_price": "stripe_price_id",
    "target_meter": "meter_id",
    "target_event_name": "meter_event_name",
    "target_customer_key": "meter_customer_key",
    "target_value_key": "meter_value_key",
    "target_formula": "meter_formula",
}
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
            "target_account",
            "target_subscription_item",
            "stripe_timestamp",
            "timestamp_shift",
            "units_confirmed",
            "in_doubt_since",
            *_TARGET_FROM_CLIENT,
        )
    ),
    *(_CLIENT.c[name] for name in _TARGET_FROM_CLIENT.values()),
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
class _Claim:
    """A leased report and its Stripe target, as plain data (sender threads never touch the database)."""

    report_id: int
    agency_id: int
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
    rest_unsent: bool  # every offer answered, or the >24 h check settled it: no unit after units_confirmed in Stripe
    target_changed: bool  # the client's current target is not the recorded one (the agency edited the client)
    account: str | None
    mode: str
    customer_id: str
    price_id: str | None
    meter_id: str | None
    event_name: str | None
    customer_key: str | None
    value_key: str | None
    formula: str | None
    subscription_item_id: str | None

    @property
    def send_group(self) -> tuple[str, str]:
        """Claims sharing a customer and meter (or legacy price) must go one at a time, in order."""
        return (self.customer_id, self.event_name if self.mode == "meter" else (self.price_id or ""))

    @property
    def remaining(self) -> int:
        return self.units - self.units_confirmed


@dataclass(frozen=True)
class _Outcome:
    """What happened to one claim.

    kind: delivered | progress (count-meter slice confirmed, more to send) | unavailable | rejected |
    stale_timestamp | key_rejected | skipped (not offered) | quarantined | unsent (the rest, provably not in
    Stripe, moves to a fresh row: billing.unsent_remainder).
    ``confirmed`` counts units Stripe confirmed during this attempt; ``answered`` is False when this attempt
    may have reached Stripe without an answer (the row is then in doubt).
    """

    claim: _Claim
    kind: OutcomeKind
    reason: str | None = None
    confirmed: int = 0
    answered: bool = True


class _TickClock:
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


def report_pending_units(now: dt.datetime | None = None, budget: dt.timedelta | None = None) -> ReportingResult:
    """Send due unit reports to Stripe within a time budget; commits its own transactions (a job, not a service).

    ``budget`` defaults to BUDGET_SHARE of the scheduler interval; what is left goes next tick.
    """
    config = current_app.config
    if budget is None:
        budget = dt.timedelta(seconds=config["REBILL_TICK_SECONDS"] * BUDGET_SHARE)
    clock = _TickClock(now, budget)
    reads = TickReads(budget.total_seconds())
    result = ReportingResult()
    gateways: dict[int, StripeGateway | StripeKeyRejected] = {}
    workers = config["STRIPE_CONCURRENCY"]
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="stripe-send") as pool:
            # At least one batch per tick, so every agency with rows due makes progress whatever the budget.
            while claims := _claim_batch(clock, result):
                outcomes = _process_batch(claims, gateways, clock, reads, pool if workers > 1 else None)
                _record_outcomes(outcomes, clock, result)
                if clock.spent():
                    break
        result.budget_spent = clock.spent()
    finally:
        result.stripe_calls = sum(g.calls for g in gateways.values() if isinstance(g, StripeGateway))
    return result


def retry_failed_reports(agency: Agency, client_id: int | None = None) -> int:
    """Make the agency's failed reports (of one client, or all) due again; return how many. Flushes only.

    Call it after the agency fixed what Stripe refused (client edited, key reconnected). A row Stripe refused
    on every offer (or the rest of one, split off when refused: billing.unsent_remainder) is then offered
    afresh to the client's current target with a valid timestamp; a row whose units may be in Stripe keeps
    its recorded target and is checked against Stripe's totals before any resend. "Needs reconcile" rows
    stay failed: only a person who reconciled may release them.
    """
    statement = (
        update(UnitReport)
        .where(
            UnitReport.agency_id == agency.id,
            UnitReport.status == ReportStatus.FAILED,
            UnitReport.last_error.not_like(f"{NEEDS_RECONCILE}%"),
        )
        .values(status=ReportStatus.PENDING, next_attempt_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    if client_id is not None:
        statement = statement.where(UnitReport.client_id == client_id)
    return db.session.execute(statement).rowcount


def backoff_delay(attempts: int) -> dt.timedelta:
    """Return the wait before attempt ``attempts + 1``: exponential, capped, with 50-100 % jitter."""
    exponent = min(max(attempts, 1) - 1, 16)
    ceiling = min(BACKOFF_BASE * (2**exponent), BACKOFF_CAP)
    return ceiling * random.uniform(0.5, 1.0)


# ---- claiming -------------------------------------------------------------------------------------------


# Claims of several schedulers take turns on PostgreSQL (a transaction-level advisory lock, held for the
# claim's few milliseconds). The round-robin choice below ranks every due row with a window function, which
# cannot skip rows another claim has locked: without turns, a second scheduler chose the same rows, found
# them locked, took its empty claim for "nothing due" and stopped. Taking turns, it sees the first claim's
# leases and chooses among the rows still due. Stripe is called after the claim commits, so schedulers
# still send in parallel. The key is Rebill's own ("RBCL"; core.leader_lock takes "RBHK").
CLAIM_LOCK_KEY = 0x5242434C


def _serialise_claims() -> None:
    if is_postgresql():
        db.session.execute(select(func.pg_advisory_xact_lock(CLAIM_LOCK_KEY)))


def _claim_batch(clock: _TickClock, result: ReportingResult) -> list[_Claim]:
    """Lease up to CLAIM_BATCH due rows, round-robin across agencies with a working key, and commit.

    One read of the due rows with their clients (locked on PostgreSQL, skipping rows another tick holds; on
    SQLite this transaction is the writer from the start), then the leases, attempt counts and first-offer
    targets written row by row in one executemany, and the rows not sent now (future timestamp, client
    incomplete, quarantined) likewise.
    """
    now = clock.now()
    take_write_lock()
    _serialise_claims()
    due = (
        _REPORT.c.status == ReportStatus.PENDING,
        _REPORT.c.next_attempt_at <= clock.start,
        _REPORT.c.agency_id.in_(select(Agency.id).where(Agency.stripe_key_status == "ok")),
    )
    # Each agency's oldest due row first, then each one's second...: a backlog of one agency fills a batch
    # only when no other agency has rows due.
    ranked = (
        select(
            _REPORT.c.id, func.row_number().over(partition_by=_REPORT.c.agency_id, order_by=_REPORT.c.id).label("turn")
        )
        .where(*due)
        .subquery()
    )
    chosen = select(ranked.c.id).order_by(ranked.c.turn, ranked.c.id).limit(CLAIM_BATCH)
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
    if not rows:
        db.session.rollback()
        return []
    claims, writes = [], []
    for row in rows:
        try:
            claim = _prepare(row, now, result, writes)
        except Exception as error:  # one bad row never stops the batch (rule 8)
            log.exception("report quarantined", extra={"fields": {"report_id": row.id}})
            writes.append(_quarantine_values(row.id, row.attempts + 1, now, f"{type(error).__name__}: {error}"))
            writes[-1]["failed_attempts"] = row.failed_attempts + 1
            result.reports_quarantined += 1
            continue
        if claim is not None:
            claims.append(claim)
            writes.append(_claim_values(claim, row, now))
    _write_rows(writes)
    db.session.commit()
    return claims


def _prepare(row, now: dt.datetime, result: ReportingResult, writes: list[dict]) -> _Claim | None:
    """Decide what to do with a due row: a claim to send now, or the row's new values in ``writes``."""
    keep_target = row.target_mode is not None and (row.in_doubt_since is not None or row.units_confirmed > 0)
    if not keep_target:
        if row.usage_timestamp > now:
            writes.append({"b_id": row.id, "next_attempt_at": row.usage_timestamp})  # never a future timestamp
            result.reports_deferred += 1
            return None
        problem = _client_problem(row)
        if problem:
            writes.append({"b_id": row.id, "status": ReportStatus.FAILED, "last_error": problem})
            result.reports_failed += 1
            return None
        fresh = _Claim(
            report_id=row.id,
            agency_id=row.agency_id,
            identifier=row.identifier,
            units=row.units,
            units_confirmed=row.units_confirmed,
            usage_timestamp=row.usage_timestamp,
            timestamp=row.usage_timestamp,
            timestamp_shift=None,
            attempt=row.attempts + 1,
            failed_attempts=row.failed_attempts,
            previous_in_doubt_since=None,
            claimed_at=now,
            needs_check=False,
            needs_stamp=row.report_mode == "legacy" or row.usage_timestamp < now - PERIOD_CHECK_AGE,
            rest_unsent=False,
            target_changed=False,
            account=row.stripe_account_id,
            mode=row.report_mode,
            customer_id=row.stripe_customer_id,
            price_id=row.stripe_price_id,
            meter_id=row.meter_id,
            event_name=row.meter_event_name,
            customer_key=row.meter_customer_key or "stripe_customer_id",
            value_key=row.meter_value_key or "value",
            formula=row.meter_formula,
            subscription_item_id=None,
        )
        return replace(fresh, timestamp=None) if fresh.needs_stamp else fresh
    if row.target_account and row.stripe_account_id and row.target_account != row.stripe_account_id:
        writes.append(
            {
                "b_id": row.id,
                "status": ReportStatus.FAILED,
                "last_error": f"{NEEDS_RECONCILE}: first offered to Stripe account {row.target_account}, but "
                f"the agency's key now opens {row.stripe_account_id}; some units may be in the first account",
            }
        )
        result.reports_failed += 1
        return None
    timestamp = row.stripe_timestamp
    needs_check = row.in_doubt_since is not None and row.in_doubt_since <= now - DEDUPE_SAFE_AGE
    stale = timestamp is None or timestamp < now - MAX_EVENT_AGE
    if stale and row.in_doubt_since is not None and not needs_check:
        # Only Stripe's totals can tell whether the doubtful offer landed, and only once the dedupe window
        # is over; then the rest goes with a new timestamp (rule 10: never left unbillable).
        writes.append({"b_id": row.id, "next_attempt_at": row.in_doubt_since + DEDUPE_SAFE_AGE})
        result.reports_deferred += 1
        return None
    return _Claim(
        report_id=row.id,
        agency_id=row.agency_id,
        identifier=row.identifier,
        units=row.units,
        units_confirmed=row.units_confirmed,
        usage_timestamp=row.usage_timestamp,
        timestamp=timestamp,  # the one offered: the >24 h check reads Stripe's window around it
        timestamp_shift=row.timestamp_shift,
        attempt=row.attempts + 1,
        failed_attempts=row.failed_attempts,
        previous_in_doubt_since=row.in_doubt_since,
        claimed_at=now,
        needs_check=needs_check,
        needs_stamp=False,  # a doubtful row is resent as offered or settled by the check; never re-stamped
        rest_unsent=row.in_doubt_since is None,  # kept only for its confirmed count events
        target_changed=_target_changed(row),
        account=row.target_account,
        mode=row.target_mode,
        customer_id=row.target_customer,
        price_id=row.target_price,
        meter_id=row.target_meter,
        event_name=row.target_event_name,
        customer_key=row.target_customer_key or "stripe_customer_id",
        value_key=row.target_value_key or "value",
        formula=row.target_formula,
        subscription_item_id=row.target_subscription_item,
    )


def _claim_values(claim: _Claim, row, now: dt.datetime) -> dict:
    """The row's lease, attempt and, when about to be offered, its target and doubt (written before sending)."""
    values = {
        "b_id": claim.report_id,
        "next_attempt_at": now + LEASE,
        "attempts": claim.attempt,  # read under the row's lock: the claim counts exactly one attempt
        "first_attempt_at": row.first_attempt_at or now,
        "target_account": claim.account,
        "stripe_timestamp": claim.timestamp,
        "target_subscription_item": claim.subscription_item_id,
        "timestamp_shift": claim.timestamp_shift,
        **{target: getattr(claim, field) for target, field in _TARGET_FIELDS.items()},
    }
    if not (claim.needs_stamp or claim.needs_check or claim.rest_unsent):
        values["in_doubt_since"] = claim.previous_in_doubt_since or now  # offered right after this commit
    return values


_TARGET_FIELDS = {
    "target_mode": "mode",
    "target_customer": "customer_id",
    "target_price": "price_id",
    "target_meter": "meter_id",
    "target_event_name": "event_name",
    "target_customer_key": "customer_key",
    "target_value_key": "value_key",
    "target_formula": "formula",
}


def _target_changed(row) -> bool:
    """Tell whether the client's settings now send units elsewhere than the row's recorded target."""
    recorded = (row.target_mode, row.target_customer, row.target_price, row.target_event_name)
    current = (row.report_mode, row.stripe_customer_id, row.stripe_price_id, row.meter_event_name)
    return recorded != current


def _client_problem(client) -> str | None:
    """Say what is missing for sending this client's units, or None."""
    if not client.stripe_customer_id:
        return "the client has no Stripe customer; edit the client"
    if client.report_mode == "legacy":
        return None if client.stripe_price_id else "the client has no Stripe price; edit the client"
    if client.report_mode != "meter" or not (client.meter_event_name and client.meter_formula):
        return "the client's price has no usable billing meter on record; edit the client to pick a metered price"
    if client.meter_formula not in ("sum", "count"):
        return f"the client's meter formula '{client.meter_formula}' cannot carry units; pick another price"
    return None


def _quarantine_values(report_id: int, attempt: int, now: dt.datetime, problem: str) -> dict:
    """Set a row aside after an unexpected error: visible reason, retried later with backoff (rule 8)."""
    return {
        "b_id": report_id,
        "next_attempt_at": now + backoff_delay(attempt),
        "last_error": f"{QUARANTINED}: Rebill could not process this report ({problem}); retried automatically",
    }


# ---- before sending: the 24 h check and the timestamp ---------------------------------------------------


def _process_batch(
    claims: list[_Claim],
    gateways: dict[int, StripeGateway | StripeKeyRejected],
    clock: _TickClock,
    reads: TickReads,
    pool: ThreadPoolExecutor | None,
) -> list[_Outcome]:
    """Decide, record and send a batch of claims; one outcome per claim.

    Rule 8: the claims that need nothing read from Stripe (most of them) are decided at once and sent in the
    background; meanwhile the others (a billing period, the >24 h check) are read round-robin across
    agencies within the tick's read budget (billing.tick_reads), then recorded and sent. A send group (one
    customer and meter) goes whole in one of the two, in order. So one agency's slow Stripe delays no other
    agency's sends that need no read, and those that do by at most one read of each agency per tick.
    """
    by_agency: dict[int, list[_Claim]] = defaultdict(list)
    for claim in claims:
        by_agency[claim.agency_id].append(claim)
    outcomes: list[_Outcome] = []
    for agency_id in list(by_agency):
        gateway = _gateway(agency_id, gateways)
        if isinstance(gateway, StripeKeyRejected):
            agency_claims = by_agency.pop(agency_id)
            outcomes.append(_Outcome(agency_claims[0], OutcomeKind.KEY_REJECTED, gateway.reason))
            outcomes.extend(_Outcome(claim, OutcomeKind.SKIPPED) for claim in agency_claims[1:])
    stops = {agency_id: threading.Event() for agency_id in by_agency}
    with reads.cached_only():
        first = _ready_to_send(gateways, by_agency, clock, reads)
    held = {(claim.agency_id, claim.send_group) for claim in first.waiting}
    send_now = {
        agency_id: [claim for claim in ready if (agency_id, claim.send_group) not in held]
        for agency_id, ready in first.ready.items()
    }
    _record_targets(_stamped(send_now), clock.now())
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="stripe-send-unread") as background:
        if pool is not None:
            sent_first = background.submit(_send_claims, gateways, send_now, pool, clock, stops)
        else:  # one sender thread: these go first, then the reads
            outcomes.extend(_send_claims(gateways, send_now, None, clock, stops))
        waiting: dict[int, list[_Claim]] = defaultdict(list)
        for claim in first.waiting:
            waiting[claim.agency_id].append(claim)
        second = _ready_to_send(gateways, waiting, clock, reads)
        send_later: dict[int, list[_Claim]] = defaultdict(list)
        for agency_id, ready in first.ready.items():
            send_later[agency_id].extend(claim for claim in ready if (agency_id, claim.send_group) in held)
        for agency_id, ready in second.ready.items():
            send_later[agency_id].extend(ready)
        for agency_id in second.key_refused:
            outcomes.extend(_Outcome(claim, OutcomeKind.SKIPPED) for claim in send_later.pop(agency_id, []))
        for agency_id in send_later:
            send_later[agency_id].sort(key=lambda claim: claim.report_id)  # a group's rows in their order
        _record_targets(_stamped(send_later), clock.now())
        outcomes.extend(first.decided + second.decided + _send_claims(gateways, send_later, pool, clock, stops))
        if pool is not None:
            outcomes.extend(sent_first.result())
    return outcomes


def _stamped(claims_by_agency: dict[int, list[_Claim]]) -> list[_Claim]:
    """The claims whose timestamp, target and doubt are written just before their offer (not at the claim)."""
    return [claim for ready in claims_by_agency.values() for claim in ready if claim.needs_stamp or claim.rest_unsent]


def _gateway(agency_id: int, gateways: dict[int, StripeGateway | StripeKeyRejected]):
    """Return the tick's gateway for an agency (built once), or the key problem that prevents one."""
    if agency_id not in gateways:
        try:
            gateways[agency_id] = gateway_for(db.session.get(Agency, agency_id))
        except StripeKeyRejected as error:
            gateways[agency_id] = error
        db.session.rollback()
    return gateways[agency_id]


@dataclass
class _Decisions:
    """Claims ready to send (per agency), claims waiting for a Stripe read, and claims decided otherwise."""

    ready: dict[int, list[_Claim]]
    waiting: list[_Claim]
    decided: list[_Outcome]
    key_refused: set[int]


def _ready_to_send(
    gateways: dict[int, StripeGateway | StripeKeyRejected],
    claims_by_agency: dict[int, list[_Claim]],
    clock: _TickClock,
    reads: TickReads,
) -> _Decisions:
    """Run the >24 h check and the period look-up where needed, round-robin across agencies (rule 8)."""
    decisions = _Decisions(ready=defaultdict(list), waiting=[], decided=[], key_refused=set())
    for turn in itertools.zip_longest(*claims_by_agency.values()):
        for claim in turn:
            if claim is None:
                continue
            if claim.agency_id in decisions.key_refused:
                decisions.decided.append(_Outcome(claim, OutcomeKind.SKIPPED))
                continue
            try:
                decided = _decide(gateways[claim.agency_id], claim, clock.now(), reads)
            except NotCached:
                decisions.waiting.append(claim)
                continue
            except ReadDeferred:  # the tick's reads are spent, or this agency's Stripe was slow: next tick
                decided = _Outcome(claim, OutcomeKind.SKIPPED)
            except StripeUnavailable as error:  # also when this agency's reads failed earlier in the tick
                decided = _Outcome(claim, OutcomeKind.UNAVAILABLE, error.reason)
            except StripeKeyRejected as error:
                decided = _Outcome(claim, OutcomeKind.KEY_REJECTED, error.reason)
                decisions.key_refused.add(claim.agency_id)
            except StripeRequestRejected as error:
                prefix = f"{NEEDS_RECONCILE}: " if claim.needs_check else ""
                decided = _Outcome(claim, OutcomeKind.REJECTED, f"{prefix}{error.reason}")
            except Exception as error:  # rule 8: this row is set aside, the others go on
                log.exception("report quarantined", extra={"fields": {"report_id": claim.report_id}})
                decided = _Outcome(claim, OutcomeKind.QUARANTINED, f"{type(error).__name__}: {error}")
            if isinstance(decided, _Outcome):
                decisions.decided.append(decided)
            else:
                decisions.ready[claim.agency_id].append(decided)
    for agency_id in decisions.key_refused:
        decisions.decided.extend(_Outcome(claim, OutcomeKind.SKIPPED) for claim in decisions.ready.pop(agency_id, []))
    db.session.rollback()
    return decisions


def _decide(gateway: StripeGateway, claim: _Claim, now: dt.datetime, reads: TickReads) -> _Claim | _Outcome:
    """Settle a claim's doubt and timestamp: the claim to send, or what happens to it instead.

    Raises NotCached when a Stripe read is needed and not allowed now (nothing of the claim changed then).
    """
    if claim.needs_check:
        with reads.reading(claim.agency_id):
            checked = _compare_with_stripe(gateway, claim)
        if isinstance(checked, _Outcome):
            return checked
        # Stripe has none of the rest (after the first count events, which went in order): the doubt is
        # settled, and the row goes on like one whose every offer was answered.
        claim = replace(checked, needs_check=False, previous_in_doubt_since=None, rest_unsent=True)
    if claim.rest_unsent and not _rest_goes_as_recorded(gateway, claim, now, reads):
        return _Outcome(claim, OutcomeKind.UNSENT)  # to a fresh row: billing.unsent_remainder
    if claim.needs_stamp:
        return _stamp(gateway, claim, now, reads)
    return claim


def _stamp(
    gateway: StripeGateway,
    claim: _Claim,
    now: dt.datetime,
    reads: TickReads,
) -> _Claim | _Outcome:
    """Give a claim the timestamp (and legacy subscription item) its units bill on (rule 10)."""
    base, shift = claim.usage_timestamp, None
    if base < now - MAX_EVENT_AGE:
        base, shift = now, "usage older than Stripe's 35 days; billed at its first offer"
    needs_period = claim.mode == "legacy" or base < now - PERIOD_CHECK_AGE
    period = _period(gateway, claim, reads) if needs_period else None
    item = None
    if claim.mode == "legacy":
        if period is None:
            return _Outcome(
                claim,
                OutcomeKind.REJECTED,
                f"customer {claim.customer_id} has no active subscription on price {claim.price_id}",
            )
        item = period.subscription_item_id
    if period is not None and base < period.start:
        base = min(period.start, now)
        shift = (
            f"usage of {claim.usage_timestamp:%Y-%m-%d %H:%M} UTC falls before the customer's current billing "
            f"period (from {period.start:%Y-%m-%d %H:%M} UTC), whose invoice may be final; billed on the next invoice"
        )
    item = item or claim.subscription_item_id
    return replace(claim, timestamp=base, timestamp_shift=shift, subscription_item_id=item)


def _rest_goes_as_recorded(
    gateway: StripeGateway,
    claim: _Claim,
    now: dt.datetime,
    reads: TickReads,
) -> bool:
    """Tell whether a row's rest, provably not in Stripe, goes on with the recorded target and timestamp.

    Yes for the next events of a count row whose settings did not change and whose recorded timestamp still
    bills on an open invoice (rule 10). Otherwise the rest moves to a fresh row that takes the client's current
    settings and a valid timestamp, and the confirmed events keep what they went with (rule 9).
    """
    if claim.units_confirmed == 0 or claim.target_changed:
        return False
    if claim.timestamp is None or claim.timestamp < now - MAX_EVENT_AGE:
        return False
    if claim.timestamp >= now - PERIOD_CHECK_AGE:
        return True
    period = _period(gateway, claim, reads)
    return period is None or claim.timestamp >= period.start


def _period(gateway: StripeGateway, claim: _Claim, reads: TickReads) -> SubscriptionPeriod | None:
    """The customer's current period on the claim's price (read once a tick: billing.tick_reads)."""
    return reads.period(claim.agency_id, gateway, claim.customer_id, claim.price_id)


def _record_targets(claims: list[_Claim], now: dt.datetime) -> None:
    """Commit the stamped timestamps and targets, and the doubt of the coming offer, before Stripe is called."""
    _write_rows(
        [
            {
                "b_id": claim.report_id,
                "stripe_timestamp": claim.timestamp,
                "timestamp_shift": claim.timestamp_shift,
                "target_subscription_item": claim.subscription_item_id,
                "units_confirmed": claim.units_confirmed,
                "in_doubt_since": claim.previous_in_doubt_since or now,
            }
            for claim in claims
        ]
    )
    db.session.commit()


def _compare_with_stripe(gateway: StripeGateway, claim: _Claim) -> _Claim | _Outcome:
    """Settle a doubtful row from Stripe's totals for its recorded target and window.

    Returns an outcome ("delivered" or "needs reconcile"), or the claim to resend: with nothing of it extra
    in Stripe, or (count meter) after the extra events, which were sent in order, are counted as confirmed.
    """
    stamp = claim.timestamp or claim.usage_timestamp
    if claim.mode == "meter":
        if not claim.meter_id:
            return _Outcome(claim, OutcomeKind.REJECTED, f"{NEEDS_RECONCILE}: the report's meter id is unknown")
        window = gateway.meter_event_total(claim.meter_id, claim.customer_id, stamp, stamp)
        same_target = (UnitReport.target_event_name == claim.event_name,)
    else:
        item = claim.subscription_item_id or gateway.find_subscription_item(claim.customer_id, claim.price_id)
        window = gateway.usage_record_total(item, stamp) if item else None
        if window is None:
            return _Outcome(
                claim, OutcomeKind.REJECTED, f"{NEEDS_RECONCILE}: Stripe shows no usage period for this report's time"
            )
        same_target = (UnitReport.target_subscription_item == item,)
    in_window = (
        UnitReport.agency_id == claim.agency_id,
        UnitReport.id != claim.report_id,
        UnitReport.stripe_timestamp >= window.start,
        UnitReport.stripe_timestamp < window.end,
        UnitReport.target_customer == claim.customer_id,
        *same_target,
    )
    known = db.session.scalar(select(func.coalesce(func.sum(UnitReport.units_confirmed), 0)).where(*in_window))
    # Other rows in doubt from before this claim may or may not be in Stripe's total.
    unconfirmed = db.session.scalar(
        select(func.count())
        .select_from(UnitReport)
        .where(*in_window, UnitReport.in_doubt_since.is_not(None), UnitReport.in_doubt_since < claim.claimed_at)
    )
    extra = window.total - known - claim.units_confirmed
    if extra == 0:
        return claim  # Stripe has none of the rest: resending is safe (a recent copy would be deduplicated)
    if unconfirmed == 0 and extra == claim.remaining:
        return _Outcome(
            claim,
            OutcomeKind.DELIVERED,
            "confirmed from Stripe's totals after the 24 h dedupe window",
            confirmed=claim.remaining,
        )
    if unconfirmed == 0 and claim.formula == "count" and 0 < extra < claim.remaining:
        return replace(claim, units_confirmed=claim.units_confirmed + int(extra))
    return _Outcome(
        claim,
        OutcomeKind.REJECTED,
        f"{NEEDS_RECONCILE}: first offered over 24 h ago and Stripe's total for its window is {window.total} "
        f"against {known} known there (+{claim.remaining} here, {unconfirmed} other rows in doubt); not resent",
    )


# ---- sending -------------------------------------------------------------------------------------------


def _send_claims(
    gateways: dict[int, StripeGateway | StripeKeyRejected],
    claims_by_agency: dict[int, list[_Claim]],
    pool: ThreadPoolExecutor | None,
    clock: _TickClock,
    stops: dict[int, threading.Event],
) -> list[_Outcome]:
    """Send claims: in order within a customer+meter group; groups in parallel up to STRIPE_CONCURRENCY.

    Each agency's first group goes before its others, so a revoked key costs one refused call per agency,
    not one per thread; the other groups follow round-robin across agencies.
    """
    first_groups, later = [], []
    for agency_id, claims in claims_by_agency.items():
        groups: dict[tuple[str, str], list[_Claim]] = defaultdict(list)
        for claim in claims:
            groups[claim.send_group].append(claim)
        ordered = [(agency_id, group) for group in groups.values()]
        if ordered:
            first_groups.append(ordered[0])
            later.append(ordered[1:])
    other_groups = [job for turn in itertools.zip_longest(*later) for job in turn if job is not None]

    def send(job: tuple[int, list[_Claim]]) -> list[_Outcome]:
        agency_id, group = job
        return _send_group(gateways[agency_id], group, stops[agency_id], clock)

    run = pool.map if pool is not None else map
    outcomes = [outcome for group in run(send, first_groups) for outcome in group]
    return outcomes + [outcome for group in run(send, other_groups) for outcome in group]


def _send_group(
    gateway: StripeGateway, claims: Iterable[_Claim], stop: threading.Event, clock: _TickClock
) -> list[_Outcome]:
    outcomes = []
    blocked = False  # after a 429/5xx or a partial slice the rest of this customer's rows wait
    for claim in claims:
        if stop.is_set() or blocked or clock.spent():
            outcomes.append(_Outcome(claim, OutcomeKind.SKIPPED))
            continue
        outcome = _send_one(gateway, claim, clock)
        if outcome.kind == OutcomeKind.KEY_REJECTED:
            stop.set()
        blocked = outcome.kind in (OutcomeKind.UNAVAILABLE, OutcomeKind.PROGRESS)
        outcomes.append(outcome)
    return outcomes


def _send_one(gateway: StripeGateway, claim: _Claim, clock: _TickClock) -> _Outcome:
    timestamp = int(claim.timestamp.timestamp())
    confirmed = 0
    try:
        if claim.remaining < 1:
            raise ValueError(f"a report must carry at least one unit, this one has {claim.remaining}")
        if claim.mode == "legacy":
            # Legacy usage records have no identifier: the idempotency key is the dedupe (docs/stripe.md). A
            # re-stamped offer (only made when Stripe has none of it) needs its own key: Stripe refuses a key
            # reused with other parameters.
            key = claim.identifier if claim.timestamp == claim.usage_timestamp else f"{claim.identifier}@{timestamp}"
            gateway.send_usage_record(claim.subscription_item_id, claim.units, timestamp, idempotency_key=key)
            return _Outcome(claim, OutcomeKind.DELIVERED, confirmed=claim.units)
        if claim.formula == "count":
            # Events in order from the first not confirmed; the slice ends early when the budget is spent.
            last = min(claim.units, claim.units_confirmed + COUNT_EVENTS_PER_CLAIM)
            slice_ends = clock.slice_deadline(COUNT_SLICE_SHARE)
            for number in range(claim.units_confirmed + 1, last + 1):
                if confirmed and (clock.spent() or time.monotonic() >= slice_ends):
                    break
                _send_event(gateway, claim, count_event_identifier(claim.identifier, number), 1, timestamp)
                confirmed += 1
            kind = OutcomeKind.DELIVERED if confirmed == claim.remaining else OutcomeKind.PROGRESS
            return _Outcome(claim, kind, confirmed=confirmed)
        _send_event(gateway, claim, claim.identifier, claim.units, timestamp)
        return _Outcome(claim, OutcomeKind.DELIVERED, confirmed=claim.units)
    except StripeUnavailable as error:
        return _Outcome(claim, OutcomeKind.UNAVAILABLE, error.reason, confirmed, answered=False)
    except StripeKeyRejected as error:
        return _Outcome(claim, OutcomeKind.KEY_REJECTED, error.reason, confirmed)
    except StripeRequestRejected as error:
        stale = error.code in STALE_TIMESTAMP_CODES or STALE_TIMESTAMP_TEXT in error.reason
        return _Outcome(claim, OutcomeKind.STALE_TIMESTAMP if stale else OutcomeKind.REJECTED, error.reason, confirmed)
    except Exception as error:  # rule 8: this row is set aside (it may have reached Stripe), the others go on
        log.exception("report quarantined", extra={"fields": {"report_id": claim.report_id}})
        return _Outcome(claim, OutcomeKind.QUARANTINED, f"{type(error).__name__}: {error}", confirmed, answered=False)


def _send_event(gateway: StripeGateway, claim: _Claim, identifier: str, value: int, timestamp: int) -> None:
    gateway.send_meter_event(
        event_name=claim.event_name,
        customer_key=claim.customer_key,
        value_key=claim.value_key,
        customer_id=claim.customer_id,
        value=value,
        identifier=identifier,
        timestamp=timestamp,
        attempt=claim.attempt,
    )


# ---- recording -----------------------------------------------------------------------------------------


def _record_outcomes(outcomes: list[_Outcome], clock: _TickClock, result: ReportingResult) -> None:
    """Write what Stripe said and commit; flag agencies whose key Stripe refused.

    Delivered rows (nearly all of them) are marked in one UPDATE per distinct note; the rest row by row.
    ``attempts`` and ``first_attempt_at`` are never touched here (append-only history).
    """
    now = clock.now()
    delivered: dict[str | None, list[int]] = defaultdict(list)
    rows: list[dict] = []
    key_problems: dict[int, str] = {}
    for outcome in outcomes:
        claim = outcome.claim
        if outcome.kind == OutcomeKind.DELIVERED:
            delivered[outcome.reason].append(claim.report_id)
            result.reports_sent += 1
            result.units_sent += outcome.confirmed
            continue
        values = {
            "b_id": claim.report_id,
            "units_confirmed": claim.units_confirmed + outcome.confirmed,
            # This offer answered: the row's doubt is what it was before; unanswered: it is in doubt from now.
            "in_doubt_since": (claim.previous_in_doubt_since or claim.claimed_at)
            if not outcome.answered
            else claim.previous_in_doubt_since,
        }
        result.units_sent += outcome.confirmed
        if outcome.kind in (OutcomeKind.UNAVAILABLE, OutcomeKind.STALE_TIMESTAMP, OutcomeKind.QUARANTINED):
            # Not taken: one more failure in a row, or the first one after this attempt's own progress.
            values["failed_attempts"] = 1 if outcome.confirmed else claim.failed_attempts + 1
        if _moves_remainder(outcome):
            _move_remainder(outcome, clock, result)
            continue
        if outcome.kind == OutcomeKind.PROGRESS:
            # Every event of the slice answered, in order: nothing of this row is in doubt. Due again in this
            # tick (next_attempt_at <= its start), behind every other agency's rows.
            values.update(in_doubt_since=None, next_attempt_at=clock.start, last_error=None, failed_attempts=0)
        elif outcome.kind == OutcomeKind.UNAVAILABLE:
            values.update(next_attempt_at=now + backoff_delay(_failures(claim, outcome)), last_error=outcome.reason)
            result.reports_retrying += 1
        elif outcome.kind == OutcomeKind.REJECTED:
            values.update(status=ReportStatus.FAILED, last_error=outcome.reason)
            result.reports_failed += 1
        elif outcome.kind == OutcomeKind.STALE_TIMESTAMP:
            # Stripe refused the time, so this offer left nothing: re-stamped at the next offer (rule 10). If an
            # earlier offer is in doubt, the recorded time stays until the >24 h check has read Stripe's window.
            retry_at = now + backoff_delay(_failures(claim, outcome))
            if claim.previous_in_doubt_since is None:
                values["stripe_timestamp"] = None
            else:
                retry_at = max(retry_at, claim.previous_in_doubt_since + DEDUPE_SAFE_AGE)
            values.update(next_attempt_at=retry_at, last_error=outcome.reason)
            result.reports_retrying += 1
        elif outcome.kind == OutcomeKind.QUARANTINED:
            values.update(_quarantine_values(claim.report_id, claim.attempt, now, outcome.reason))
            result.reports_quarantined += 1
        else:  # key_rejected or skipped: not applied by Stripe; due again when the key works / next tick
            if outcome.kind == OutcomeKind.KEY_REJECTED:
                key_problems[claim.agency_id] = outcome.reason
            values.update(next_attempt_at=now)
            result.reports_deferred += 1
        rows.append(values)
    for reason, report_ids in delivered.items():
        db.session.execute(
            update(_REPORT)
            .where(_REPORT.c.id.in_(report_ids))
            .values(
                status=ReportStatus.SENT,
                sent_at=now,
                last_error=reason,
                units_confirmed=_REPORT.c.units,
                in_doubt_since=None,
                failed_attempts=0,
            )
        )
    _write_rows(rows)
    for agency_id, reason in key_problems.items():
        _flag_agency(db.session.get(Agency, agency_id), reason, result)
    db.session.commit()


def _moves_remainder(outcome: _Outcome) -> bool:
    """Tell whether the rest of a row provably never reached Stripe and cannot go as recorded.

    "unsent": the >24 h check or the period check decided so. A refusal (of the target or of the timestamp)
    after some count events were confirmed: every offer of the row was answered, so the refused event and
    those after it are not in Stripe, and the confirmed ones must keep the target and time they went with.
    """
    if outcome.kind == OutcomeKind.UNSENT:
        return True
    claim = outcome.claim
    confirmed = claim.units_confirmed + outcome.confirmed
    return (
        outcome.kind in (OutcomeKind.REJECTED, OutcomeKind.STALE_TIMESTAMP)
        and not (outcome.reason or "").startswith(NEEDS_RECONCILE)
        and claim.previous_in_doubt_since is None
        and outcome.answered
        and 0 < confirmed < claim.units
    )


def _move_remainder(outcome: _Outcome, clock: _TickClock, result: ReportingResult) -> None:
    """Close the row at its confirmed units and give the rest a fresh row (billing.unsent_remainder)."""
    claim, now = outcome.claim, clock.now()
    confirmed = claim.units_confirmed + outcome.confirmed
    if outcome.kind == OutcomeKind.REJECTED:  # the rest waits for the agency's fix (retry_failed_reports)
        move_unsent_remainder(
            claim.report_id, confirmed, now, due_at=now, status=ReportStatus.FAILED, reason=outcome.reason
        )
        result.reports_failed += 1
        return
    if outcome.kind == OutcomeKind.STALE_TIMESTAMP:
        due_at, reason = now + backoff_delay(_failures(claim, outcome)), outcome.reason
    else:  # offered again in this tick if the budget allows, behind every other agency's rows
        due_at, reason = clock.start, None
    move_unsent_remainder(claim.report_id, confirmed, now, due_at=due_at, reason=reason)
    result.reports_deferred += 1


def _failures(claim: _Claim, outcome: _Outcome) -> int:
    """The attempt number backoff grows with: a count-meter row that got events through is not failing.

    Every slice of a large count-meter row is an attempt; counting them would put a row that just made
    progress an hour away at its first 429.
    """
    return 1 if claim.units_confirmed or outcome.confirmed else claim.attempt


def _write_rows(rows: list[dict]) -> None:
    """Update outbox rows one by one with their own values (``b_id`` names the row), grouped by column set."""
    by_columns: dict[tuple[str, ...], list[dict]] = defaultdict(list)
    for row in rows:
        by_columns[tuple(sorted(key for key in row if key != "b_id"))].append(row)
    for columns, group in by_columns.items():
        db.session.execute(
            update(_REPORT).where(_REPORT.c.id == bindparam("b_id")).values({c: bindparam(c) for c in columns}),
            group,
        )


def _flag_agency(agency: Agency, reason: str, result: ReportingResult) -> None:
    """Stop sending for an agency whose key Stripe refused, until the agency fixes the key."""
    agency.stripe_key_status = "needs_attention"
    agency.stripe_key_problem = reason
    result.agencies_flagged += 1
    log.warning("stripe key needs attention", extra={"fields": {"agency_id": agency.id, "reason": reason}})
