"""A stateful, per-account fake of the Stripe v1 API subset Rebill uses, served as a Werkzeug WSGI app.

Facts and their sources are in docs/stripe.md; UNCONFIRMED ones are marked here too.
"""

from __future__ import annotations

import calendar
import contextlib
import copy
import hashlib
import hmac
import json
import logging
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import parse_qsl

from werkzeug.exceptions import HTTPException
from werkzeug.routing import Map, Rule
from werkzeug.wrappers import Request, Response

log = logging.getLogger(__name__)

# https://docs.stripe.com/billing/subscriptions/usage-based/recording-usage-api: "within the past 35
# calendar days or up to 5 minutes in the future" (the 5 minutes are for clock drift).
METER_EVENT_MAX_AGE = 35 * 86400
METER_EVENT_MAX_AHEAD = 5 * 60
# https://docs.stripe.com/changelog/basil/2025-03-31/deprecate-legacy-usage-based-billing
LEGACY_USAGE_REMOVED_IN = "2025-03-31"
LAST_LEGACY_VERSION = "2025-02-24.acacia"  # builders act as a pre-basil client so tests can seed legacy prices
DEFAULT_API_VERSION = "2026-10-28.endive"  # what stripe-python 16.1.0 sends
FAULTS = (
    "rate_limit", "server_error", "timeout", "accept_then_drop", "accept_then_500", "revoke_key", "bad_request",
    "slow",  # applied and answered as usual, after `seconds`
)
# Meter-event identifiers are unique "within a rolling period of at least 24 hours"
# (https://docs.stripe.com/api/billing/meter-event/create): the fake forgets them after exactly that.
IDENTIFIER_TTL = 24 * 3600
# An invoice is finalized an hour after its period ends unless the account sets another grace period
# (https://docs.stripe.com/billing/subscriptions/usage-based/configure-grace-period); usage reported for a
# period after its invoice was finalized is billed on no invoice.
INVOICE_GRACE = 3600
# A subscription embeds its first 10 items; more are read from /v1/subscription_items (items.has_more).
EMBEDDED_ITEMS = 10
_NUMBER = re.compile(r"-?\d+(\.\d+)?")
_SEARCH_CLAUSE = re.compile(r'(name|email|id)([:~])"((?:[^"\\]|\\.)*)"')
_KEY_MODE = re.compile(r"^(sk|rk|pk)_(test|live)_")

# (method, path, endpoint, restricted-key permission[, object kind for `retrieve`]). Permission names follow
# the `rak_*` names seen in real 403 bodies (docs/stripe.md §4.2); which one guards each endpoint is UNCONFIRMED.
ROUTES = [
    ("GET", "/v1/account", "get_account", "rak_account_read"),
    ("GET", "/v1/products", "list_products", "rak_product_read"),
    ("POST", "/v1/products", "create_product", "rak_product_write"),
    ("GET", "/v1/products/<id>", "retrieve", "rak_product_read", "product"),
    ("GET", "/v1/prices", "list_prices", "rak_plan_read"),
    ("POST", "/v1/prices", "create_price", "rak_plan_write"),
    ("GET", "/v1/prices/<id>", "retrieve", "rak_plan_read", "price"),
    ("GET", "/v1/billing/meters", "list_meters", "rak_billing_meter_read"),
    ("POST", "/v1/billing/meters", "create_meter", "rak_billing_meter_write"),
    ("GET", "/v1/billing/meters/<id>", "retrieve", "rak_billing_meter_read", "billing.meter"),
    ("POST", "/v1/billing/meters/<id>/deactivate", "deactivate_meter", "rak_billing_meter_write"),
    ("POST", "/v1/billing/meters/<id>/reactivate", "reactivate_meter", "rak_billing_meter_write"),
    ("GET", "/v1/billing/meters/<id>/event_summaries", "event_summaries", "rak_billing_meter_read"),
    ("POST", "/v1/billing/meter_events", "create_meter_event", "rak_billing_meter_event_write"),
    ("GET", "/v1/customers", "list_customers", "rak_customer_read"),
    ("GET", "/v1/customers/search", "search_customers", "rak_customer_read"),
    ("POST", "/v1/customers", "create_customer", "rak_customer_write"),
    ("GET", "/v1/customers/<id>", "retrieve", "rak_customer_read", "customer"),
    ("DELETE", "/v1/customers/<id>", "delete_customer", "rak_customer_write"),
    ("GET", "/v1/subscriptions", "list_subscriptions", "rak_subscription_read"),
    ("POST", "/v1/subscriptions", "create_subscription", "rak_subscription_write"),
    ("GET", "/v1/subscriptions/<id>", "retrieve", "rak_subscription_read", "subscription"),
    ("GET", "/v1/subscription_items", "list_subscription_items", "rak_subscription_read"),
    ("GET", "/v1/subscription_items/<id>", "retrieve", "rak_subscription_read", "subscription_item"),
    ("POST", "/v1/subscription_items/<id>/usage_records", "create_usage_record", "rak_usage_record_write"),
    ("GET", "/v1/subscription_items/<id>/usage_record_summaries", "usage_record_summaries",
     "rak_usage_record_read"),
    ("GET", "/v1/webhook_endpoints", "list_webhook_endpoints", "rak_webhook_read"),
    ("POST", "/v1/webhook_endpoints", "create_webhook_endpoint", "rak_webhook_write"),
    ("GET", "/v1/webhook_endpoints/<id>", "retrieve", "rak_webhook_read", "webhook_endpoint"),
    ("DELETE", "/v1/webhook_endpoints/<id>", "delete_webhook_endpoint", "rak_webhook_write"),
    # API v2 (JSON bodies): event destinations for thin events, and the full event behind a thin notification
    # (https://docs.stripe.com/api/v2/core/event-destinations, https://docs.stripe.com/api/v2/core/events).
    # Which restricted-key permission guards them is UNCONFIRMED; the fake names them like the v1 ones.
    ("POST", "/v2/core/event_destinations", "create_event_destination", "rak_event_destination_write"),
    ("GET", "/v2/core/event_destinations/<id>", "retrieve", "rak_event_destination_read",
     "v2.core.event_destination"),
    ("DELETE", "/v2/core/event_destinations/<id>", "delete_event_destination", "rak_event_destination_write"),
    ("GET", "/v2/core/events/<id>", "retrieve", "rak_event_read", "v2.core.event"),
]
_URLS = Map([Rule(path, endpoint=n, methods=[method]) for n, (method, path, *_) in enumerate(ROUTES)],
            strict_slashes=False, merge_slashes=False).bind("api.stripe.com")


