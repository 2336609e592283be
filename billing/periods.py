"""A client's money this period: its Stripe billing period (cached), units in it, estimated charge, billing state.

The period is the current period of the customer's subscription item on the client's price, as Stripe bills
it; without such a subscription, the UTC calendar month (as ``rebill reconcile`` reads it) and a problem
saying Stripe bills these units on no invoice. Period, price terms and names come from ``ClientPeriod``, a
cache refreshed by the scheduler (``refresh_stale_periods``) and when a client's Stripe fields change
(``refresh_client_period``), so reading a list never waits on Stripe.

``period.units`` are the units Rebill billed in the period (sent to Stripe or waiting to be), by the time each
report was given in Stripe (its usage time until first offered; later when the usage fell before the
customer's current period, see billing.reporting), which is the time Stripe bills them at.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import and_, case, func, or_, select

from billing.dry_run import WouldHaveBilled, shadow_usage_in_periods, shows_dry_run
from billing.estimates import Estimate, PriceTerms, add_amounts, estimate
from billing.models import Agency, ClientPeriod, RebillClient, UnitReport
from billing.states import BillingState, ClientStatus, ReportMode, ReportStatus
from billing.stripe_gateway import (
    StripeGateway,
    StripeKeyRejected,
    StripeRequestRejected,
    StripeUnavailable,
    gateway_for,
    item_for,
)
from billing.stripe_limits import PERIOD_CHECK_AGE
from core.database import db, utcnow

log = logging.getLogger("billing.periods")

# Stripe changes a period only at renewal (refreshed right after ``period_end``), a price only by archiving
# it, and names rarely: an hourly re-read keeps names fresh without costing agencies' rate limits.
REFRESH_EVERY = dt.timedelta(hours=1)
REFRESH_BATCH = 200
REFRESH_BUDGET_SECONDS = 20.0
# A report that failed to reach Stripe this many offers in a row shows the client as failing, not just "slow"
# (counted since its last progress: each slice of a count-meter row is an offer, and a 429 after progress is
# only a pause).
FAILING_AFTER_ATTEMPTS = 3


@dataclass(frozen=True)
class ClientMoney:
    """A client's period, units and estimated charge in it, and whether its billing works."""

    period_start: dt.datetime
    period_end: dt.datetime
    units: int
    estimate: Estimate | None  # None until the price has been read (or when Rebill cannot price it)
    billing_state: BillingState
    billing_problem: str | None
    product_name: str | None
    price_name: str | None
    customer_name: str | None
    # What the client's monthly cap in units costs at its price (a cap given in money shows its units
    # and this): None without a cap or before the price has been read.
    cap_estimate: Estimate | None = None
    # A dry run's figures this period (billing.dry_run); None for a client with no dry-run usage in it.
    would_have_billed: WouldHaveBilled | None = None

    def period_json(self) -> dict:
        """The contract's ``period`` object (docs/contract.md §5)."""
        return {
            "start": self.period_start.isoformat(),
            "end": self.period_end.isoformat(),
            "units": self.units,
            "estimate": None
            if self.estimate is None
            else {"amount": self.estimate.amount, "currency": self.estimate.currency},
        }


# ---- reading ------------------------------------------------------------------------------------------


def client_money(
    agency: Agency, clients: Sequence[RebillClient], now: dt.datetime | None = None
) -> dict[int, ClientMoney]:
    """Return each client's period figures and billing state, from the cache and the outbox (no Stripe call)."""
    now = now or utcnow()
    ids = [client.id for client in clients]
    if not ids:
        return {}
    cached = {
        row.client_id: row for row in db.session.scalars(select(ClientPeriod).where(ClientPeriod.client_id.in_(ids)))
    }
    periods = {client.id: period_of(cached.get(client.id), client, now) for client in clients}
    units = units_in_periods(periods, now)
    shadow_usage = shadow_usage_in_periods(periods)
    troubles = _report_troubles(ids)
    money = {}
    for client in clients:
        row = cached.get(client.id)
        if row is not None and (row.customer_id, row.price_id) != (client.stripe_customer_id, client.stripe_price_id):
            row = None  # read for the client's previous customer or price: names and terms no longer apply
        terms = PriceTerms.from_json(row.price_terms) if row is not None and row.price_terms else None
        start, end = periods[client.id]
        state, problem = billing_state(agency, client, row, troubles.get(client.id))
        money[client.id] = ClientMoney(
            period_start=start,
            period_end=end,
            units=units.get(client.id, 0),
            estimate=estimate(terms, units.get(client.id, 0)) if terms is not None else None,
            billing_state=state,
            billing_problem=problem,
            product_name=row.product_name if row else None,
            price_name=row.price_name if row else None,
            customer_name=row.customer_name if row else None,
            cap_estimate=estimate(terms, client.monthly_cap_units)
            if terms is not None and client.monthly_cap_units is not None
            else None,
            would_have_billed=WouldHaveBilled.of(shadow_usage.get(client.id, 0), client.billing_unit, terms)
            if shows_dry_run(client, shadow_usage.get(client.id, 0))
            else None,
        )
    return money


