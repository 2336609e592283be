"""Reconcile: compare what the ledger says reached Stripe with Stripe's own totals, per client, this period.

It never sends or resends anything. Stripe deduplicates identifiers only for ~24 h, so a unit whose
delivery is unknown after that window must be settled by a person looking at these numbers
(docs/stripe.md §1.8-§1.9, §8.6), not by retrying blindly.

``record_reconcile_gaps`` is the scheduler's daily run of the same comparison: a meter whose Stripe total
for a customer this period is below the units the ledger marked sent (settled for an hour: summaries lag)
means Stripe rejected some of them after accepting them (docs/billing-rules.md#meter-errors-stripe-reports-later),
so those clients are flagged ``reconcile_problem`` (shown as failing) until the totals match again. It
catches what the meter-error events cannot: errors Stripe counts but does not name, and agencies whose key
may not register an event destination (billing.meter_errors).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections import defaultdict
from dataclasses import dataclass, field, replace
from decimal import Decimal

from sqlalchemy import case, func, select

from billing.models import Agency, RebillClient, UnitReport
from billing.report_claims import offered_to_customer
from billing.states import ReportMode, ReportStatus
from billing.stripe_gateway import StripeGateway, StripeGatewayError, StripeWindowTotal, gateway_for
from billing.stripe_limits import TOTALS_SETTLE
from billing.stripe_target import REPORT_COLUMNS, StripeTarget
from core.database import db, utcnow

log = logging.getLogger("billing.reconcile")

# Units sent more recently than this are not expected in Stripe's totals yet by the daily gap check.
SETTLED_AFTER = TOTALS_SETTLE
RECONCILE_EVERY_SECONDS = 24 * 3600


@dataclass
class ReconcileLine:
    """One Stripe target (customer + meter, or customer + legacy price) and how the ledger compares."""

    company_id: str
    client_ids: list[int]
    customer_id: str
    target: str  # the meter's event name, or the legacy price id (what the reports recorded, rule 9)
    period_start: dt.datetime | None = None
    period_end: dt.datetime | None = None
    units_sent: int = 0  # confirmed by Stripe, offered with a timestamp inside the period
    units_unconfirmed: int = 0  # offered, Stripe's answer unknown (in doubt)
    units_waiting: int = 0  # not offered yet, or refused and waiting for a fix
    stripe_total: Decimal | None = None
    # Of units_sent, those confirmed before SETTLED_AFTER ago: Stripe's total should include them by now.
    units_sent_settled: int = 0
    mode: ReportMode = ReportMode.METER
    problem: str | None = None
    nicknames: list[str] = field(default_factory=list)

    @property
    def drift(self) -> Decimal | None:
        """Return Stripe's total minus the units the ledger marked sent (None when Stripe was not read)."""
        return None if self.stripe_total is None else self.stripe_total - self.units_sent

    @property
    def missing_in_stripe(self) -> int:
        """Units the ledger marked sent (settled) that Stripe's meter total lacks: Stripe rejected them later.

        0 for legacy usage records (Stripe answers those synchronously) and when Stripe was not read.
        """
        if self.mode != ReportMode.METER or self.stripe_total is None or self.problem:
            return 0
        return max(0, int(self.units_sent_settled - self.stripe_total))


def reconcile_clients(company_id: str | None = None, now: dt.datetime | None = None) -> list[ReconcileLine]:
    """Compare ledger and Stripe for every Stripe target (of one agency, or all) over its current billing period."""
    now = now or utcnow()
    agencies = select(Agency).where(Agency.stripe_key_ciphertext.is_not(None)).order_by(Agency.id)
    if company_id is not None:
        agencies = agencies.where(Agency.company_id == company_id)
    lines: list[ReconcileLine] = []
    for agency in db.session.scalars(agencies).all():
        lines.extend(_reconcile_agency(agency, now))
    db.session.rollback()
    return lines


def _reconcile_agency(agency: Agency, now: dt.datetime) -> list[ReconcileLine]:
    """One line per Stripe target: the clients' current targets and every target a report was offered to."""
    clients = {
        client.id: client
        for client in db.session.scalars(
            select(RebillClient).where(RebillClient.agency_id == agency.id).order_by(RebillClient.id)
        )
    }
    # Grouped by what Stripe totals (StripeTarget.series): clients and reports sending to the same meter of a
    # customer, or the same legacy price, share one line.
    members: dict[StripeTarget, set[int]] = defaultdict(set)
    current: dict[StripeTarget, set[int]] = defaultdict(set)
    for client in clients.values():
        target = client.stripe_target.series()
        members[target].add(client.id)
        current[target].add(client.id)
    # Reports remember where they went (rule 9): a client moved to another customer still has its earlier
    # units on the first one, and reconcile shows them there.
    offered = db.session.execute(
        select(UnitReport.client_id, *(UnitReport.__table__.c[column] for column in REPORT_COLUMNS.values()))
        .where(UnitReport.agency_id == agency.id, UnitReport.target_mode.is_not(None))
        .distinct()
    )
    for row in offered:
        members[StripeTarget.from_columns(row, REPORT_COLUMNS).series()].add(row.client_id)
    if not members:
        return []
    try:
        gateway = gateway_for(agency)
    except StripeGatewayError as error:
        return [_line(agency, target, ids, clients, problem=error.reason) for target, ids in members.items()]
    return [
        _reconcile_target(gateway, agency, target, ids, current[target], clients, now)
        for target, ids in members.items()
    ]


def _line(agency: Agency, target: StripeTarget, client_ids: set[int], clients: dict, **fields) -> ReconcileLine:
    ordered = sorted(client_ids)
    return ReconcileLine(
        company_id=agency.company_id,
        client_ids=ordered,
        nicknames=[clients[client_id].nickname for client_id in ordered if client_id in clients],
        customer_id=target.customer_id,
        target=target.name,
        **fields,
    )


