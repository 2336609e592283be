"""Reporting: drain the unit outbox (UnitReport rows) into each agency's Stripe, every unit exactly once.

How a tick sends (docs/billing-rules.md rules 6-7; docs/stripe.md §1.9, §3.4, §8):

- Claim: due rows (``pending``, ``next_attempt_at <= now``, agency key ``ok``) about to be sent are leased
  in a short transaction: ``next_attempt_at = now + LEASE``, ``attempts + 1`` and ``first_attempt_at``
  (kept from the first attempt). On PostgreSQL the claim selects with ``FOR UPDATE SKIP LOCKED``; on SQLite
  the claiming transaction takes the write lock before it reads. Either way two ticks or two schedulers
  never hold the same row, and no database lock is held while Stripe is called.
- Send: after the claim is committed. Each row goes with its own deterministic identifier. Aggregation
  writes one row per client per pass, so a normal tick makes exactly one Stripe call per client with new
  units (``value = k`` on a sum meter; k events ``<identifier>-<i>`` on a count meter). A backlog (after
  an outage) is sent row by row, oldest first, never merged: merging would need a new identifier for units
  that may already sit in Stripe under the old one. Rows of one customer and meter go in order on one
  thread (Stripe allows one concurrent call per customer per meter); different customers go in parallel.
- Record: a row is marked ``sent`` only after Stripe answered, or answered "an event already exists with
  identifier" (it was delivered before). A crash between Stripe and this commit leaves the row leased;
  when the lease ends the next tick resends the same identifier and Stripe deduplicates it.
- Errors: StripeUnavailable (429/5xx/connection/timeout) → retried with exponential backoff and jitter;
  StripeKeyRejected (401/403) → the agency is flagged ``needs_attention`` and its rows are released
  untouched (no retry storm: nothing of that agency is sent until the key is fixed); StripeRequestRejected
  (unknown customer, no subscription item, no active meter…) → ``failed`` with Stripe's reason, retried
  after the agency fixes the client or the key (``retry_failed_reports``).
- Stripe deduplicates identifiers (and idempotency keys) only for ~24 h. A row first attempted more than
  DEDUPE_SAFE_AGE ago is never resent blindly: Stripe's totals for its window (meter event summaries, or
  the legacy usage-record summary) are compared with what the ledger knows was sent; Stripe having exactly
  this row's units extra → ``sent``; nothing extra → resent; anything else → ``failed`` "needs reconcile".
- Timestamps: a row older than MAX_EVENT_AGE (Stripe takes meter events up to 35 days back) fails with
  that reason; a row stamped in the future waits until its time.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import threading
import time
from collections import defaultdict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from flask import current_app
from sqlalchemy import bindparam, func, select, update

from billing.models import Agency, RebillClient, UnitReport
from billing.stripe_gateway import (
    MeterDelivery,
    StripeGateway,
    StripeGatewayError,
    StripeKeyRejected,
    StripeRequestRejected,
    StripeUnavailable,
    gateway_for,
)
from billing.units import take_write_lock
from core.database import db, is_postgresql, utcnow

log = logging.getLogger("billing.reporting")

# Longer than the slowest possible Stripe call (timeout x attempts + SDK backoff), so a lease never ends
# while its tick is still talking to Stripe; a crashed tick's rows wait this long before being resent.
LEASE = dt.timedelta(minutes=5)
# Stripe keeps identifiers "within a rolling period of at least 24 hours" (docs/stripe.md §1.3); an hour of margin.
DEDUPE_SAFE_AGE = dt.timedelta(hours=23)
# Meter events may be "within the past 35 calendar days" (docs/stripe.md §1.3); a margin for the call itself.
MAX_EVENT_AGE = dt.timedelta(days=35) - dt.timedelta(minutes=10)
TOO_OLD = (
    "earlier attempts failed and the usage is now older than Stripe accepts (35 days); one may have reached "
    "Stripe: run `rebill reconcile`"
)
BACKOFF_BASE = dt.timedelta(seconds=30)
BACKOFF_CAP = dt.timedelta(hours=1)
CLAIM_BATCH = 1000
NEEDS_RECONCILE = "needs reconcile"

_REPORT = UnitReport.__table__
_CLIENT = RebillClient.__table__
_CLAIM_REPORT_COLUMNS = tuple(
    _REPORT.c[name]
    for name in (
        "id",
        "agency_id",
        "client_id",
        "identifier",
        "units",
        "usage_timestamp",
        "attempts",
        "first_attempt_at",
    )
)
_CLAIM_CLIENT_COLUMNS = tuple(
    _CLIENT.c[name]
    for name in (
        "report_mode",
        "stripe_customer_id",
        "stripe_price_id",
        "meter_id",
        "meter_event_name",
        "meter_customer_key",
        "meter_value_key",
        "meter_formula",
        "subscription_item_id",
    )
)


@dataclass
class ReportingResult:
    """What one reporting pass did."""

    reports_sent: int = 0
    units_sent: int = 0
    reports_failed: int = 0
    reports_retrying: int = 0
    reports_deferred: int = 0
    stripe_calls: int = 0
    agencies_flagged: int = 0


@dataclass(frozen=True)
class _Claim:
    """A leased report and everything needed to send it, as plain data (sender threads never touch the DB)."""

    report_id: int
    agency_id: int
    client_id: int
    identifier: str
    units: int
    timestamp: dt.datetime
    attempt: int
    previous_first_attempt_at: dt.datetime | None  # before this claim; restored if Stripe was not reached
    needs_check: bool  # first attempted beyond Stripe's dedupe window: ask Stripe before resending
    claimed_at: dt.datetime
    report_mode: str
    customer_id: str
    price_id: str
    meter_id: str | None
    event_name: str | None
    customer_key: str | None
    value_key: str | None
    formula: str | None
    subscription_item_id: str | None

    @property
    def send_group(self) -> tuple[str, str]:
        """Rows sharing a customer and meter (or subscription item) are sent one after another."""
        return self.customer_id, (self.event_name or "") if self.report_mode == "meter" else self.price_id


@dataclass(frozen=True)
class _Outcome:
    """What happened to one claim: delivered | unavailable | rejected | key_rejected | skipped."""

    claim: _Claim
    kind: str
    reason: str | None = None
    delivery: MeterDelivery | None = None
    subscription_item_id: str | None = None


class _TickClock:
    """The tick's notion of now: the caller's ``now`` advanced by the real time elapsed since the start."""

    def __init__(self, now: dt.datetime | None):
        self._start = now or utcnow()
        self._monotonic = time.monotonic()

    def now(self) -> dt.datetime:
        return self._start + dt.timedelta(seconds=time.monotonic() - self._monotonic)

    @property
    def start(self) -> dt.datetime:
        return self._start


def report_pending_units(now: dt.datetime | None = None) -> ReportingResult:
    """Send every due unit report to Stripe; commits its own short transactions (a job, not a service)."""
    clock = _TickClock(now)
    result = ReportingResult()
    gateways: dict[int, StripeGateway | StripeKeyRejected] = {}
    workers = current_app.config["STRIPE_CONCURRENCY"]
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="stripe-send") as pool:
            while claims := _claim_batch(clock, result):
                outcomes = _process_batch(claims, gateways, clock, pool if workers > 1 else None)
                _record_outcomes(outcomes, clock, result)
    finally:
        result.stripe_calls = sum(g.calls for g in gateways.values() if isinstance(g, StripeGateway))
    return result


def retry_failed_reports(agency: Agency, client_id: int | None = None) -> int:
    """Make the agency's failed reports (of one client, or all) due again; return how many. Flushes only.

    Call it after the agency fixed what Stripe refused (client edited, key reconnected). Rows whose earlier
    attempts are older than Stripe's dedupe window are still checked against Stripe before any resend.
    "Needs reconcile" rows stay failed: their units may already be in Stripe, and after an edit the check
    would look at the new customer or meter, so only a person who reconciled may release them.
    """
    statement = (
        update(UnitReport)
        .where(
            UnitReport.agency_id == agency.id,
            UnitReport.status == "failed",
            UnitReport.last_error.not_like(f"{NEEDS_RECONCILE}%"),
        )
        .values(status="pending", next_attempt_at=utcnow())
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


def _claim_batch(clock: _TickClock, result: ReportingResult) -> list[_Claim]:
    """Lease up to CLAIM_BATCH due rows (agencies with a working key) and commit before Stripe is called.

    Three statements per batch, whatever its size: one read of the due rows with their clients (locked on
    PostgreSQL, skipping rows another tick holds; on SQLite this transaction is the writer from the start),
    one UPDATE leasing the rows about to be sent and counting the attempt, and one for the few rows not sent
    now (future timestamp, too old, client incomplete). Each sent row gets one new version here, not two.
    """
    now = clock.now()
    take_write_lock()
    due = (
        select(*_CLAIM_REPORT_COLUMNS, *_CLAIM_CLIENT_COLUMNS)
        .join_from(_REPORT, _CLIENT, _CLIENT.c.id == _REPORT.c.client_id)
        .where(
            _REPORT.c.status == "pending",
            _REPORT.c.next_attempt_at <= clock.start,
            _REPORT.c.agency_id.in_(select(Agency.id).where(Agency.stripe_key_status == "ok")),
        )
        .order_by(_REPORT.c.id)
        .limit(CLAIM_BATCH)
    )
    if is_postgresql():
        # Rows another tick is claiming right now are skipped, not waited for; client and agency rows are
        # not locked. A row locked here is re-checked against the conditions in its newest version.
        due = due.with_for_update(skip_locked=True, of=_REPORT)
    rows = db.session.execute(due).all()
    if not rows:
        db.session.rollback()
        return []
    claims, held = [], []
    for row in rows:
        claim = _prepare(row, now, result, held)
        if claim is not None:
            claims.append(claim)
    if claims:
        db.session.execute(
            update(_REPORT)
            .where(_REPORT.c.id.in_([claim.report_id for claim in claims]))
            .values(
                next_attempt_at=now + LEASE,
                attempts=_REPORT.c.attempts + 1,
                first_attempt_at=func.coalesce(_REPORT.c.first_attempt_at, now),
            )
        )
    _write_rows(held)
    db.session.commit()
    return claims


def _process_batch(
    claims: list[_Claim],
    gateways: dict[int, StripeGateway | StripeKeyRejected],
    clock: _TickClock,
    pool: ThreadPoolExecutor | None,
) -> list[_Outcome]:
    """Check old attempts, then send a batch of claims; return one outcome per claim."""
    by_agency: dict[int, list[_Claim]] = defaultdict(list)
    for claim in claims:
        by_agency[claim.agency_id].append(claim)
    outcomes: list[_Outcome] = []
    sendable: dict[int, list[_Claim]] = {}
    for agency_id, agency_claims in by_agency.items():
        gateway = _gateway(agency_id, gateways)
        if isinstance(gateway, StripeKeyRejected):
            outcomes.append(_Outcome(agency_claims[0], "key_rejected", gateway.reason))
            outcomes.extend(_Outcome(claim, "skipped") for claim in agency_claims[1:])
            continue
        checked = _check_old_attempts(gateway, agency_claims, clock)
        outcomes.extend(checked.values())
        if any(outcome.kind == "key_rejected" for outcome in checked.values()):
            outcomes.extend(_Outcome(c, "skipped") for c in agency_claims if c.report_id not in checked)
            continue
        sendable[agency_id] = [claim for claim in agency_claims if claim.report_id not in checked]
    return outcomes + _send_claims(gateways, sendable, pool)


def _gateway(agency_id: int, gateways: dict[int, StripeGateway | StripeKeyRejected]):
    """Return the tick's gateway for an agency (built once), or the key problem that prevents one."""
    if agency_id not in gateways:
        try:
            gateways[agency_id] = gateway_for(db.session.get(Agency, agency_id))
        except StripeKeyRejected as error:
            gateways[agency_id] = error
        db.session.rollback()
    return gateways[agency_id]


