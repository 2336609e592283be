"""Fixtures for the usage API: agencies with keys, an event builder and a poster."""

from __future__ import annotations

import datetime as dt
import itertools
from dataclasses import dataclass

import pytest
from sqlalchemy import func, select

from billing.agencies import ensure_agency
from billing.models import UsageEvent
from capri.api_keys import create_api_key
from core.database import db, utcnow

_ids = itertools.count(1)


@dataclass
class KeyedAgency:
    """An agency and one of its live API keys."""

    id: int
    company_id: str
    key: str
    key_id: int


def make_keyed_agency(company_id: str) -> KeyedAgency:
    """Create an agency with one API key, committed (call inside an app context)."""
    agency = ensure_agency(company_id, f"Agency {company_id}")
    api_key, full_key = create_api_key(agency.id, "test")
    db.session.commit()
    return KeyedAgency(agency.id, company_id, full_key, api_key.id)


@pytest.fixture
def agency(app_context) -> KeyedAgency:
    """Agency A with a live key."""
    return make_keyed_agency("company-a")


@pytest.fixture
def other_agency(app_context) -> KeyedAgency:
    """Agency B with a live key."""
    return make_keyed_agency("company-b")


def iso(moment: dt.datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def event(**fields) -> dict:
    """Return a valid event; fields override (None values stay, use `drop` to remove a key)."""
    body = {
        "id": f"evt-{next(_ids)}",
        "channel": "chan-1",
        "input_tokens": 120,
        "output_tokens": 30,
        "messages": 1,
        "model": "gpt-4o-mini",
        "occurred_at": iso(utcnow() - dt.timedelta(minutes=1)),
    }
    body.update(fields)
    return body


def without(body: dict, *names: str) -> dict:
    return {key: value for key, value in body.items() if key not in names}


def post_usage(client, key: str | None, payload, *, headers: dict | None = None):
    """POST a usage body (a dict/list is sent as JSON, bytes/str as they are)."""
    all_headers = {"Content-Type": "application/json"}
    if key is not None:
        all_headers["Authorization"] = f"Bearer {key}"
    all_headers.update(headers or {})
    if isinstance(payload, bytes | str):
        return client.post("/api/v1/usage", data=payload, headers=all_headers)
    return client.post("/api/v1/usage", json=payload, headers=all_headers)


def ledger_rows(agency_id: int | None = None) -> list[UsageEvent]:
    """Return the ledger rows (of one agency) by agency and event id, read fresh."""
    db.session.rollback()
    query = select(UsageEvent)
    if agency_id is not None:
        query = query.where(UsageEvent.agency_id == agency_id)
    return sorted(db.session.scalars(query), key=lambda row: (row.agency_id, row.source_event_id))


def ledger_count() -> int:
    db.session.rollback()
    return db.session.scalar(select(func.count()).select_from(UsageEvent))
