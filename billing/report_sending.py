"""Before and during the send (billing.reporting): the >24 h check, the timestamp, then the units to Stripe.

Claims of one agency are checked and stamped with its gateway (rule 10: a timestamp Stripe bills on an open
invoice), their targets and timestamps committed, then sent: rows of one customer and meter in order on one
thread, other groups in parallel. Nothing here writes to the database but ``record_targets``.
"""

from __future__ import annotations

import datetime as dt
import itertools
import logging
import threading
import time
from collections import defaultdict, deque
from collections.abc import Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import closing
from dataclasses import dataclass, replace

from sqlalchemy import func, select

from billing.models import Agency, UnitReport
from billing.report_claims import (
    MAX_EVENT_AGE,
    NEEDS_RECONCILE,
    PERIOD_CHECK_AGE,
    Claim,
    TickClock,
    account_moved,
    account_moved_reason,
    claim_params,
    offered_to_customer,
    write_rows,
)
from billing.states import OutcomeKind, ReportStatus
from billing.stripe_gateway import (
    MeterUnknown,
    StripeGateway,
    StripeKeyRejected,
    StripeRequestRejected,
    StripeUnavailable,
    SubscriptionPeriod,
    gateway_for,
)
from billing.stripe_target import StripeTarget
from billing.tick_reads import NotCached, ReadDeferred, TickReads
from core.database import db

log = logging.getLogger("billing.reporting")

# A count-meter row sends at most this many events, or for at most this share of the tick's budget, per
# claim; then it records its progress and goes back in line behind every other row due.
COUNT_EVENTS_PER_CLAIM = 100
COUNT_SLICE_SHARE = 0.1
# Stripe's refusals of a timestamp: a meter event older than 35 days (code as in docs/stripe.md), a legacy
# usage record before the current period ("Cannot create the usage record with this timestamp because
# timestamps must be after the subscription's last invoice period (or current period start time).").
STALE_TIMESTAMP_CODES = ("timestamp_too_far_in_past",)
STALE_TIMESTAMP_TEXT = "usage record with this timestamp"


@dataclass(frozen=True)
class Outcome:
    """What happened to one claim.

    kind: delivered | progress (count-meter slice confirmed, more to send) | unavailable | rejected |
    stale_timestamp | key_rejected | skipped (not offered) | quarantined | unsent (the rest, provably not in
    Stripe, moves to a fresh row: billing.unsent_remainder) | awaits_check (in doubt, not resent: its recorded
    time no longer bills on an open invoice; the >24 h check settles it).
    ``confirmed`` counts units Stripe confirmed during this attempt; ``answered`` is False when this attempt
    may have reached Stripe without an answer (the row is then in doubt).
    """

    claim: Claim
    kind: OutcomeKind
    reason: str | None = None
    confirmed: int = 0
    answered: bool = True