def _prepare(row, now: dt.datetime, result: ReportingResult, held: list[dict]) -> _Claim | None:
    """Decide what to do with a leased row: a claim to send now, or the row's new values in ``held``."""
    if row.usage_timestamp > now:
        held.append({"b_id": row.id, "next_attempt_at": row.usage_timestamp})  # never send a future timestamp
        result.reports_deferred += 1
        return None
    timestamp = row.usage_timestamp
    if timestamp < now - MAX_EVENT_AGE:
        if row.first_attempt_at is not None:
            held.append({"b_id": row.id, "status": "failed", "last_error": f"{NEEDS_RECONCILE}: {TOO_OLD}"})
            result.reports_failed += 1
            return None
        # Logged but never offered to Stripe (a key problem or outage that lasted weeks, or usage that
        # arrived already that old): none of it can be in Stripe, so bill it now rather than lose it.
        timestamp = now
        held.append({"b_id": row.id, "usage_timestamp": now})
    problem = _client_problem(row)
    if problem:
        held.append({"b_id": row.id, "status": "failed", "last_error": problem})
        result.reports_failed += 1
        return None
    previous_first = row.first_attempt_at
    return _Claim(
        report_id=row.id,
        agency_id=row.agency_id,
        client_id=row.client_id,
        identifier=row.identifier,
        units=row.units,
        timestamp=timestamp,
        attempt=row.attempts + 1,  # counted by _claim_batch's UPDATE, under the row's lock
        previous_first_attempt_at=previous_first,
        needs_check=previous_first is not None and previous_first <= now - DEDUPE_SAFE_AGE,
        claimed_at=now,
        report_mode=row.report_mode,
        customer_id=row.stripe_customer_id,
        price_id=row.stripe_price_id,
        meter_id=row.meter_id,
        event_name=row.meter_event_name,
        customer_key=row.meter_customer_key,
        value_key=row.meter_value_key,
        formula=row.meter_formula,
        subscription_item_id=row.subscription_item_id,
    )


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