class StripeFakeError(Exception):
    """An API error, answered with Stripe's error envelope."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = dict(headers or {})

    def body(self) -> dict:
        """The `{"error": {...}}` envelope, without absent fields as Stripe does."""
        err = {"type": self.type, "message": self.message, "code": self.code, "param": self.param}
        return {"error": {k: v for k, v in err.items() if v is not None}}


def _missing(kind: str, obj_id: str, param: str = "id") -> StripeFakeError:
    return StripeFakeError(404, f"No such {kind}: '{obj_id}'", code="resource_missing", param=param)


def _invalid(message: str, param: str | None = None, code: str | None = None) -> StripeFakeError:
    return StripeFakeError(400, message, param=param, code=code)


class Call(NamedTuple):
    """One request seen by the fake; status 0 means the client got no answer (timeout fault)."""

    method: str
    path: str
    api_key: str | None
    params: dict
    idempotency_key: str | None
    status: int


@dataclass
class _Fault:
    fault: str
    matches: Callable[[str], bool]
    remaining: int
    seconds: float
    method: str | None
    api_key: str | None
    headers: dict
    skip: int = 0  # matching requests let through before the fault fires


@dataclass
class _Tenant:
    """All objects of one account in one mode (test and live data are separate at Stripe)."""

    account_id: str
    livemode: bool
    display_name: str
    objects: dict[str, dict[str, dict]] = field(default_factory=lambda: defaultdict(dict))
    events: list[dict] = field(default_factory=list)
    events_by: dict[tuple[str, str], list[dict]] = field(default_factory=lambda: defaultdict(list))
    identifiers: dict[str, int] = field(default_factory=dict)  # identifier -> when Stripe took it
    usage: dict[str, dict[int, int]] = field(default_factory=lambda: defaultdict(dict))
    idempotency: dict[str, tuple] = field(default_factory=dict)
    webhook_secrets: dict[str, str] = field(default_factory=dict)  # endpoint id -> whsec_… (shown at create only)
    # Thin events (API v2) delivered to event destinations, and each destination's signing secret.
    destination_secrets: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SignedDelivery:
    """One event POST to one webhook endpoint, signed as Stripe signs it (not sent yet)."""

    url: str
    body: bytes
    headers: dict

    def send(self, timeout: float = 10.0) -> int:
        """POST it over HTTP (the demo); return the status code (0 when nothing answered)."""
        # The URL is one Rebill registered (http(s) only, checked at create).
        request = urllib.request.Request(self.url, data=self.body, headers=self.headers, method="POST")  # noqa: S310
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
                return response.status
        except urllib.error.HTTPError as error:
            return error.code
        except OSError:
            return 0


def stripe_signature(payload: bytes, secret: str, timestamp: int) -> str:
    """The `Stripe-Signature` header: `t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>.<payload>")>`.

    https://docs.stripe.com/webhooks#verify-manually (the signed payload is the timestamp, a dot, the raw body).
    """
    signed = f"{timestamp}.".encode() + payload
    return f"t={timestamp},v1={hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()}"


@dataclass
class _Key:
    tenant: _Tenant
    denied: frozenset[str]


@dataclass
class _Outcome:
    status: int
    body: str
    headers: dict
    fault: _Fault | None = None


def unflatten(pairs: Iterable[tuple[str, str]]) -> dict:
    """Turn Stripe form pairs (`a[b]=1`, `items[0][price]=p`, `expand[]=x`) into nested dicts/lists."""
    root: dict = {}
    for key, value in pairs:
        head, _, rest = key.partition("[")
        parts = [head] + (re.findall(r"([^\[\]]*)\]", "[" + rest) if rest else [])
        node = root
        for i, part in enumerate(parts):
            part = part or str(len(node))  # `[]` appends
            if i == len(parts) - 1:
                node[part] = value
            else:
                if not isinstance(node.get(part), dict):
                    node[part] = {}
                node = node[part]
    return {k: _listify(v) for k, v in root.items()}


def _listify(node: Any) -> Any:
    if not isinstance(node, dict):
        return node
    node = {k: _listify(v) for k, v in node.items()}
    if node and all(k.isdigit() for k in node):
        return [node[k] for k in sorted(node, key=int)]
    return node


def _async_error_message(code: str, event: dict, t: _Tenant, meter_id: str) -> str:
    """Stripe's sample error wording per code (as in its examples; exact wording of most is UNCONFIRMED)."""
    key = t.objects["billing.meter"][meter_id]["customer_mapping"]["event_payload_key"]
    if code == "meter_event_customer_not_found":
        return f"No customer found with ID {event['payload'].get(key)}."
    if code == "timestamp_too_far_in_past":
        return "Timestamp must be within the past 35 calendar days."
    if code == "meter_event_no_customer_defined":
        return f"Customer mapping key {key} not found in payload."
    return f"The meter event is invalid ({code})."


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def _mask(api_key: str) -> str:
    mode = _KEY_MODE.match(api_key)
    return f"{mode.group(0) if mode else ''}****{api_key[-4:]}"


def _int(params: Mapping, name: str, default: int | None = None, required: bool = False) -> int | None:
    value = params.get(name)
    if value is None or value == "":
        if required:
            raise _invalid(f"Missing required param: {name}.", name, "parameter_missing")
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise _invalid(f"Invalid integer: {value}", name, "parameter_invalid_integer") from None


def _bool(params: Mapping, name: str) -> bool | None:
    value = params.get(name)
    if value is None or isinstance(value, bool):
        return value
    if value in ("true", "false"):
        return value == "true"
    raise _invalid(f"Invalid boolean: {value}", name)


def _str(params: Mapping, name: str, required: bool = False, choices: Iterable[str] = ()) -> str | None:
    value = params.get(name)
    if value is None or value == "":
        if required:
            raise _invalid(f"Missing required param: {name}.", name, "parameter_missing")
        return None
    if not isinstance(value, str) or (choices and value not in choices):
        raise _invalid(f"Invalid {name}: must be one of {', '.join(choices) or 'a string'}", name)
    return value


def _obj(params: Mapping, name: str) -> dict | None:
    value = params.get(name)
    if value is not None and not isinstance(value, dict):
        raise _invalid(f"Invalid {name}: must be a hash", name)
    return value


def _significant(number: str) -> str:
    return number.lstrip("-").replace(".", "").strip("0")


def _id_of(obj: str | Mapping) -> str:
    return obj if isinstance(obj, str) else obj["id"]


def _number(value: Decimal) -> int | float:
    return int(value) if value == value.to_integral_value() else float(value)


def _add_month(ts: int, months: int = 1) -> int:
    d = datetime.fromtimestamp(ts, UTC)
    year, month = divmod(d.month - 1 + months, 12)
    year, month = d.year + year, month + 1
    return int(d.replace(year=year, month=month, day=min(d.day, calendar.monthrange(year, month)[1]))
               .timestamp())


def _periods(anchor: int, until: int) -> list[tuple[int, int]]:
    """Monthly billing periods from a subscription's anchor up to the one containing ``until``, oldest first."""
    periods, months = [], 0
    while True:
        start, end = _add_month(anchor, months), _add_month(anchor, months + 1)
        periods.append((start, end))
        if end > until:
            return periods
        months += 1


def _aggregate(formula: str, events: list[dict]) -> Decimal:
    """Apply a meter's default_aggregation formula (sum, count or last)."""
    if formula == "count":
        return Decimal(len(events))
    if formula == "last":  # the latest timestamp wins; on a tie, the later-received event
        latest = max(enumerate(events), key=lambda ie: (ie[1]["timestamp"], ie[0]), default=(0, None))[1]
        return Decimal(latest["payload"][latest["_value_key"]]) if latest else Decimal(0)
    return sum((Decimal(e["payload"][e["_value_key"]]) for e in events), Decimal(0))


