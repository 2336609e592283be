"""The billing core's named states: every word a status column may hold or an answer may carry, and what it means.

Each is a ``StrEnum``: a member is its stored word (``UsageState.PENDING == "pending"``), so it goes to the
database, JSON and logs unchanged; the models declare a CHECK constraint from the same members
(``allowed``), so the database refuses any other word. ``BillingState`` and ``SpendStatus`` are not stored:
they are words of the external contract (docs/contract.md §5), computed on each read.
"""

from __future__ import annotations

import enum

from sqlalchemy import CheckConstraint


class Provider(enum.StrEnum):
    """What kind of source a client bills (``rebill_client.provider``; the API's ``provider``, docs/contract.md).

    Its key names the event field that maps usage to the client (billing.sources): ``channel_id`` or
    ``location_id``. How an event reached Rebill is another fact, its ``UsageSource``.
    """

    CAPRI_API = "capri_api"  # an API channel of the AI platform: usage API events naming its channel_id
    GHL = "ghl"  # a GHL subaccount: its webhooks' messages and usage API events naming its location_id


class UsageSource(enum.StrEnum):
    """How a usage event reached Rebill (``usage_event.source``); events are deduplicated per source.

    Not the client's provider: a GHL subaccount's client counts events of both sources (``platform``
    messages and tokens come through the usage API), so the two are separate columns with separate words;
    billing.sources is the one place that maps one to the other (docs/billing-rules.md "Providers and
    sources"). The stored words stay as they are: they are part of the ledger's unique key (agency, source,
    event id), and the CSV export shows them (docs/contract.md §5).
    """

    USAGE_API = "capri"  # the AI platform's usage API (capri/), for channels and subaccounts alike
    GHL_WEBHOOK = "ghl"  # GHL's message webhooks (ghl/)


class ClientStatus(enum.StrEnum):
    """Whether a client's usage is billed (rules 5 and 13, docs/billing-rules.md)."""

    ACTIVE = "active"
    PAUSED = "paused"  # usage received while paused is recorded, never billed
    SHADOW = "shadow"  # a dry run: usage counted and shown as what it would have billed, never sent (billing.dry_run)


class UsageState(enum.StrEnum):
    """Where a usage event stands (``usage_event.state``); only ``counted`` is billed."""

    PENDING = "pending"  # not yet aggregated
    COUNTED = "counted"  # added to its client's counters
    UNMAPPED = "unmapped"  # no client mapped its source when aggregated (rule 3)
    PAUSED = "paused"  # its client was paused when Rebill received it (rule 5)
    IGNORED = "ignored"  # mapped, but the client does not count this kind of usage
    QUARANTINED = "quarantined"  # an impossible value (rule 12): beyond one AI call, or its client quarantined
    CAPPED = "capped"  # its client's units this period had reached the monthly cap: recorded, never billed
    SHADOW = "shadow"  # its client was in a dry run when Rebill received it: measured and shown, never billed (rule 13)


class ReportStatus(enum.StrEnum):
    """Where a unit report (the outbox row) stands (``unit_report.status``)."""

    PENDING = "pending"  # waiting to be offered, or offered again after a retryable failure
    SENT = "sent"  # Stripe confirmed all its units
    FAILED = "failed"  # Stripe refused it for good: waits for the agency to fix the cause


class ReportMode(enum.StrEnum):
    """How a client's units reach Stripe (``rebill_client.report_mode``, ``unit_report.target_mode``), read from
    its price when the client is saved (billing.price_usability; docs/stripe.md §8)."""

    METER = "meter"  # meter events to the price's billing meter (docs/stripe.md §1)
    LEGACY = "legacy"  # usage records on the subscription item of a metered price without a meter (§2.2, §2.3)


class OutcomeKind(enum.StrEnum):
    """What happened to one claimed unit report in a reporting tick (billing.reporting)."""

    DELIVERED = "delivered"
    PROGRESS = "progress"  # a count meter's slice confirmed, more to send
    UNAVAILABLE = "unavailable"  # Stripe unreachable or answered 429/5xx: retried later
    REJECTED = "rejected"
    STALE_TIMESTAMP = "stale_timestamp"  # Stripe refused the timestamp: re-stamped and re-offered
    KEY_REJECTED = "key_rejected"  # the agency's key was refused: its other claims are skipped
    SKIPPED = "skipped"  # not offered this tick
    UNSENT = "unsent"  # the rest provably not in Stripe cannot go as recorded: moved (billing.unsent_remainder)
    AWAITS_CHECK = "awaits_check"  # in doubt, its recorded time no longer bills on an open invoice: not resent
    QUARANTINED = "quarantined"


class BillingState(enum.StrEnum):
    """Whether a client's units reach an invoice (billing.periods.billing_state; the portal API's ``billing_state``)."""

    OK = "ok"
    FAILING = "failing"  # something stops its units or their payment: ``billing_problem`` says what
    PAUSED = "paused"
    STRIPE_DISCONNECTED = "stripe_disconnected"  # the agency's Stripe key is refused or removed


class SpendStatus(enum.StrEnum):
    """May this channel or subaccount spend now (billing.spend; the usage API's ``GET /api/v1/status``)."""

    ACTIVE = "active"
    PAUSED = "paused"
    CAPPED = "capped"  # the period's billed units reached the client's monthly cap
    PAYMENT_FAILED = "payment_failed"  # Stripe could not collect the customer's invoice
    SHADOW = "shadow"
    UNMAPPED = "unmapped"  # no live client maps it


def allowed(column: str, states: type[enum.StrEnum]) -> CheckConstraint:
    """Return the CHECK constraint that holds ``column`` to these words (named ck_<table>_<column> by convention)."""
    words = ", ".join(f"'{state.value}'" for state in states)
    return CheckConstraint(f"{column} IN ({words})", name=column)
