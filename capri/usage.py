"""Record a batch of usage events from the AI platform into the billing ledger, one result per event."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from billing.ledger import record_usage
from capri.validation import CheckedEvent, check_event
from core.database import utcnow
from core.metrics import USAGE_EVENTS_RECEIVED

log = logging.getLogger("capri.usage")


def report_usage(agency_id: int, events: Sequence[Any]) -> list[dict[str, Any]]:
    """Check each event, record the valid ones in one idempotent insert, and return a result per event.

    Rejected events are never written, so their ids stay free for a corrected resend. Accepted events go
    to the ledger in one statement (all or nothing), where the (agency, "capri", id) unique constraint
    turns repeats, within the batch or across batches and whatever their contents, into ``duplicate``.
    Flushes only; the caller commits.
    """
    now = utcnow()
    checked = [check_event(event, now) for event in events]
    # Insert in id order: concurrent batches that share ids in different orders then take the unique-index
    # locks in the same order, so PostgreSQL never deadlocks them. The sort is stable, so within a batch the
    # first copy of an id is still the one accepted.
    positions = sorted(
        (index for index, item in enumerate(checked) if item.record is not None),
        key=lambda index: checked[index].record.source_event_id,
    )
    outcomes = record_usage(agency_id, [checked[index].record for index in positions])
    inserted = dict(zip(positions, outcomes, strict=True))
    results = [_result(item, inserted.get(index)) for index, item in enumerate(checked)]
    counts = {status: sum(r["status"] == status for r in results) for status in _STATUSES}
    for status, count in counts.items():
        USAGE_EVENTS_RECEIVED.labels(status).inc(count)
    log.info("usage batch recorded", extra={"fields": {"agency_id": agency_id, "events": len(results), **counts}})
    return results


_STATUSES = ("accepted", "duplicate", "rejected")


def _result(item: CheckedEvent, inserted: bool | None) -> dict[str, Any]:
    if item.record is None:
        return {"id": item.event_id, "status": "rejected", "reason": item.reason}
    result: dict[str, Any] = {"id": item.event_id, "status": "accepted" if inserted else "duplicate"}
    if item.flags:
        result["flags"] = list(item.flags)
    return result
