"""The one gateway to Stripe: an agency's key, base addresses, API versions, timeouts, retries, typed errors.

Every call runs on a ``stripe.StripeClient`` built for one agency's key; ``stripe.api_key`` is never set, so
tenants can never borrow each other's credentials (docs/stripe.md §3.3). The Stripe facts cited below are in
docs/stripe.md, checked against stripe-python 16.1.0.
"""

from __future__ import annotations

import datetime as dt
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, TypeVar

import stripe
from flask import current_app

from billing.errors import BillingError, StripeKeyInvalid
from billing.estimates import PriceTerms, PriceTermsInvalid, price_terms
from billing.models import Agency
from billing.price_usability import PriceInfo, classify_price, price_meter_id
from billing.stripe_target import StripeTarget
from billing.stripe_transport import DEFAULT_TIMEOUT_SECONDS, StripeHttpClient
from core.encryption import SecretUnreadable, secret_box
from core.metrics import STRIPE_CALLS

# Usage records were removed in 2025-03-31.basil and the SDK always sends its pinned version, so legacy
# calls pin the last pre-basil version per request
# (docs.stripe.com/billing/subscriptions/usage-based-legacy/sdk-upgrade; docs/stripe.md §2.2).
LEGACY_USAGE_API_VERSION = "2025-02-24.acacia"
DEFAULT_MAX_NETWORK_RETRIES = 2
KEY_PATTERN = re.compile(r"^(sk|rk)_(test|live)_[A-Za-z0-9_]{8,}$")
# Stripe refuses a reused meter-event identifier with this message; it means "already delivered"
# (langfuse/langfuse PR #16292; docs/stripe.md §1.4 and §7.1).
DUPLICATE_IDENTIFIER = "An event already exists with identifier"
# 403 bodies name the missing permission as 'rak_charge_write' or 'checkout_session_read' (docs/stripe.md §4.1).
PERMISSION_PATTERN = re.compile(r"'((?:rak_)?[a-z_]+_(?:read|write))'")
ACCOUNT_PATTERN = re.compile(r"account '(acct_[A-Za-z0-9]+)'")
PAGE_SIZE = 100

T = TypeVar("T")


