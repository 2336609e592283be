"""Rules 8 and 12 on the aggregation side: an impossible value is quarantined where it is (one event, one
client) with a reason the agency can read, and one agency's bad data never stops the pass for the others.

Issue 9, scenario 5: a client's counter overflowing BIGINT used to raise inside the single aggregation
transaction, so every tick failed the same way and every agency's events stayed pending.
"""

import pytest
from sqlalchemy import select, update

from billing.agencies import ensure_agency
from billing.models import RebillClient, UnitReport, UsageEvent
from billing.units import CLIENT_USAGE_MAX, aggregate_pending_usage, report_identifier
from billing.usage import client_usage
from core.database import db
from tests.billing.factories import NOW, event_states, fresh, make_client, pending_count, record, reports_of, tokens

BIGINT_MAX = 2**63 - 1


@pytest.fixture
def agencies(app_context):
    """Agency A misbehaves; agency B must not notice."""
    return ensure_agency("company-bad"), ensure_agency("company-good")


def store_event_as_before_the_bounds(agency, event_id: str, **counts) -> None:
    """Store an event the way the usage API accepted it before rule 12 (up to 10^12 per count)."""
    db.session.add(
        UsageEvent(
            agency_id=agency.id, source="capri", source_event_id=event_id, channel_id="chan-1",
            occurred_at=NOW, **counts,
        )
    )
    db.session.flush()


def set_client(client: RebillClient, **values) -> None:
    """Put a client row into a state only old or damaged data can have (no service writes it)."""
    db.session.execute(update(RebillClient).where(RebillClient.id == client.id).values(**values))
    db.session.commit()


def test_scenario5_a_client_at_the_bigint_limit_is_quarantined_and_other_agencies_are_counted(agencies):
    bad, good = agencies
    full = make_client(bad, billing_unit=1000)
    other = make_client(good, billing_unit=10)
    db.session.commit()
    set_client(full, counted_usage=BIGINT_MAX - 500, units_logged=(BIGINT_MAX - 500) // 1000)
    record(bad, tokens("a1", 1000))
    record(good, tokens("b1", 25))
    db.session.commit()

    result = aggregate_pending_usage()
    db.session.commit()

    assert (fresh(other).counted_usage, other.units_logged, other.remainder) == (25, 2, 5)
    assert [report.units for report in reports_of(other)] == [2]
    full = fresh(full)
    assert full.counted_usage == BIGINT_MAX - 500  # nothing added, nothing overflowed
    assert "lifetime limit" in full.quarantine_reason and "not billed" in full.quarantine_reason
    assert reports_of(full) == []
    assert event_states(bad) == {"a1": "quarantined"}
    assert (result.events, result.quarantined, result.failed_agencies) == (2, 1, ())

    # Later passes keep the client quarantined and everyone else counting; its usage stays visible.
    record(bad, tokens("a2", 10))
    record(good, tokens("b2", 5))
    aggregate_pending_usage()
    db.session.commit()
    assert event_states(bad) == {"a1": "quarantined", "a2": "quarantined"}
    assert fresh(other).units_logged == 3
    usage = client_usage(bad, full.id)
    assert (usage["quarantined_events"], usage["quarantine_reason"]) == (2, full.quarantine_reason)
    assert pending_count() == 0


def test_rule12_usage_that_reaches_the_lifetime_limit_counts_up_to_it_exactly(agencies):
    bad, _ = agencies
    client = make_client(bad, billing_unit=1)
    db.session.commit()
    set_client(client, counted_usage=CLIENT_USAGE_MAX - 30, units_logged=CLIENT_USAGE_MAX - 30)
    record(bad, tokens("fits", 30), tokens("over", 1), tokens("later", 1))
    aggregate_pending_usage()
    db.session.commit()

    client = fresh(client)
    assert (client.counted_usage, client.units_logged) == (CLIENT_USAGE_MAX, CLIENT_USAGE_MAX)
    assert [report.units for report in reports_of(client)] == [30]
    assert event_states(bad) == {"fits": "counted", "over": "quarantined", "later": "quarantined"}
    assert client.quarantine_reason.startswith(f"its usage stopped counting at {CLIENT_USAGE_MAX:,} tokens")


def test_rule12_an_event_beyond_one_ai_call_is_quarantined_and_its_client_goes_on_counting(agencies):
    bad, _ = agencies
    client = make_client(bad, billing_unit=100)
    store_event_as_before_the_bounds(bad, "huge", input_tokens=10**12, output_tokens=10**12)
    store_event_as_before_the_bounds(bad, "chatty", messages=10**12)
    record(bad, tokens("normal", 250))
    db.session.commit()

    result = aggregate_pending_usage()
    db.session.commit()

    assert event_states(bad) == {"huge": "quarantined", "chatty": "quarantined", "normal": "counted"}
    assert (fresh(client).counted_usage, client.units_logged, client.quarantine_reason) == (250, 2, None)
    assert result.quarantined == 2
    assert client_usage(bad, client.id)["quarantined_events"] == 2


def test_rule12_a_client_whose_billing_unit_is_not_positive_is_quarantined_not_divided_by(agencies):
    bad, good = agencies
    broken = make_client(bad, billing_unit=10)
    other = make_client(good, billing_unit=10)
    db.session.commit()
    set_client(broken, billing_unit=0)
    record(bad, tokens("a1", 50))
    record(good, tokens("b1", 50))
    db.session.commit()

    aggregate_pending_usage()
    db.session.commit()

    assert fresh(other).units_logged == 5
    assert "billing unit is 0" in fresh(broken).quarantine_reason
    assert (broken.counted_usage, event_states(bad)) == (0, {"a1": "quarantined"})


def test_rule8_an_unforeseen_failure_holds_back_only_the_failing_agencys_usage(agencies):
    bad, good = agencies
    damaged = make_client(bad, billing_unit=1)
    other = make_client(good, billing_unit=1)
    # Damaged data nobody checks for: the outbox already holds the identifier A's next report will use
    # (say, a client row restored from an older backup than the outbox), so A's report INSERT fails.
    db.session.add(
        UnitReport(
            agency_id=bad.id, client_id=damaged.id, units=1, usage_timestamp=NOW, status="sent",
            identifier=report_identifier(damaged.report_prefix, damaged.id, 1),
        )
    )
    record(bad, tokens("a1", 3))
    record(good, tokens("b1", 4))
    db.session.commit()

    result = aggregate_pending_usage()
    db.session.commit()

    assert result.failed_agencies == (bad.id,)
    assert (fresh(other).units_logged, [report.units for report in reports_of(other)]) == (4, [4])
    assert event_states(good) == {"b1": "counted"}
    assert event_states(bad) == {"a1": "pending"}  # kept, retried by every later pass
    assert fresh(damaged).counted_usage == 0
    assert db.session.scalar(select(UnitReport.units).where(UnitReport.client_id == damaged.id)) == 1