class FakeStripeState:
    """Thread-safe Stripe data partitioned per account, plus fault injection and a call log."""

    def __init__(self, clock: Callable[[], float] = time.time, id_seed: str | None = None):
        """``id_seed`` makes object ids repeatable: the same calls in the same order get the same ids."""
        self._clock = clock
        self._lock = threading.RLock()
        self._keys: dict[str, _Key] = {}
        self._tenants: dict[tuple[str, bool], _Tenant] = {}
        self._faults: list[_Fault] = []
        self._released = threading.Event()
        self.calls: list[Call] = []
        self._id_seed = id_seed
        self._ids_made = 0

    def _next_id(self, prefix: str) -> str:
        if self._id_seed is None:
            return _new_id(prefix)
        self._ids_made += 1
        return f"{prefix}_{hashlib.sha256(f'{self._id_seed}:{self._ids_made}'.encode()).hexdigest()[:24]}"

    # ---- saving and restoring (the demo keeps its fake Stripe across restarts) ------------------------
    def save(self, path: str | Path, extra: Mapping | None = None) -> None:
        """Write every key, account and object (not faults, call log or idempotency keys) to a JSON file,
        atomically, with ``extra`` for the caller; ``load`` reads it back."""
        with self._lock:
            snapshot = {
                "version": 1,
                "ids_made": self._ids_made,
                "keys": {key: {"account_id": k.tenant.account_id, "livemode": k.tenant.livemode,
                               "denied": sorted(k.denied)} for key, k in self._keys.items()},
                "tenants": [
                    {"account_id": t.account_id, "livemode": t.livemode, "display_name": t.display_name,
                     "objects": t.objects, "events": t.events, "identifiers": t.identifiers,
                     "usage": {item: {str(ts): q for ts, q in rows.items()} for item, rows in t.usage.items()},
                     "webhook_secrets": t.webhook_secrets, "destination_secrets": t.destination_secrets}
                    for t in self._tenants.values()
                ],
                "extra": dict(extra or {}),
            }
            text = json.dumps(snapshot)
        path = Path(path)
        partial = path.with_suffix(path.suffix + ".partial")
        partial.write_text(text)
        os.replace(partial, path)

    def load(self, path: str | Path) -> dict:
        """Replace this state's keys and accounts with a file ``save`` wrote; return its ``extra``."""
        snapshot = json.loads(Path(path).read_text())
        with self._lock:
            self._tenants.clear()
            self._keys.clear()
            for saved in snapshot["tenants"]:
                t = _Tenant(saved["account_id"], saved["livemode"], saved["display_name"])
                for kind, objects in saved["objects"].items():
                    t.objects[kind].update(objects)
                t.events.extend(saved["events"])
                for event in t.events:
                    meter = t.objects["billing.meter"][event["_meter"]]
                    customer = event["payload"][meter["customer_mapping"]["event_payload_key"]]
                    t.events_by[(meter["id"], customer)].append(event)
                t.identifiers.update(saved["identifiers"])  # identifier -> when Stripe took it
                for item, rows in saved["usage"].items():
                    t.usage[item].update({int(ts): q for ts, q in rows.items()})
                t.webhook_secrets.update(saved["webhook_secrets"])
                t.destination_secrets.update(saved.get("destination_secrets", {}))
                self._tenants[(t.account_id, t.livemode)] = t
            for key, saved in snapshot["keys"].items():
                tenant = self._tenants[(saved["account_id"], saved["livemode"])]
                self._keys[key] = _Key(tenant, frozenset(saved["denied"]))
            self._ids_made = snapshot["ids_made"]
        return snapshot["extra"]

    def now(self) -> int:
        """The fake's current Unix time."""
        return int(self._clock())

    # ---- accounts, keys, faults -------------------------------------------------------------------
    def add_account(self, api_key: str, account_id: str | None = None, livemode: bool | None = None,
                    display_name: str | None = None, denied_permissions: Iterable[str] = ()) -> str:
        """Register a key for an account (keys of one account share its data); returns the account id."""
        mode = _KEY_MODE.match(api_key)
        livemode = (mode is not None and mode.group(2) == "live") if livemode is None else livemode
        account_id = account_id or self._next_id("acct")
        denied = frozenset(p if p.startswith("rak_") else f"rak_{p}" for p in denied_permissions)
        with self._lock:
            tenant = self._tenants.setdefault(
                (account_id, livemode), _Tenant(account_id, livemode, display_name or f"Agency {account_id}"))
            self._keys[api_key] = _Key(tenant, denied)
        return account_id

    def inject(self, path: str | re.Pattern, fault: str, times: int = 1, *, seconds: float = 2.0,
               method: str | None = None, api_key: str | None = None,
               headers: Mapping[str, str] | None = None, after: int = 0) -> None:
        """Queue a fault for the next `times` matching requests (str = path prefix, compiled regex = search).

        ``after`` lets that many matching requests through first. ``revoke_key`` answers 401 and removes the
        request's key for good, as when the agency rolls its key in the Dashboard. ``bad_request`` answers 400
        invalid_request_error with code ``parameter_unknown`` (a refusal that is not "no such object").
        """
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; choose from {FAULTS}")
        matches = path.search if isinstance(path, re.Pattern) else (lambda p, prefix=path: p.startswith(prefix))
        with self._lock:
            self._faults.append(_Fault(fault, matches, times, seconds, method and method.upper(), api_key,
                                       dict(headers or {}), after))

    def revoke_key(self, api_key: str) -> None:
        """Forget a key: every later request with it answers 401 (the agency rolled it)."""
        with self._lock:
            self._keys.pop(api_key, None)

    def clear_faults(self) -> None:
        """Drop all queued faults."""
        with self._lock:
            self._faults.clear()

    def release_hangs(self) -> None:
        """Wake every request held by a `timeout` fault (the server calls this on stop)."""
        self._released.set()

    def arm_hangs(self) -> None:
        """Let `timeout` faults hang again after release_hangs (the server calls this on start)."""
        self._released.clear()

    # ---- builders and read helpers for tests and the demo -----------------------------------------
    def _tenant(self, api_key: str) -> _Tenant:
        try:
            return self._keys[api_key].tenant
        except KeyError:
            raise KeyError(f"unregistered api key {_mask(api_key)}; call add_account first") from None

    def _build(self, api_key: str, make: Callable[[_Tenant], dict]) -> dict:
        with self._lock:
            return copy.deepcopy(make(self._tenant(api_key)))

    def create_meter(self, api_key: str, event_name: str, formula: str = "sum",
                     customer_key: str = "stripe_customer_id", value_key: str = "value",
                     display_name: str | None = None) -> dict:
        """Create an active billing meter."""
        params = {"event_name": event_name, "display_name": display_name or event_name,
                  "default_aggregation": {"formula": formula},
                  "customer_mapping": {"event_payload_key": customer_key, "type": "by_id"},
                  "value_settings": {"event_payload_key": value_key}}
        return self._build(api_key, lambda t: self._api_create_meter(t, params))

    def create_product(self, api_key: str, name: str = "AI usage", **fields: Any) -> dict:
        """Create a product."""
        return self._build(api_key, lambda t: self._api_create_product(t, {"name": name, **fields}))

    def create_price(self, api_key: str, product: str | Mapping, unit_amount: int | None, metered: bool = True,
                     meter: str | Mapping | None = None, transform_quantity: Mapping | None = None,
                     currency: str = "usd", interval: str = "month", *, nickname: str | None = None,
                     unit_amount_decimal: str | None = None, tiers: list[Mapping] | None = None,
                     tiers_mode: str | None = None) -> dict:
        """Create a monthly price; metered without a meter makes a legacy (pre-basil) usage price.

        ``tiers`` (with ``tiers_mode`` graduated or volume) makes a tiered price; ``unit_amount`` is then None.
        """
        params = {"product": _id_of(product), "currency": currency,
                  "recurring": {"interval": interval, "usage_type": "metered" if metered else "licensed",
                                **({"meter": _id_of(meter)} if meter else {})},
                  **({"transform_quantity": dict(transform_quantity)} if transform_quantity else {})}
        optional = {"unit_amount": unit_amount, "nickname": nickname, "unit_amount_decimal": unit_amount_decimal,
                    "tiers_mode": tiers_mode}
        params.update({name: value for name, value in optional.items() if value is not None})
        if tiers is not None:
            params.update(billing_scheme="tiered", tiers=[dict(tier) for tier in tiers])
        return self._build(api_key, lambda t: self._api_create_price(t, params, LAST_LEGACY_VERSION))

    def create_customer(self, api_key: str, name: str | None = None, email: str | None = None,
                        **fields: Any) -> dict:
        """Create a customer."""
        return self._build(api_key, lambda t: self._api_create_customer(t, {"name": name, "email": email, **fields}))

    def delete_customer(self, api_key: str, customer: str | Mapping) -> dict:
        """Delete a customer (reads then answer the `deleted: true` stub)."""
        return self._build(api_key, lambda t: self._api_delete_customer(t, {}, None, _id_of(customer)))

    def create_subscription(self, api_key: str, customer: str | Mapping,
                            price: str | Mapping | list[str | Mapping], status: str = "active",
                            start_date: int | None = None) -> dict:
        """Create a subscription (one item per price) in the given status (legacy prices allowed).

        Its billing periods are monthly from ``start_date`` and roll over as the fake's clock passes them.
        """
        prices = price if isinstance(price, list) else [price]
        params = {"customer": _id_of(customer), "items": [{"price": _id_of(p)} for p in prices],
                  "backdate_start_date": start_date}
        return self._build(api_key, lambda t: self._api_create_subscription(
            t, params, LAST_LEGACY_VERSION, status))

    def billed_units(self, api_key: str, customer: str | Mapping, event_name: str) -> int | float:
        """Units of a customer's meter events that landed on an invoice.

        An event counts in the billing period of its timestamp (on the customer's subscription item whose
        price uses the meter) only if Stripe received it before that period's invoice was finalized (period
        end + INVOICE_GRACE); later ones are accepted but billed nowhere. Events of no period bill nothing.
        """
        with self._lock:
            t = self._tenant(api_key)
            meter = self._active_meter(t, event_name)
            items = [i for s in t.objects["subscription"].values() if s["customer"] == _id_of(customer)
                     for i in s["_items"] if (i["price"]["recurring"] or {}).get("meter") == meter["id"]]
            billed = []
            for event in t.events_by[(meter["id"], _id_of(customer))]:
                for item in items:
                    period = next(((start, end) for start, end in _periods(item["_anchor"], event["timestamp"])
                                   if start <= event["timestamp"] < end), None)
                    if period is not None and event["created"] < period[1] + INVOICE_GRACE:
                        billed.append(event)
                        break
            return _number(_aggregate(meter["default_aggregation"]["formula"], billed))

    def meter_events(self, api_key: str, event_name: str | None = None) -> list[dict]:
        """Stored meter events of the key's account, oldest first."""
        with self._lock:
            events = self._tenant(api_key).events
            return [self._public_event(e) for e in events if event_name in (None, e["event_name"])]

    def total_units(self, api_key: str, customer: str | Mapping, event_name: str) -> int | float:
        """All-time aggregate of a customer's events on the active meter for event_name (formula-aware)."""
        with self._lock:
            t = self._tenant(api_key)
            meter = self._active_meter(t, event_name)
            if meter is None:
                raise KeyError(f"no active meter for {event_name!r}")
            events = t.events_by[(meter["id"], _id_of(customer))]
            return _number(_aggregate(meter["default_aggregation"]["formula"], events))

    def usage_record_total(self, api_key: str, subscription_item: str | Mapping) -> int:
        """Sum of the legacy usage records of a subscription item."""
        with self._lock:
            return sum(self._tenant(api_key).usage[_id_of(subscription_item)].values())

    # ---- events to webhook endpoints ------------------------------------------------------------------
    def emit_event(self, api_key: str, event_type: str, data_object: Mapping) -> list[SignedDelivery]:
        """Create an event in the key's account and sign one delivery per enabled endpoint that wants it.

        The caller sends them (``SignedDelivery.send`` or a test client), so tests control timing and order.
        """
        with self._lock:
            t = self._tenant(api_key)
            now = self.now()
            event = {"id": self._next_id("evt"), "object": "event", "api_version": DEFAULT_API_VERSION,
                     "created": now, "data": {"object": copy.deepcopy(dict(data_object))},
                     "livemode": t.livemode, "pending_webhooks": 0,
                     "request": {"id": None, "idempotency_key": None}, "type": event_type}
            endpoints = [e for e in t.objects["webhook_endpoint"].values()
                         if not e.get("deleted") and e["status"] == "enabled"
                         and ("*" in e["enabled_events"] or event_type in e["enabled_events"])]
            event["pending_webhooks"] = len(endpoints)
            t.objects["event"][event["id"]] = event
            body = json.dumps(event).encode()
            return [SignedDelivery(e["url"], body, {
                "Content-Type": "application/json; charset=utf-8",
                "Stripe-Signature": stripe_signature(body, t.webhook_secrets[e["id"]], now),
                "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks)"}) for e in endpoints]

    def reject_meter_events_later(self, api_key: str, identifiers: Iterable[str],
                                  code: str = "meter_event_customer_not_found",
                                  message: str | None = None, samples: int = 5) -> list[SignedDelivery]:
        """Play Stripe's asynchronous meter-event validation failing: the named events (answered 2xx when
        they were sent) are taken out of the meter's totals, and one ``v1.billing.meter.error_report_triggered``
        thin event per meter is created and signed for each enabled thin event destination that wants it.

        Stripe names at most a few ``sample_errors`` per error type and counts the rest in ``error_count``
        (https://docs.stripe.com/api/v2/core/events/object); ``samples`` sets how many the fake names.
        """
        with self._lock:
            t = self._tenant(api_key)
            wanted = set(identifiers)
            rejected = [e for e in t.events if e["identifier"] in wanted]
            if len(rejected) != len(wanted):
                missing = sorted(wanted - {e["identifier"] for e in rejected})
                raise KeyError(f"no meter events with identifiers {missing}")
            by_meter: dict[str, list[dict]] = defaultdict(list)
            for event in rejected:
                by_meter[event["_meter"]].append(event)
                t.events.remove(event)
                customer_key = t.objects["billing.meter"][event["_meter"]]["customer_mapping"]["event_payload_key"]
                t.events_by[(event["_meter"], event["payload"].get(customer_key))].remove(event)
            deliveries = []
            for meter_id, events in by_meter.items():
                now = self.now()
                created = datetime.fromtimestamp(now, UTC).isoformat().replace("+00:00", "Z")
                sample = [{"error_message": message or _async_error_message(code, event, t, meter_id),
                           "request": {"identifier": event["identifier"]}} for event in events[:samples]]
                event = {
                    "id": self._next_id("evt_test"), "object": "v2.core.event", "context": None,
                    "created": created, "livemode": t.livemode, "reason": None,
                    "type": "v1.billing.meter.error_report_triggered",
                    "related_object": {"id": meter_id, "type": "billing.meter",
                                       "url": f"/v1/billing/meters/{meter_id}"},
                    "data": {
                        "developer_message_summary": f"There are {len(events)} invalid events",
                        "reason": {"error_count": len(events), "error_types": [
                            {"code": code, "error_count": len(events), "sample_errors": sample}]},
                        "validation_start": created, "validation_end": created,
                    },
                }
                t.objects["v2.core.event"][event["id"]] = event
                deliveries.extend(self._deliver_thin(t, event, now))
            return deliveries

    def _deliver_thin(self, t: _Tenant, event: dict, now: int) -> list[SignedDelivery]:
        # A thin notification carries no `data`: the receiver fetches the event (/v2/core/events/<id>).
        notification = json.dumps({k: v for k, v in event.items() if k != "data"}).encode()
        destinations = [d for d in t.objects["v2.core.event_destination"].values()
                        if not d.get("deleted") and d["status"] == "enabled" and d["event_payload"] == "thin"
                        and ("*" in d["enabled_events"] or event["type"] in d["enabled_events"])]
        return [SignedDelivery(d["webhook_endpoint"]["url"], notification, {
            "Content-Type": "application/json; charset=utf-8",
            "Stripe-Signature": stripe_signature(notification, t.destination_secrets[d["id"]], now),
            "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks)"}) for d in destinations]

    def event_destinations(self, api_key: str) -> list[dict]:
        """The account's live event destinations (without secrets), oldest first."""
        with self._lock:
            return [copy.deepcopy(d) for d in self._tenant(api_key).objects["v2.core.event_destination"].values()
                    if not d.get("deleted")]

    def webhook_endpoints(self, api_key: str) -> list[dict]:
        """The account's live webhook endpoints (without secrets), oldest first."""
        with self._lock:
            return [copy.deepcopy(e) for e in self._tenant(api_key).objects["webhook_endpoint"].values()
                    if not e.get("deleted")]

    def invoice_event(self, api_key: str, event_type: str, customer: str | Mapping,
                      subscription: str | Mapping | None = None, amount_due: int = 1000) -> list[SignedDelivery]:
        """Emit invoice.payment_failed / invoice.paid for a customer's invoice (the invoice is built here)."""
        paid = event_type == "invoice.paid"
        sub_id = _id_of(subscription) if subscription else None
        invoice = {"id": self._next_id("in"), "object": "invoice", "customer": _id_of(customer),
                   "amount_due": amount_due, "amount_paid": amount_due if paid else 0, "currency": "usd",
                   "status": "paid" if paid else "open", "attempt_count": 1, "livemode": False,
                   # Since 2025-03-31.basil the subscription sits under parent.subscription_details.
                   "parent": {"type": "subscription_details",
                              "subscription_details": {"subscription": sub_id}} if sub_id else None}
        return self.emit_event(api_key, event_type, invoice)

    def cancel_subscription(self, api_key: str, subscription: str | Mapping) -> list[SignedDelivery]:
        """Cancel a subscription now and emit customer.subscription.deleted."""
        with self._lock:
            t = self._tenant(api_key)
            sub = self._get(t, "subscription", _id_of(subscription))
            sub["status"] = "canceled"
            sub["canceled_at"] = self.now()
            snapshot = copy.deepcopy(self._public_subscription(sub))
        return self.emit_event(api_key, "customer.subscription.deleted", snapshot)

    # ---- request dispatch ---------------------------------------------------------------------------
    def dispatch(self, method: str, path: str, params: dict, headers: Mapping[str, str]) -> _Outcome:
        """Answer one API request; hang/drop faults are left to the WSGI layer via `_Outcome.fault`."""
        auth = headers.get("Authorization", "")
        api_key = auth[7:].strip() if auth.startswith("Bearer ") else None
        idem_key = headers.get("Idempotency-Key") if method == "POST" else None
        with self._lock:
            fault = None
            try:
                key = self._authenticate(api_key)
                try:
                    route, args = _URLS.match(path, method)
                except HTTPException:
                    raise StripeFakeError(404, f"Unrecognized request URL ({method}: {path}).") from None
                _, _, endpoint, permission, *kind = ROUTES[route]
                if kind:  # generic retrieve: which object table to read
                    args["kind"] = kind[0]
                if permission in key.denied:
                    raise StripeFakeError(
                        403, f"The provided key '{_mask(api_key)}' does not have the required permissions for "
                        f"this endpoint on account '{key.tenant.account_id}'. Having the '{permission}' "
                        "permission would allow this request to continue.", code="more_permissions_required")
                fault = self._take_fault(method, path, api_key)
                if fault is not None and fault.fault == "timeout":
                    outcome = _Outcome(0, "", {}, fault)
                else:
                    self._raise_fault(fault, api_key)
                    outcome = self._execute(key.tenant, endpoint, args, params, headers, idem_key)
                    outcome.fault = fault
            except StripeFakeError as err:
                outcome = _Outcome(err.status, json.dumps(err.body()), err.headers, fault)
            self.calls.append(Call(method, path, api_key, params, idem_key, outcome.status))
            return outcome

    def _authenticate(self, api_key: str | None) -> _Key:
        if not api_key:
            raise StripeFakeError(401, "You did not provide an API key. You need to provide your API key in "
                                  "the Authorization header, using Bearer auth.")
        key = self._keys.get(api_key)
        if key is None:
            raise StripeFakeError(401, f"Invalid API Key provided: {_mask(api_key)}")
        return key

    def _take_fault(self, method: str, path: str, api_key: str | None) -> _Fault | None:
        for fault in self._faults:  # FIFO: the oldest matching fault fires first
            if (fault.matches(path) and fault.method in (None, method)
                    and fault.api_key in (None, api_key)):
                if fault.skip > 0:
                    fault.skip -= 1
                    return None
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self._faults.remove(fault)
                return fault
        return None

    def _raise_fault(self, fault: _Fault | None, api_key: str | None) -> None:
        if fault is None or fault.fault.startswith("accept_then_") or fault.fault == "slow":
            return
        if fault.fault == "revoke_key":
            self._keys.pop(api_key, None)
            self._authenticate(api_key)
        if fault.fault == "bad_request":
            # A 400 invalid_request_error whose code is not resource_missing: Stripe refuses the request itself.
            raise StripeFakeError(400, "Received unknown parameter: expand[0] (injected by the fake).",
                                  code="parameter_unknown", param="expand[0]", headers=fault.headers)
        if fault.fault == "rate_limit":
            # Real 429 bodies carry code rate_limit; the SDK maps any 429 to RateLimitError.
            raise StripeFakeError(429, "Request rate limit exceeded. Learn more about rate limits here "
                                  "https://stripe.com/docs/rate-limits.", code="rate_limit",
                                  headers=fault.headers)
        raise StripeFakeError(500, "An unknown error occurred (injected by the fake).", type="api_error",
                              headers=fault.headers)

    def _execute(self, t: _Tenant, endpoint: str, args: dict, params: dict, headers: Mapping[str, str],
                 idem_key: str | None) -> _Outcome:
        """Run a handler under Stripe's idempotency rules (https://docs.stripe.com/api/idempotent_requests)."""
        fingerprint = (endpoint, args, params)
        saved = t.idempotency.get(idem_key) if idem_key else None
        if saved is not None:
            if saved[0] != fingerprint:
                raise StripeFakeError(
                    400, "Keys for idempotent requests can only be used with the same parameters they were "
                    f"first used with. Try using a key other than '{idem_key}' if you meant to execute a "
                    "different request.", type="idempotency_error")
            return _Outcome(saved[1], saved[2], {"Idempotent-Replayed": "true", "Idempotency-Key": idem_key})
        version = headers.get("Stripe-Version") or DEFAULT_API_VERSION
        body = json.dumps(getattr(self, f"_api_{endpoint}")(t, params, version, **args))
        if idem_key:
            # Only executed requests are saved; validation errors are not (same docs page).
            t.idempotency[idem_key] = (fingerprint, 200, body)
        return _Outcome(200, body, {"Idempotency-Key": idem_key} if idem_key else {})

    # ---- generic object helpers ---------------------------------------------------------------------
    def _get(self, t: _Tenant, kind: str, obj_id: str, param: str = "id") -> dict:
        obj = t.objects[kind].get(obj_id)
        if obj is None:
            raise _missing(kind, obj_id, param)
        return obj

    def _page(self, objs: list[dict], params: Mapping, url: str) -> dict:
        """Cut a Stripe list page (`limit`, `starting_after`) out of newest-first objects."""
        limit = _int(params, "limit", 10)
        if not 1 <= limit <= 100:
            raise _invalid("Invalid limit: must be between 1 and 100", "limit")
        cursor = _str(params, "starting_after")
        if cursor is not None:
            ids = [o["id"] for o in objs]
            if cursor not in ids:
                raise _missing("object", cursor, "starting_after")
            objs = objs[ids.index(cursor) + 1:]
        return {"object": "list", "data": objs[:limit], "has_more": len(objs) > limit, "url": url}

    def _list(self, t: _Tenant, kind: str, params: Mapping, url: str, keep: Callable[[dict], bool]) -> dict:
        objs = [o for o in reversed(t.objects[kind].values()) if not o.get("deleted") and keep(o)]
        return self._page(objs, params, url)

    def _expand(self, t: _Tenant, obj: dict, params: Mapping, in_list: bool = False) -> dict:
        """Apply `expand[]` (price.product, subscription.customer); unknown paths are refused like Stripe."""
        if obj["object"] == "subscription":
            obj = self._public_subscription(obj)
        elif obj["object"] == "subscription_item":
            obj = self._public_item(obj)
        paths = params.get("expand") or []
        tiers = None
        if obj["object"] == "price":  # `tiers` is not included by default (docs.stripe.com/api/prices/object)
            tiers = obj["_tiers"]
            obj = {k: v for k, v in obj.items() if k != "_tiers"}
        for path in [paths] if isinstance(paths, str) else paths:
            name = path[5:] if in_list and path.startswith("data.") else path
            if (obj["object"], name) == ("price", "tiers"):
                obj = {**obj, "tiers": copy.deepcopy(tiers)}
            elif (obj["object"], name) == ("price", "product"):
                obj = {**obj, "product": self._get(t, "product", obj["product"])}
            elif (obj["object"], name) == ("subscription", "customer"):
                obj = {**obj, "customer": self._get(t, "customer", obj["customer"])}
            else:
                raise _invalid(f"This property cannot be expanded ({path}).", "expand")
        return obj

    def _active_meter(self, t: _Tenant, event_name: str) -> dict | None:
        return next((m for m in t.objects["billing.meter"].values()
                     if m["event_name"] == event_name and m["status"] == "active"), None)

    def _api_retrieve(self, t: _Tenant, params: Mapping, version: str, id: str, kind: str) -> dict:
        return self._expand(t, self._get(t, kind, id), params)

    @staticmethod
    def _public_event(event: dict) -> dict:
        return {k: copy.deepcopy(v) for k, v in event.items() if not k.startswith("_")}

    # ---- account, products, prices --------------------------------------------------------------------
    def _api_get_account(self, t, params, version):
        return {"id": t.account_id, "object": "account", "business_profile": {"name": t.display_name},
                "settings": {"dashboard": {"display_name": t.display_name, "timezone": "Etc/UTC"}},
                "charges_enabled": True, "country": "US", "default_currency": "usd", "type": "standard"}

    def _api_create_product(self, t: _Tenant, params: Mapping, version: str = DEFAULT_API_VERSION) -> dict:
        now = self.now()
        product = {"id": self._next_id("prod"), "object": "product", "active": _bool(params, "active") is not False,
                   "created": now, "default_price": None, "description": params.get("description"),
                   "livemode": t.livemode, "metadata": params.get("metadata") or {},
                   "name": _str(params, "name", required=True), "type": "service", "updated": now}
        t.objects["product"][product["id"]] = product
        return product

    def _api_list_products(self, t, params, version):
        active = _bool(params, "active")
        return self._list(t, "product", params, "/v1/products", lambda p: active in (None, p["active"]))

    def _api_create_price(self, t: _Tenant, params: Mapping, version: str) -> dict:
        if _obj(params, "product_data"):
            product_id = self._api_create_product(t, params["product_data"])["id"]
        else:
            product_id = self._get(t, "product", _str(params, "product", required=True), "product")["id"]
        scheme = _str(params, "billing_scheme", choices=("per_unit", "tiered")) or "per_unit"
        tiers, tiers_mode = self._price_tiers(params) if scheme == "tiered" else (None, None)
        unit_amount = _int(params, "unit_amount", required=scheme == "per_unit" and "unit_amount_decimal" not in params)
        recurring, transform = _obj(params, "recurring"), _obj(params, "transform_quantity")
        if transform is not None and tiers is not None:  # https://docs.stripe.com/api/prices/create
            raise _invalid("transform_quantity cannot be combined with tiers.", "transform_quantity")
        if recurring is not None:
            meter = _str(recurring, "meter")
            usage_type = _str(recurring, "usage_type", choices=("licensed", "metered")) or "licensed"
            if meter is not None:
                self._get(t, "billing.meter", meter, "recurring[meter]")
                if usage_type != "metered":
                    raise _invalid("A meter can only be set on a metered price.", "recurring[usage_type]")
            elif usage_type == "metered" and version >= LEGACY_USAGE_REMOVED_IN:
                # Basil forbids new meter-less metered prices (changelog URL at LEGACY_USAGE_REMOVED_IN).
                raise _invalid("Metered prices must be backed by a billing meter: pass recurring[meter].",
                               "recurring[meter]")
            recurring = {"interval": _str(recurring, "interval", True, ("day", "week", "month", "year")),
                         "interval_count": _int(recurring, "interval_count", 1), "meter": meter,
                         "trial_period_days": None, "usage_type": usage_type}
        if transform is not None:
            transform = {"divide_by": _int(transform, "divide_by", required=True),
                         "round": _str(transform, "round", True, ("up", "down"))}
            if transform["divide_by"] < 1:
                raise _invalid("transform_quantity[divide_by] must be positive.", "transform_quantity[divide_by]")
        decimal = params.get("unit_amount_decimal") or (None if unit_amount is None else str(unit_amount))
        price = {"id": self._next_id("price"), "object": "price", "active": _bool(params, "active") is not False,
                 "billing_scheme": scheme, "created": self.now(),
                 "currency": _str(params, "currency", required=True).lower(), "custom_unit_amount": None,
                 "livemode": t.livemode, "lookup_key": params.get("lookup_key"),
                 "metadata": params.get("metadata") or {}, "nickname": params.get("nickname"),
                 "product": product_id, "recurring": recurring, "tax_behavior": "unspecified",
                 "tiers_mode": tiers_mode, "_tiers": tiers, "transform_quantity": transform,
                 "type": "recurring" if recurring else "one_time", "unit_amount": unit_amount,
                 "unit_amount_decimal": decimal}
        t.objects["price"][price["id"]] = price
        return self._expand(t, price, params)

    @staticmethod
    def _price_tiers(params: Mapping) -> tuple[list[dict], str]:
        """Validate ``tiers`` and ``tiers_mode`` of a tiered price as Stripe does (the last up_to is inf)."""
        tiers_mode = _str(params, "tiers_mode", True, ("graduated", "volume"))
        raw = params.get("tiers")
        if not isinstance(raw, list) or not raw or not all(isinstance(tier, dict) for tier in raw):
            raise _invalid("Missing required param: tiers.", "tiers", "parameter_missing")
        tiers, previous = [], 0
        for n, tier in enumerate(raw):
            last = n == len(raw) - 1
            up_to = tier.get("up_to")
            if (up_to == "inf") != last:
                raise _invalid("Only the last tier may (and must) have up_to=inf.", f"tiers[{n}][up_to]")
            up_to = None if last else _int(tier, "up_to", required=True)
            if up_to is not None and up_to <= previous:
                raise _invalid("Tiers must be in increasing order of up_to.", f"tiers[{n}][up_to]")
            previous = up_to or previous
            unit = tier.get("unit_amount_decimal") or tier.get("unit_amount")
            flat = tier.get("flat_amount_decimal") or tier.get("flat_amount")
            tiers.append({"flat_amount": _int(tier, "flat_amount"), "flat_amount_decimal": flat,
                          "unit_amount": _int(tier, "unit_amount"), "unit_amount_decimal": unit, "up_to": up_to})
        return tiers, tiers_mode

    def _api_list_prices(self, t, params, version):
        want = {"product": params.get("product"), "active": _bool(params, "active"),
                "type": params.get("type"), "currency": params.get("currency")}
        rec = _obj(params, "recurring") or {}

        def keep(p):
            if any(v is not None and p[k] != v for k, v in want.items()):
                return False
            return all(p["recurring"] and p["recurring"].get(k) == v for k, v in rec.items())
        page = self._list(t, "price", params, "/v1/prices", keep)
        page["data"] = [self._expand(t, p, params, in_list=True) for p in page["data"]]
        return page

    # ---- billing meters, meter events, summaries --------------------------------------------------
    def _api_create_meter(self, t: _Tenant, params: Mapping, version: str = DEFAULT_API_VERSION) -> dict:
        event_name = _str(params, "event_name", required=True)
        if len(event_name) > 100:
            raise _invalid("event_name must be at most 100 characters.", "event_name")
        if self._active_meter(t, event_name) is not None:  # one meter per event name (meters/configure)
            raise _invalid(f"An active meter with event_name {event_name} already exists.", "event_name")
        formula = _str(_obj(params, "default_aggregation") or {}, "formula", True, ("sum", "count", "last"))
        customer_key = _str(_obj(params, "customer_mapping") or {}, "event_payload_key") or "stripe_customer_id"
        value_key = _str(_obj(params, "value_settings") or {}, "event_payload_key") or "value"
        now = self.now()
        meter = {"id": self._next_id("mtr"), "object": "billing.meter", "created": now,
                 "customer_mapping": {"event_payload_key": customer_key, "type": "by_id"},
                 "default_aggregation": {"formula": formula},
                 "display_name": _str(params, "display_name", required=True), "event_name": event_name,
                 "event_time_window": _str(params, "event_time_window", choices=("hour", "day")),
                 "livemode": t.livemode, "status": "active", "status_transitions": {"deactivated_at": None},
                 "updated": now, "value_settings": {"event_payload_key": value_key}}
        t.objects["billing.meter"][meter["id"]] = meter
        return meter

    def _api_list_meters(self, t, params, version):
        status = _str(params, "status", choices=("active", "inactive"))
        return self._list(t, "billing.meter", params, "/v1/billing/meters",
                          lambda m: status in (None, m["status"]))

    def _set_meter_status(self, t: _Tenant, meter_id: str, active: bool) -> dict:
        meter = self._get(t, "billing.meter", meter_id)
        if active and self._active_meter(t, meter["event_name"]) not in (None, meter):
            raise _invalid(f"An active meter with event_name {meter['event_name']} already exists.")
        now = self.now()
        meter.update(status="active" if active else "inactive", updated=now,
                     status_transitions={"deactivated_at": None if active else now})
        return meter

    def _api_deactivate_meter(self, t, params, version, id):
        return self._set_meter_status(t, id, active=False)

    def _api_reactivate_meter(self, t, params, version, id):
        return self._set_meter_status(t, id, active=True)

    def _api_create_meter_event(self, t, params, version):
        """Validate and store a meter event; which checks real v1 runs synchronously is UNCONFIRMED.

        See docs/stripe.md §1.4.
        """
        event_name = _str(params, "event_name", required=True)
        payload = _obj(params, "payload")
        if not payload:
            raise _invalid("Missing required param: payload.", "payload", "parameter_missing")
        identifier = _str(params, "identifier") or str(uuid.uuid4())
        if len(identifier) > 100:
            raise _invalid("identifier must be at most 100 characters.", "identifier")
        # https://docs.stripe.com/api/billing/meter-event/create: identifiers are unique "within a rolling
        # period of at least 24 hours"; the fake never forgets. Wording as observed (langfuse PR #16292).
        taken = t.identifiers.get(identifier)
        if taken is not None and self.now() - taken < IDENTIFIER_TTL:
            raise StripeFakeError(400, f"An event already exists with identifier {identifier}.",
                                  param="identifier", headers={"Stripe-Should-Retry": "false"})
        meter = self._active_meter(t, event_name)
        if meter is None:
            raise _invalid(f"No active meter found for event_name {event_name}", "event_name",
                           "resource_missing")
        now = self.now()
        timestamp = _int(params, "timestamp", now)
        # Codes below reuse the async error-report codes (docs/stripe.md §1.4) so callers can classify them.
        if timestamp < now - METER_EVENT_MAX_AGE:
            raise _invalid("Timestamp must be within the past 35 calendar days.", "timestamp",
                           "timestamp_too_far_in_past")
        if timestamp > now + METER_EVENT_MAX_AHEAD:
            raise _invalid("Timestamp must not be more than 5 minutes in the future.", "timestamp",
                           "timestamp_in_future")
        customer_key = meter["customer_mapping"]["event_payload_key"]
        value_key = meter["value_settings"]["event_payload_key"]
        customer_id = payload.get(customer_key)
        if not customer_id:
            raise _invalid(f"Missing customer mapping key {customer_key} in payload.",
                           f"payload[{customer_key}]", "meter_event_no_customer_defined")
        value = payload.get(value_key)
        if value is None:
            raise _invalid(f"Missing value key {value_key} in payload.", f"payload[{value_key}]",
                           "meter_event_value_not_found")
        # Decimals are accepted by today's docs; >15 significant digits is refused from 2026-04-22.dahlia.
        if not isinstance(value, str) or not _NUMBER.fullmatch(value) or len(_significant(value)) > 15:
            raise _invalid(f"Invalid value {value!r}: must be a number string with at most 15 significant "
                           "digits.", f"payload[{value_key}]", "meter_event_invalid_value")
        customer = t.objects["customer"].get(customer_id)
        if customer is None or customer.get("deleted"):
            raise _invalid(f"No such customer: '{customer_id}'", f"payload[{customer_key}]",
                           "resource_missing")
        event = {"object": "billing.meter_event", "created": now, "event_name": event_name,
                 "identifier": identifier, "livemode": t.livemode, "payload": dict(payload),
                 "timestamp": timestamp, "_meter": meter["id"], "_value_key": value_key}
        t.identifiers[identifier] = now
        t.events.append(event)
        t.events_by[(meter["id"], customer_id)].append(event)
        return self._public_event(event)

    def _api_event_summaries(self, t, params, version, id):
        meter = self._get(t, "billing.meter", id)
        customer = self._get(t, "customer", _str(params, "customer", required=True), "customer")["id"]
        start, end = _int(params, "start_time", required=True), _int(params, "end_time", required=True)
        window = _str(params, "value_grouping_window", choices=("hour", "day"))
        step = {"hour": 3600, "day": 86400}.get(window, 60)
        for name, value in (("start_time", start), ("end_time", end)):
            if value % step:  # https://docs.stripe.com/api/billing/meter-event-summary/list
                raise _invalid(f"{name} must be aligned to {window or 'minute'} boundaries.", name)
        if end <= start:
            raise _invalid("end_time must be after start_time.", "end_time")
        bounds = [(s, min(s + step, end)) for s in range(start, end, step)] if window else [(start, end)]
        events = t.events_by[(meter["id"], customer)]
        summaries = []
        for lo, hi in bounds:
            digest = hashlib.sha256(f"{meter['id']}:{customer}:{lo}:{hi}".encode()).hexdigest()[:24]
            value = _aggregate(meter["default_aggregation"]["formula"],
                               [e for e in events if lo <= e["timestamp"] < hi])
            summaries.append({"id": f"mtrusg_{digest}", "object": "billing.meter_event_summary",
                              "aggregated_value": float(value), "end_time": hi, "livemode": t.livemode,
                              "meter": meter["id"], "start_time": lo})
        return self._page(summaries, params, f"/v1/billing/meters/{id}/event_summaries")

    # ---- customers ------------------------------------------------------------------------------------
    def _api_create_customer(self, t: _Tenant, params: Mapping, version: str = DEFAULT_API_VERSION) -> dict:
        customer = {"id": self._next_id("cus"), "object": "customer", "created": self.now(),
                    "description": params.get("description"), "email": params.get("email"),
                    "livemode": t.livemode, "metadata": params.get("metadata") or {},
                    "name": params.get("name")}
        t.objects["customer"][customer["id"]] = customer
        return customer

    def _api_delete_customer(self, t, params, version, id):
        if self._get(t, "customer", id).get("deleted"):
            raise _missing("customer", id)
        t.objects["customer"][id] = {"id": id, "object": "customer", "deleted": True}
        return t.objects["customer"][id]

    def _api_list_customers(self, t, params, version):
        email = params.get("email")
        return self._list(t, "customer", params, "/v1/customers", lambda c: email in (None, c["email"]))

    def _api_search_customers(self, t, params, version):
        """Search customers in the subset of Stripe's query language Rebill sends: ``field:"v"`` (exact) or
        ``field~"v"`` (substring, 3+ characters) on name or email, joined by OR or AND; one page
        (https://docs.stripe.com/search#search-query-language). Stripe's index lags writes by about a minute;
        the fake's does not."""
        query = _str(params, "query", required=True)
        limit = _int(params, "limit", 10)
        if not 1 <= limit <= 100:
            raise _invalid("Invalid limit: must be between 1 and 100", "limit")
        clauses, joiners, position = [], set(), 0
        for match in _SEARCH_CLAUSE.finditer(query):
            between = query[position:match.start()].strip()  # "" before the first clause, OR/AND after
            if between != ("" if not clauses else between) or (clauses and between not in ("OR", "AND")):
                raise _invalid(f"Invalid search query: {query}", "query")
            if clauses:
                joiners.add(between)
            field, operator, value = match.group(1), match.group(2), re.sub(r"\\(.)", r"\1", match.group(3))
            if operator == "~" and len(value) < 3:
                raise _invalid("Substring matching (~) needs at least 3 characters.", "query")
            clauses.append((field, operator, value.lower()))
            position = match.end()
        if not clauses or query[position:].strip() or len(joiners) > 1:
            raise _invalid(f"Invalid search query: {query}", "query")
        joiner = joiners.pop() if joiners else "OR"

        def matches(customer, field, operator, value):
            have = str(customer.get(field) or "").lower()
            return value in have if operator == "~" else have == value

        combine = all if joiner == "AND" else any
        found = [c for c in reversed(t.objects["customer"].values()) if not c.get("deleted")
                 and combine(matches(c, *clause) for clause in clauses)]
        return {"object": "search_result", "data": found[:limit], "has_more": len(found) > limit,
                "next_page": None, "url": "/v1/customers/search"}

    # ---- subscriptions and legacy usage records -----------------------------------------------------
    def _api_create_subscription(self, t: _Tenant, params: Mapping, version: str, status: str = "active") -> dict:
        customer = self._get(t, "customer", _str(params, "customer", required=True), "customer")
        if customer.get("deleted"):
            raise _missing("customer", customer["id"], "customer")
        items = params.get("items")
        if not isinstance(items, list) or not items or not all(isinstance(i, dict) for i in items):
            raise _invalid("Missing required param: items.", "items", "parameter_missing")
        now = self.now()
        start = _int(params, "backdate_start_date", now)
        sub_id = self._next_id("sub")
        data = []
        for n, item in enumerate(items):
            price = self._get(t, "price", _str(item, "price", required=True), f"items[{n}][price]")
            metered = (price["recurring"] or {}).get("usage_type") == "metered"
            if metered and price["recurring"]["meter"] is None and version >= LEGACY_USAGE_REMOVED_IN:
                raise _invalid("Legacy metered prices cannot be added to subscriptions from API version "
                               "2025-03-31.basil on.", f"items[{n}][price]")
            if metered and item.get("quantity") is not None:  # UNCONFIRMED for meter-backed prices
                raise _invalid("You cannot set the quantity for metered plans.", f"items[{n}][quantity]")
            data.append({"id": self._next_id("si"), "object": "subscription_item", "created": now,
                         "current_period_end": _add_month(start), "current_period_start": start,
                         "metadata": {}, "price": self._expand(t, copy.deepcopy(price), {}),
                         "quantity": None if metered else _int(item, "quantity", 1), "subscription": sub_id,
                         "_anchor": start})
        sub = {"id": sub_id, "object": "subscription", "cancel_at_period_end": False, "created": now,
               "customer": customer["id"], "livemode": t.livemode, "_items": data,
               "metadata": params.get("metadata") or {}, "start_date": start, "status": status}
        t.objects["subscription"][sub_id] = sub
        for item in data:
            t.objects["subscription_item"][item["id"]] = item
        return self._expand(t, sub, params)

    def _public_item(self, item: dict) -> dict:
        """A subscription item as of now: its current period rolled forward from the anchor."""
        start, end = _periods(item["_anchor"], self.now())[-1]
        public = {k: v for k, v in item.items() if not k.startswith("_")}
        return {**public, "current_period_start": start, "current_period_end": end}

    def _public_subscription(self, sub: dict) -> dict:
        items = sub["_items"]
        public = {k: v for k, v in sub.items() if not k.startswith("_")}
        return {**public, "items": {
            "object": "list", "data": [self._public_item(i) for i in items[:EMBEDDED_ITEMS]],
            "has_more": len(items) > EMBEDDED_ITEMS, "total_count": len(items),
            "url": f"/v1/subscription_items?subscription={sub['id']}"}}

    def _api_list_subscriptions(self, t, params, version):
        customer, price, status = params.get("customer"), params.get("price"), params.get("status")

        def keep(s):
            # Stripe lists every status but canceled unless `status` (or "all") says otherwise.
            if status != "all" and (s["status"] != status if status else s["status"] == "canceled"):
                return False
            has_price = any(i["price"]["id"] == price for i in s["_items"])
            return customer in (None, s["customer"]) and (price is None or has_price)
        page = self._list(t, "subscription", params, "/v1/subscriptions", keep)
        page["data"] = [self._expand(t, s, params, in_list=True) for s in page["data"]]
        return page

    def _api_list_subscription_items(self, t, params, version):
        sub = self._get(t, "subscription", _str(params, "subscription", required=True), "subscription")
        return self._page([self._public_item(i) for i in sub["_items"]], params, "/v1/subscription_items")

    def _legacy_item(self, t: _Tenant, version: str, item_id: str) -> dict:
        if version >= LEGACY_USAGE_REMOVED_IN:
            raise _invalid(f"Usage records were removed in API version 2025-03-31.basil (this request used "
                           f"{version}). Send a pre-basil Stripe-Version or move to /v1/billing/meter_events.")
        item = self._get(t, "subscription_item", item_id)
        recurring = item["price"]["recurring"] or {}
        if recurring.get("usage_type") != "metered" or recurring.get("meter"):
            # Wording as reported in laravel/cashier-stripe #1709.
            raise _invalid(f"Cannot create a usage record for `{item_id}` because it is not on the legacy "
                           "metered billing system. Call /v1/billing/meter_events instead.")
        return item

    def _api_create_usage_record(self, t, params, version, id):
        item = self._legacy_item(t, version, id)
        quantity = _int(params, "quantity", required=True)
        action = _str(params, "action", choices=("increment", "set")) or "increment"
        now = self.now()
        timestamp = now if params.get("timestamp") in (None, "now") else _int(params, "timestamp")
        if timestamp < self._public_item(item)["current_period_start"]:
            raise _invalid("Cannot create the usage record with this timestamp because timestamps must be "
                           "after the subscription's last invoice period (or current period start time).",
                           "timestamp")
        if timestamp > now + METER_EVENT_MAX_AHEAD:
            raise _invalid("Cannot create the usage record with this timestamp because it is in the future.",
                           "timestamp")
        records = t.usage[id]
        # action=set overwrites the quantity at that exact timestamp only (stripe/stripe-python PR #607).
        records[timestamp] = quantity if action == "set" else records.get(timestamp, 0) + quantity
        return {"id": self._next_id("mbur"), "object": "usage_record", "livemode": t.livemode,
                "quantity": quantity, "subscription_item": id, "timestamp": timestamp}

    def _api_usage_record_summaries(self, t, params, version, id):
        item = self._legacy_item(t, version, id)
        summaries = [  # one per billing period, newest first
            {"id": f"sis_{hashlib.sha256(f'{id}:{start}'.encode()).hexdigest()[:24]}",
             "object": "usage_record_summary", "invoice": None, "livemode": t.livemode,
             "period": {"start": start, "end": end}, "subscription_item": id,
             "total_usage": sum(q for ts, q in t.usage[id].items() if start <= ts < end)}
            for start, end in reversed(_periods(item["_anchor"], self.now()))]
        return self._page(summaries, params, f"/v1/subscription_items/{id}/usage_record_summaries")

    # ---- webhook endpoints ----------------------------------------------------------------------------
    def _api_create_webhook_endpoint(self, t, params, version):
        url = _str(params, "url", required=True)
        if not re.match(r"^https?://", url):
            raise _invalid("Invalid URL: URL must be publicly accessible and use http or https.", "url",
                           "url_invalid")
        events = params.get("enabled_events")
        if isinstance(events, str):
            events = [events]
        if not isinstance(events, list) or not events or not all(isinstance(e, str) for e in events):
            raise _invalid("Missing required param: enabled_events.", "enabled_events", "parameter_missing")
        endpoint = {"id": self._next_id("we"), "object": "webhook_endpoint", "api_version": params.get("api_version"),
                    "application": None, "created": self.now(), "description": params.get("description"),
                    "enabled_events": list(events), "livemode": t.livemode,
                    "metadata": params.get("metadata") or {}, "status": "enabled", "url": url}
        t.objects["webhook_endpoint"][endpoint["id"]] = endpoint
        # https://docs.stripe.com/api/webhook_endpoints/object: `secret` "is only returned at creation".
        t.webhook_secrets[endpoint["id"]] = f"whsec_{uuid.uuid4().hex}{uuid.uuid4().hex[:8]}"
        return {**endpoint, "secret": t.webhook_secrets[endpoint["id"]]}

    def _api_create_event_destination(self, t, params, version):
        """https://docs.stripe.com/api/v2/core/event-destinations/create: the signing secret is in the answer
        only when asked for (`include: ["webhook_endpoint.signing_secret"]`) and never again."""
        _str(params, "name", required=True)
        kind = _str(params, "type", required=True, choices=("webhook_endpoint", "amazon_eventbridge"))
        if kind != "webhook_endpoint":
            raise _invalid("The fake only supports webhook_endpoint destinations.", "type")
        payload = _str(params, "event_payload", required=True, choices=("thin", "snapshot"))
        events = params.get("enabled_events")
        if not isinstance(events, list) or not events or not all(isinstance(e, str) for e in events):
            raise _invalid("Missing required param: enabled_events.", "enabled_events", "parameter_missing")
        webhook = _obj(params, "webhook_endpoint") or {}
        url = webhook.get("url")
        if not isinstance(url, str) or not re.match(r"^https?://", url):
            raise _invalid("webhook_endpoint.url must be an http or https URL.", "webhook_endpoint.url")
        created = datetime.fromtimestamp(self.now(), UTC).isoformat().replace("+00:00", "Z")
        destination = {"id": self._next_id("ed_test"), "object": "v2.core.event_destination", "created": created,
                       "description": params.get("description") or "", "enabled_events": list(events),
                       "event_payload": payload, "events_from": params.get("events_from") or ["self"],
                       "livemode": t.livemode, "metadata": params.get("metadata") or {}, "name": params["name"],
                       "status": "enabled", "status_details": None, "type": "webhook_endpoint",
                       "updated": created, "webhook_endpoint": {"signing_secret": None, "url": url}}
        t.objects["v2.core.event_destination"][destination["id"]] = destination
        t.destination_secrets[destination["id"]] = f"whsec_{uuid.uuid4().hex}{uuid.uuid4().hex[:8]}"
        answer = copy.deepcopy(destination)
        include = params.get("include") or []
        if "webhook_endpoint.signing_secret" in include:
            answer["webhook_endpoint"]["signing_secret"] = t.destination_secrets[destination["id"]]
        return answer

    def _api_delete_event_destination(self, t, params, version, id):
        if self._get(t, "v2.core.event_destination", id).get("deleted"):
            raise _missing("v2.core.event_destination", id)
        t.objects["v2.core.event_destination"][id] = {"id": id, "object": "v2.core.event_destination",
                                                        "deleted": True}
        t.destination_secrets.pop(id, None)
        return {"id": id, "object": "v2.core.event_destination", "deleted": True}

    def _api_list_webhook_endpoints(self, t, params, version):
        return self._list(t, "webhook_endpoint", params, "/v1/webhook_endpoints", lambda e: True)

    def _api_delete_webhook_endpoint(self, t, params, version, id):
        if self._get(t, "webhook_endpoint", id).get("deleted"):
            raise _missing("webhook_endpoint", id)
        t.objects["webhook_endpoint"][id] = {"id": id, "object": "webhook_endpoint", "deleted": True}
        t.webhook_secrets.pop(id, None)
        return t.objects["webhook_endpoint"][id]