class StripeGatewayError(BillingError):
    """Stripe did not do what was asked; ``reason`` is safe to show the agency."""

    def __init__(self, reason: str, stripe_message: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.stripe_message = stripe_message or reason


class StripeUnavailable(StripeGatewayError):
    """Stripe could not answer now (429, 5xx, connection error, timeout): try again later."""


class StripeKeyRejected(StripeGatewayError):
    """Stripe refused the agency's key (401) or a permission of it (403): the agency must fix the key.

    ``permission_missing``: a 403, so the key works and only this kind of request is refused (a restricted
    key without that permission); other requests with the key may still succeed.
    """

    def __init__(self, reason: str, stripe_message: str | None = None, *, permission_missing: bool = False):
        super().__init__(reason, stripe_message)
        self.permission_missing = permission_missing


class StripeRequestRejected(StripeGatewayError):
    """Stripe refused this request (another 4xx): retrying the same request cannot help."""

    def __init__(self, reason: str, code: str | None = None):
        super().__init__(reason)
        self.code = code


class MeterUnknown(StripeRequestRejected):
    """A meter target recorded without its meter's id (saved before Rebill kept it): its totals cannot be read."""

    def __init__(self):
        super().__init__("the meter id is unknown; edit the client to refresh its price")


# The rebill_stripe_calls_total outcome of each failure kind.
_OUTCOMES = {
    StripeUnavailable: "unavailable",
    StripeKeyRejected: "key_rejected",
    StripeRequestRejected: "request_rejected",
}


@dataclass(frozen=True)
class StripeAccount:
    """The Stripe account behind a validated key."""

    account_id: str | None
    mode: str  # "test" | "live"
    display_name: str | None


@dataclass(frozen=True)
class ProductPrices:
    """A product with its active prices."""

    product_id: str
    name: str
    prices: list[PriceInfo] = field(default_factory=list)


@dataclass(frozen=True)
class PriceTermsInfo:
    """How a price charges (None with the reason when Rebill cannot price it), with names to show."""

    terms: PriceTerms | None
    problem: str | None
    product_name: str | None
    price_name: str | None


@dataclass(frozen=True)
class CustomerInfo:
    """A Stripe customer as the customer picker shows it."""

    id: str
    name: str | None
    email: str | None


@dataclass(frozen=True)
class MeterDelivery:
    """What Stripe did with one report: events accepted now and events it already had."""

    events_accepted: int
    events_already_there: int


@dataclass(frozen=True)
class WebhookEndpoint:
    """A webhook endpoint Rebill created in the agency's account; ``secret`` is only known at creation."""

    endpoint_id: str
    secret: str


@dataclass(frozen=True)
class MeterErrorSample:
    """One meter event Stripe named in an error report: its identifier (ours) and why it was invalid."""

    code: str
    message: str
    identifier: str


@dataclass(frozen=True)
class MeterErrorReport:
    """A ``v1.billing.meter.error_report_triggered`` event as fetched: the meter, how many meter events were
    invalid in its window, and the samples Stripe names (at most a few per error type)."""

    event_id: str
    meter_id: str | None
    error_count: int
    samples: tuple[MeterErrorSample, ...]


@dataclass(frozen=True)
class SubscriptionPeriod:
    """The customer's live subscription item on a price and its current billing period [start, end)."""

    subscription_item_id: str
    start: dt.datetime
    end: dt.datetime


@dataclass(frozen=True)
class LiveItem:
    """A live subscription item of a customer: its price, the price's billing meter (None: legacy or licensed),
    and its current period."""

    price_id: str
    meter_id: str | None
    period: SubscriptionPeriod


def item_for(items: list[LiveItem], price_id: str | None, meter_id: str | None) -> LiveItem | None:
    """The customer's item that bills units sent for a price: the item on the price; without one, and given the
    price's meter, the item on any price of the meter whose current period started last.

    Stripe bills a meter's events on every live item of the customer whose price uses the meter (events name a
    customer, not an item: docs/stripe.md §1.2): after a plan change to another price of the same meter the new
    item bills them. With several such items, a timestamp in the period that started last lies in the current
    period of all of them. A legacy price has no meter: only its own item.
    """
    for item in items:
        if price_id and item.price_id == price_id:
            return item
    on_meter = [item for item in items if meter_id and item.meter_id == meter_id]
    return max(on_meter, key=lambda item: item.period.start, default=None)


@dataclass(frozen=True)
class StripeWindowTotal:
    """Stripe's aggregated usage of one customer over a window (meter summaries or a usage-record period)."""

    total: Decimal
    start: dt.datetime
    end: dt.datetime


def gateway_for(agency: Agency) -> StripeGateway:
    """Return a gateway on the agency's own key (decrypted now, never stored in clear)."""
    if not agency.stripe_key_ciphertext:
        raise StripeKeyRejected("no Stripe key is connected")
    try:
        api_key = secret_box().decrypt(agency.stripe_key_ciphertext)
    except SecretUnreadable:
        raise StripeKeyRejected("the stored Stripe key cannot be decrypted; connect the key again") from None
    config = current_app.config
    return StripeGateway(
        api_key,
        config["STRIPE_API_BASE"],
        timeout=config["STRIPE_TIMEOUT_SECONDS"],
        max_network_retries=config["STRIPE_NETWORK_ATTEMPTS"] - 1,
    )


def count_event_identifier(identifier: str, number: int) -> str:
    """Return the identifier of event ``number`` (1-based) of a report on a count meter."""
    return f"{identifier}-{number}"


def key_mode(api_key: str) -> str:
    """Return "test" or "live" for a secret or restricted key; raise StripeKeyInvalid for anything else."""
    match = KEY_PATTERN.match(api_key or "")
    if match is None:
        raise StripeKeyInvalid(
            "paste a secret key (sk_test_…/sk_live_…) or a restricted key (rk_test_…/rk_live_…); "
            "publishable keys (pk_…) and webhook secrets cannot be used"
        )
    return match.group(2)


class StripeGateway:
    """Business operations on one agency's Stripe account."""

    def __init__(
        self,
        api_key: str,
        api_base: str,
        *,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        max_network_retries: int = DEFAULT_MAX_NETWORK_RETRIES,
    ):
        self._api_key = api_key
        base = api_base.rstrip("/")
        # StripeClient defaults to 0 retries and an 80 s timeout; both are set explicitly (docs/stripe.md §3.2, §3.4).
        self._client = stripe.StripeClient(
            api_key,
            base_addresses={"api": base, "meter_events": base},
            http_client=StripeHttpClient(timeout=timeout),
            max_network_retries=max_network_retries,
        )
        self._calls = 0
        self._calls_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<StripeGateway key=…{self._api_key[-4:]}>"

    @property
    def calls(self) -> int:
        """Count the Stripe API operations this gateway started (the SDK's own retries not included)."""
        return self._calls

    def count_calls_of(self, replaced: StripeGateway) -> None:
        """Count the calls of the gateway this one replaces (the agency's earlier key) as this one's."""
        with self._calls_lock:
            self._calls += replaced.calls

    # ---- key and account ----------------------------------------------------------------------------

    def validate_key(self) -> StripeAccount:
        """Check the key with Stripe; raise StripeKeyInvalid naming what is wrong (bad key, missing permission).

        StripeUnavailable (Stripe unreachable) propagates: the key may be fine, so the agency should retry.
        """
        mode = key_mode(self._api_key)
        try:
            # One cheap read that the job needs anyway: proves the key and billing_meter_read (docs/stripe.md §4.3).
            self._call(lambda: self._client.v1.billing.meters.list({"limit": 1}))
            account_id, display_name = self._account()
        except StripeKeyRejected as error:
            raise StripeKeyInvalid(error.reason) from None
        except StripeRequestRejected as error:
            raise StripeKeyInvalid(f"Stripe refused the key check: {error.reason}") from None
        return StripeAccount(account_id=account_id, mode=mode, display_name=display_name)

    def _account(self) -> tuple[str | None, str | None]:
        """Read the account id and name; restricted keys often lack account read, so a 403 is not fatal."""
        try:
            account = self._call(lambda: self._client.v1.accounts.retrieve_current())
        except StripeKeyRejected as error:
            if not self._api_key.startswith("rk_"):
                raise
            match = ACCOUNT_PATTERN.search(error.stripe_message)
            return (match.group(1) if match else None), None
        profile = getattr(account, "business_profile", None)
        settings = getattr(account, "settings", None)
        dashboard = getattr(settings, "dashboard", None) if settings else None
        name = getattr(profile, "name", None) if profile else None
        return account.id, name or (getattr(dashboard, "display_name", None) if dashboard else None)

    # ---- prices -------------------------------------------------------------------------------------

    def list_products_with_prices(self) -> list[ProductPrices]:
        """List active products with their active prices, each classified for unit reporting."""
        products = self._all(lambda params: self._client.v1.products.list(params), {"active": True})
        prices = self._all(lambda params: self._client.v1.prices.list(params), {"active": True})
        meters = {meter.id: meter for meter in self._all(lambda params: self._client.v1.billing.meters.list(params))}
        by_product: dict[str, list[PriceInfo]] = {product.id: [] for product in products}
        for price in prices:
            product_id = price.product if isinstance(price.product, str) else price.product.id
            by_product.setdefault(product_id, []).append(classify_price(price, meters.get(price_meter_id(price))))
        names = {product.id: product.name for product in products}
        return [
            ProductPrices(product_id=product_id, name=names.get(product_id, product_id), prices=items)
            for product_id, items in by_product.items()
        ]

    def describe_price(self, price_id: str) -> PriceInfo:
        """Classify one price (with its meter); raise StripeRequestRejected if Stripe does not know it."""
        price = self._call(lambda: self._client.v1.prices.retrieve(price_id))
        meter_id = price_meter_id(price)
        meter = self._call(lambda: self._client.v1.billing.meters.retrieve(meter_id)) if meter_id else None
        return classify_price(price, meter)

    def read_price_terms(self, price_id: str) -> PriceTermsInfo:
        """Read how a price charges (tiers included) and its product's name, for estimates and display."""
        # `tiers` is only in the answer when expanded (docs.stripe.com/api/prices/object#price_object-tiers).
        price = self._call(lambda: self._client.v1.prices.retrieve(price_id, {"expand": ["tiers", "product"]}))
        product = price.product
        product_name = product if isinstance(product, str) else getattr(product, "name", None)
        try:
            terms, problem = price_terms(price.to_dict()), None
        except PriceTermsInvalid as error:
            terms, problem = None, f"Rebill cannot estimate this price: {error}"
        return PriceTermsInfo(terms, problem, product_name, getattr(price, "nickname", None))

    # ---- customers and subscriptions ------------------------------------------------------------------

    def search_customers(self, query: str, limit: int = 20) -> list[CustomerInfo]:
        """Find the account's customers whose name or email contains ``query``, or whose id it is.

        Empty query: the newest customers. A ``cus_`` id is read directly; fewer than 3 characters is too
        short for Stripe's substring search (``~`` needs 3), so it filters the newest page instead
        (docs.stripe.com/search#search-query-language; the search index lags new customers by about a minute).
        """
        query = query.strip()
        if query.startswith("cus_") and " " not in query:
            try:
                customer = self._call(lambda: self._client.v1.customers.retrieve(query))
            except StripeRequestRejected as error:
                if error.code == "resource_missing":
                    return []
                raise
            return [] if getattr(customer, "deleted", False) else [_customer_info(customer)]
        if len(query) < 3:
            page = self._call(lambda: self._client.v1.customers.list({"limit": PAGE_SIZE}))
            wanted = query.lower()
            found = [
                _customer_info(customer)
                for customer in page.data
                if wanted in (customer.name or "").lower() or wanted in (customer.email or "").lower()
            ]
            return found[:limit]
        quoted = query.replace("\\", "\\\\").replace('"', '\\"')
        search = f'name~"{quoted}" OR email~"{quoted}"'
        result = self._call(lambda: self._client.v1.customers.search({"query": search, "limit": limit}))
        return [_customer_info(customer) for customer in result.data]

    def customer_name(self, customer_id: str) -> str | None:
        """Return the customer's name (or email) to show instead of its id; None if it has neither."""
        customer = self._call(lambda: self._client.v1.customers.retrieve(customer_id))
        if getattr(customer, "deleted", False):
            return None
        return getattr(customer, "name", None) or getattr(customer, "email", None)

    def customer_exists(self, customer_id: str) -> bool:
        """Tell whether the account has this customer (a deleted customer counts as unknown)."""
        try:
            customer = self._call(lambda: self._client.v1.customers.retrieve(customer_id))
        except StripeRequestRejected as error:
            if error.code == "resource_missing":
                return False
            raise
        return not getattr(customer, "deleted", False)

    def find_subscription_item(self, customer_id: str, price_id: str) -> str | None:
        """Return the customer's live subscription item on this price (legacy usage records need it)."""
        period = self.subscription_period(customer_id, price_id)
        return period.subscription_item_id if period is not None else None

    def subscription_period(self, customer_id: str, price_id: str) -> SubscriptionPeriod | None:
        """Return the customer's live subscription item on this price with its current billing period.

        Reads every subscription of the customer with that price and every item of each (a subscription
        embeds only its first items and says ``items.has_more``). The period fields live on the item since
        API version 2025-03-31.basil (docs.stripe.com/changelog/basil/2025-03-31/deprecate-subscription-
        current-period-start-and-end). None when the customer has no live subscription on the price.
        """
        # `price` filters subscriptions containing that price (docs/stripe.md §2.3).
        for item in self._live_items({"customer": customer_id, "price": price_id}):
            if item.price.id == price_id:
                return _item_period(item)
        return None

    def meter_subscription_period(self, customer_id: str, meter_id: str) -> SubscriptionPeriod | None:
        """Return the customer's live subscription item on any price of this meter, with its current period
        (``item_for``: the one whose period started last). None when no live item of the customer bills the
        meter."""
        item = item_for(self.live_items(customer_id), None, meter_id)
        return item.period if item is not None else None

    def live_items(self, customer_id: str) -> list[LiveItem]:
        """Every live subscription item of the customer, in one listing of its subscriptions (no ``price``
        filter), with the items beyond those a subscription embeds."""
        return [
            LiveItem(price_id=item.price.id, meter_id=price_meter_id(item.price), period=_item_period(item))
            for item in self._live_items({"customer": customer_id})
        ]

    def _live_items(self, params: dict) -> Iterator[Any]:
        """Yield every item of the live subscriptions ``subscriptions.list`` gives for ``params`` (it lists all
        but canceled ones), with the items beyond those a subscription embeds (``items.has_more``)."""
        for subscription in self._all(lambda page: self._client.v1.subscriptions.list(page), params):
            if subscription.status not in ("active", "trialing", "past_due"):
                continue
            items = subscription["items"]
            listed = items.data
            if items.has_more:
                listed = self._all(
                    lambda page: self._client.v1.subscription_items.list(page), {"subscription": subscription.id}
                )
            yield from listed

    # ---- sending units --------------------------------------------------------------------------------

    def send_meter_units(
        self,
        *,
        event_name: str,
        customer_key: str,
        value_key: str,
        customer_id: str,
        units: int,
        identifier: str,
        timestamp: int,
        formula: str,
        attempt: int,
    ) -> MeterDelivery:
        """Send k units as meter events: one event of value k for ``sum``, k events of 1 for ``count``.

        A reused identifier is answered "already exists": that event was delivered before, not an error.
        """
        if units < 1:
            raise ValueError("units must be positive")
        if formula == "count":
            # A count meter counts events, so k units need k events, each its own stable identifier.
            events = ((count_event_identifier(identifier, number), 1) for number in range(1, units + 1))
        elif formula == "sum":
            events = iter([(identifier, units)])
        else:
            raise StripeRequestRejected(f"a meter with formula '{formula}' cannot carry units")
        accepted = already_there = 0
        for event_identifier, value in events:
            new = self.send_meter_event(
                event_name=event_name,
                customer_key=customer_key,
                value_key=value_key,
                customer_id=customer_id,
                value=value,
                identifier=event_identifier,
                timestamp=timestamp,
                attempt=attempt,
            )
            accepted, already_there = accepted + new, already_there + (not new)
        return MeterDelivery(events_accepted=accepted, events_already_there=already_there)

    def send_meter_event(
        self,
        *,
        event_name: str,
        customer_key: str,
        value_key: str,
        customer_id: str,
        value: int,
        identifier: str,
        timestamp: int,
        attempt: int,
    ) -> bool:
        """Send one meter event; True if Stripe took it now, False if it already had this identifier."""
        # The identifier is the real dedupe; a fresh idempotency key per app-level attempt keeps a saved
        # 5xx from being replayed forever, while the SDK reuses it across its own retries (docs/stripe.md §8.3).
        # POST /v1/billing/meter_events exactly as ``v1.billing.meter_events.create`` sends it (same
        # encoding, retries and error handling), without building a MeterEvent object nobody reads
        # (its CPU cost per call: see bench/README.md).
        request = {
            "event_name": event_name,
            "identifier": identifier,
            "timestamp": timestamp,
            "payload": {customer_key: customer_id, value_key: str(value)},
            "idempotency_key": f"{identifier}:a{attempt}",
        }
        try:
            self._call(lambda: self._client.raw_request("post", "/v1/billing/meter_events", **request))
        except StripeRequestRejected as error:
            if DUPLICATE_IDENTIFIER not in error.reason:
                raise
            return False
        return True

    def send_usage_record(self, subscription_item: str, units: int, timestamp: int, idempotency_key: str) -> None:
        """Add k units to a legacy metered subscription item (``action=increment``, pre-basil API version)."""
        self._call(
            lambda: self._client.raw_request(
                "post",
                f"/v1/subscription_items/{subscription_item}/usage_records",
                quantity=units,
                timestamp=timestamp,
                action="increment",
                stripe_version=LEGACY_USAGE_API_VERSION,
                idempotency_key=idempotency_key,
            )
        )

    def send_units(
        self,
        target: StripeTarget,
        identifier: str,
        units: int,
        timestamp: int,
        *,
        attempt: int,
        confirmed: int = 0,
        restamped: bool = False,
    ) -> Iterator[int]:
        """Send a report's units to its target, yielding the units each call to Stripe confirmed.

        A sum meter takes one event of value k, a legacy price one usage record of k (both all or nothing:
        ``confirmed`` is 0). A count meter takes one event per unit, ``<identifier>-<n>`` for n after
        ``confirmed``; the caller may stop between events (closing the iterator sends no more) and knows from
        what was yielded how far Stripe got when a call raises. ``restamped``: the units go with another
        timestamp than their first offer.
        """
        if target.is_legacy:
            # Usage records have no identifier: the idempotency key is the dedupe (docs/stripe.md §2.1). A
            # re-stamped offer (only made when Stripe has none of it) needs its own key: Stripe refuses a key
            # reused with other parameters.
            key = f"{identifier}@{timestamp}" if restamped else identifier
            self.send_usage_record(target.subscription_item_id, units, timestamp, idempotency_key=key)
            yield units
        elif target.formula == "count":
            for number in range(confirmed + 1, units + 1):
                self._send_target_event(target, count_event_identifier(identifier, number), 1, timestamp, attempt)
                yield 1
        else:
            self._send_target_event(target, identifier, units, timestamp, attempt)
            yield units

    def _send_target_event(
        self, target: StripeTarget, identifier: str, value: int, timestamp: int, attempt: int
    ) -> None:
        self.send_meter_event(
            event_name=target.event_name,
            customer_key=target.customer_key,
            value_key=target.value_key,
            customer_id=target.customer_id,
            value=value,
            identifier=identifier,
            timestamp=timestamp,
            attempt=attempt,
        )

    # ---- reading Stripe's totals ------------------------------------------------------------------------

    def meter_event_total(
        self, meter_id: str, customer_id: str, start: dt.datetime, end: dt.datetime
    ) -> StripeWindowTotal:
        """Sum the meter's event summaries for a customer over [start, end), widened to whole minutes.

        Summaries are eventually consistent (docs/stripe.md §1.8): recent events may not show yet.
        """
        start_time = _floor_minute(start)
        end_time = max(_ceil_minute(end), start_time + 60)
        summaries = self._all(
            lambda params: self._client.v1.billing.meters.event_summaries.list(meter_id, params),
            {"customer": customer_id, "start_time": start_time, "end_time": end_time},
        )
        total = sum((Decimal(str(summary.aggregated_value)) for summary in summaries), Decimal(0))
        return StripeWindowTotal(total=total, start=_from_unix(start_time), end=_from_unix(end_time))

    def usage_record_total(self, subscription_item: str, at: dt.datetime) -> StripeWindowTotal | None:
        """Return the legacy usage total of the item's billing period containing ``at``, if Stripe lists it."""
        response = self._call(
            lambda: self._client.raw_request(
                "get",
                f"/v1/subscription_items/{subscription_item}/usage_record_summaries",
                limit=PAGE_SIZE,
                stripe_version=LEGACY_USAGE_API_VERSION,
            )
        )
        summaries = self._client.deserialize(response, api_mode="V1")
        for summary in summaries.data:
            start, end = _from_unix(summary.period.start), _from_unix(summary.period.end)
            if start <= at < end:
                return StripeWindowTotal(total=Decimal(summary.total_usage), start=start, end=end)
        return None

    def window_total(self, target: StripeTarget, start: dt.datetime, end: dt.datetime) -> StripeWindowTotal | None:
        """Return Stripe's total of the target's units for its customer over a window.

        A meter: its event summaries over [start, end), widened to whole minutes (``meter_event_total``). A
        legacy price: the usage-record total of the subscription item's billing period containing ``end``
        (the target's item, else the customer's current one on the price); None when there is no item or
        Stripe lists no such period. Raises MeterUnknown for a meter target without a meter id.
        """
        if target.is_legacy:
            item = target.subscription_item_id or self.find_subscription_item(target.customer_id, target.price_id)
            return self.usage_record_total(item, end) if item else None
        if not target.meter_id:
            raise MeterUnknown()
        return self.meter_event_total(target.meter_id, target.customer_id, start, end)

    # ---- webhook endpoints (the agency's Stripe events come to Rebill) ---------------------------------

    def create_webhook_endpoint(self, url: str, events: list[str], description: str) -> WebhookEndpoint:
        """Register ``url`` for ``events`` in this account; Stripe returns the signing secret only now.

        https://docs.stripe.com/api/webhook_endpoints/create
        """
        endpoint = self._call(
            lambda: self._client.v1.webhook_endpoints.create(
                {"url": url, "enabled_events": events, "description": description}
            )
        )
        return WebhookEndpoint(endpoint_id=endpoint.id, secret=endpoint.secret)

    def delete_webhook_endpoint(self, endpoint_id: str) -> None:
        """Remove a webhook endpoint; one already gone counts as removed."""
        try:
            self._call(lambda: self._client.v1.webhook_endpoints.delete(endpoint_id))
        except StripeRequestRejected as error:
            if error.code != "resource_missing":
                raise

    # ---- event destinations (API v2 thin events) -------------------------------------------------------

    def create_event_destination(self, url: str, events: list[str], name: str, description: str) -> WebhookEndpoint:
        """Register ``url`` as a webhook event destination for thin ``events``; the signing secret comes only
        in this answer, and only when asked for (https://docs.stripe.com/api/v2/core/event-destinations/create).
        """
        destination = self._call(
            lambda: self._client.v2.core.event_destinations.create(
                {
                    "name": name,
                    "description": description,
                    "type": "webhook_endpoint",
                    "event_payload": "thin",
                    "enabled_events": events,
                    "webhook_endpoint": {"url": url},
                    "include": ["webhook_endpoint.signing_secret"],
                }
            )
        )
        secret = destination.webhook_endpoint.signing_secret if destination.webhook_endpoint else None
        if not secret:
            raise StripeRequestRejected("Stripe created the event destination without its signing secret")
        return WebhookEndpoint(endpoint_id=destination.id, secret=secret)

    def delete_event_destination(self, destination_id: str) -> None:
        """Remove an event destination; one already gone counts as removed."""
        try:
            self._call(lambda: self._client.v2.core.event_destinations.delete(destination_id))
        except StripeRequestRejected as error:
            if error.code != "resource_missing":
                raise

    def parse_event_notification(self, payload: bytes, signature: str | None, secret: str, tolerance: int):
        """Verify a thin event's ``Stripe-Signature`` and parse it (stripe-python's own check and parser).

        Raises stripe.SignatureVerificationError for a bad signature, ValueError for a body that is no thin
        event notification (a snapshot event, another object).
        """
        return self._client.parse_event_notification(payload, signature, secret, tolerance)

    def meter_error_report(self, payload: bytes | str) -> MeterErrorReport:
        """Fetch the full event behind a (verified, stored) thin meter error notification and read its samples.

        A thin notification carries no data: the event is fetched from /v2/core/events/<id>
        (https://docs.stripe.com/event-destinations#fetch-data); its ``data.reason.error_types[]`` each have a
        ``code``, an ``error_count`` and ``sample_errors[]`` naming ``request.identifier``.
        """
        notification = self._client.parse_event_notification_without_verification(payload)
        event = self._call(notification.fetch_event)
        data = getattr(event, "data", None)
        reason = getattr(data, "reason", None)
        samples = []
        for error_type in getattr(reason, "error_types", None) or []:
            for sample in getattr(error_type, "sample_errors", None) or []:
                request = getattr(sample, "request", None)
                identifier = getattr(request, "identifier", None)
                if isinstance(identifier, str) and identifier:
                    samples.append(MeterErrorSample(error_type.code, sample.error_message, identifier))
        related = getattr(event, "related_object", None)
        return MeterErrorReport(
            event_id=event.id,
            meter_id=getattr(related, "id", None),
            error_count=int(getattr(reason, "error_count", 0) or 0),
            samples=tuple(samples),
        )

    # ---- plumbing -------------------------------------------------------------------------------------

    def _call(self, operation: Callable[[], T]) -> T:
        """Run one API operation, counting it and translating SDK errors into the gateway's three kinds."""
        with self._calls_lock:
            self._calls += 1
        try:
            with translate_stripe_errors():
                result = operation()
        except StripeGatewayError as error:
            STRIPE_CALLS.labels(_OUTCOMES[type(error)]).inc()
            raise
        STRIPE_CALLS.labels("ok").inc()
        return result

    def _all(self, list_page: Callable[[dict], Any], params: dict | None = None) -> list[Any]:
        """Read every page of a v1 list."""
        params = {**(params or {}), "limit": PAGE_SIZE}
        items: list[Any] = []
        while True:
            page = self._call(lambda p=dict(params): list_page(p))
            items.extend(page.data)
            if not page.has_more or not page.data:
                return items
            params["starting_after"] = page.data[-1].id


@contextmanager
def translate_stripe_errors() -> Iterator[None]:
    """Map stripe-python exceptions onto StripeUnavailable / StripeKeyRejected / StripeRequestRejected."""
    try:
        yield
    except stripe.AuthenticationError as error:
        raise StripeKeyRejected(f"Stripe rejected the API key (401): {_message(error)}") from None
    except stripe.PermissionError as error:
        raise StripeKeyRejected(
            _permission_reason(error), stripe_message=_message(error), permission_missing=True
        ) from None
    except stripe.RateLimitError as error:
        # A plain 429 is not retried by the SDK (docs/stripe.md §3.4); the next tick retries with backoff.
        raise StripeUnavailable(f"Stripe rate limit (429): {_message(error)}") from None
    except stripe.APIConnectionError as error:
        raise StripeUnavailable(f"Stripe could not be reached: {_message(error)}") from None
    except stripe.InvalidRequestError as error:
        raise StripeRequestRejected(_message(error), code=error.code) from None
    except stripe.StripeError as error:
        status = error.http_status or 0
        if status == 409 or status >= 500 or status == 0:
            raise StripeUnavailable(f"Stripe answered {status or 'nothing usable'}: {_message(error)}") from None
        code = error.error.code if error.error is not None else None
        raise StripeRequestRejected(f"Stripe refused the request ({status}): {_message(error)}", code=code) from None


def _customer_info(customer: Any) -> CustomerInfo:
    return CustomerInfo(id=customer.id, name=getattr(customer, "name", None), email=getattr(customer, "email", None))


def _message(error: stripe.StripeError) -> str:
    message = error.error.message if error.error is not None and error.error.message else error.user_message
    return str(message or type(error).__name__)


def _permission_reason(error: stripe.StripeError) -> str:
    """Name the missing permission of a restricted key, parsed defensively from the 403 message."""
    message = _message(error)
    match = PERMISSION_PATTERN.search(message)
    if match:
        return f"the Stripe key lacks the '{match.group(1)}' permission; edit the restricted key in Stripe"
    return f"Stripe refused this key the request (403): {message}"


def _item_period(item: Any) -> SubscriptionPeriod:
    """A subscription item's current period (on the item since API version 2025-03-31.basil)."""
    return SubscriptionPeriod(
        subscription_item_id=item.id,
        start=_from_unix(item.current_period_start),
        end=_from_unix(item.current_period_end),
    )


def _from_unix(seconds: int | float) -> dt.datetime:
    return dt.datetime.fromtimestamp(int(seconds), dt.UTC)


def _floor_minute(moment: dt.datetime) -> int:
    seconds = int(moment.timestamp())
    return seconds - seconds % 60


def _ceil_minute(moment: dt.datetime) -> int:
    seconds = int(moment.timestamp()) + (1 if moment.microsecond else 0)
    return -(-seconds // 60) * 60