def process_batch(
    claims: list[Claim],
    gateways: dict[int, StripeGateway | StripeKeyRejected],
    clock: TickClock,
    reads: TickReads,
    pool: ThreadPoolExecutor | None,
    workers: int = 1,
) -> list[Outcome]:
    """Decide, record and send a batch of claims; one outcome per claim (``workers``: sends at once in ``pool``).

    Rule 8: the claims that need nothing read from Stripe (most of them) are decided at once and sent in the
    background; meanwhile the others (a billing period, the >24 h check) are read round-robin across
    agencies within the tick's read budget (billing.tick_reads), then recorded and sent. A send group (one
    customer and meter) goes whole in one of the two, in order. So one agency's slow Stripe delays no other
    agency's sends that need no read, and those that do by at most one read of each agency per tick.
    """
    by_agency: dict[int, list[Claim]] = defaultdict(list)
    for claim in claims:
        by_agency[claim.agency_id].append(claim)
    outcomes: list[Outcome] = []
    keys, accounts = {}, {}
    for agency_id, key, account in db.session.execute(
        select(Agency.id, Agency.stripe_key_ciphertext, Agency.stripe_account_id).where(Agency.id.in_(by_agency))
    ):
        keys[agency_id], accounts[agency_id] = key, account
    outcomes.extend(_take_out_moved_accounts(by_agency, accounts))
    for agency_id in list(by_agency):
        gateway = _gateway(agency_id, gateways, keys.get(agency_id))
        if isinstance(gateway, StripeKeyRejected):
            agency_claims = by_agency.pop(agency_id)
            outcomes.append(Outcome(agency_claims[0], OutcomeKind.KEY_REJECTED, gateway.reason))
            outcomes.extend(Outcome(claim, OutcomeKind.SKIPPED) for claim in agency_claims[1:])
    stops = {agency_id: threading.Event() for agency_id in by_agency}
    with reads.cached_only():
        first = ready_to_send(gateways, by_agency, clock, reads)
    held = {(claim.agency_id, claim.send_group) for claim in first.waiting}
    send_now = {
        agency_id: [claim for claim in ready if (agency_id, claim.send_group) not in held]
        for agency_id, ready in first.ready.items()
    }
    outcomes.extend(_send_only_held(send_now, record_targets(_stamped(send_now), clock.now())))
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="stripe-send-unread") as background:
        if pool is not None:
            sent_first = background.submit(send_claims, gateways, send_now, pool, clock, stops, workers)
        else:  # one sender thread: these go first, then the reads
            outcomes.extend(send_claims(gateways, send_now, None, clock, stops))
        waiting: dict[int, list[Claim]] = defaultdict(list)
        for claim in first.waiting:
            waiting[claim.agency_id].append(claim)
        second = ready_to_send(gateways, waiting, clock, reads)
        send_later: dict[int, list[Claim]] = defaultdict(list)
        for agency_id, ready in first.ready.items():
            send_later[agency_id].extend(claim for claim in ready if (agency_id, claim.send_group) in held)
        for agency_id, ready in second.ready.items():
            send_later[agency_id].extend(ready)
        for agency_id in second.key_refused:
            outcomes.extend(Outcome(claim, OutcomeKind.SKIPPED) for claim in send_later.pop(agency_id, []))
        for agency_id in send_later:
            send_later[agency_id].sort(key=lambda claim: claim.report_id)  # a group's rows in their order
        outcomes.extend(_send_only_held(send_later, record_targets(_stamped(send_later), clock.now())))
        outcomes.extend(
            first.decided + second.decided + send_claims(gateways, send_later, pool, clock, stops, workers)
        )
        if pool is not None:
            outcomes.extend(sent_first.result())
    return outcomes


def _take_out_moved_accounts(by_agency: dict[int, list[Claim]], accounts: dict[int, str | None]) -> list[Outcome]:
    """Take out the claims whose agency's key opens another Stripe account now than at the claim; their outcomes.

    The key may change between the claim (which checked the account: report_claims._prepare) and this read of
    it, and the gateway is built from the key read here. A row whose units may be in the first account fails
    "needs reconcile", as at the claim; one with nothing in Stripe is skipped (not offered), and its next claim
    takes the client's current target.
    """
    outcomes: list[Outcome] = []
    for agency_id, claims in list(by_agency.items()):
        kept = []
        for claim in claims:
            if not account_moved(claim.target.account, accounts.get(agency_id)):
                kept.append(claim)
            elif claim.previous_in_doubt_since is not None or claim.units_confirmed > 0:
                reason = account_moved_reason(claim.target.account, accounts[agency_id])
                outcomes.append(Outcome(claim, OutcomeKind.REJECTED, reason))
            else:
                outcomes.append(Outcome(claim, OutcomeKind.SKIPPED))
        if kept:
            by_agency[agency_id] = kept
        else:
            del by_agency[agency_id]
    return outcomes


def _stamped(claims_by_agency: dict[int, list[Claim]]) -> list[Claim]:
    """The claims whose timestamp, target and doubt are written just before their offer (not at the claim)."""
    return [claim for ready in claims_by_agency.values() for claim in ready if claim.needs_stamp or claim.rest_unsent]


