"""Test data for the billing core: client rows and usage records (no Stripe needed for aggregation tests)."""

from __future__ import annotations

import datetime as dt
import itertools

from sqlalchemy import func, select

from billing.ledger import UsageRecord, record_usage
from billing.models import Agency, RebillClient, UnitReport, UsageEvent
from core.database import db

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
_numbers = itertools.count(1)


def make_client(
    agency: Agency,
    *,
    provider: str = "capri_api",
    source_key: str = "chan-1",
    charge_by: str = "tokens",
    billing_unit: int = 1000,
    message_source: str | None = None,
    status: str = "active",
) -> RebillClient:
    """Insert a client row as create_client would leave it after its Stripe checks (meter mode)."""
    if provider == "ghl" and charge_by == "messages" and message_source is None:
        message_source = "ghl_outbound"
    number = next(_numbers)
    client = RebillClient(
        agency_id=agency.id,
        nickname=f"Client {number}",
        provider=provider,
        channel_id=source_key if provider == "capri_api" else None,
        location_id=source_key if provider == "ghl" else None,
        source_key=source_key,
        stripe_product_id="prod_test",
        stripe_price_id="price_test",
        stripe_customer_id=f"cus_test{number}",
        charge_by=charge_by,
        billing_unit=billing_unit,
        message_source=message_source,
        status=status,
        report_mode="meter",
        meter_id="mtr_test",
        meter_event_name="ai_units",
        meter_customer_key="stripe_customer_id",
        meter_value_key="value",
        meter_formula="sum",
    )
    db.session.add(client)
    db.session.flush()
    return client


def tokens(event_id: str, total: int, *, channel: str | None = "chan-1", location: str | None = None, **fields):
    """A usage API event with ``total`` tokens (split input/output), for a channel or a subaccount."""
    if location is not None:
        channel = None
    fields.setdefault("occurred_at", NOW)
    fields.setdefault("model", "test-model")
    return UsageRecord(
        source="capri",
        source_event_id=event_id,
        channel_id=channel,
        location_id=location,
        input_tokens=total // 2,
        output_tokens=total - total // 2,
        **fields,
    )


def capri_messages(event_id: str, messages: int, *, channel: str | None = "chan-1", location: str | None = None):
    """A usage API event reporting messages."""
    if location is not None:
        channel = None
    return UsageRecord(
        source="capri", source_event_id=event_id, channel_id=channel, location_id=location, messages=messages,
        occurred_at=NOW,
    )  # fmt: skip


def ghl_message(event_id: str, location: str, direction: str, messages: int = 1):
    """A GHL message webhook as the GHL adapter records it (one message per messageId)."""
    return UsageRecord(
        source="ghl", source_event_id=event_id, location_id=location, direction=direction, messages=messages,
        occurred_at=NOW,
    )  # fmt: skip


def record(agency: Agency, *records: UsageRecord) -> list[bool]:
    """Record usage through the real ledger and flush it."""
    accepted = record_usage(agency.id, list(records))
    db.session.flush()
    return accepted


def fresh(client: RebillClient) -> RebillClient:
    """Reload a client's row from the database."""
    db.session.expire(client)
    return db.session.get(RebillClient, client.id)


def reports_of(client: RebillClient) -> list[UnitReport]:
    """The client's outbox rows, oldest first."""
    return list(db.session.scalars(select(UnitReport).where(UnitReport.client_id == client.id).order_by(UnitReport.id)))


def event_states(agency: Agency) -> dict[str, str]:
    """Map each of the agency's events (by source event id) to its state."""
    rows = db.session.execute(
        select(UsageEvent.source_event_id, UsageEvent.state).where(UsageEvent.agency_id == agency.id)
    )
    return dict(rows.all())


def pending_count() -> int:
    """Count events still waiting for aggregation (all agencies)."""
    return db.session.scalar(select(func.count()).select_from(UsageEvent).where(UsageEvent.state == "pending"))