def money_summary(agency: Agency, clients: Sequence[RebillClient], now: dt.datetime | None = None) -> dict:
    """Total the clients' estimated charges and units this period per currency; count clients and failing ones."""
    money = client_money(agency, clients, now)
    amounts: dict[str, list[str]] = defaultdict(list)
    units: dict[str, int] = defaultdict(int)
    for client in clients:
        figures = money[client.id]
        if figures.estimate is not None:
            amounts[figures.estimate.currency].append(figures.estimate.amount)
            units[figures.estimate.currency] += figures.units
    failing = [client for client in clients if money[client.id].billing_state == BillingState.FAILING]
    return {
        "totals": [
            {"currency": currency, "amount": add_amounts(amounts[currency], currency), "units": units[currency]}
            for currency in sorted(amounts)
        ],
        "clients": len(clients),
        "clients_failing": len(failing),
        "problems": [
            {"client_id": client.id, "nickname": client.nickname, "problem": money[client.id].billing_problem}
            for client in failing
        ],
        "stripe_disconnected": _stripe_stopped(agency) is not None,
        "billing_problem": _stripe_stopped(agency),
    }


def billing_state(
    agency: Agency, client: RebillClient, cached: ClientPeriod | None, trouble: str | None
) -> tuple[BillingState, str | None]:
    """Say whether the client's units reach an invoice, and why not."""
    stopped = _stripe_stopped(agency)
    if stopped:
        return BillingState.STRIPE_DISCONNECTED, stopped
    if client.status == ClientStatus.PAUSED:
        if client.paused_for_payment:
            problem = client.payment_problem or "an invoice payment failed"
            return BillingState.PAUSED, f"paused until the customer pays: {problem}"
        return BillingState.PAUSED, "paused: usage is recorded but not billed until the client is resumed"
    if client.quarantine_reason:  # rule 12: aggregation stopped counting its usage (billing.units)
        return BillingState.FAILING, f"usage is no longer counted: {client.quarantine_reason}"
    if trouble:
        return BillingState.FAILING, trouble
    if client.reconcile_problem:  # the daily reconciliation (billing.reconcile): units missing in Stripe
        return BillingState.FAILING, client.reconcile_problem
    # Told by Stripe's events (billing.stripe_events): the units reach Stripe, but nobody pays for them.
    if client.payment_failed_at is not None:
        problem = client.payment_problem or "ask them to update their card"
        return BillingState.FAILING, f"the customer's payment failed: {problem}"
    if client.subscription_problem:
        return BillingState.FAILING, client.subscription_problem
    if cached is not None and cached.problem:
        return BillingState.FAILING, cached.problem
    return BillingState.OK, None


# last_error of a unit report Stripe rejected after accepting it (billing.meter_errors).
REJECTED_LATER = "Stripe rejected these units after accepting them"


def plain_report_error(error: str | None, units: int) -> str:
    """Turn what Stripe answered for a unit report into what the agency should fix."""
    error = error or "Stripe refused them"
    lowered = error.lower()
    if error.startswith(REJECTED_LATER):
        # Stripe's asynchronous meter validation (billing.meter_errors): nothing was resent.
        detail = error[len(REJECTED_LATER) :].lstrip(": ")
        if "customer" in lowered:
            return (
                f"Stripe rejected {units} units after accepting them, because of the client's Stripe customer "
                f"({detail}): pick the right customer for this client and Rebill sends them again"
            )
        return (
            f"Stripe rejected {units} units after accepting them ({detail}): fix the client's Stripe settings "
            "and Rebill sends them again"
        )
    if "no such customer" in lowered:
        customer = error.split("'")[1] if error.count("'") >= 2 else "this customer"
        return f"Stripe has no customer {customer}: pick the right customer for this client ({units} units waiting)"
    if "no such price" in lowered or "no active meter" in lowered:
        return f"the client's Stripe price or meter is gone: pick another price ({units} units waiting)"
    if "could not be reached" in lowered or "rate limit" in lowered or "answered 5" in lowered:
        return f"Stripe cannot be reached; Rebill keeps retrying ({units} units waiting)"
    return f"Stripe refused {units} units: {error}"


