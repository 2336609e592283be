"""Billing core tables: agencies, rebill clients, the usage ledger and the unit-report outbox.

All usage and unit quantities are integers (BigInteger); money itself lives in Stripe prices.
"""

from __future__ import annotations

import datetime as dt
import secrets

from sqlalchemy import BigInteger, Boolean, ForeignKey, Index, Integer, String, Text, UniqueConstraint, false, text
from sqlalchemy.orm import Mapped, mapped_column, relationship

from billing.states import ClientStatus, Provider, ReportMode, ReportStatus, UsageSource, UsageState, allowed
from billing.stripe_target import CLIENT_COLUMNS, REPORT_COLUMNS, StripeTarget
from core.database import BigId, TimestampMixin, UTCDateTime, db, utcnow

CHARGE_BY = ("tokens", "messages")
MESSAGE_SOURCES = ("ghl_outbound", "ghl_inbound", "ghl_all", "platform")
# Integer primary keys are 32-bit on PostgreSQL: a larger number names no row, and PostgreSQL would refuse
# to compare it with the column (an error, not "not found").
MAX_ROW_ID = 2**31 - 1


def is_row_id(value: object) -> bool:
    """Tell whether a value can be the id of a row with an Integer primary key."""
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_ROW_ID


def new_report_prefix() -> str:
    """Return a fresh random identifier prefix for a client's unit reports (64 bits, 16 hex chars)."""
    return secrets.token_hex(8)


class Agency(TimestampMixin, db.Model):
    """A GHL company that installed Rebill, with its own Stripe connection."""

    __tablename__ = "agency"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    company_id: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str | None] = mapped_column(String(255))
    whitelabel_domain: Mapped[str | None] = mapped_column(String(255))
    stripe_key_ciphertext: Mapped[str | None] = mapped_column(Text)
    stripe_account_id: Mapped[str | None] = mapped_column(String(64))
    stripe_mode: Mapped[str | None] = mapped_column(String(8))
    stripe_key_last4: Mapped[str | None] = mapped_column(String(4))
    # missing | ok | needs_attention (Stripe answered 401/403 with this key)
    stripe_key_status: Mapped[str] = mapped_column(String(24), default="missing", server_default="missing")
    stripe_key_problem: Mapped[str | None] = mapped_column(Text)
    # Set while Rebill is installed neither at agency level nor in any subaccount (the GHL adapter keeps it);
    # the agency's API keys are refused meanwhile.
    uninstalled_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    # Portal tokens carry the generation they were signed under; an uninstall or a reinstall bumps it, so
    # every token signed before stops working at once.
    session_generation: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Spend alerts are POSTed here, signed with the secret (billing.alerts); both optional.
    alert_url: Mapped[str | None] = mapped_column(Text)
    alert_secret_ciphertext: Mapped[str | None] = mapped_column(Text)

    clients: Mapped[list[RebillClient]] = relationship(back_populates="agency")