# ---- the 24 h rule -------------------------------------------------------------------------------------


def _check_old_attempts(gateway: StripeGateway, claims: list[_Claim], clock: _TickClock) -> dict[int, _Outcome]:
    """Ask Stripe about rows first attempted beyond the dedupe window; return outcomes for rows not to resend."""
    outcomes: dict[int, _Outcome] = {}
    for claim in claims:
        if not claim.needs_check:
            continue
        if outcomes and any(o.kind == "key_rejected" for o in outcomes.values()):
            outcomes[claim.report_id] = _Outcome(claim, "skipped")
            continue
        try:
            verdict = _compare_with_stripe(gateway, claim)
        except StripeUnavailable as error:
            outcomes[claim.report_id] = _Outcome(claim, "unavailable", error.reason)
        except StripeKeyRejected as error:
            outcomes[claim.report_id] = _Outcome(claim, "key_rejected", error.reason)
        except StripeRequestRejected as error:
            outcomes[claim.report_id] = _Outcome(claim, "rejected", f"{NEEDS_RECONCILE}: {error.reason}")
        else:
            if verdict is not None:
                outcomes[claim.report_id] = verdict
    db.session.rollback()
    return outcomes


def _compare_with_stripe(gateway: StripeGateway, claim: _Claim) -> _Outcome | None:
    """Return "delivered" or "needs reconcile" from Stripe's totals, or None when resending is safe."""
    if claim.report_mode == "meter":
        if not claim.meter_id:
            return _Outcome(claim, "rejected", f"{NEEDS_RECONCILE}: the client's meter id is unknown")
        window = gateway.meter_event_total(claim.meter_id, claim.customer_id, claim.timestamp, claim.timestamp)
        same_target = (RebillClient.meter_event_name == claim.event_name,)
    else:
        item = claim.subscription_item_id or gateway.find_subscription_item(claim.customer_id, claim.price_id)
        window = gateway.usage_record_total(item, claim.timestamp) if item else None
        if window is None:
            return _Outcome(
                claim, "rejected", f"{NEEDS_RECONCILE}: Stripe shows no usage period for this report's time"
            )
        same_target = (RebillClient.stripe_price_id == claim.price_id,)
    in_window = (
        UnitReport.agency_id == claim.agency_id,
        UnitReport.id != claim.report_id,
        UnitReport.usage_timestamp >= window.start,
        UnitReport.usage_timestamp < window.end,
        RebillClient.stripe_customer_id == claim.customer_id,
        *same_target,
    )
    sent = db.session.scalar(
        select(func.coalesce(func.sum(UnitReport.units), 0))
        .join(RebillClient, RebillClient.id == UnitReport.client_id)
        .where(*in_window, UnitReport.status == "sent")
    )
    # Other rows attempted before this claim and not confirmed may or may not be in Stripe's total.
    unconfirmed = db.session.scalar(
        select(func.count())
        .select_from(UnitReport)
        .join(RebillClient, RebillClient.id == UnitReport.client_id)
        .where(*in_window, UnitReport.status != "sent", UnitReport.first_attempt_at < claim.claimed_at)
    )
    extra = window.total - sent
    if extra == 0:
        return None  # Stripe has none of it: resending is safe (a recent copy would be deduplicated anyway)
    if extra == claim.units and unconfirmed == 0:
        return _Outcome(claim, "delivered", "confirmed from Stripe's totals after the 24 h dedupe window")
    return _Outcome(
        claim,
        "rejected",
        f"{NEEDS_RECONCILE}: first sent over 24 h ago and Stripe's total for its window is {window.total} "
        f"against {sent} known sent (+{claim.units} here, {unconfirmed} other unconfirmed); not resent",
    )