def _reconcile_target(
    gateway: StripeGateway,
    agency: Agency,
    target: StripeTarget,
    client_ids: set[int],
    current_clients: set[int],
    clients: dict,
    now: dt.datetime,
) -> ReconcileLine:
    line = _line(agency, target, client_ids, clients, mode=target.mode)
    try:
        window = _stripe_window(gateway, target, now)
    except StripeGatewayError as error:
        line.problem = error.reason
        return line
    if window is None:
        line.problem = "Stripe shows no current period for this target (no subscription item on its price)"
        return line
    line.period_start, line.period_end, line.stripe_total = window.start, window.end, window.total
    # Stripe's total holds every writer's units: the reports to the customer, whichever agency offered them (two
    # agencies may connect one account), not only this agency's; otherwise the other agency's units fill the
    # total and hide units Stripe rejected after accepting them.
    offered_here = (
        offered_to_customer(target.customer_id, agency.stripe_account_id),
        (UnitReport.target_event_name if target.mode == ReportMode.METER else UnitReport.target_price) == target.name,
        UnitReport.stripe_timestamp >= window.start,
        UnitReport.stripe_timestamp < window.end,
    )
    not_confirmed = UnitReport.units - UnitReport.units_confirmed
    # A count report still going out has slices Stripe confirmed a moment ago, not in its total yet: only sent
    # reports count as settled.
    settled = (UnitReport.status == ReportStatus.SENT) & (UnitReport.sent_at <= now - SETTLED_AFTER)
    sent, unconfirmed, sent_settled = db.session.execute(
        select(
            func.coalesce(func.sum(UnitReport.units_confirmed), 0),
            _units_where(UnitReport.in_doubt_since.is_not(None), not_confirmed),
            _units_where(settled, UnitReport.units_confirmed),
        ).where(*offered_here)
    ).one()
    line.units_sent_settled = int(sent_settled)
    waiting = db.session.scalar(
        select(func.coalesce(func.sum(not_confirmed), 0)).where(
            UnitReport.client_id.in_(current_clients or {0}),
            UnitReport.status != ReportStatus.SENT,
            UnitReport.in_doubt_since.is_(None),
            UnitReport.usage_timestamp >= window.start,
            UnitReport.usage_timestamp < window.end,
        )
    )
    line.units_sent, line.units_unconfirmed, line.units_waiting = int(sent), int(unconfirmed), int(waiting)
    return line


def _units_where(condition, units):
    """Sum ``units`` over the reports matching a condition (0 when none)."""
    return func.coalesce(func.sum(case((condition, units), else_=0)), 0)


def _stripe_window(gateway: StripeGateway, target: StripeTarget, now: dt.datetime) -> StripeWindowTotal | None:
    """Read Stripe's total for the target's current period (subscription period, else the calendar month)."""
    period = gateway.subscription_period(target.customer_id, target.price_id) if target.price_id else None
    if period is not None:
        start, end = period.start, period.end
        target = replace(target, subscription_item_id=period.subscription_item_id)
    else:
        start, end = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0), now
    return gateway.window_total(target, start, min(end, now))


# ---- the daily gap check ------------------------------------------------------------------------------


def record_reconcile_gaps(now: dt.datetime | None = None) -> int:
    """The scheduler's daily job: flag (and clear) each agency's clients whose meter total in Stripe is below
    what the ledger marked sent; return how many clients are flagged. Commits per agency; one agency's
    Stripe trouble leaves the others' results (and its own previous ones) in place."""
    now = now or utcnow()
    agency_ids = db.session.scalars(
        select(Agency.id)
        .where(Agency.stripe_key_ciphertext.is_not(None), Agency.stripe_key_status == "ok")
        .order_by(Agency.id)
    ).all()
    flagged = 0
    for agency_id in agency_ids:
        try:
            flagged += _record_agency_gaps(db.session.get(Agency, agency_id), now)
            db.session.commit()
        except Exception:
            db.session.rollback()
            log.exception("reconcile gap check failed", extra={"fields": {"agency_id": agency_id}})
    return flagged


def _record_agency_gaps(agency: Agency, now: dt.datetime) -> int:
    lines = _reconcile_agency(agency, now)
    problems: dict[int, str] = {}
    checked: set[int] = set()
    for line in lines:
        if line.mode != ReportMode.METER or line.stripe_total is None or line.problem:
            continue  # not read (Stripe down, no period): keep what the last check found
        checked.update(line.client_ids)
        missing = line.missing_in_stripe
        if missing:
            total = line.stripe_total
            in_stripe = int(total) if total == total.to_integral_value() else total
            message = (
                f"Stripe's meter holds {missing} units fewer for customer {line.customer_id} this period than "
                f"Rebill sent ({line.units_sent_settled} sent, {in_stripe} in Stripe; checked "
                f"{now:%Y-%m-%d %H:%M} UTC): Stripe rejected them after accepting them. Check the customer "
                "and the meter in Stripe; Rebill does not resend units it cannot name"
            )
            for client_id in line.client_ids:
                problems.setdefault(client_id, message)
    clients = db.session.scalars(
        select(RebillClient).where(RebillClient.agency_id == agency.id, RebillClient.id.in_(checked or {0}))
    ).all()
    for client in clients:
        client.reconcile_problem = problems.get(client.id)
    db.session.flush()
    if problems:
        log.warning(
            "units missing in Stripe", extra={"fields": {"agency_id": agency.id, "clients": sorted(problems)}}
        )
    return len(problems)
