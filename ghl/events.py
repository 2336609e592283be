"""What each GHL webhook type does: an explicit table; unknown types are stored and acknowledged.

A handler flushes its writes and returns None ("processed") or a short reason why it ignored the event
("ignored"); it raises to mark the delivery "failed" (the error is kept and the delivery can be replayed).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import bindparam, select

from billing.ledger import UsageRecord, record_usage
from core.database import db, utcnow
from ghl.installs import record_install_event, record_uninstall_event
from ghl.locations import record_location_event
from ghl.models import GhlLocation
from ghl.payloads import PayloadInvalid, identifier, timestamp

Handler = Callable[[dict[str, Any]], str | None]

# Built once: a cached compiled statement run on the session's connection keeps the hot path cheap.
_LOCATION_STATE = select(GhlLocation.agency_id, GhlLocation.is_installed).where(
    GhlLocation.location_id == bindparam("location_id")
)


def record_inbound_message(event: dict[str, Any]) -> str | None:
    """Record an InboundMessage as one inbound message of its subaccount."""
    return _record_message(event, "inbound")


def record_outbound_message(event: dict[str, Any]) -> str | None:
    """Record an OutboundMessage as one outbound message of its subaccount."""
    # The type decides the direction: GHL's own OutboundMessage example says "inbound" (a doc typo, §2.2).
    return _record_message(event, "outbound")


def acknowledge(event: dict[str, Any]) -> str | None:
    """Keep the delivery, do nothing (PLAN_CHANGE: Rebill bills through Stripe, not GHL plans)."""
    return f"{event.get('type')} needs no action"


HANDLERS: dict[str, Handler] = {
    "INSTALL": record_install_event,
    "UNINSTALL": record_uninstall_event,
    "LocationCreate": record_location_event,
    "LocationUpdate": record_location_event,
    "InboundMessage": record_inbound_message,
    "OutboundMessage": record_outbound_message,
    "PLAN_CHANGE": acknowledge,
}


def handle_event(event: dict[str, Any]) -> str | None:
    """Dispatch a verified webhook payload to its handler."""
    handler = HANDLERS.get(event.get("type"))  # type: ignore[arg-type]
    if handler is None:
        return f"no handler for event type {str(event.get('type'))[:64]!r}"
    return handler(event)


def _record_message(event: dict[str, Any], direction: str) -> str | None:
    """Put one message into the usage ledger, keyed on messageId so a redelivered message counts once.

    Counting per client (and which message source a client uses) happens in billing aggregation; here
    we only record the fact, for installed subaccounts.
    """
    location_id = identifier(event, "locationId")
    message_id = identifier(event, "messageId")
    if not location_id:
        raise PayloadInvalid("message without a locationId")
    if not message_id:
        raise PayloadInvalid("message without a messageId: it cannot be counted exactly once")
    location = db.session.connection().execute(_LOCATION_STATE, {"location_id": location_id}).one_or_none()
    if location is None:
        # Not ours yet (its INSTALL or our sync has not landed): fail visibly, replay once it is known.
        raise PayloadInvalid(f"message for subaccount {location_id}, which Rebill does not know yet")
    if not location.is_installed:
        return f"subaccount {location_id} is not installed; message kept, not counted"
    record = UsageRecord(
        source="ghl",
        source_event_id=message_id,
        occurred_at=timestamp(event, "dateAdded", "timestamp") or utcnow(),
        location_id=location_id,
        messages=1,
        direction=direction,
    )
    if record_usage(location.agency_id, [record]) == [False]:
        return f"message {message_id} was already recorded"
    return None
