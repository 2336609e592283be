"""Where a client's units go in Stripe, as one value (docs/stripe.md §8; docs/billing-rules.md rule 9).

A meter target names the customer, the price and its billing meter: the meter's event name, payload keys and
formula (docs/stripe.md §1.1, §1.3). A legacy target (a metered price without a meter, docs/stripe.md §2.2)
names the customer, the price and the customer's subscription item on it (§2.3). A client keeps its current
target in its own columns and a unit report the one its units were first offered to; ``CLIENT_COLUMNS`` and
``REPORT_COLUMNS`` say which columns hold each field, and ``from_columns``/``columns`` map the value onto them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from billing.states import ReportMode

# A meter's payload keys when it names none: Stripe's defaults (docs/stripe.md §1.1).
DEFAULT_CUSTOMER_KEY = "stripe_customer_id"
DEFAULT_VALUE_KEY = "value"

# Field -> column, for the client's current target (billing.models.RebillClient): the agency's account is
# not the client's to keep.
CLIENT_COLUMNS = {
    "mode": "report_mode",
    "customer_id": "stripe_customer_id",
    "price_id": "stripe_price_id",
    "meter_id": "meter_id",
    "event_name": "meter_event_name",
    "customer_key": "meter_customer_key",
    "value_key": "meter_value_key",
    "formula": "meter_formula",
    "subscription_item_id": "subscription_item_id",
}
# Field -> column, for the target a unit report recorded at its first offer (billing.models.UnitReport).
REPORT_COLUMNS = {
    "account": "target_account",
    "mode": "target_mode",
    "customer_id": "target_customer",
    "price_id": "target_price",
    "meter_id": "target_meter",
    "event_name": "target_event_name",
    "customer_key": "target_customer_key",
    "value_key": "target_value_key",
    "formula": "target_formula",
    "subscription_item_id": "target_subscription_item",
}


@dataclass(frozen=True)
class StripeTarget:
    """A Stripe customer with the meter (or legacy price) its units go to, and how they must be sent."""

    mode: ReportMode
    customer_id: str
    price_id: str | None
    meter_id: str | None = None
    event_name: str | None = None
    customer_key: str | None = None
    value_key: str | None = None
    formula: str | None = None  # "sum" | "count" for meters Rebill can use
    subscription_item_id: str | None = None  # legacy: where usage records go
    account: str | None = None  # the agency's Stripe account, when known

    @classmethod
    def from_columns(cls, row: Any, columns: Mapping[str, str]) -> StripeTarget | None:
        """Read a target from a row (an ORM object or a result row); None when it records no target."""
        values = {field: getattr(row, column) for field, column in columns.items()}
        return None if values["mode"] is None else cls(**values)

    def columns(self, columns: Mapping[str, str]) -> dict[str, Any]:
        """Return the column values that record this target in a table (``CLIENT_COLUMNS``/``REPORT_COLUMNS``)."""
        return {column: getattr(self, field) for field, column in columns.items()}

    @property
    def is_legacy(self) -> bool:
        """Legacy usage records go to the customer's subscription item, and only within its current period."""
        return self.mode == ReportMode.LEGACY

    @property
    def name(self) -> str:
        """What Stripe totals the customer's units under: the meter's event name, or the legacy price id."""
        return (self.event_name if self.mode == ReportMode.METER else self.price_id) or ""

    def series(self) -> StripeTarget:
        """The target as Stripe totals it (customer and meter, or customer and legacy price), for grouping.

        What only shapes the events (payload keys, formula), the subscription item and the account are left
        out, so every client and report adding to the same total have the same series.
        """
        return StripeTarget(
            mode=self.mode,
            customer_id=self.customer_id,
            price_id=self.price_id,
            meter_id=self.meter_id,
            event_name=self.event_name if self.mode == ReportMode.METER else None,
        )

    def with_payload_defaults(self) -> StripeTarget:
        """The target with Stripe's default payload keys where none is recorded (events always need both)."""
        return replace(
            self,
            customer_key=self.customer_key or DEFAULT_CUSTOMER_KEY,
            value_key=self.value_key or DEFAULT_VALUE_KEY,
        )

