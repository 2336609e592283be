"""Which prices can carry units (billing.price_usability), as the gateway reads them from the fake Stripe."""

from __future__ import annotations

from tests.billing.stripe_support import by_id


def test_prices_are_classified_for_unit_reporting(gateway, catalog):
    products = gateway.list_products_with_prices()
    info = by_id(products)
    prices = catalog["prices"]

    summed = info[prices["sum"]["id"]]
    assert (summed.usable, summed.report_mode, summed.formula, summed.warning) == (True, "meter", "sum", None)
    assert (summed.event_name, summed.customer_key, summed.value_key) == ("units_sum", "stripe_customer_id", "value")
    assert summed.meter_id == catalog["meters"]["sum"]["id"]
    assert (summed.unit_amount, summed.currency, summed.interval) == (10, "usd", "month")

    counted = info[prices["count"]["id"]]
    assert (counted.usable, counted.report_mode, counted.formula) == (True, "meter", "count")

    last = info[prices["last"]["id"]]
    assert not last.usable and "last" in last.reason

    assert not info[prices["inactive_meter"]["id"]].usable
    assert "inactive" in info[prices["inactive_meter"]["id"]].reason

    legacy = info[prices["legacy"]["id"]]
    assert (legacy.usable, legacy.report_mode, legacy.meter_id) == (True, "legacy", None)

    transformed = info[prices["transform"]["id"]]
    assert transformed.usable and "divides the reported quantity by 1000" in transformed.warning

    licensed = info[prices["licensed"]["id"]]
    assert not licensed.usable and "licensed" in licensed.reason

    names = {product.product_id: product.name for product in products}
    assert names == {catalog["product"]["id"]: "AI units", catalog["other"]["id"]: "Seats"}


def test_a_meter_with_a_time_window_cannot_carry_units(stripe_server, key, gateway):
    client = stripe_server.client(key)
    meter = client.v1.billing.meters.create(
        {
            "display_name": "hourly",
            "event_name": "hourly",
            "default_aggregation": {"formula": "sum"},
            "event_time_window": "hour",
        }
    )
    price = stripe_server.state.create_price(key, stripe_server.state.create_product(key, "P"), 5, meter=meter.id)
    info = gateway.describe_price(price["id"])
    assert not info.usable and "latest event per hour" in info.reason


def test_describe_price_classifies_one_price(gateway, catalog):
    assert gateway.describe_price(catalog["prices"]["count"]["id"]).formula == "count"
    assert gateway.describe_price(catalog["prices"]["licensed"]["id"]).usable is False
