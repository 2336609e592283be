"""Which Stripe prices can carry Rebill's units, and how the units must reach them (docs/stripe.md §8.1).

A price is judged with its billing meter, as Stripe returned both: usable prices say whether units go as
meter events or as legacy usage records, and what the meter needs in each event.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from billing.states import ReportMode
from billing.stripe_target import StripeTarget


@dataclass(frozen=True)
class PriceInfo:
    """A price and whether Rebill can log units on it, and how."""

    price_id: str
    product_id: str
    nickname: str | None
    unit_amount: int | None
    currency: str
    interval: str | None
    usable: bool
    reason: str | None = None  # why it is not usable
    report_mode: ReportMode | None = None  # when usable
    meter_id: str | None = None
    event_name: str | None = None
    customer_key: str | None = None
    value_key: str | None = None
    formula: str | None = None
    warning: str | None = None

    def target(self, customer_id: str) -> StripeTarget:
        """Where a customer's units on this (usable) price go (a legacy target still needs the customer's item)."""
        return StripeTarget(
            mode=self.report_mode,
            customer_id=customer_id,
            price_id=self.price_id,
            meter_id=self.meter_id,
            event_name=self.event_name,
            customer_key=self.customer_key,
            value_key=self.value_key,
            formula=self.formula,
        )



def classify_price(price: Any, meter: Any | None) -> PriceInfo:
    """Decide whether a price can carry Rebill's units and how they must be sent (docs/stripe.md §2.2, §8.1)."""
    recurring = getattr(price, "recurring", None)
    product = price.product if isinstance(price.product, str) else price.product.id
    base = {
        "price_id": price.id,
        "product_id": product,
        "nickname": getattr(price, "nickname", None),
        "unit_amount": getattr(price, "unit_amount", None),
        "currency": price.currency,
        "interval": getattr(recurring, "interval", None) if recurring else None,
    }
    transform = getattr(price, "transform_quantity", None)
    warning = None
    if transform:
        # Rebill already turns N tokens into one unit; Stripe would divide the units again (docs/stripe.md §1.2).
        divide_by, rounding = getattr(transform, "divide_by", None), getattr(transform, "round", None)
        warning = (
            f"this price divides the reported quantity by {divide_by} (rounding {rounding}), so Stripe would "
            f"bill 1/{divide_by} of Rebill's units; use a price without transform_quantity"
        )
    if not getattr(price, "active", True):
        return PriceInfo(**base, usable=False, reason="this price is archived in Stripe")
    if recurring is None:
        return PriceInfo(**base, usable=False, reason="a one-time price cannot carry usage; pick a metered price")
    if recurring.usage_type != "metered":
        return PriceInfo(
            **base,
            usable=False,
            reason="a licensed (fixed-quantity) price cannot take usage units; pick a metered price",
        )
    meter_id = price_meter_id(price)
    if meter_id is None:
        # A metered price without a meter is a legacy usage-record price (basil changelog, docs/stripe.md §2.2).
        return PriceInfo(**base, usable=True, report_mode=ReportMode.LEGACY, warning=warning)
    if meter is None:
        return PriceInfo(**base, usable=False, reason=f"its billing meter {meter_id} cannot be read", meter_id=meter_id)
    details = {
        "meter_id": meter.id,
        "event_name": meter.event_name,
        "customer_key": meter.customer_mapping.event_payload_key,
        "value_key": meter.value_settings.event_payload_key,
        "formula": meter.default_aggregation.formula,
    }
    if meter.status != "active":
        return PriceInfo(**base, usable=False, reason="its billing meter is inactive", **details)
    if details["formula"] == "last":
        return PriceInfo(
            **base,
            usable=False,
            reason="its meter keeps only the last value sent (formula 'last'), so units cannot add up",
            **details,
        )
    if getattr(meter, "event_time_window", None):
        # Pre-aggregated ingestion keeps only the latest event per window (docs/stripe.md §1.1): units would be lost.
        return PriceInfo(
            **base,
            usable=False,
            reason=f"its meter keeps only the latest event per {meter.event_time_window}, so units cannot add up",
            **details,
        )
    if details["formula"] not in ("sum", "count"):
        return PriceInfo(**base, usable=False, reason=f"unknown meter formula '{details['formula']}'", **details)
    return PriceInfo(**base, usable=True, report_mode=ReportMode.METER, warning=warning, **details)


def price_meter_id(price: Any) -> str | None:
    """Return the id of the billing meter a Stripe price is on, or None (a legacy or licensed price)."""
    recurring = getattr(price, "recurring", None)
    return getattr(recurring, "meter", None) if recurring else None
