"""Monthly caps: a client's units in a period never pass its cap; the crossing event counts up to the cap exactly,
later usage is recorded as capped (shown, never billed) until the period rolls over or the cap is raised."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest
from sqlalchemy import select

from billing.agencies import ensure_agency
from billing.clients import update_client
from billing.estimates import PriceTerms, Tier, charge_minor_units
from billing.models import ClientPeriod, UnitReport, UsageEvent
from billing.periods import calendar_month
from billing.spend import source_status
from billing.units import aggregate_pending_usage
from core.database import db, utcnow
from core.errors import ClientInvalid
from tests.billing.factories import event_states, fresh, make_client, record, reports_of, tokens


@pytest.fixture
def agency(app_context):
    return ensure_agency("company-caps")


def capped_client(agency, cap: int, billing_unit: int = 1000):
    client = make_client(agency, billing_unit=billing_unit)
    client.monthly_cap_units = cap
    db.session.flush()
    return client


def counted_of(event_id: str) -> int:
    return db.session.scalar(select(UsageEvent.counted).where(UsageEvent.source_event_id == event_id))


def test_the_crossing_event_is_billed_up_to_the_cap_exactly_and_later_usage_is_capped(agency):
    client = capped_client(agency, cap=3)
    record(agency, tokens("e1", 2500))
    aggregate_pending_usage()
    assert (fresh(client).units_logged, client.remainder) == (2, 500)

    record(agency, tokens("e2", 4000), tokens("e3", 700))
    aggregate_pending_usage()
    db.session.commit()

    client = fresh(client)
    assert (client.units_logged, client.remainder, client.counted_usage) == (3, 0, 3000)
    assert counted_of("e2") == 500  # only what reaches the cap is billed
    assert event_states(agency) == {"e1": "counted", "e2": "counted", "e3": "capped"}
    assert counted_of("e3") == 700  # measured and shown, never billed
    assert sum(report.units for report in reports_of(client)) == 3
    assert source_status(agency.id, channel="chan-1").status == "capped"


def test_a_cap_reached_within_one_pass_stops_there(agency):
    client = capped_client(agency, cap=2, billing_unit=10)
    record(agency, *[tokens(f"e{n}", 8) for n in range(5)])  # 40 tokens = 4 units, cap 2

    result = aggregate_pending_usage()

    assert result.units == 2 and fresh(client).units_logged == 2 and client.remainder == 0
    assert list(event_states(agency).values()) == ["counted", "counted", "counted", "capped", "capped"]
    assert [counted_of(f"e{n}") for n in range(5)] == [8, 8, 4, 8, 8]


def test_raising_the_cap_bills_new_usage_but_never_the_capped_usage(agency):
    client = capped_client(agency, cap=1, billing_unit=10)
    record(agency, tokens("e1", 25))
    aggregate_pending_usage()
    assert fresh(client).units_logged == 1

    update_client(agency, client.id, {"monthly_cap_units": 5})
    record(agency, tokens("e2", 20))
    aggregate_pending_usage()

    assert fresh(client).units_logged == 3
    assert event_states(agency) == {"e1": "counted", "e2": "counted"}
    assert counted_of("e1") == 10  # its 15 tokens past the old cap stay unbilled


def test_a_new_period_uncaps_the_client(agency):
    client = capped_client(agency, cap=2, billing_unit=10)
    record(agency, tokens("e1", 30))
    aggregate_pending_usage()
    db.session.commit()
    assert fresh(client).units_logged == 2 and source_status(agency.id, channel="chan-1").status == "capped"

    # The subscription renewed: Stripe's new period starts after those units' time (billing.periods caches it).
    now = utcnow()
    db.session.add(ClientPeriod(client_id=client.id, customer_id=client.stripe_customer_id,
                                price_id=client.stripe_price_id, period_start=now,
                                period_end=now + dt.timedelta(days=30)))
    db.session.commit()
    assert source_status(agency.id, channel="chan-1").status == "active"
    record(agency, tokens("e2", 30, occurred_at=now))

    assert aggregate_pending_usage().units == 2
    assert event_states(agency) == {"e1": "counted", "e2": "counted"}


def test_clients_without_a_cap_are_not_limited(agency):
    client = make_client(agency, billing_unit=1)
    record(agency, tokens("e1", 10**6))
    assert aggregate_pending_usage().units == 10**6
    assert fresh(client).units_logged == 10**6


def test_last_months_units_do_not_count_toward_this_months_cap(agency):
    client = capped_client(agency, cap=2, billing_unit=10)
    start, _ = calendar_month(utcnow())
    db.session.add(UnitReport(agency_id=agency.id, client_id=client.id, units=2, status="sent",
                              usage_timestamp=start - dt.timedelta(seconds=1), identifier="rebill_old_1"))
    record(agency, tokens("e1", 20))
    assert aggregate_pending_usage().units == 2


# ---- caps in currency -------------------------------------------------------------------------------------

GRADUATED_TERMS = PriceTerms(
    currency="usd",
    tiers_mode="graduated",
    tiers=(Tier(5, Decimal(500)), Tier(10, Decimal(400), Decimal(1000)), Tier(None, Decimal(300))),
)


def priced_client(agency, terms: PriceTerms, billing_unit: int = 10):
    client = make_client(agency, billing_unit=billing_unit)
    db.session.add(ClientPeriod(client_id=client.id, customer_id=client.stripe_customer_id,
                                price_id=client.stripe_price_id, price_terms=terms.to_json()))
    db.session.flush()
    return client


def test_a_cap_in_money_bills_the_units_the_amount_buys_at_the_price_exactly(agency):
    client = priced_client(agency, GRADUATED_TERMS)

    update_client(agency, client.id, {"monthly_cap_amount": "43"})  # 5 x $5, $10 flat, 2 x $4 = $43: 7 units
    db.session.commit()
    client = fresh(client)
    assert (client.monthly_cap_units, client.monthly_cap_amount, client.monthly_cap_currency) == (7, "43.00", "usd")

    record(agency, tokens("e1", 100))  # 10 units of usage
    aggregate_pending_usage()
    db.session.commit()
    assert fresh(client).units_logged == 7
    assert charge_minor_units(GRADUATED_TERMS, fresh(client).units_logged) == 4300
    assert source_status(agency.id, channel="chan-1").status == "capped"


def test_a_cap_in_units_replaces_a_cap_in_money_and_a_bad_amount_changes_nothing(agency):
    client = priced_client(agency, GRADUATED_TERMS)
    update_client(agency, client.id, {"monthly_cap_amount": "25.00"})
    assert (fresh(client).monthly_cap_units, client.monthly_cap_amount) == (5, "25.00")

    for amount, reason in [("12.345", "decimal places"), ("4.99", "does not cover one unit"), (25, "decimal"),
                           ("-1", "positive")]:
        with pytest.raises(ClientInvalid) as refused:
            update_client(agency, client.id, {"monthly_cap_amount": amount})
        assert reason in refused.value.errors["monthly_cap_amount"]
        assert (fresh(client).monthly_cap_units, client.monthly_cap_amount) == (5, "25.00")
    with pytest.raises(ClientInvalid) as refused:
        update_client(agency, client.id, {"monthly_cap_amount": "30", "monthly_cap_units": 3})
    assert set(refused.value.errors) == {"monthly_cap_amount", "monthly_cap_units"}

    update_client(agency, client.id, {"monthly_cap_units": 9})
    client = fresh(client)
    assert (client.monthly_cap_units, client.monthly_cap_amount, client.monthly_cap_currency) == (9, None, None)
    # Other edits keep a cap in money as it is (no new conversion).
    update_client(agency, client.id, {"monthly_cap_amount": "100"})
    update_client(agency, client.id, {"nickname": "Renamed"})
    assert (fresh(client).monthly_cap_units, client.monthly_cap_amount) == (25, "100.00")
    # Clearing the amount clears the cap (its units were the amount's), not only the money view of it.
    update_client(agency, client.id, {"monthly_cap_amount": None})
    client = fresh(client)
    assert (client.monthly_cap_units, client.monthly_cap_amount, client.monthly_cap_currency) == (None, None, None)
    # Clearing an amount that is not set leaves a cap in units alone.
    update_client(agency, client.id, {"monthly_cap_units": 4})
    update_client(agency, client.id, {"monthly_cap_amount": None})
    assert fresh(client).monthly_cap_units == 4