def _send_only_held(claims_by_agency: dict[int, list[Claim]], lost: set[int]) -> list[Outcome]:
    """Take the claims whose row another tick claimed since (``lost``) out of the sending; skipped outcomes for them.

    Such a tick may have stamped and sent the row already: a legacy report stamped afresh goes under an
    idempotency key of its own timestamp (StripeGateway.send_units), so a second stamp by this tick would be a
    second usage record that Stripe applies (docs/billing-rules.md, rule 6). Their skipped outcome writes
    nothing (STILL_CLAIMED).
    """
    if not lost:
        return []
    skipped = []
    for agency_id, claims in claims_by_agency.items():
        skipped.extend(Outcome(claim, OutcomeKind.SKIPPED) for claim in claims if claim.report_id in lost)
        claims_by_agency[agency_id] = [claim for claim in claims if claim.report_id not in lost]
    return skipped


def _gateway(agency_id: int, gateways: dict[int, StripeGateway | StripeKeyRejected], key_ciphertext: str | None):
    """Return the tick's gateway for an agency, or the key problem that prevents one.

    Built once per key: an agency that connects a new key during the tick (after its old one was refused, or to
    another account) gets a gateway on the new key at its next batch, never the one kept from before. The old
    gateway's calls are carried over to the new one (the tick counts them).
    """
    kept = gateways.get(agency_id)
    if kept is None or getattr(kept, "built_from", None) != key_ciphertext:
        try:
            gateway = gateway_for(db.session.get(Agency, agency_id))
        except StripeKeyRejected as error:
            gateway = error
        db.session.rollback()
        gateway.built_from = key_ciphertext
        if isinstance(kept, StripeGateway) and isinstance(gateway, StripeGateway):
            gateway.count_calls_of(kept)
        gateways[agency_id] = gateway
    return gateways[agency_id]


@dataclass
class _Decisions:
    """Claims ready to send (per agency), claims waiting for a Stripe read, and claims decided otherwise."""

    ready: dict[int, list[Claim]]
    waiting: list[Claim]
    decided: list[Outcome]
    key_refused: set[int]


def ready_to_send(
    gateways: dict[int, StripeGateway | StripeKeyRejected],
    claims_by_agency: dict[int, list[Claim]],
    clock: TickClock,
    reads: TickReads,
) -> _Decisions:
    """Run the >24 h check and the period look-up where needed, round-robin across agencies (rule 8)."""
    decisions = _Decisions(ready=defaultdict(list), waiting=[], decided=[], key_refused=set())
    for turn in itertools.zip_longest(*claims_by_agency.values()):
        for claim in turn:
            if claim is None:
                continue
            if claim.agency_id in decisions.key_refused:
                decisions.decided.append(Outcome(claim, OutcomeKind.SKIPPED))
                continue
            try:
                decided = _decide(gateways[claim.agency_id], claim, clock.now(), reads)
            except NotCached:
                decisions.waiting.append(claim)
                continue
            except ReadDeferred:  # the tick's reads are spent, or this agency's Stripe was slow: next tick
                decided = Outcome(claim, OutcomeKind.SKIPPED)
            except StripeUnavailable as error:  # also when this agency's reads failed earlier in the tick
                decided = Outcome(claim, OutcomeKind.UNAVAILABLE, error.reason)
            except StripeKeyRejected as error:
                decided = Outcome(claim, OutcomeKind.KEY_REJECTED, error.reason)
                decisions.key_refused.add(claim.agency_id)
            except StripeRequestRejected as error:
                prefix = f"{NEEDS_RECONCILE}: " if claim.needs_check else ""
                decided = Outcome(claim, OutcomeKind.REJECTED, f"{prefix}{error.reason}")
            except Exception as error:  # rule 8: this row is set aside, the others go on
                log.exception("report quarantined", extra={"fields": {"report_id": claim.report_id}})
                decided = Outcome(claim, OutcomeKind.QUARANTINED, f"{type(error).__name__}: {error}")
            if isinstance(decided, Outcome):
                decisions.decided.append(decided)
            else:
                decisions.ready[claim.agency_id].append(decided)
    for agency_id in decisions.key_refused:
        decisions.decided.extend(Outcome(claim, OutcomeKind.SKIPPED) for claim in decisions.ready.pop(agency_id, []))
    db.session.rollback()
    return decisions


