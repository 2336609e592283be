"""Reading fields out of GHL webhook payloads, which are signed but not always complete (docs/ghl.md §8)."""

from __future__ import annotations

import datetime as dt
from typing import Any

ID_MAX_LENGTH = 64


class PayloadInvalid(ValueError):
    """A verified webhook lacks a field its handler needs; recorded on the delivery, replayable."""


def identifier(event: dict[str, Any], name: str) -> str | None:
    """Return a GHL id field (companyId, locationId, id, messageId …) or None when absent or not a string."""
    value = event.get(name)
    if not isinstance(value, str):
        return None
    value = value.strip()
    if not value:
        return None
    if len(value) > ID_MAX_LENGTH:
        raise PayloadInvalid(f"{name} is longer than {ID_MAX_LENGTH} characters")
    return value


def text(event: dict[str, Any], name: str, max_length: int = 255) -> str | None:
    """Return a free-text field, trimmed and cut to ``max_length``, or None."""
    value = event.get(name)
    if not isinstance(value, str):
        return None
    # NUL is dropped: PostgreSQL text cannot hold it, and a display name loses nothing without it.
    return value.replace("\x00", "").strip()[:max_length] or None


def timestamp(event: dict[str, Any], *names: str) -> dt.datetime | None:
    """Return the first of ``names`` that parses as an ISO-8601 time, as aware UTC."""
    for name in names:
        value = event.get(name)
        if not isinstance(value, str):
            continue
        try:
            parsed = dt.datetime.fromisoformat(value.strip())
            return parsed.replace(tzinfo=dt.UTC) if parsed.tzinfo is None else parsed.astimezone(dt.UTC)
        except (ValueError, OverflowError):  # unreadable, or beyond year 9999 once converted to UTC
            continue
    return None
