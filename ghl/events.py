"""What each GHL webhook type does: an explicit table; unknown types are stored and acknowledged.

A handler flushes its writes and returns None ("processed") or a short reason why it ignored the event
("ignored"); it raises to mark the delivery "failed" (the error is kept and the delivery can be replayed).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, select

from billing.ledger import UsageRecord, record_usage
from billing.states import UsageSource
from core.database import db, utcnow
from ghl.installs import record_install_event, record_uninstall_event
from ghl.locations import record_location_event
from ghl.models import GhlLocation
from ghl.payloads import PayloadInvalid, identifier, timestamp

Handler = Callable[[dict[str, Any]], str | None]

MESSAGE_DIRECTIONS = {"InboundMessage": "inbound", "OutboundMessage": "outbound"}

# Built once: a cached compiled statement run on the session's connection keeps the hot path cheap.
_LOCATION_STATE = select(GhlLocation.agency_id, GhlLocation.is_installed).where(
    GhlLocation.location_id == bindparam("location_id")
)


def record_message(event: dict[str, Any], received_at: dt.datetime | None = None) -> str | None:
    """Record an InboundMessage or OutboundMessage as one message of its subaccount, in that direction.

    ``received_at``: when Rebill first received the delivery (a replay keeps it, rule 11); now if not given.
    """
    return _record_message(read_message(event), received_at)


def acknowledge(event: dict[str, Any]) -> str | None:
    """Keep the delivery, do nothing (PLAN_CHANGE: Rebill bills through Stripe, not GHL plans)."""
    return f"{event.get('type')} needs no action"


HANDLERS: dict[str, Handler] = {
    "INSTALL": record_install_event,
    "UNINSTALL": record_uninstall_event,
    "LocationCreate": record_location_event,
    "LocationUpdate": record_location_event,
    "InboundMessage": record_message,
    "OutboundMessage": record_message,
    "PLAN_CHANGE": acknowledge,
}


def handle_event(event: dict[str, Any], received_at: dt.datetime | None = None) -> str | None:
    """Dispatch a verified webhook payload to its handler; ``received_at``: the delivery's first receipt."""
    event_type = event.get("type")
    handler = HANDLERS.get(event_type) if isinstance(event_type, str) else None
    if handler is None:
        return f"no handler for event type {str(event.get('type'))[:64]!r}"
    if handler is record_message:  # the one handler that records usage, judged by its received time
        return record_message(event, received_at)
    return handler(event)


@dataclass(frozen=True, slots=True)
class Message:
    """The usage fact a message webhook carries."""

    location_id: str
    message_id: str  # the message's first attempt: its usage key, the same for every retry of it
    direction: str  # inbound | outbound
    occurred_at: dt.datetime


def read_message(event: dict[str, Any]) -> Message:
    """Read the message fact out of an InboundMessage/OutboundMessage; raise PayloadInvalid without its ids.

    GHL sends a retried message (a failed SMS sent again) with a new ``messageId`` and an ``originalMessageId``
    naming the first attempt (docs/ghl.md §2.2): keyed on the first attempt, a message counts once across retries.
    """
    location_id = identifier(event, "locationId")
    message_id = identifier(event, "messageId")
    if not location_id:
        raise PayloadInvalid("message without a locationId")
    if not message_id:
        raise PayloadInvalid("message without a messageId: it cannot be counted exactly once")
    return Message(
        location_id=location_id,
        message_id=identifier(event, "originalMessageId") or message_id,
        # The type decides the direction: GHL's own OutboundMessage example says "inbound" (a doc typo,
        # docs/ghl.md §2.2).
        direction=MESSAGE_DIRECTIONS[event["type"]],
        occurred_at=timestamp(event, "dateAdded", "timestamp") or utcnow(),
    )


# The outcomes of recording a message other than "processed". The webhook hot path on PostgreSQL records
# messages in one SQL statement (ghl.webhooks) and stores these same texts, so both paths read alike.
def unknown_subaccount(message: Message) -> PayloadInvalid:
    """The failure for a message of a subaccount Rebill does not know (yet): replay once it is known."""
    return PayloadInvalid(f"message for subaccount {message.location_id}, which Rebill does not know yet")


def not_installed_note(message: Message) -> str:
    """Why a message of an uninstalled subaccount is kept but not counted."""
    return f"subaccount {message.location_id} is not installed; message kept, not counted"


def already_recorded_note(message: Message) -> str:
    """Why a message delivered again (in another webhook) is not counted twice."""
    return f"message {message.message_id} was already recorded"


def _record_message(message: Message, received_at: dt.datetime | None) -> str | None:
    """Put one message into the usage ledger, keyed on messageId so a redelivered message counts once.

    Counting per client (and which message source a client uses) happens in billing aggregation; here
    we only record the fact, for installed subaccounts.
    """
    location = db.session.connection().execute(_LOCATION_STATE, {"location_id": message.location_id}).one_or_none()
    if location is None:
        # Not ours yet (its INSTALL or our sync has not landed): fail visibly, replay once it is known.
        raise unknown_subaccount(message)
    if not location.is_installed:
        return not_installed_note(message)
    record = UsageRecord(
        source=UsageSource.GHL_WEBHOOK,
        source_event_id=message.message_id,
        occurred_at=message.occurred_at,
        location_id=message.location_id,
        messages=1,
        direction=message.direction,
    )
    if record_usage(location.agency_id, [record], received_at=received_at) == [False]:
        return already_recorded_note(message)
    return None