def _decide(gateway: StripeGateway, claim: Claim, now: dt.datetime, reads: TickReads) -> Claim | Outcome:
    """Settle a claim's doubt and timestamp: the claim to send, or what happens to it instead.

    Raises NotCached when a Stripe read is needed and not allowed now (nothing of the claim changed then).
    """
    if claim.needs_check:
        with reads.reading(claim.agency_id):
            checked = _compare_with_stripe(gateway, claim)
        if isinstance(checked, Outcome):
            return checked
        # Stripe's totals have none of the rest (after the first count events, which went in order). An offer of
        # it may still have reached Stripe and been rejected later (docs/stripe.md §1.4): Stripe keeps that
        # identifier for 24 h and would answer a resend "already exists". So the rest never goes again under
        # its identifiers: it moves to a fresh row, or the row is re-opened under a fresh identifier
        # (billing.unsent_remainder; docs/billing-rules.md#fresh-identifiers).
        return Outcome(replace(checked, previous_in_doubt_since=None), OutcomeKind.UNSENT)
    if claim.previous_in_doubt_since is not None and not _bills_on_an_open_invoice(gateway, claim, now, reads):
        # A resend carries the recorded time (the identifier's dedupe needs it), which now lies in a period whose
        # invoice may be final: if the first offer did not land, the resend would land there, billed nowhere.
        # Only the >24 h check can tell, from Stripe's totals, and then offers what is missing afresh
        # (docs/billing-rules.md#in-doubt-across-a-period-rollover).
        return Outcome(claim, OutcomeKind.AWAITS_CHECK)
    if claim.rest_unsent and not _rest_goes_as_recorded(gateway, claim, now, reads):
        return Outcome(claim, OutcomeKind.UNSENT)  # to a fresh row: billing.unsent_remainder
    if claim.needs_stamp:
        return _stamp(gateway, claim, now, reads)
    return claim


def _stamp(
    gateway: StripeGateway,
    claim: Claim,
    now: dt.datetime,
    reads: TickReads,
) -> Claim | Outcome:
    """Give a claim the timestamp (and legacy subscription item) its units bill on (rule 10)."""
    base, shift = claim.usage_timestamp, None
    if base < now - MAX_EVENT_AGE:
        base, shift = now, "usage older than Stripe's 35 days; billed at its first offer"
    needs_period = claim.target.is_legacy or base < now - PERIOD_CHECK_AGE
    period = _period(gateway, claim, reads) if needs_period else None
    item = None
    if claim.target.is_legacy:
        if period is None:
            return Outcome(
                claim,
                OutcomeKind.REJECTED,
                f"customer {claim.target.customer_id} has no active subscription on price {claim.target.price_id}",
            )
        item = period.subscription_item_id
    if period is not None and base < period.start:
        base = min(period.start, now)
        shift = (
            f"usage of {claim.usage_timestamp:%Y-%m-%d %H:%M} UTC falls before the customer's current billing "
            f"period (from {period.start:%Y-%m-%d %H:%M} UTC), whose invoice may be final; billed on the next invoice"
        )
    target = replace(claim.target, subscription_item_id=item or claim.target.subscription_item_id)
    return replace(claim, timestamp=base, timestamp_shift=shift, target=target)


