"""The usage ledger records each event once, whatever the duplicates."""

import datetime as dt

import pytest
from sqlalchemy import func, select

from billing.agencies import ensure_agency
from billing.ledger import UsageRecord, record_usage
from billing.models import UsageEvent
from core.database import db

NOW = dt.datetime(2026, 11, 26, 12, 0, tzinfo=dt.UTC)


def record(event_id: str, **fields) -> UsageRecord:
    fields.setdefault("channel_id", "chan-1")
    return UsageRecord(source="capri", source_event_id=event_id, occurred_at=NOW, **fields)


def test_a_duplicate_inside_one_batch_and_across_batches_is_recorded_once(app_context):
    agency = ensure_agency("company-1")
    first = record_usage(agency.id, [record("e1", input_tokens=5), record("e1", input_tokens=5), record("e2")])
    second = record_usage(agency.id, [record("e2"), record("e3")])
    db.session.commit()
    assert first == [True, False, True]
    assert second == [False, True]
    assert db.session.scalar(select(func.count()).select_from(UsageEvent)) == 3


def test_event_ids_are_scoped_per_agency_and_per_source(app_context):
    a, b = ensure_agency("company-a"), ensure_agency("company-b")
    assert record_usage(a.id, [record("same")]) == [True]
    assert record_usage(b.id, [record("same")]) == [True]
    ghl = UsageRecord(source="ghl", source_event_id="same", occurred_at=NOW, location_id="loc", messages=1)
    assert record_usage(a.id, [ghl]) == [True]


@pytest.mark.parametrize(
    "fields",
    [{"channel_id": None}, {"location_id": "loc"}, {"input_tokens": -1}],
)
def test_malformed_records_are_refused_before_any_write(fields):
    with pytest.raises(ValueError):
        record("bad", **fields)


def test_ensure_agency_is_idempotent(app_context):
    first = ensure_agency("company-1", "Acme")
    second = ensure_agency("company-1")
    assert first.id == second.id
    assert second.name == "Acme"
