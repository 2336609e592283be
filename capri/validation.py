"""Parse and check usage API bodies: the whole body (400/413) and each event (accepted or rejected whole).

Rules the contract fixes (docs/contract.md §4); the OpenAPI document in ``capri.openapi`` is built from
the same constants and a test keeps the two in agreement:
- the body is a JSON object ``{"events": [...]}`` with at most ``MAX_EVENTS`` events and no other field,
  and holds no more JSON structure than ``MAX_EVENTS`` valid events can (``MAX_STRUCTURE_BYTES``);
- an event names an ``id`` (1-255 characters), exactly one of ``channel`` or ``location_id``, non-negative
  integer ``input_tokens``/``output_tokens`` (each at most 10^8) and ``messages`` (at most 10^4), at least
  one above zero, an optional ``model``
  and an ``occurred_at`` with a timezone, not more than 5 minutes in the future;
- ``null`` means "not given" for the optional fields; unknown fields are rejected, because a misspelt
  count (``"output_token"``) silently ignored would under-bill the client.
"""

from __future__ import annotations

import datetime as dt
import gc
import heapq
import json
import threading
import unicodedata
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from billing.ledger import MAX_MESSAGES_PER_EVENT, MAX_TOKENS_PER_EVENT, UsageRecord
from billing.states import UsageSource
from billing.stripe_limits import METER_EVENT_MAX_AGE

MAX_EVENTS = 1000
# 1000 events at their largest legitimate size (every string at its limit, escaped) stay well under this.
MAX_BODY_BYTES = 4 * 1024 * 1024
ID_MAX_LENGTH = 255
CHANNEL_MAX_LENGTH = 255
LOCATION_ID_MAX_LENGTH = 64
MODEL_MAX_LENGTH = 128
OCCURRED_AT_MAX_LENGTH = 64
COUNT_FIELDS = ("input_tokens", "output_tokens", "messages")
# What one event may carry (rule 12: what a real AI call can produce; billing.ledger says why these).
COUNT_MAX = {
    "input_tokens": MAX_TOKENS_PER_EVENT,
    "output_tokens": MAX_TOKENS_PER_EVENT,
    "messages": MAX_MESSAGES_PER_EVENT,
}
EVENT_FIELDS = frozenset({"id", "channel", "location_id", *COUNT_FIELDS, "model", "occurred_at"})
FUTURE_TOLERANCE = dt.timedelta(minutes=5)
# A cheap bound, checked before parsing, on what json.loads would build: every JSON value but the first of
# a container follows a ",", every container opens with "[" or "{", and every object member follows a "{"
# or a ",", so these bytes bound the lists, dicts, numbers and keys a body makes (a 4 MiB body of tiny
# nested arrays is 2 million lists, ~1.2 s of parsing; of "0," 2 million calls of _parse_int, ~0.25 s). The
# limit is the most a batch of MAX_EVENTS valid events can hold, so no such batch is ever refused: per
# event one "{", at most one "," per field (between fields, and before the next event), and every
# character of its strings, whose lengths are bounded (id, channel or location_id, model, occurred_at) and
# which may be nothing but "[", "{" and ","; UTF-8 never uses these bytes inside a multi-byte character, and
# an escaped one ("\u007b") holds none. Plus the body's own "{" and "[". That is 711 per event,
# 711,002 for the batch; a body above it is refused (413) before anything is parsed.
MAX_STRUCTURE_BYTES = 2 + MAX_EVENTS * (
    1 + len(EVENT_FIELDS) + ID_MAX_LENGTH + max(CHANNEL_MAX_LENGTH, LOCATION_ID_MAX_LENGTH)
    + MODEL_MAX_LENGTH + OCCURRED_AT_MAX_LENGTH
)  # fmt: skip
# Usage older than Stripe's limit for meter event timestamps (billing.stripe_limits.METER_EVENT_MAX_AGE) is
# kept in the ledger and flagged so the caller knows it may not reach Stripe in its own period. The flag is a
# word of the usage API's answer (its schema, capri/openapi.py; README), so it keeps its number.
FLAG_OLDER_THAN_STRIPE_WINDOW = "older_than_35_days"
# Nothing Rebill bills predates this; earlier values are a caller's bug (an epoch-zero clock), and refusing
# them keeps date arithmetic downstream far from datetime's year-1 edge.
EARLIEST_OCCURRED_AT = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)