def _rest_goes_as_recorded(
    gateway: StripeGateway,
    claim: Claim,
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
    return _bills_on_an_open_invoice(gateway, claim, now, reads)


def _bills_on_an_open_invoice(gateway: StripeGateway, claim: Claim, now: dt.datetime, reads: TickReads) -> bool:
    """Tell whether the claim's recorded timestamp still bills on an open invoice (rule 10).

    Yes while it is younger than PERIOD_CHECK_AGE (in the current period, or in the previous one's finalization
    grace, an hour by default) or lies in the customer's current period. The period is the one the stamp reads
    (``_period``: one read of the customer's live items a tick, never one read per report). Only when no live
    item of the customer bills the target at all does no invoice bill the units whatever their time, so the
    recorded one stands.
    """
    if claim.timestamp >= now - PERIOD_CHECK_AGE:
        return True
    period = _period(gateway, claim, reads)
    return period is None or claim.timestamp >= period.start


def _period(gateway: StripeGateway, claim: Claim, reads: TickReads) -> SubscriptionPeriod | None:
    """The current period of the customer's live item that bills the claim's units (read once a tick:
    billing.tick_reads); None when no live item bills them.

    The item on the recorded price; for a meter target without one, the item on any price of the recorded
    meter. Stripe bills a meter's events on every item of the customer whose price uses the meter: after a plan
    change to another price of the same meter (the old item gone), units stamped in the old item's last period
    land on its closed invoice, billed nowhere, while the new item's period says where they still bill
    (docs/billing-rules.md#in-doubt-across-a-period-rollover). A legacy usage record names its item: no fallback.
    """
    meter_id = None if claim.target.is_legacy else claim.target.meter_id
    return reads.period(claim.agency_id, gateway, claim.target.customer_id, claim.target.price_id, meter_id)


def record_targets(claims: list[Claim], now: dt.datetime) -> set[int]:
    """Commit the stamped timestamps and targets, and the doubt of the coming offer, before Stripe is called.

    Returns the ids of the claims whose row was not written: claimed by another tick since (this tick stalled
    past its LEASE) or flagged by a meter error. They must not be sent (_send_only_held). The written rows are
    held by this transaction until its commit (locked on PostgreSQL, the writer on SQLite), so the read after
    the write tells exactly which writes landed.
    """
    if not claims:
        return set()
    write_rows(
        [
            {
                **claim_params(claim),
                "stripe_timestamp": claim.timestamp,
                "timestamp_shift": claim.timestamp_shift,
                "target_subscription_item": claim.target.subscription_item_id,
                "units_confirmed": claim.units_confirmed,
                "in_doubt_since": claim.previous_in_doubt_since or now,
            }
            for claim in claims
        ],
        claimed=True,
    )
    rows = db.session.execute(
        select(UnitReport.id, UnitReport.status, UnitReport.identifier, UnitReport.attempts).where(
            UnitReport.id.in_([claim.report_id for claim in claims])
        )
    )
    now_held = {(row.id, row.identifier, row.attempts) for row in rows if row.status == ReportStatus.PENDING}
    db.session.commit()
    return {c.report_id for c in claims if (c.report_id, c.identifier, c.attempt) not in now_held}


def _compare_with_stripe(gateway: StripeGateway, claim: Claim) -> Claim | Outcome:
    """Settle a doubtful row from Stripe's totals for its recorded target and window.

    Returns an outcome ("delivered" or "needs reconcile"), or the claim to resend: with nothing of it extra
    in Stripe, or a total too small to hold its one event (sum meter), or (count meter) after the extra events,
    which were sent in order, are counted as confirmed.
    """
    stamp = claim.timestamp or claim.usage_timestamp
    try:
        window = gateway.window_total(claim.target, stamp, stamp)
    except MeterUnknown:
        return Outcome(claim, OutcomeKind.REJECTED, f"{NEEDS_RECONCILE}: the report's meter id is unknown")
    if window is None:
        return Outcome(
            claim, OutcomeKind.REJECTED, f"{NEEDS_RECONCILE}: Stripe shows no usage period for this report's time"
        )
    # The rows adding to the same Stripe total: the meter's events of the customer, or the legacy item's records.
    if claim.target.is_legacy:
        same_target = (UnitReport.target_subscription_item == claim.target.subscription_item_id,)
    else:
        same_target = (UnitReport.target_event_name == claim.target.event_name,)
    # The ledger is read after Stripe's total, in a transaction begun after it: an offer that reached Stripe
    # before the total was read had its doubt committed before it was made (report_claims._claim_values,
    # record_targets).
    db.session.rollback()
    # Every writer Rebill knows of in the total: the reports to the customer, whichever agency offered them (two
    # agencies may connect one account), not only this agency's.
    account = claim.target.account or db.session.scalar(
        select(Agency.stripe_account_id).where(Agency.id == claim.agency_id)
    )
    in_window = (
        offered_to_customer(claim.target.customer_id, account),
        UnitReport.id != claim.report_id,
        UnitReport.stripe_timestamp >= window.start,
        UnitReport.stripe_timestamp < window.end,
        *same_target,
    )
    # ``unconfirmed``: every other row of the window in doubt may or may not be in Stripe's total: one whose
    # doubt began after this claim (another scheduler's offer, sent while this one read) as much as an older one.
    known, unconfirmed = db.session.execute(
        select(
            func.coalesce(func.sum(UnitReport.units_confirmed), 0),
            func.count().filter(UnitReport.in_doubt_since.is_not(None)),
        ).where(*in_window)
    ).one()
    extra = window.total - known - claim.units_confirmed
    # A neighbour's confirmed units are in Stripe only as long as Stripe does not reject them later: a 2xx for
    # a meter event is not final, and a rejection may never be named to Rebill (Stripe samples; an agency may
    # have no event destination: docs/stripe.md §1.4, docs/billing-rules.md#meter-errors-stripe-reports-later).
    # So ``known`` bounds the neighbours' units from above: this row holds at least ``extra``, yet a rejected
    # neighbour can hide any of it, and a zero proves nothing unless no neighbour's confirmed units count in
    # the window. This row's own confirmed count events are not such a doubt: they carry its one timestamp,
    # customer and payload, on which the later checks (customer, time, meter, value) give one verdict, and a
    # named one makes the row "needs reconcile". Legacy usage records are validated on the call.
    exact = claim.target.is_legacy or known == 0
    if extra == 0 and exact:
        return claim  # Stripe has none of the rest: resending is safe (a recent copy would be deduplicated)
    if _sent_as_one_meter_event(claim.target) and window.total < claim.remaining:
        # The row went as one event of all its units, no event is negative, and its last offer has settled in the
        # total (LAST_RESEND_AGE): had it landed, the total would hold at least its units, whatever became of the
        # neighbours (confirmed ones rejected later, others in doubt landed or not). A total below proves it missing.
        # Not ``known + units``: a neighbour rejected after its 2xx leaves the total short without this row being
        # missing (docs/billing-rules.md#in-doubt-across-a-period-rollover).
        return claim
    if unconfirmed == 0 and extra == claim.remaining:
        return Outcome(
            claim,
            OutcomeKind.DELIVERED,
            "confirmed from Stripe's totals after the 24 h dedupe window",
            confirmed=claim.remaining,
        )
    if unconfirmed == 0 and exact and claim.target.formula == "count" and 0 < extra < claim.remaining:
        return replace(claim, units_confirmed=claim.units_confirmed + int(extra))
    return Outcome(
        claim,
        OutcomeKind.REJECTED,
        f"{NEEDS_RECONCILE}: first offered over 24 h ago and Stripe's total for its window is {window.total} "
        f"against {known} known there (+{claim.remaining} here, {unconfirmed} other rows in doubt); not resent",
    )


def _sent_as_one_meter_event(target: StripeTarget) -> bool:
    """Tell whether a report to this target goes as one meter event of all its units (a sum meter), not as one
    event per unit (count) nor as a usage record (legacy): as StripeGateway.send_units sends it."""
    return not target.is_legacy and target.formula != "count"


def send_claims(
    gateways: dict[int, StripeGateway | StripeKeyRejected],
    claims_by_agency: dict[int, list[Claim]],
    pool: ThreadPoolExecutor | None,
    clock: TickClock,
    stops: dict[int, threading.Event],
    workers: int = 1,
) -> list[Outcome]:
    """Send claims: in order within a customer+meter group; groups in parallel, ``workers`` at a time.

    Each agency's first group goes before its others, so a revoked key costs one refused call per agency,
    not one per thread; once an agency's first group is answered, its other groups follow round-robin with
    those of the other agencies whose first group was answered. An agency waits only for its own first
    answer, never for every agency's: no thread idles while a group is ready to go.
    """
    queues: dict[int, deque[list[Claim]]] = {}
    for agency_id, claims in claims_by_agency.items():
        groups: dict[tuple[str, str], list[Claim]] = defaultdict(list)
        for claim in claims:
            groups[claim.send_group].append(claim)
        if groups:
            queues[agency_id] = deque(groups.values())

    def send(agency_id: int, group: list[Claim]) -> list[Outcome]:
        return _send_group(gateways[agency_id], group, stops[agency_id], clock)

    outcomes: list[Outcome] = []
    if pool is None:  # one thread: every agency's first group, then the others round-robin
        firsts = [(agency_id, queue.popleft()) for agency_id, queue in queues.items()]
        rest = ([(agency_id, group) for group in queue] for agency_id, queue in queues.items())
        others = [job for turn in itertools.zip_longest(*rest) for job in turn if job is not None]
        for agency_id, group in firsts + others:
            outcomes.extend(send(agency_id, group))
        return outcomes
    unopened = deque(queues)  # agencies whose first group has not gone yet
    opened: deque[int] = deque()  # agencies whose first group was answered and that have groups left
    in_flight: dict[Future, tuple[int, bool]] = {}  # future -> (agency, is its first group)
    while unopened or opened or in_flight:
        while len(in_flight) < workers and (unopened or opened):
            first = bool(unopened)
            agency_id = unopened.popleft() if first else opened.popleft()
            in_flight[pool.submit(send, agency_id, queues[agency_id].popleft())] = (agency_id, first)
            if not first and queues[agency_id]:
                opened.append(agency_id)
        done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
        for future in done:
            agency_id, first = in_flight.pop(future)
            outcomes.extend(future.result())
            if first and queues[agency_id]:
                opened.append(agency_id)
    return outcomes


def _send_group(
    gateway: StripeGateway, claims: Iterable[Claim], stop: threading.Event, clock: TickClock
) -> list[Outcome]:
    outcomes = []
    blocked = False  # after a 429/5xx or a partial slice the rest of this customer's rows wait
    for claim in claims:
        if stop.is_set() or blocked or clock.spent():
            outcomes.append(Outcome(claim, OutcomeKind.SKIPPED))
            continue
        outcome = _send_one(gateway, claim, clock)
        if outcome.kind == OutcomeKind.KEY_REJECTED:
            stop.set()
        blocked = outcome.kind in (OutcomeKind.UNAVAILABLE, OutcomeKind.PROGRESS)
        outcomes.append(outcome)
    return outcomes


def _send_one(gateway: StripeGateway, claim: Claim, clock: TickClock) -> Outcome:
    timestamp = int(claim.timestamp.timestamp())
    confirmed = 0
    try:
        if claim.remaining < 1:
            raise ValueError(f"a report must carry at least one unit, this one has {claim.remaining}")
        # Stripe is called once per count event: the slice ends after COUNT_EVENTS_PER_CLAIM of them, or when the
        # budget is spent; a re-stamped offer is only made when Stripe has none of the row.
        slice_ends = clock.slice_deadline(COUNT_SLICE_SHARE)
        sending = gateway.send_units(
            claim.target,
            claim.identifier,
            claim.units,
            timestamp,
            attempt=claim.attempt,
            confirmed=claim.units_confirmed,
            restamped=claim.timestamp != claim.usage_timestamp,
        )
        with closing(sending):
            for calls, units in enumerate(sending, start=1):
                confirmed += units
                if calls >= COUNT_EVENTS_PER_CLAIM or clock.spent() or time.monotonic() >= slice_ends:
                    break
        kind = OutcomeKind.DELIVERED if confirmed == claim.remaining else OutcomeKind.PROGRESS
        return Outcome(claim, kind, confirmed=confirmed)
    except StripeUnavailable as error:
        return Outcome(claim, OutcomeKind.UNAVAILABLE, error.reason, confirmed, answered=False)
    except StripeKeyRejected as error:
        return Outcome(claim, OutcomeKind.KEY_REJECTED, error.reason, confirmed)
    except StripeRequestRejected as error:
        stale = error.code in STALE_TIMESTAMP_CODES or STALE_TIMESTAMP_TEXT in error.reason
        return Outcome(claim, OutcomeKind.STALE_TIMESTAMP if stale else OutcomeKind.REJECTED, error.reason, confirmed)
    except Exception as error:  # rule 8: this row is set aside (it may have reached Stripe), the others go on
        log.exception("report quarantined", extra={"fields": {"report_id": claim.report_id}})
        return Outcome(claim, OutcomeKind.QUARANTINED, f"{type(error).__name__}: {error}", confirmed, answered=False)
