"""Reporting: drain the unit outbox (UnitReport rows) into each agency's Stripe, every unit exactly once.

A tick claims due rows (billing.report_claims), checks, stamps and sends them (billing.report_sending), and
records what Stripe said (here).

How a tick sends (docs/billing-rules.md rules 6-10; docs/stripe.md):

- Claim: due rows (``pending``, ``next_attempt_at <=`` the tick's start, agency key ``ok``) are leased in a
  short transaction: ``next_attempt_at = now + LEASE`` and the attempt counted (``attempts + 1``,
  ``first_attempt_at`` kept from the first). Attempt history is append-only: nothing lowers ``attempts`` or
  clears ``first_attempt_at``. Rows are taken round-robin across agencies (each agency's longest-due row,
  then each agency's second...), so one agency's backlog never pushes another's rows out of a batch; the
  choice reads a few index entries per agency, never every due row (billing.report_claims). On
  PostgreSQL the claim locks with ``FOR UPDATE SKIP LOCKED``; on SQLite the claiming transaction takes the
  write lock before it reads. Two ticks never hold the same row; no database lock is held while Stripe is
  called.
- Target (rule 9): a row's first offer records where it goes (a billing.stripe_target.StripeTarget: the
  agency's Stripe account, meter event name and payload keys or legacy subscription item, customer, price) and
  its timestamp in the row, committed before Stripe is called. While any of its units may be in Stripe
  (``in_doubt_since`` set, or some count-meter events confirmed) every retry, the >24 h check and reconcile
  use that record, never the client's current settings. Once Stripe answered every offer with a refusal, none
  of it is in Stripe and the next offer records the client's (fixed) settings afresh. A count-meter row whose
  confirmed events are in Stripe and whose rest provably is not (every offer answered) goes on with the
  recorded target and timestamp only while the client's settings are unchanged and the timestamp still bills
  on an open invoice; when Stripe refuses the rest, or those no longer hold, or the >24 h check settled the
  rest, the row is closed at its confirmed units and the rest moves to a fresh row (billing.unsent_remainder)
  that is offered like a new one.
- Timestamp (rule 10): the usage time, unless it lies before the customer's current billing period (whose
  previous invoice may be finalized: usage stamped there is billed nowhere, or refused for legacy usage
  records) or beyond Stripe's 35 days; then the start of the current period (or now), and the row says so
  in ``timestamp_shift``. Usage younger than PERIOD_CHECK_AGE is sent as is without asking Stripe: it lies in
  the current period or in the previous one's finalization grace (an hour by default).
- Send: rows of one customer and meter go in order on one thread (Stripe allows one concurrent call per
  customer per meter); different customers go in parallel. Across schedulers, a claim holds the clients it
  took rows of until its batch is recorded, or its tick fails (once its sends are joined), or its process
  dies (then at most its LEASE; client_send_lease): other schedulers pass their rows over meanwhile. A sum
  meter gets one event of value k, a legacy price one usage record of k. A count meter gets k events
  ``<identifier>-<n>``, at most COUNT_EVENTS_PER_CLAIM per claim, and the row records how many Stripe
  confirmed (``units_confirmed``), so a resend, a crash or a lease expiry resumes after the last confirmed
  event, and a huge row goes back in line between slices instead of holding the tick.
- Budget (rule 8): a tick stops claiming and sending when its time budget is spent (a call in flight is
  finished) and leaves the rest, untouched, for the next tick. Reads before sending (a billing period, the
  >24 h check) never hold up reports that need none: those are sent first, in the background, while the
  reads go round-robin across agencies within a share of the budget; an agency whose read failed or was slow
  is not read again in that tick, and its reports that need a read back off (billing.tick_reads). An
  unexpected error on one row quarantines that row (visible reason, retried with backoff); the tick goes on.
- Record: a row is ``sent`` only after Stripe answered, or answered "an event already exists with
  identifier" (delivered before). A crash before this commit leaves the row leased and in doubt; after the
  lease the same identifiers go again and Stripe deduplicates them (~24 h). A row in doubt is resent with
  its recorded timestamp only while that still bills on an open invoice (the test the rest of a count row
  passes); once a period rollover left it behind, it waits for the >24 h check instead
  (docs/billing-rules.md#in-doubt-across-a-period-rollover).
- Errors: StripeUnavailable (429/5xx/connection/timeout) → retried with exponential backoff and jitter;
  StripeKeyRejected (401/403) → the agency is flagged ``needs_attention`` and its rows wait for the key;
  StripeRequestRejected (unknown customer, no subscription item, no active meter…) → ``failed`` with
  Stripe's reason, re-offered after the agency fixes the client or key (``retry_failed_reports``); a
  refused timestamp (before the current period, older than 35 days) is re-stamped and re-offered at once.
- Past Stripe's ~24 h dedupe window a row in doubt is never resent blindly: Stripe's totals for its target
  and window (meter event summaries, or the legacy usage-record summary) are compared with what the ledger
  knows is there; exactly this row's missing units extra, no other row of the window in doubt → delivered;
  nothing extra while nothing else of a meter window is confirmed (a neighbour's 2xx may since have been
  rejected, hiding this row's units) → the rest is provably unsent, but may have reached Stripe and been
  rejected later under identifiers Stripe still holds, so it never goes again under them: a row with nothing
  confirmed is re-opened under a fresh identifier and offered afresh to the client's current target with a
  valid timestamp, a count row's rest moves to a fresh row (docs/billing-rules.md#fresh-identifiers); so
  does a sum-meter row whose window total is below its own units, whatever its neighbours (its one event, had
  it landed, would be all there: docs/billing-rules.md#in-doubt-across-a-period-rollover); anything else →
  ``failed`` "needs reconcile".
- Meter errors (billing.meter_errors) may flag a row while a tick holds it: every outcome is written only to
  a row still ``pending`` under the identifier the claim offered, so the flag stands.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

from flask import current_app
from sqlalchemy import bindparam, select, update

from billing.aggregation_store import take_write_lock
from billing.models import Agency, UnitReport
from billing.report_claims import (
    DEDUPE_SAFE_AGE,
    NEEDS_RECONCILE,
    STILL_CLAIMED,
    Claim,
    ReportingResult,
    TickClock,
    backoff_delay,
    claim_batch,
    claim_params,
    due_again,
    quarantine_values,
    release_clients,
    release_holds_of_ended_threads,
    release_own_holds,
    sender_name,
    write_rows,
)
from billing.report_sending import Outcome, process_batch
from billing.states import OutcomeKind, ReportStatus
from billing.stripe_gateway import (
    StripeGateway,
    StripeKeyRejected,
)
from billing.tick_reads import TickReads
from billing.unsent_remainder import move_unsent_remainder
from core.database import db, utcnow

log = logging.getLogger("billing.reporting")

# Share of the scheduler interval a tick's reporting may take (the rest is aggregation and slack).
BUDGET_SHARE = 0.75
# Agencies' Stripe gateways a tick keeps between batches (~5.5 KB each, bench/README.md): beyond them, those of
# agencies not in the batch just sent are dropped, so a tick's memory does not grow with the agencies it serves.
GATEWAYS_KEPT = 1000

_REPORT = UnitReport.__table__


def report_pending_units(now: dt.datetime | None = None, budget: dt.timedelta | None = None) -> ReportingResult:
    """Send due unit reports to Stripe within a time budget; commits its own transactions (a job, not a service).

    ``budget`` defaults to BUDGET_SHARE of the scheduler interval; what is left goes next tick.
    """
    config = current_app.config
    if budget is None:
        budget = dt.timedelta(seconds=config["REBILL_TICK_SECONDS"] * BUDGET_SHARE)
    clock = TickClock(now, budget)
    reads = TickReads(budget.total_seconds())
    result = ReportingResult()
    gateways: dict[int, StripeGateway | StripeKeyRejected] = {}
    calls_of_dropped_gateways = 0
    resume: dict = {}  # where each agency's next claim starts (billing.report_claims._choose_due_rows)
    workers = config["STRIPE_CONCURRENCY"]
    release_holds_of_ended_threads()
    db.session.commit()
    try:
        try:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="stripe-send") as pool:
                # At least one batch per tick, so every agency with rows due makes progress whatever the budget.
                while claims := claim_batch(clock, result, resume):
                    outcomes = process_batch(claims, gateways, clock, reads, pool if workers > 1 else None, workers)
                    _record_outcomes(outcomes, clock, result)
                    for claim in claims:  # a count slice's progress, a re-opened row: due again at the tick's start
                        due_again(resume, claim.agency_id, clock.start, claim.report_id)
                    calls_of_dropped_gateways += _drop_gateways(gateways, keep={claim.agency_id for claim in claims})
                    if clock.spent():
                        break
        except BaseException:
            _release_holds_after_failure()
            raise
        result.budget_spent = clock.spent()
    finally:
        result.stripe_calls = calls_of_dropped_gateways + sum(
            g.calls for g in gateways.values() if isinstance(g, StripeGateway)
        )
    return result


def _release_holds_after_failure() -> None:
    """A tick failed between a claim and its record: let the next tick (another thread) have its clients now.

    Runs after the send pools were joined (``with`` exits), so nothing of the failed batch is in flight; its
    claimed rows keep their lease, only the clients' other rows become claimable again.
    """
    try:
        db.session.rollback()
        release_own_holds()
        db.session.commit()
    except Exception:  # the tick's own error is the one to raise; the holds then end with their LEASE
        log.exception("could not release the failed tick's client holds")
        db.session.rollback()


def _drop_gateways(gateways: dict[int, StripeGateway | StripeKeyRejected], keep: set[int]) -> int:
    """Bound the gateways a tick holds (~5.5 KB each): past GATEWAYS_KEPT, drop those of agencies not in ``keep``.

    Returns the Stripe calls the dropped ones made, for the tick's count. An agency whose gateway was dropped
    gets a new one if a later batch has its rows; one whose key was refused is flagged by then and has no more
    rows due in this tick.
    """
    if len(gateways) <= GATEWAYS_KEPT:
        return 0
    calls = 0
    for agency_id in [agency_id for agency_id in gateways if agency_id not in keep]:
        gateway = gateways.pop(agency_id)
        if isinstance(gateway, StripeGateway):
            calls += gateway.calls
    return calls


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


def _record_outcomes(outcomes: list[Outcome], clock: TickClock, result: ReportingResult) -> None:
    """Write what Stripe said and commit; flag agencies whose key Stripe refused.

    Delivered rows (nearly all of them) are marked in one executemany; the rest row by row.
    ``attempts`` and ``first_attempt_at`` are never touched here (append-only history).
    Every write applies only to a row its claim still holds (STILL_CLAIMED): pending under the identifier the
    claim offered, and not claimed again since. A meter error may have flagged it meanwhile (billing.meter_errors:
    failed, or re-opened under a fresh identifier), and what this offer got must not overwrite that
    (docs/billing-rules.md#meter-errors-stripe-reports-later); a tick stalled past its lease must not overwrite
    the newer outcome of the tick that claimed the row after it.
    """
    now = clock.now()
    delivered: dict[str | None, list[dict]] = defaultdict(list)  # claim_params by note
    rows: list[dict] = []
    key_problems: dict[int, str] = {}
    for outcome in outcomes:
        claim = outcome.claim
        if outcome.kind == OutcomeKind.DELIVERED:
            delivered[outcome.reason].append(claim_params(claim))
            result.reports_sent += 1
            result.units_sent += outcome.confirmed
            continue
        values = {
            **claim_params(claim),
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
        elif outcome.kind == OutcomeKind.AWAITS_CHECK:
            # Not offered: the >24 h check settles it, as a row in doubt too old to resend (report_claims._prepare).
            values.update(next_attempt_at=claim.previous_in_doubt_since + DEDUPE_SAFE_AGE)
            result.reports_deferred += 1
        elif outcome.kind == OutcomeKind.QUARANTINED:
            values.update(quarantine_values(claim.report_id, claim.attempt, now, outcome.reason))
            result.reports_quarantined += 1
        else:  # key_rejected or skipped: not applied by Stripe; due again when the key works / next tick
            if outcome.kind == OutcomeKind.KEY_REJECTED:
                key_problems[claim.agency_id] = outcome.reason
            values.update(next_attempt_at=now)
            result.reports_deferred += 1
        rows.append(values)
    if delivered:
        # Confirmed whole: units_confirmed is read from the row, so this is not write_rows.
        columns = ("status", "sent_at", "last_error", "in_doubt_since", "failed_attempts")
        db.session.execute(
            update(_REPORT)
            .where(*STILL_CLAIMED)
            .values({**{column: bindparam(column) for column in columns}, "units_confirmed": _REPORT.c.units}),
            [
                {**params, "status": ReportStatus.SENT, "sent_at": now, "last_error": reason}
                | {"in_doubt_since": None, "failed_attempts": 0}
                for reason, claimed in delivered.items()
                for params in claimed
            ],
        )
    write_rows(rows, claimed=True)
    for agency_id, reason in key_problems.items():
        _flag_agency(db.session.get(Agency, agency_id), reason, result)
    release_clients([outcome.claim for outcome in outcomes], sender_name())  # nothing of theirs in flight now
    db.session.commit()


def _moves_remainder(outcome: Outcome) -> bool:
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


def _move_remainder(outcome: Outcome, clock: TickClock, result: ReportingResult) -> None:
    """Close the row at its confirmed units and give the rest a fresh row (billing.unsent_remainder).

    Nothing is moved when a meter error flagged the row since the claim (see _record_outcomes).
    """
    claim, now = outcome.claim, clock.now()
    take_write_lock()
    still_claimed = db.session.scalar(
        select(_REPORT.c.id).where(*STILL_CLAIMED).with_for_update().params(**claim_params(claim))
    )
    if still_claimed is None:
        return
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


def _failures(claim: Claim, outcome: Outcome) -> int:
    """The attempt number backoff grows with: a count-meter row that got events through is not failing.

    Every slice of a large count-meter row is an attempt; counting them would put a row that just made
    progress an hour away at its first 429.
    """
    return 1 if claim.units_confirmed or outcome.confirmed else claim.attempt


def _flag_agency(agency: Agency, reason: str, result: ReportingResult) -> None:
    """Stop sending for an agency whose key Stripe refused, until the agency fixes the key."""
    agency.stripe_key_status = "needs_attention"
    agency.stripe_key_problem = reason
    result.agencies_flagged += 1
    log.warning("stripe key needs attention", extra={"fields": {"agency_id": agency.id, "reason": reason}})