class BodyInvalid(Exception):
    """The body is not the expected JSON shape (HTTP 400)."""


class BatchTooLarge(Exception):
    """The body carries more events, or more JSON structure, than one request may (HTTP 413)."""


@dataclass(frozen=True, slots=True)
class CheckedEvent:
    """One event after checking: a ledger record, or the reason it is rejected."""

    event_id: str | None  # echoed back in the result; None when the caller's id is not a string
    record: UsageRecord | None = None
    reason: str | None = None
    flags: tuple[str, ...] = field(default=())


class _OutOfRange:
    """Stands in for a JSON integer too long to be a count, so one event is rejected, not the whole body."""


def parse_usage_body(raw: bytes) -> list[Any]:
    """Return the events list of a usage body; raise BodyInvalid or BatchTooLarge."""
    structure = raw.count(b"[") + raw.count(b"{") + raw.count(b",")
    if structure > MAX_STRUCTURE_BYTES:
        raise BatchTooLarge(
            f"the body holds more JSON values than {MAX_EVENTS} events can ({structure} of the bytes '[', '{{' "
            f"and ',', at most {MAX_STRUCTURE_BYTES}); split the batch"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BodyInvalid("the body is not UTF-8 encoded JSON") from None
    try:
        body = _loads_without_gc(text)
    except RecursionError:
        raise BodyInvalid("the body is nested too deeply") from None
    except ValueError as error:
        raise BodyInvalid(f"the body is not valid JSON: {error}") from None
    if not isinstance(body, dict):
        raise BodyInvalid('the body must be a JSON object: {"events": [...]}')
    unknown = body.keys() - {"events"}
    if unknown:
        raise BodyInvalid(f"unknown top-level field(s): {_names(unknown)}; the body is {{\"events\": [...]}}")
    events = body.get("events")
    if not isinstance(events, list):
        raise BodyInvalid('the body must have an "events" array')
    if len(events) > MAX_EVENTS:
        raise BatchTooLarge(f"at most {MAX_EVENTS} events per request, got {len(events)}; split the batch")
    return events


# Held while the collector is paused, so that two parses (threads) never see each other's pause as the
# state to restore. Under gevent it is never contended, patched or not: a parse never yields holding it.
_GC_PAUSE = threading.Lock()


def _loads_without_gc(text: str) -> Any:
    """json.loads with the cyclic garbage collector paused.

    Every list and dict json.loads makes is a GC allocation, and the collections they trigger rescan the
    ones already built: ~1 s of the ~1.2 s parse of 2 million tiny lists, ~0.16 s of the 0.25 s parse of
    the 355,000 one-number lists MAX_STRUCTURE_BYTES lets through. Paused, nothing is lost: what json.loads
    makes holds no reference cycle, so reference counting frees all of it.
    """
    with _GC_PAUSE:
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            return json.loads(
                text,
                parse_int=_parse_int,
                parse_constant=_refuse_constant,
                object_pairs_hook=_object_without_repeated_keys,
            )
        finally:
            if was_enabled:
                gc.enable()


def check_event(event: Any, now: dt.datetime) -> CheckedEvent:
    """Check one event against the contract; never raise for bad input."""
    if not isinstance(event, dict):
        return CheckedEvent(None, reason="an event must be a JSON object")
    event_id = event.get("id")
    echoed_id = event_id if isinstance(event_id, str) else None
    try:
        record, flags = _record_from(event, now)
    except _Rejected as rejection:
        return CheckedEvent(echoed_id, reason=str(rejection))
    return CheckedEvent(echoed_id, record=record, flags=flags)


class _Rejected(Exception):
    """Why an event cannot be accepted; the message is the reason the caller sees."""


def _record_from(event: dict, now: dt.datetime) -> tuple[UsageRecord, tuple[str, ...]]:
    unknown = event.keys() - EVENT_FIELDS
    if unknown:
        raise _Rejected(f"unknown field(s): {_names(unknown)}")
    event_id = _text(event, "id", ID_MAX_LENGTH, required=True)
    channel = _text(event, "channel", CHANNEL_MAX_LENGTH)
    location_id = _text(event, "location_id", LOCATION_ID_MAX_LENGTH)
    if (channel is None) == (location_id is None):
        raise _Rejected("give exactly one of channel or location_id")
    counts = {name: _count(event, name) for name in COUNT_FIELDS}
    if not any(counts.values()):
        raise _Rejected("at least one of input_tokens, output_tokens or messages must be above 0")
    model = _text(event, "model", MODEL_MAX_LENGTH)
    occurred_at = _occurred_at(event, now)
    flags = (FLAG_OLDER_THAN_STRIPE_WINDOW,) if occurred_at < now - METER_EVENT_MAX_AGE else ()
    record = UsageRecord(
        source=UsageSource.USAGE_API,
        source_event_id=event_id,
        occurred_at=occurred_at,
        channel_id=channel,
        location_id=location_id,
        model=model,
        **counts,
    )
    return record, flags


def _text(event: dict, name: str, max_length: int, *, required: bool = False) -> str | None:
    value = event.get(name)
    if value is None:
        if required:
            raise _Rejected(f"{name} is required")
        return None
    if not isinstance(value, str):
        raise _Rejected(f"{name} must be a string")
    if not 1 <= len(value) <= max_length:
        raise _Rejected(f"{name} must be 1 to {max_length} characters long")
    # Control characters (NUL above all: PostgreSQL text cannot hold it) and lone surrogates (not encodable
    # as UTF-8) cannot be stored or shown faithfully.
    if any(unicodedata.category(character) in {"Cc", "Cs"} for character in value):
        raise _Rejected(f"{name} must not contain control characters or unpaired surrogates")
    return value


def _count(event: dict, name: str) -> int:
    value = event.get(name)
    if value is None:
        return 0
    # bool is an int in Python and 1.0 a float in JSON: neither is an integer count.
    if isinstance(value, bool) or not isinstance(value, int | _OutOfRange):
        raise _Rejected(f"{name} must be a non-negative integer (no fraction or exponent)")
    if isinstance(value, _OutOfRange) or value < 0:
        raise _Rejected(f"{name} must be between 0 and {COUNT_MAX[name]}")
    if value > COUNT_MAX[name]:
        raise _Rejected(
            f"{name} must be between 0 and {COUNT_MAX[name]}: one AI call produces far less; "
            "report larger usage as several events"
        )
    return value


def _occurred_at(event: dict, now: dt.datetime) -> dt.datetime:
    value = event.get("occurred_at")
    if value is None:
        raise _Rejected("occurred_at is required")
    if not isinstance(value, str) or len(value) > OCCURRED_AT_MAX_LENGTH:
        raise _Rejected("occurred_at must be an ISO-8601 date-time string with a timezone")
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        raise _Rejected("occurred_at must be an ISO-8601 date-time string with a timezone") from None
    if parsed.tzinfo is None or parsed.utcoffset() is None:
        raise _Rejected("occurred_at must include a timezone (Z or ±HH:MM)")
    try:
        occurred_at = parsed.astimezone(dt.UTC)
    except OverflowError:
        raise _Rejected(f"occurred_at must not be before {EARLIEST_OCCURRED_AT.date().isoformat()}") from None
    if occurred_at < EARLIEST_OCCURRED_AT:
        raise _Rejected(f"occurred_at must not be before {EARLIEST_OCCURRED_AT.date().isoformat()}")
    if occurred_at > now + FUTURE_TOLERANCE:
        raise _Rejected("occurred_at is more than 5 minutes in the future")
    return occurred_at


def _parse_int(digits: str) -> int | _OutOfRange:
    # Python refuses to parse integers beyond 4300 digits (a whole-body error); anything beyond 20 digits
    # is out of range for a count anyway, so keep it as a marker and reject just that event.
    return _OutOfRange() if len(digits) > 20 else int(digits)


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON value")


def _object_without_repeated_keys(pairs: list[tuple[str, Any]]) -> dict:
    result = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"the key {key[:40]!r} appears twice in one object")
        result[key] = value
    return result


def _names(names: Collection[str]) -> str:
    """The first five names in sorted order, and how many more: without sorting them all (there may be 400,000)."""
    shown = ", ".join(repr(name[:40]) for name in heapq.nsmallest(5, names))
    return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")