def _stripe_stopped(agency: Agency) -> str | None:
    if not agency.stripe_key_ciphertext or agency.stripe_key_status == "missing":
        return "Stripe is not connected: billing has stopped. Connect the agency's Stripe key on the Stripe tab."
    if agency.stripe_key_status != "ok":
        reason = agency.stripe_key_problem or "Stripe refused the agency's key"
        return f"billing has stopped: {reason}. Replace the Stripe key on the Stripe tab."
    return None


def period_of(row: ClientPeriod | None, client: RebillClient, now: dt.datetime) -> tuple[dt.datetime, dt.datetime]:
    """The client's current period: the cached Stripe period read for its customer and price, else the month."""
    fresh = row is not None and (row.customer_id, row.price_id) == (client.stripe_customer_id, client.stripe_price_id)
    if fresh and row.period_start and row.period_end and row.period_start <= now < row.period_end:
        return row.period_start, row.period_end
    return calendar_month(now)


def calendar_month(now: dt.datetime) -> tuple[dt.datetime, dt.datetime]:
    """Return the UTC calendar month holding ``now``: the period when Stripe names none."""
    start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = (start + dt.timedelta(days=32)).replace(day=1)
    return start, end


def client_periods(clients: Sequence[RebillClient], now: dt.datetime) -> dict[int, tuple[dt.datetime, dt.datetime]]:
    """Each client's current period (``period_of``), from the cache in one query."""
    ids = [client.id for client in clients]
    rows = db.session.scalars(select(ClientPeriod).where(ClientPeriod.client_id.in_(ids)))
    cached = {row.client_id: row for row in rows}
    return {client.id: period_of(cached.get(client.id), client, now) for client in clients}


def units_in_periods(periods: dict[int, tuple[dt.datetime, dt.datetime]], now: dt.datetime) -> dict[int, int]:
    """Sum each client's reported and waiting units that bill in its current period: one query per period.

    ``periods`` are the clients' current periods at ``now`` (``client_periods``). A report bills in the period
    of the time Stripe was given, which is later than the usage time when the usage fell before the
    customer's current period (billing.reporting, rule 10). A report not yet given its time counts where it
    would be stamped if offered now: in the current period when its usage lies before it (and is older than
    the previous period's grace, or goes as a legacy usage record), else at its usage time. Units of a waiting
    report recorded before the current period that may still be re-stamped into it (in doubt, or a count
    report's unconfirmed rest) count in the current period too (docs/billing-rules.md#units-in-a-period).
    """
    by_period: dict[tuple[dt.datetime, dt.datetime], list[int]] = defaultdict(list)
    for client_id, period in periods.items():
        by_period[period].append(client_id)
    waiting = UnitReport.status != ReportStatus.SENT
    # A report none of whose units may be in Stripe (never offered, or every offer refused: no doubt, nothing
    # confirmed; also a sum-meter report Stripe named later) is offered afresh and stamped then (rule 10).
    # Counted at its usage time, a backlog from before the period start left the current period's cap its
    # full room beside it, and both were billed in the current period.
    may_be_in_stripe = or_(UnitReport.in_doubt_since.is_not(None), UnitReport.units_confirmed > 0)
    billed_at = func.coalesce(UnitReport.stripe_timestamp, UnitReport.usage_timestamp)
    restamped = and_(
        waiting,
        ~may_be_in_stripe,
        or_(UnitReport.usage_timestamp < now - PERIOD_CHECK_AGE, RebillClient.report_mode == ReportMode.LEGACY),
    )
    # A waiting report whose units may be in Stripe keeps its recorded time, but what of it is not confirmed
    # may still land in the current period: the >24 h check re-opens a doubtful report that did not land, and a
    # count report's rest moves to a fresh report, both stamped afresh (rule 10). Until then that rest takes
    # room in the current period as well, so the cap is never passed (it may bill slightly less meanwhile).
    rest = UnitReport.units - UnitReport.units_confirmed
    units: dict[int, int] = {}
    for (start, end), client_ids in by_period.items():
        billed_in_period = and_(billed_at >= start, billed_at < end)
        stamped_into_period = and_(restamped, UnitReport.usage_timestamp < start)
        rest_may_move_in = and_(waiting, may_be_in_stripe, billed_at < start)
        counted = case(
            (billed_in_period, UnitReport.units),
            (stamped_into_period, UnitReport.units),
            (rest_may_move_in, rest),
            else_=0,
        )
        rows = db.session.execute(
            select(UnitReport.client_id, func.sum(counted))
            .join(RebillClient, RebillClient.id == UnitReport.client_id)
            .where(
                UnitReport.client_id.in_(client_ids),
                or_(billed_in_period, stamped_into_period, rest_may_move_in),
            )
            .group_by(UnitReport.client_id)
        ).all()
        units.update({client_id: int(total) for client_id, total in rows})
    return units