# ---- sending -------------------------------------------------------------------------------------------


def _send_claims(
    gateways: dict[int, StripeGateway | StripeKeyRejected],
    claims_by_agency: dict[int, list[_Claim]],
    pool: ThreadPoolExecutor | None,
) -> list[_Outcome]:
    """Send claims: in order within a customer+meter group; groups in parallel up to STRIPE_CONCURRENCY.

    Each agency's first group goes before its others, so a revoked key costs one refused call per agency,
    not one per thread.
    """
    first_groups, other_groups = [], []
    stops = {agency_id: threading.Event() for agency_id in claims_by_agency}
    for agency_id, claims in claims_by_agency.items():
        groups: dict[tuple[str, str], list[_Claim]] = defaultdict(list)
        for claim in claims:
            groups[claim.send_group].append(claim)
        ordered = list(groups.values())
        if not ordered:
            continue
        first_groups.append((agency_id, ordered[0]))
        other_groups.extend((agency_id, group) for group in ordered[1:])

    def send(job: tuple[int, list[_Claim]]) -> list[_Outcome]:
        agency_id, group = job
        return _send_group(gateways[agency_id], group, stops[agency_id])

    run = pool.map if pool is not None else map
    outcomes = [outcome for group in run(send, first_groups) for outcome in group]
    return outcomes + [outcome for group in run(send, other_groups) for outcome in group]