class RebillClient(TimestampMixin, db.Model):
    """One of the agency's customers, billed one Stripe unit per ``billing_unit`` tokens or messages."""

    __tablename__ = "rebill_client"
    __table_args__ = (
        # One live client per API channel or subaccount, so no usage event can count twice.
        Index(
            "uq_rebill_client_live_source",
            "agency_id",
            "provider",
            "source_key",
            unique=True,
            postgresql_where=text("deleted_at IS NULL"),
            sqlite_where=text("deleted_at IS NULL"),
        ),
        allowed("provider", Provider),
        allowed("status", ClientStatus),
        allowed("report_mode", ReportMode),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    agency_id: Mapped[int] = mapped_column(ForeignKey("agency.id"), index=True)
    nickname: Mapped[str] = mapped_column(String(120))
    provider: Mapped[str] = mapped_column(String(16))
    channel_id: Mapped[str | None] = mapped_column(String(255))
    location_id: Mapped[str | None] = mapped_column(String(64))
    # channel_id for capri_api clients, location_id for ghl clients: what usage events are matched on.
    source_key: Mapped[str] = mapped_column(String(255))
    stripe_product_id: Mapped[str] = mapped_column(String(255))
    stripe_price_id: Mapped[str] = mapped_column(String(255))
    stripe_customer_id: Mapped[str] = mapped_column(String(255))
    charge_by: Mapped[str] = mapped_column(String(16))
    billing_unit: Mapped[int] = mapped_column(BigInteger)
    message_source: Mapped[str | None] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(
        String(16), default=ClientStatus.ACTIVE, server_default=ClientStatus.ACTIVE.value
    )
    deleted_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())

    # How units reach Stripe, read from the price when the client is saved (docs/stripe.md §8): with the customer
    # and price above, the client's ``stripe_target`` (billing.stripe_target.CLIENT_COLUMNS).
    report_mode: Mapped[str] = mapped_column(
        String(16), default=ReportMode.METER, server_default=ReportMode.METER.value
    )
    meter_id: Mapped[str | None] = mapped_column(String(255))
    meter_event_name: Mapped[str | None] = mapped_column(String(100))
    meter_customer_key: Mapped[str | None] = mapped_column(String(100))
    meter_value_key: Mapped[str | None] = mapped_column(String(100))
    meter_formula: Mapped[str | None] = mapped_column(String(8))
    subscription_item_id: Mapped[str | None] = mapped_column(String(255))

    # Running counters, changed only by aggregation (billing.units) under the client's row lock. BIGINT has
    # lifetime headroom: aggregation quarantines a client before counted_usage passes CLIENT_USAGE_MAX (4e18).
    counted_usage: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    units_logged: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    remainder: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    report_sequence: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Random per client, first part of every UnitReport identifier: two Rebill deployments (or a rebuilt
    # database) sending to one Stripe account never reuse an identifier (docs/stripe.md §1.9).
    report_prefix: Mapped[str] = mapped_column(String(16), default=new_report_prefix)
    # Set by aggregation when the client's usage cannot be counted (rule 12: its total would pass the
    # lifetime bound, or its settings are impossible). Its events are then kept as "quarantined", never
    # billed, and aggregation of every other client goes on.
    quarantine_reason: Mapped[str | None] = mapped_column(Text)
    # Rule 11: usage received from this moment on counts under the client's current status and source;
    # usage received earlier, under the closed term (RebillClientTerm) it was received in, or not at all if
    # the client did not exist yet. A client counts from its creation (the epoch when the agency chose to
    # bill earlier unmapped usage).
    term_started_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)

    # Spend controls (billing.stripe_events): an unpaid invoice marks the client; the agency chooses whether
    # that also pauses it. payment_event_at is the Stripe time of the last payment event applied, so an
    # older event arriving late never undoes a newer one.
    payment_failed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    payment_problem: Mapped[str | None] = mapped_column(Text)
    payment_event_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    pause_on_payment_failure: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    paused_for_payment: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # Set when Stripe says the customer's subscription no longer holds the client's price.
    subscription_problem: Mapped[str | None] = mapped_column(Text)
    # Optional monthly cap in units, and the alert thresholds in % of it ("50,80,100" when None).
    monthly_cap_units: Mapped[int | None] = mapped_column(BigInteger)
    # A cap given as money: the amount as typed (major units, "50.00") in the price's currency; the cap in
    # units above is then derived from it (billing.clients, docs/billing-rules.md#caps-in-currency).
    monthly_cap_amount: Mapped[str | None] = mapped_column(String(32))
    monthly_cap_currency: Mapped[str | None] = mapped_column(String(3))
    # Set by the daily reconciliation when Stripe's meter total for this client's customer is below what
    # Rebill sent (billing.reconcile.record_reconcile_gaps); cleared when the totals match again.
    reconcile_problem: Mapped[str | None] = mapped_column(Text)
    alert_thresholds: Mapped[str | None] = mapped_column(String(64))

    agency: Mapped[Agency] = relationship(back_populates="clients")

    @property
    def stripe_target(self) -> StripeTarget | None:
        """Where the client's units go now: its customer, price and meter (or legacy subscription item)."""
        return StripeTarget.from_columns(self, CLIENT_COLUMNS)

    @stripe_target.setter
    def stripe_target(self, target: StripeTarget) -> None:
        for column, value in target.columns(CLIENT_COLUMNS).items():
            setattr(self, column, value)