def _report_troubles(client_ids: Iterable[int]) -> dict[int, str]:
    """Describe, per client, the units Stripe refused or that keep failing to reach it (newest reason)."""
    rows = db.session.execute(
        select(UnitReport.client_id, UnitReport.last_error, func.sum(UnitReport.units), func.max(UnitReport.id))
        .where(
            UnitReport.client_id.in_(list(client_ids)),
            or_(
                UnitReport.status == ReportStatus.FAILED,
                and_(
                    UnitReport.status == ReportStatus.PENDING,
                    UnitReport.failed_attempts >= FAILING_AFTER_ATTEMPTS,
                    UnitReport.last_error.is_not(None),
                ),
            ),
        )
        .group_by(UnitReport.client_id, UnitReport.last_error)
    ).all()
    newest: dict[int, tuple[int, str | None]] = {}
    waiting: dict[int, int] = defaultdict(int)
    for client_id, error, units, report_id in rows:
        waiting[client_id] += int(units)
        if client_id not in newest or report_id > newest[client_id][0]:
            newest[client_id] = (report_id, error)
    return {client_id: plain_report_error(error, waiting[client_id]) for client_id, (_, error) in newest.items()}


# ---- refreshing the cache ----------------------------------------------------------------------------


def refresh_client_period(
    agency: Agency, client: RebillClient, gateway: StripeGateway | None = None
) -> ClientPeriod | None:
    """Re-read a client's period, price terms and names from Stripe into the cache; flushes, never commits.

    Stripe being unreachable or refusing the agency's key leaves the cache as it was (None is returned then);
    a customer or price Stripe does not know is recorded as the client's problem.
    """
    try:
        gateway = gateway or gateway_for(agency)
        return _store_period(client, *_read_period(gateway, client))
    except (StripeUnavailable, StripeKeyRejected) as error:
        log.info("period not refreshed", extra={"fields": {"client_id": client.id, "reason": error.reason}})
        return None


def refresh_stale_periods(now: dt.datetime | None = None, limit: int = REFRESH_BATCH) -> int:
    """Refresh the cached periods that are missing, stale or past their end; commits per agency; returns how many.

    The scheduler's job. Agencies whose key is missing or refused are skipped (nothing can be read); one
    agency's slow or failing Stripe costs only its own clients this run, within a time budget for all.
    """
    now = now or utcnow()
    deadline = time.monotonic() + REFRESH_BUDGET_SECONDS
    stale = or_(
        ClientPeriod.client_id.is_(None),
        ClientPeriod.customer_id != RebillClient.stripe_customer_id,
        ClientPeriod.price_id != RebillClient.stripe_price_id,
        ClientPeriod.refreshed_at < now - REFRESH_EVERY,
        ClientPeriod.period_end <= now,
    )
    rows = db.session.execute(
        select(RebillClient.id, RebillClient.agency_id)
        .join(Agency, Agency.id == RebillClient.agency_id)
        .outerjoin(ClientPeriod, ClientPeriod.client_id == RebillClient.id)
        .where(RebillClient.deleted_at.is_(None), Agency.stripe_key_status == "ok", stale)
        .order_by(ClientPeriod.refreshed_at.is_not(None), ClientPeriod.refreshed_at, RebillClient.id)
        .limit(limit)
    ).all()
    by_agency: dict[int, list[int]] = defaultdict(list)
    for client_id, agency_id in rows:
        by_agency[agency_id].append(client_id)
    refreshed = 0
    for agency_id, client_ids in by_agency.items():
        if time.monotonic() > deadline:
            break
        refreshed += _refresh_agency(agency_id, client_ids, deadline)
    return refreshed


def _refresh_agency(agency_id: int, client_ids: list[int], deadline: float) -> int:
    refreshed = 0
    try:
        agency = db.session.get(Agency, agency_id)
        gateway = gateway_for(agency)
        for client_id in client_ids:
            if time.monotonic() > deadline:
                break
            client = db.session.get(RebillClient, client_id)
            if client is None or client.deleted_at is not None:
                continue
            _store_period(client, *_read_period(gateway, client))
            refreshed += 1
        db.session.commit()
    except (StripeUnavailable, StripeKeyRejected) as error:
        db.session.commit()  # keep the clients refreshed before Stripe stopped answering
        log.info("periods not refreshed", extra={"fields": {"agency_id": agency_id, "reason": error.reason}})
    except Exception:
        db.session.rollback()
        log.exception("period refresh failed", extra={"fields": {"agency_id": agency_id}})
    return refreshed


