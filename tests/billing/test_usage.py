"""What the agency sees: a client's counters, daily series and reports, and the unmapped usage list."""

import datetime as dt

import pytest

from billing.agencies import ensure_agency
from billing.clients import update_client
from billing.units import aggregate_pending_usage
from billing.usage import client_usage, unmapped_usage
from core.database import db, utcnow
from core.errors import NotFound
from tests.billing.factories import capri_messages, ghl_message, make_client, record, reports_of, tokens


@pytest.fixture
def agency(app_context):
    return ensure_agency("company-usage")


def test_client_usage_shows_counters_units_reported_and_recent_reports(agency):
    client = make_client(agency, billing_unit=100)
    day = utcnow().replace(hour=12, minute=0, second=0, microsecond=0)  # noon of a past day
    if day > utcnow():
        day -= dt.timedelta(days=1)
    day_before = day - dt.timedelta(days=1)
    record(
        agency,
        tokens("y1", 150, occurred_at=day_before),
        tokens("t1", 120, occurred_at=day, model="big"),
        tokens("old", 10, occurred_at=day - dt.timedelta(days=45)),  # outside the 30-day series
    )
    aggregate_pending_usage()
    first, = reports_of(client)  # fmt: skip
    first.status, first.sent_at, first.attempts = "sent", utcnow(), 1
    update_client(agency, client.id, {"status": "paused"})
    record(agency, tokens("p1", 40, occurred_at=day))
    aggregate_pending_usage()
    record(agency, tokens("waiting", 5))
    db.session.commit()

    usage = client_usage(agency, client.id)
    assert {key: usage[key] for key in ("counted_usage", "units_logged", "units_reported", "remainder")} == {
        "counted_usage": 280,
        "units_logged": 2,
        "units_reported": 2,
        "remainder": 80,
    }
    assert (usage["units_awaiting_stripe"], usage["paused_usage"], usage["events_awaiting_aggregation"]) == (0, 40, 1)
    assert (usage["status"], usage["charge_by"], usage["billing_unit"]) == ("paused", "tokens", 100)
    daily = {day["date"]: day for day in usage["daily"]}
    assert len(usage["daily"]) == 30 and usage["daily"][-1]["date"] == utcnow().date().isoformat()
    assert daily[day.date().isoformat()] == {
        "date": day.date().isoformat(),
        "usage": 120,
        "paused_usage": 40,
        "shadow_usage": 0,
        "events": 2,
    }
    assert daily[day_before.date().isoformat()]["usage"] == 150
    assert sum(day["usage"] for day in usage["daily"]) == 270  # the 45-day-old event is outside the window
    assert {row["model"]: row["input_tokens"] + row["output_tokens"] for row in usage["models"]} == {
        "big": 120,
        "test-model": 160,
    }
    (report,) = usage["reports"]
    assert report["identifier"] == f"rebill_{client.report_prefix}_{client.id}_1"
    assert (report["units"], report["status"], report["attempts"], report["last_error"]) == (2, "sent", 1, None)
    assert report["sent_at"] is not None


def test_units_not_yet_sent_are_shown_as_awaiting_stripe(agency):
    client = make_client(agency, billing_unit=1)
    record(agency, tokens("e1", 3))
    aggregate_pending_usage()
    record(agency, tokens("e2", 4))
    aggregate_pending_usage()
    failed = reports_of(client)[1]
    failed.status, failed.last_error = "failed", "no such customer"
    usage = client_usage(agency, client.id)
    assert (usage["units_reported"], usage["units_awaiting_stripe"]) == (0, 7)
    assert [(r["units"], r["status"], r["last_error"]) for r in usage["reports"]] == [
        (4, "failed", "no such customer"),
        (3, "pending", None),
    ]


def test_client_usage_of_another_agency_or_a_deleted_client_is_not_found(agency):
    client = make_client(agency)
    with pytest.raises(NotFound):
        client_usage(ensure_agency("company-else"), client.id)
    client.deleted_at = utcnow()
    with pytest.raises(NotFound):
        client_usage(agency, client.id)


def test_unmapped_usage_lists_sources_no_live_client_maps(agency):
    make_client(agency, source_key="chan-mapped")
    make_client(agency, provider="ghl", source_key="loc-mapped", charge_by="messages")
    record(
        agency,
        tokens("c1", 100, channel="chan-free"),
        tokens("c2", 50, channel="chan-free"),
        capri_messages("c3", 2, channel="chan-free"),
        ghl_message("g1", "loc-free", "inbound"),
        ghl_message("g2", "loc-free", "outbound"),
        tokens("g3", 30, location="loc-free"),
        tokens("mapped", 70, channel="chan-mapped"),
        tokens("early", 5, channel="chan-mapped-later"),
    )
    record(ensure_agency("company-else"), tokens("theirs", 1, channel="chan-theirs"))
    aggregate_pending_usage()
    record(agency, tokens("pending", 1, channel="chan-new"))  # not aggregated yet: not listed yet
    # A source mapped after its usage arrived: that usage stays unbilled but is no longer listed here.
    make_client(agency, source_key="chan-mapped-later")
    db.session.commit()

    rows = {row["channel_id"] or row["location_id"]: row for row in unmapped_usage(agency)}
    assert set(rows) == {"chan-free", "loc-free"}
    channel, location = rows["chan-free"], rows["loc-free"]
    assert (channel["provider"], channel["location_id"], channel["tokens"], channel["messages"]) == (
        "capri_api",
        None,
        150,
        2,
    )
    assert (channel["input_tokens"], channel["output_tokens"], channel["events"]) == (75, 75, 3)
    assert (location["provider"], location["channel_id"], location["tokens"], location["messages"]) == (
        "ghl",
        None,
        30,
        2,
    )
    assert location["events"] == 3
    assert location["first_seen"] <= location["last_seen"] <= utcnow()
    assert location["last_seen"].tzinfo is not None