def _send_group(gateway: StripeGateway, claims: Iterable[_Claim], stop: threading.Event) -> list[_Outcome]:
    outcomes = []
    blocked = False  # after a 429/5xx the rest of this customer's rows wait for the next tick
    for claim in claims:
        if stop.is_set() or blocked:
            outcomes.append(_Outcome(claim, "skipped"))
            continue
        outcome = _send_one(gateway, claim)
        if outcome.kind == "key_rejected":
            stop.set()
        blocked = outcome.kind == "unavailable"
        outcomes.append(outcome)
    return outcomes


def _send_one(gateway: StripeGateway, claim: _Claim) -> _Outcome:
    timestamp = int(claim.timestamp.timestamp())
    try:
        if claim.report_mode == "legacy":
            item = claim.subscription_item_id or gateway.find_subscription_item(claim.customer_id, claim.price_id)
            if item is None:
                return _Outcome(
                    claim,
                    "rejected",
                    f"customer {claim.customer_id} has no active subscription on price {claim.price_id}",
                )
            # Legacy usage records have no identifier: the idempotency key is the dedupe (docs/stripe.md §2.1).
            gateway.send_usage_record(item, claim.units, timestamp, idempotency_key=claim.identifier)
            return _Outcome(claim, "delivered", subscription_item_id=item)
        delivery = gateway.send_meter_units(
            event_name=claim.event_name,
            customer_key=claim.customer_key or "stripe_customer_id",
            value_key=claim.value_key or "value",
            customer_id=claim.customer_id,
            units=claim.units,
            identifier=claim.identifier,
            timestamp=timestamp,
            formula=claim.formula,
            attempt=claim.attempt,
        )
        return _Outcome(claim, "delivered", delivery=delivery)
    except StripeUnavailable as error:
        return _Outcome(claim, "unavailable", error.reason)
    except StripeKeyRejected as error:
        return _Outcome(claim, "key_rejected", error.reason)
    except StripeRequestRejected as error:
        return _Outcome(claim, "rejected", error.reason)
    except StripeGatewayError as error:  # pragma: no cover - the three kinds above are exhaustive
        return _Outcome(claim, "unavailable", error.reason)