class FakeStripeApp:
    """WSGI entry point: parses Stripe's form encoding, lets the state answer, then plays hang/drop faults."""

    def __init__(self, state: FakeStripeState | None = None):
        self.state = state or FakeStripeState()

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        request = Request(environ)
        pairs = parse_qsl(request.query_string.decode(), keep_blank_values=True)
        json_body: dict = {}
        if request.method == "POST" and request.path.startswith("/v2/"):
            # API v2 takes JSON bodies (https://docs.stripe.com/api-v2-overview).
            text = request.get_data(as_text=True)
            json_body = json.loads(text) if text.strip() else {}
        elif request.method == "POST":
            pairs += parse_qsl(request.get_data(as_text=True), keep_blank_values=True)
        try:
            outcome = self.state.dispatch(request.method, request.path, {**unflatten(pairs), **json_body},
                                          request.headers)
        except Exception as exc:  # a bug in the fake: answer JSON so the SDK shows it instead of HTML
            log.exception("stripe_fake failed on %s %s", request.method, request.path)
            err = StripeFakeError(500, f"stripe_fake bug: {exc!r}", type="api_error")
            outcome = _Outcome(500, json.dumps(err.body()), {})
        fault = outcome.fault.fault if outcome.fault else None
        if fault in ("timeout", "slow"):
            self.state._released.wait(outcome.fault.seconds)  # release_hangs() cuts the hang short
        if fault in ("timeout", "accept_then_drop"):
            self._drop_connection(environ)  # raises when a real socket is there
            outcome = _Outcome(500, json.dumps(StripeFakeError(
                500, "Connection dropped (injected by the fake).", type="api_error").body()), {})
        elif fault == "accept_then_500":
            outcome = _Outcome(500, json.dumps(StripeFakeError(
                500, "An unknown error occurred (injected after applying the request).", type="api_error")
                .body()), {})
        headers = {"Request-Id": f"req_{uuid.uuid4().hex[:14]}", **outcome.headers}
        response = Response(outcome.body, outcome.status, headers, mimetype="application/json")
        return response(environ, start_response)

    @staticmethod
    def _drop_connection(environ: dict) -> None:
        """Close the socket unanswered; werkzeug's server treats ConnectionError as a client drop."""
        sock = environ.get("werkzeug.socket")
        if sock is None:
            return  # not behind werkzeug's server (e.g. werkzeug.test.Client): fall back to a 500
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        raise ConnectionAbortedError("stripe_fake dropped the connection on purpose")


def create_app(state: FakeStripeState | None = None) -> FakeStripeApp:
    """Build the WSGI app around a (new) state."""
    return FakeStripeApp(state)
