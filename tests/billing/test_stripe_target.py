"""The Stripe target as one value (billing.stripe_target), kept in a client's and a report's columns."""

from __future__ import annotations

from billing.models import RebillClient, UnitReport
from billing.stripe_target import CLIENT_COLUMNS, REPORT_COLUMNS, StripeTarget

COUNT_METER = StripeTarget(
    mode="meter",
    customer_id="cus_1",
    price_id="price_1",
    meter_id="mtr_1",
    event_name="ai_units",
    customer_key="customer",
    value_key="units",
    formula="count",
)
LEGACY = StripeTarget(mode="legacy", customer_id="cus_1", price_id="price_2", subscription_item_id="si_1")


def test_a_client_keeps_its_target_in_its_columns():
    client = RebillClient()
    client.stripe_target = LEGACY
    assert (client.report_mode, client.stripe_customer_id, client.stripe_price_id) == ("legacy", "cus_1", "price_2")
    assert (client.subscription_item_id, client.meter_id, client.meter_event_name) == ("si_1", None, None)
    assert client.stripe_target == LEGACY
    client.stripe_target = COUNT_METER
    assert (client.meter_event_name, client.meter_formula, client.subscription_item_id) == ("ai_units", "count", None)
    assert client.stripe_target == COUNT_METER


def test_the_client_columns_leave_out_the_agency_s_account():
    assert "account" not in CLIENT_COLUMNS
    assert "account" in REPORT_COLUMNS
    client = RebillClient()
    client.stripe_target = StripeTarget(mode="legacy", customer_id="cus_1", price_id="price_2", account="acct_1")
    assert client.stripe_target.account is None


def test_a_report_records_the_whole_target_and_none_before_its_first_offer():
    recorded = StripeTarget(**{**COUNT_METER.__dict__, "account": "acct_1", "subscription_item_id": "si_9"})
    report = UnitReport(**recorded.columns(REPORT_COLUMNS))
    assert (report.target_account, report.target_mode, report.target_event_name) == ("acct_1", "meter", "ai_units")
    assert report.target == recorded
    assert UnitReport().target is None


def test_the_series_is_what_stripe_totals():
    other_shape = StripeTarget(
        mode="meter", customer_id="cus_1", price_id="price_1", meter_id="mtr_1", event_name="ai_units",
        formula="sum", subscription_item_id="si_1", account="acct_1",
    )  # fmt: skip
    assert other_shape.series() == COUNT_METER.series()
    assert other_shape.series() != StripeTarget(**{**COUNT_METER.__dict__, "customer_id": "cus_2"}).series()
    assert (COUNT_METER.name, LEGACY.name) == ("ai_units", "price_2")
    assert LEGACY.series() == StripeTarget(mode="legacy", customer_id="cus_1", price_id="price_2")


def test_events_get_stripe_s_default_payload_keys_where_none_is_recorded():
    assert (LEGACY.customer_key, LEGACY.value_key) == (None, None)
    filled = LEGACY.with_payload_defaults()
    assert (filled.customer_key, filled.value_key) == ("stripe_customer_id", "value")
    assert COUNT_METER.with_payload_defaults() == COUNT_METER