# ---- recording -----------------------------------------------------------------------------------------


def _record_outcomes(outcomes: list[_Outcome], clock: _TickClock, result: ReportingResult) -> None:
    """Write what Stripe said and commit; flag agencies whose key Stripe refused.

    Delivered rows (nearly all of them) are marked in one UPDATE per distinct note; the rest row by row.
    """
    now = clock.now()
    delivered: dict[str | None, list[int]] = defaultdict(list)
    other_rows: list[dict] = []
    key_problems: dict[int, str] = {}
    found_items: dict[int, str] = {}
    for outcome in outcomes:
        claim = outcome.claim
        if outcome.kind == "delivered":
            delivered[outcome.reason].append(claim.report_id)
            result.reports_sent += 1
            result.units_sent += claim.units
            if outcome.subscription_item_id and outcome.subscription_item_id != claim.subscription_item_id:
                found_items[claim.client_id] = outcome.subscription_item_id
        elif outcome.kind == "unavailable":
            other_rows.append(
                {
                    "b_id": claim.report_id,
                    "next_attempt_at": now + backoff_delay(claim.attempt),
                    "last_error": outcome.reason,
                }
            )
            result.reports_retrying += 1
        elif outcome.kind == "rejected":
            other_rows.append({"b_id": claim.report_id, "status": "failed", "last_error": outcome.reason})
            result.reports_failed += 1
        else:  # key_rejected or skipped: Stripe did not apply it, so undo the claim as if never attempted
            if outcome.kind == "key_rejected":
                key_problems[claim.agency_id] = outcome.reason
            other_rows.append(
                {
                    "b_id": claim.report_id,
                    "attempts": claim.attempt - 1,
                    "first_attempt_at": claim.previous_first_attempt_at,
                    "next_attempt_at": now,
                }
            )
            result.reports_deferred += 1
    for reason, report_ids in delivered.items():
        db.session.execute(
            update(_REPORT).where(_REPORT.c.id.in_(report_ids)).values(status="sent", sent_at=now, last_error=reason)
        )
    _write_rows(other_rows)
    for client_id, item in found_items.items():
        client = db.session.get(RebillClient, client_id)
        if client is not None and not client.subscription_item_id:
            client.subscription_item_id = item
    for agency_id, reason in key_problems.items():
        _flag_agency(db.session.get(Agency, agency_id), reason, result)
    db.session.commit()


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