class RebillClientTerm(db.Model):
    """A closed span of a client's history: usage received in [starts_at, ends_at) counted under these settings.

    Written when a client is paused, resumed or moved to another source (billing.client_terms.start_new_term), so
    an event that committed after the change, or a replayed one, is judged by the settings in force when
    Rebill first received it.
    """

    __tablename__ = "rebill_client_term"
    __table_args__ = (allowed("provider", Provider), allowed("status", ClientStatus))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    client_id: Mapped[int] = mapped_column(ForeignKey("rebill_client.id"), index=True)
    starts_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    ends_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    status: Mapped[str] = mapped_column(String(16))
    provider: Mapped[str] = mapped_column(String(16))
    source_key: Mapped[str] = mapped_column(String(255))


class UsageEvent(db.Model):
    """One usage fact from a provider, recorded once (deduplicated on its source's event id)."""

    __tablename__ = "usage_event"
    __table_args__ = (
        UniqueConstraint("agency_id", "source", "source_event_id"),
        Index(
            "ix_usage_event_pending",
            "id",
            postgresql_where=text("state = 'pending'"),
            sqlite_where=text("state = 'pending'"),
        ),
        # Every query by source asks for pending or unmapped events (billing.units, billing.usage), so
        # the index holds only those: counting an event (the common case by far) then adds no entry here.
        Index(
            "ix_usage_event_agency_source_key",
            "agency_id",
            "channel_id",
            "location_id",
            postgresql_where=text("state IN ('pending', 'unmapped')"),
            sqlite_where=text("state IN ('pending', 'unmapped')"),
        ),
        Index("ix_usage_event_client_received", "client_id", "received_at"),
        allowed("source", UsageSource),
        allowed("state", UsageState),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    agency_id: Mapped[int] = mapped_column(ForeignKey("agency.id"))
    source: Mapped[str] = mapped_column(String(16))
    source_event_id: Mapped[str] = mapped_column(String(255))
    channel_id: Mapped[str | None] = mapped_column(String(255))
    location_id: Mapped[str | None] = mapped_column(String(64))
    input_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    output_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    messages: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    direction: Mapped[str | None] = mapped_column(String(8))
    model: Mapped[str | None] = mapped_column(String(128))
    occurred_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    state: Mapped[str] = mapped_column(String(12), default=UsageState.PENDING, server_default=UsageState.PENDING.value)
    # The client the event was counted for. No foreign key: only aggregation writes it, from a client row
    # it holds locked, and clients are never deleted (soft delete), so the key always exists; PostgreSQL's
    # per-row check of that key was a large part of the aggregation's UPDATE (see bench/README.md).
    client_id: Mapped[int | None] = mapped_column(Integer)
    # What this event measures for its client under the client's charge_by/message_source (set by
    # aggregation). Billed only in state "counted"; kept for "paused" events so paused usage stays visible.
    counted: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")


class ClientSendLease(db.Model):
    """Which scheduler thread sends a client's unit reports now (billing.report_claims, reporting's docstring).

    Stripe takes one call at a time per customer and meter. A claim takes a client's rows only if no other
    scheduler holds the client (``sender`` differs and ``until`` not passed); it then holds the client until
    its batch is recorded or its tick fails (billing.reporting.report_pending_units), or for the claim's LEASE
    if its process dies.
    """

    __tablename__ = "client_send_lease"

    client_id: Mapped[int] = mapped_column(ForeignKey("rebill_client.id", ondelete="CASCADE"), primary_key=True)
    sender: Mapped[str] = mapped_column(String(64))
    until: Mapped[dt.datetime] = mapped_column(UTCDateTime())


class UnitReport(TimestampMixin, db.Model):
    """Outbox row: k units of one client on their way to Stripe under a deterministic identifier."""

    __tablename__ = "unit_report"
    __table_args__ = (
        Index("ix_unit_report_status_next", "status", "next_attempt_at"),
        # The >24 h check and reconcile compare one customer's reports in a window with Stripe's totals
        # (billing.report_claims.offered_to_customer): whichever agency offered them, so not by agency.
        Index("ix_unit_report_customer_time", "target_customer", "stripe_timestamp"),
        # Reporting's claim reads each agency's first due rows in this order (billing.report_claims): a few
        # index entries per agency, however long any agency's backlog or history is.
        Index(
            "ix_unit_report_agency_due",
            "agency_id",
            "next_attempt_at",
            "id",
            postgresql_where=text("status = 'pending'"),
            sqlite_where=text("status = 'pending'"),
        ),
        allowed("status", ReportStatus),
        allowed("target_mode", ReportMode),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    agency_id: Mapped[int] = mapped_column(ForeignKey("agency.id"), index=True)
    client_id: Mapped[int] = mapped_column(ForeignKey("rebill_client.id"), index=True)
    identifier: Mapped[str] = mapped_column(String(100), unique=True)
    units: Mapped[int] = mapped_column(BigInteger)
    usage_timestamp: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    status: Mapped[str] = mapped_column(
        String(12), default=ReportStatus.PENDING, server_default=ReportStatus.PENDING.value
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    next_attempt_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # Attempt history, append-only: a claim for sending counts an attempt and nothing ever lowers or clears it.
    first_attempt_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    # Offers in a row that Stripe did not take (unreachable, 429/5xx, a refused timestamp, quarantined); progress
    # or delivery resets it. Each slice of a count-meter row is an attempt, so the money view calls a client
    # failing by this count, not by ``attempts`` (billing.periods).
    failed_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    last_error: Mapped[str | None] = mapped_column(Text)
    sent_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())

    # Where the units went (rule 9), recorded before the first offer to Stripe and kept while any of them may
    # be in Stripe: retries, the >24 h check and reconcile use these, never the client's current settings.
    # Together the report's ``target`` (billing.stripe_target.REPORT_COLUMNS).
    target_account: Mapped[str | None] = mapped_column(String(64))
    target_mode: Mapped[str | None] = mapped_column(String(16))  # billing.states.ReportMode
    target_customer: Mapped[str | None] = mapped_column(String(255))
    target_price: Mapped[str | None] = mapped_column(String(255))
    target_meter: Mapped[str | None] = mapped_column(String(255))
    target_event_name: Mapped[str | None] = mapped_column(String(100))
    target_customer_key: Mapped[str | None] = mapped_column(String(100))
    target_value_key: Mapped[str | None] = mapped_column(String(100))
    target_formula: Mapped[str | None] = mapped_column(String(8))
    target_subscription_item: Mapped[str | None] = mapped_column(String(255))
    # The timestamp Stripe is given; differs from usage_timestamp when the usage fell before the customer's
    # current billing period or beyond Stripe's 35 days (rule 10), and timestamp_shift then says why.
    stripe_timestamp: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    timestamp_shift: Mapped[str | None] = mapped_column(String(255))
    # Units Stripe confirmed: all or none on a sum meter or usage record; on a count meter events
    # 1..units_confirmed, so a resend starts after the last event Stripe accepted.
    units_confirmed: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # Earliest offer whose outcome Stripe never told (timeout, 5xx, crash); None when every offer was answered.
    # Past Stripe's 24 h dedupe window such a row is checked against Stripe's totals before any resend.
    in_doubt_since: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())

    @property
    def target(self) -> StripeTarget | None:
        """Where the units were first offered (rule 9), or None before any offer."""
        return StripeTarget.from_columns(self, REPORT_COLUMNS)


class StripeEventEndpoint(TimestampMixin, db.Model):
    """The webhook endpoint Rebill registered in an agency's Stripe account (one per agency).

    ``route_id`` is Rebill's own random name for it in ``POST /webhooks/stripe/<route_id>`` (the URL must be
    known before Stripe assigns ``stripe_endpoint_id``); the signing secret is stored encrypted.
    """

    __tablename__ = "stripe_event_endpoint"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    agency_id: Mapped[int] = mapped_column(ForeignKey("agency.id"), unique=True)
    route_id: Mapped[str] = mapped_column(String(64), unique=True)
    url: Mapped[str] = mapped_column(Text)
    stripe_endpoint_id: Mapped[str | None] = mapped_column(String(255))
    secret_ciphertext: Mapped[str | None] = mapped_column(Text)
    # registered | not_permitted (a restricted key without the permission) | failed (Stripe refused or was down)
    status: Mapped[str] = mapped_column(String(16))
    problem: Mapped[str | None] = mapped_column(Text)
    # The thin-event destination (API v2) for Stripe's asynchronous meter errors, at ``<url>/thin``: its id,
    # signing secret (encrypted), and status/problem as above (None: not attempted).
    destination_id: Mapped[str | None] = mapped_column(String(255))
    destination_secret_ciphertext: Mapped[str | None] = mapped_column(Text)
    destination_status: Mapped[str | None] = mapped_column(String(16))
    destination_problem: Mapped[str | None] = mapped_column(Text)


class StripeEvent(db.Model):
    """A verified Stripe event exactly as received, stored before processing (deduplicated per agency)."""

    __tablename__ = "stripe_event"
    __table_args__ = (UniqueConstraint("agency_id", "event_id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    agency_id: Mapped[int] = mapped_column(ForeignKey("agency.id"))
    event_id: Mapped[str] = mapped_column(String(255))
    event_type: Mapped[str] = mapped_column(String(100))
    body: Mapped[str] = mapped_column(Text)
    received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # received | processed | ignored | failed
    status: Mapped[str] = mapped_column(String(12), default="received", server_default="received", index=True)
    error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    processed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())


class ClientPeriod(db.Model):
    """What Stripe last said about a client's billing: its current period, how its price charges, and names.

    A cache, refreshed on a schedule and whenever the client's Stripe fields change (billing.periods), so
    listing clients with their estimated charge never waits on Stripe. ``customer_id``/``price_id`` say what
    it was read for: a row for other values is stale.
    """

    __tablename__ = "client_period"

    client_id: Mapped[int] = mapped_column(ForeignKey("rebill_client.id"), primary_key=True)
    customer_id: Mapped[str] = mapped_column(String(255))
    price_id: Mapped[str] = mapped_column(String(255))
    # None: the customer has no live subscription on the price (Stripe then bills these units on no invoice).
    period_start: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    period_end: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    price_terms: Mapped[str | None] = mapped_column(Text)  # billing.estimates.PriceTerms.to_json()
    product_name: Mapped[str | None] = mapped_column(String(255))
    price_name: Mapped[str | None] = mapped_column(String(255))
    customer_name: Mapped[str | None] = mapped_column(String(255))
    problem: Mapped[str | None] = mapped_column(Text)  # in plain words, for the agency
    refreshed_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class SpendAlert(db.Model):
    """A client's billed units in a period reached one of its alert thresholds (fires once per period)."""

    __tablename__ = "spend_alert"
    __table_args__ = (UniqueConstraint("client_id", "period_start", "threshold_percent"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    agency_id: Mapped[int] = mapped_column(ForeignKey("agency.id"), index=True)
    client_id: Mapped[int] = mapped_column(ForeignKey("rebill_client.id"))
    period_start: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    threshold_percent: Mapped[int] = mapped_column(Integer)
    units: Mapped[int] = mapped_column(BigInteger)
    cap_units: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class AlertDelivery(db.Model):
    """One alert on its way to the agency's alert URL: the signed POST's body and its attempts (the log)."""

    __tablename__ = "alert_delivery"
    __table_args__ = (Index("ix_alert_delivery_status_next", "status", "next_attempt_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    alert_id: Mapped[int] = mapped_column(ForeignKey("spend_alert.id"), index=True)
    agency_id: Mapped[int] = mapped_column(ForeignKey("agency.id"))
    body: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(12))  # pending | delivered | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    next_attempt_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_attempt_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    delivered_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