def _read_period(gateway: StripeGateway, client: RebillClient) -> tuple[dict, str | None]:
    """Ask Stripe for the client's period, price terms and names; return the cache values and a problem.

    A read Stripe refuses (an unknown customer or price, any other 4xx, a permission the restricted key
    lacks) becomes the client's problem, shown as its ``billing_problem``: the client itself is saved and
    valid. Only Stripe being unreachable or refusing the key outright (401) propagates, and the caller
    leaves the cache as it was.
    """
    values: dict = {"period_start": None, "period_end": None, "price_terms": None}
    problems = []
    try:
        values["customer_name"] = gateway.customer_name(client.stripe_customer_id)
    except (StripeRequestRejected, StripeKeyRejected) as error:
        if _key_refused(error):
            raise
        if getattr(error, "code", None) == "resource_missing":
            problems.append(f"Stripe has no customer {client.stripe_customer_id}: pick the right customer")
        else:
            problems.append(f"Stripe refused to read the customer {client.stripe_customer_id}: {error.reason}")
    try:
        info = gateway.read_price_terms(client.stripe_price_id)
        values.update(product_name=info.product_name, price_name=info.price_name)
        values["price_terms"] = info.terms.to_json() if info.terms else None
        if info.problem:
            problems.append(info.problem)
    except (StripeRequestRejected, StripeKeyRejected) as error:
        if _key_refused(error):
            raise
        problems.append(f"Stripe cannot read the client's price {client.stripe_price_id}: {error.reason}")
    if not problems:
        # The item reporting stamps the client's units in (report_sending._period): on the client's price, else
        # on any price of its meter, which Stripe bills the meter's events on as well (a plan change in Stripe).
        meter_id = client.meter_id if client.report_mode == ReportMode.METER else None
        try:
            items = gateway.live_items(client.stripe_customer_id)
            item = item_for(items, client.stripe_price_id, meter_id)
        except (StripeRequestRejected, StripeKeyRejected) as error:
            if _key_refused(error):
                raise
            problems.append(f"Stripe refused to read the customer's subscriptions: {error.reason}")
        else:
            if item is None:
                problems.append(
                    "the customer has no active subscription with this price, so Stripe bills these units on no "
                    "invoice: subscribe the customer to the price in Stripe"
                )
            else:
                values["period_start"], values["period_end"] = item.period.start, item.period.end
                if item.price_id != client.stripe_price_id:
                    problems.append(
                        f"the customer has no active subscription with this price but one with price "
                        f"{item.price_id} of the same meter: Stripe bills these units on it, at that price, while "
                        f"Rebill's amounts and caps in money use this one: set the client's price to {item.price_id}"
                    )
                # Stripe bills a meter's events on every live item whose price uses the meter (docs/stripe.md
                # §1.2): a second one invoices every unit Rebill reports again, which Rebill cannot see or undo.
                others = sorted({
                    other.price_id for other in items
                    if meter_id is not None and other.meter_id == meter_id
                    and other.period.subscription_item_id != item.period.subscription_item_id
                })  # fmt: skip
                if others:
                    problems.append(
                        f"the customer has another live subscription item on this meter (price {', '.join(others)}): "
                        "Stripe invoices every unit once on each item, so twice or more: remove the extra item in "
                        "Stripe"
                    )
    return values, "; ".join(problems) or None


def _key_refused(error: StripeRequestRejected | StripeKeyRejected) -> bool:
    """Tell a refused key (401), which stops every read and says nothing about the client, from a refused read."""
    return isinstance(error, StripeKeyRejected) and not error.permission_missing


def _store_period(client: RebillClient, values: dict, problem: str | None) -> ClientPeriod:
    row = db.session.get(ClientPeriod, client.id)
    if row is None:
        row = ClientPeriod(client_id=client.id)
        db.session.add(row)
    row.customer_id = client.stripe_customer_id
    row.price_id = client.stripe_price_id
    for name, value in values.items():
        setattr(row, name, _clip(value) if name.endswith("_name") else value)
    row.problem = problem
    row.refreshed_at = utcnow()
    db.session.flush()
    return row


def _clip(name: str | None) -> str | None:
    return name[:255] if name else name
