"""Rebill clients: validated creation and edits, pause/resume, soft delete — each edit exact for billing.

Every edit that changes how usage counts (N, status, message_source, source, deletion) first
locks the client row and counts its pending events under the settings in force when they arrived
(billing.units.flush_client_usage), then changes the settings, in the caller's transaction. Services flush,
never commit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from billing.aggregation_store import take_write_lock
from billing.alerts import parse_thresholds, thresholds_of
from billing.client_terms import (
    set_billing_unit,
    set_client_status,
    settle_source_before_mapping,
    start_counting,
    start_new_term,
)
from billing.estimates import AmountInvalid, PriceTerms, major_units, minor_units, units_within
from billing.models import CHARGE_BY, MESSAGE_SOURCES, Agency, ClientPeriod, RebillClient, is_row_id
from billing.price_usability import PriceInfo
from billing.reporting import retry_failed_reports
from billing.sources import source_field
from billing.states import ClientStatus, Provider
from billing.stripe_gateway import StripeGateway, StripeKeyRejected, StripeRequestRejected, gateway_for
from billing.stripe_target import StripeTarget
from billing.units import UNBILLED_STATES, flush_client_usage
from core.database import db, utcnow
from core.errors import ClientInvalid, NotFound

CLIENT_FIELDS = (
    "nickname",
    "provider",
    "channel_id",
    "location_id",
    "stripe_product_id",
    "stripe_price_id",
    "stripe_customer_id",
    "charge_by",
    "billing_unit",
    "message_source",
    "status",
    "pause_on_payment_failure",
    "monthly_cap_units",
    "monthly_cap_amount",
    "alert_thresholds",
)
STRIPE_FIELDS = ("stripe_product_id", "stripe_price_id", "stripe_customer_id")
# Fields whose change alters how usage is counted: pending events are counted under the old values first.
COUNTING_FIELDS = ("provider", "channel_id", "location_id", "billing_unit", "message_source", "status")
NICKNAME_MAX = 120
CHANNEL_ID_MAX = 255
LOCATION_ID_MAX = 64
STRIPE_ID_MAX = 255
BILLING_UNIT_MAX = 10**12
CAP_UNITS_MAX = 10**12
DEFAULT_MESSAGE_SOURCE = "ghl_outbound"

KnownLocations = Iterable[str] | Callable[[], Iterable[str]] | None


def create_client(
    agency: Agency,
    fields: Mapping[str, Any],
    *,
    bill_unmapped_usage: bool = False,
    known_location_ids: KnownLocations = None,
) -> RebillClient:
    """Validate and add a client; its counting starts now (rule 1 "counted from the client's creation").

    ``bill_unmapped_usage``: usage of this channel/subaccount that arrived before any client mapped it is
    never billed by default (rule 3). With True — the agency's explicit choice — every earlier unmapped event
    of this source (not counted by any client) is counted under the new client at the next aggregation.
    ``known_location_ids``: the agency's installed GHL subaccount ids (or a callable returning them); a
    ghl client's location_id must be one of them. None skips that check (the caller vouches for the id).
    """
    values = validate_client_fields(fields, known_location_ids=known_location_ids)
    if bill_unmapped_usage and values["status"] in UNBILLED_STATES:
        # The earlier usage would be aggregated as "paused" / "shadow" and so never billed, against the
        # agency's choice (rules 5 and 13).
        kind = "a dry-run (shadow)" if values["status"] == ClientStatus.SHADOW else "a paused"
        raise ClientInvalid(
            {"bill_unmapped_usage": f"{kind} client bills nothing: add it active to bill the earlier usage"}
        )
    target = stripe_target_for(agency, values)
    values.update(cap_from_amount(agency, values))
    take_write_lock()
    source_key = _source_key(values)
    _refuse_taken_source(agency.id, values["provider"], source_key, except_id=None)
    client = RebillClient(agency_id=agency.id, source_key=source_key, **values)
    client.stripe_target = target
    try:
        with db.session.begin_nested():
            db.session.add(client)
            db.session.flush()
    except IntegrityError:
        # A concurrent request mapped the same source between our check and our insert.
        raise ClientInvalid({source_field(values["provider"]): "another client already uses it"}) from None
    settle_source_before_mapping(agency.id, values["provider"], source_key, bill_unmapped=bill_unmapped_usage)
    start_counting(client, earlier_usage=bill_unmapped_usage)
    db.session.flush()
    return client


def update_client(
    agency: Agency, client_id: int, fields: Mapping[str, Any], *, known_location_ids: KnownLocations = None
) -> RebillClient:
    """Change any client fields; usage pending at the change counts under the old settings (rules 4, 5).

    A new N applies to the carried remainder (billing.client_terms.set_billing_unit); pausing or resuming first
    counts pending events under the old status, so usage received while paused is never billed (a dry run,
    ``shadow``, likewise: rule 13). A new
    channel/subaccount is mapped from now on (its earlier usage stays unmapped). charge_by is fixed at
    creation: a remainder of tokens is no remainder of messages (carrying it would bill usage that never
    happened, dropping it would lose usage), so billing another measure takes a new client.
    """
    # Validate and ask Stripe before taking any lock: a slow Stripe must not hold the client (or, on
    # SQLite, the whole database) while usage keeps arriving.
    snapshot = get_client(agency, client_id)
    values = validate_client_fields(fields, current=_field_values(snapshot), known_location_ids=known_location_ids)
    if values["charge_by"] != snapshot.charge_by:
        raise ClientInvalid(
            {
                "charge_by": "cannot change after creation; add a new client to bill another measure "
                "(this one keeps its history)"
            }
        )
    checked = {name: values[name] for name in STRIPE_FIELDS}
    target = None
    if any(getattr(snapshot, name) != value for name, value in checked.items()):
        target = stripe_target_for(agency, values)
    cap_basis = _cap_basis(values)
    cap = cap_from_amount(agency, values, current=snapshot) if _cap_basis(_field_values(snapshot)) != cap_basis else {}

    current = _locked_client(agency, client_id)
    values = validate_client_fields(fields, current=_field_values(current), known_location_ids=None)
    if _cap_basis(values) != cap_basis:
        # Another edit changed the amount or price while we read the price: convert what we will store.
        cap = cap_from_amount(agency, values, current=current)
    if cap:
        values.update(cap)
    elif values["monthly_cap_amount"] is not None:
        values["monthly_cap_units"] = current.monthly_cap_units  # derived from the unchanged amount and price
    changed = {name: value for name, value in values.items() if getattr(current, name) != value}
    if not changed:
        return current
    stripe_changed = any(name in changed for name in STRIPE_FIELDS)
    if stripe_changed and (target is None or any(values[name] != checked[name] for name in STRIPE_FIELDS)):
        # Another edit changed the Stripe fields while we were asking Stripe: check what we will store.
        target = stripe_target_for(agency, values)
    source_key = _source_key(values)
    new_source = (values["provider"], source_key) != (current.provider, current.source_key)
    if new_source:
        _refuse_taken_source(agency.id, values["provider"], source_key, except_id=current.id)
    if any(name in changed for name in COUNTING_FIELDS):
        flush_client_usage(current)
    if "status" in changed or new_source:
        start_new_term(current)  # rule 11: usage received until now keeps the settings in force
    if "billing_unit" in changed:
        set_billing_unit(current, changed.pop("billing_unit"))
    if "status" in changed:
        current.paused_for_payment = False  # the agency decided; a paid invoice must not undo its choice
    for name, value in changed.items():
        setattr(current, name, value)
    if stripe_changed:
        current.stripe_target = target
    current.source_key = source_key
    if new_source:
        try:
            with db.session.begin_nested():
                db.session.flush()
        except IntegrityError:
            raise ClientInvalid({source_field(values["provider"]): "another client already uses it"}) from None
        settle_source_before_mapping(agency.id, values["provider"], source_key, bill_unmapped=False)
    db.session.flush()
    if stripe_changed:
        # The agency fixed what Stripe refused (customer, price): the client's failed reports are due again.
        retry_failed_reports(agency, current.id)
    return current


def delete_client(agency: Agency, client_id: int) -> None:
    """Soft-delete a client: its pending usage counts first, its history stays, new usage is unmapped."""
    client = _locked_client(agency, client_id)
    flush_client_usage(client)
    client.deleted_at = utcnow()
    db.session.flush()


def get_client(agency: Agency, client_id: int) -> RebillClient:
    """Return a live client of this agency; NotFound for other agencies' ids and deleted clients."""
    if not is_row_id(client_id):
        raise NotFound("client not found")
    client = db.session.scalars(
        select(RebillClient).where(
            RebillClient.id == client_id, RebillClient.agency_id == agency.id, RebillClient.deleted_at.is_(None)
        )
    ).one_or_none()
    if client is None:
        raise NotFound("client not found")
    return client


def list_clients(agency: Agency) -> list[RebillClient]:
    """Return the agency's live clients, oldest first."""
    return list(
        db.session.scalars(
            select(RebillClient)
            .where(RebillClient.agency_id == agency.id, RebillClient.deleted_at.is_(None))
            .order_by(RebillClient.id)
        )
    )


def pause_clients_for_location(agency_id: int, location_id: str) -> int:
    """Pause the live active ghl clients of an uninstalled subaccount; return how many were paused.

    Their pending usage counts first (it arrived while they were active); history is kept, and an agency
    can resume them later.
    """
    return _pause_clients(
        agency_id, RebillClient.provider == Provider.GHL, RebillClient.source_key == location_id
    )


def pause_agency_clients(agency_id: int) -> int:
    """Pause every live active client of an agency that uninstalled Rebill; return how many were paused.

    API-channel clients too: nobody of the agency can sign in to manage them any more, so nothing may keep
    billing into its Stripe. Pending usage counts first; history is kept; a reinstalled agency resumes them.
    """
    return _pause_clients(agency_id)


def _pause_clients(agency_id: int, *conditions) -> int:
    take_write_lock()
    ids = db.session.scalars(
        select(RebillClient.id)
        .where(
            RebillClient.agency_id == agency_id,
            RebillClient.deleted_at.is_(None),
            RebillClient.status == ClientStatus.ACTIVE,
            *conditions,
        )
        .order_by(RebillClient.id)
    ).all()
    paused = 0
    for client_id in ids:
        client = _lock_client_row(agency_id, client_id)
        if client is None or client.status != ClientStatus.ACTIVE:
            continue
        set_client_status(client, ClientStatus.PAUSED)
        paused += 1
    db.session.flush()
    return paused


def validate_client_fields(
    fields: Mapping[str, Any], *, current: Mapping[str, Any] | None = None, known_location_ids: KnownLocations = None
) -> dict[str, Any]:
    """Return the complete, normalised client fields, or raise ClientInvalid naming every bad field.

    ``current`` holds an existing client's values (an update); ``fields`` then names only what changes.
    """
    if not isinstance(fields, Mapping):
        raise ClientInvalid({"fields": "send the client's fields as an object"})
    errors: dict[str, str] = {name: "unknown field" for name in fields if name not in CLIENT_FIELDS}
    merged = {**(current or {}), **{name: value for name, value in fields.items() if name in CLIENT_FIELDS}}
    values: dict[str, Any] = {}

    values["nickname"] = _text(merged, "nickname", NICKNAME_MAX, errors, strip=True)
    values["provider"] = _choice(merged, "provider", tuple(Provider), errors)
    values["charge_by"] = _choice(merged, "charge_by", CHARGE_BY, errors)
    values["status"] = _choice(
        {"status": merged.get("status", ClientStatus.ACTIVE)}, "status", tuple(ClientStatus), errors
    )
    for name in STRIPE_FIELDS:
        values[name] = _text(merged, name, STRIPE_ID_MAX, errors, single_token=True)
    values["billing_unit"] = _billing_unit(merged.get("billing_unit"), errors)
    values["pause_on_payment_failure"] = merged.get("pause_on_payment_failure", False)
    if not isinstance(values["pause_on_payment_failure"], bool):
        errors["pause_on_payment_failure"] = "must be true or false"
    cap_fields = _cap_fields(fields, merged, current or {}, errors)
    values["monthly_cap_units"], values["monthly_cap_amount"] = cap_fields
    values["alert_thresholds"] = _thresholds(merged.get("alert_thresholds"), errors)

    provider = values["provider"]
    values["channel_id"] = values["location_id"] = None
    if provider == Provider.CAPRI_API:
        values["channel_id"] = _text(merged, "channel_id", CHANNEL_ID_MAX, errors, strip=True)
        if fields.get("location_id") is not None:
            errors["location_id"] = "only GHL clients have a subaccount; API channel clients use channel_id"
    elif provider == Provider.GHL:
        values["location_id"] = _text(merged, "location_id", LOCATION_ID_MAX, errors, strip=True)
        if fields.get("channel_id") is not None:
            errors["channel_id"] = "only API channel clients have a channel id; GHL clients use location_id"
        location_changes = current is None or values["location_id"] != current.get("location_id")
        if values["location_id"] and known_location_ids is not None and location_changes:
            known = known_location_ids() if callable(known_location_ids) else known_location_ids
            if values["location_id"] not in set(known):
                errors["location_id"] = "not one of the agency's installed GHL subaccounts"

    values["message_source"] = None
    if provider == Provider.GHL and values["charge_by"] == "messages":
        values["message_source"] = _choice(
            {"message_source": merged.get("message_source") or DEFAULT_MESSAGE_SOURCE},
            "message_source",
            MESSAGE_SOURCES,
            errors,
        )
    elif fields.get("message_source") is not None and provider and values["charge_by"]:
        errors["message_source"] = "only GHL clients charged by messages have a message source"

    if errors:
        raise ClientInvalid(errors)
    return values


def stripe_target_for(agency: Agency, values: Mapping[str, Any]) -> StripeTarget:
    """Check the client's Stripe customer, product and price with the agency's Stripe; return where units go.

    Raises ClientInvalid (422) with Stripe's reason: no connected key, unknown customer, unusable price, a
    price of another product, or (legacy prices) a customer without a subscription on that price. Stripe
    being unreachable raises billing.stripe_gateway.StripeUnavailable (retry later).
    """
    if not agency.stripe_key_ciphertext:
        raise ClientInvalid({name: "connect the agency's Stripe account first" for name in STRIPE_FIELDS})
    gateway = gateway_for(agency)
    customer_id, price_id = values["stripe_customer_id"], values["stripe_price_id"]
    try:
        if not gateway.customer_exists(customer_id):
            raise ClientInvalid({"stripe_customer_id": f"the agency's Stripe account has no customer {customer_id}"})
        try:
            price = gateway.describe_price(price_id)
        except StripeRequestRejected as error:
            raise ClientInvalid({"stripe_price_id": f"Stripe cannot use this price: {error.reason}"}) from None
        _check_price(price, values)
        target = price.target(customer_id)
        if target.is_legacy:
            # Legacy usage records go to the customer's subscription item for this price (docs/stripe.md §2.3).
            target = replace(target, subscription_item_id=gateway.find_subscription_item(customer_id, price_id))
            if target.subscription_item_id is None:
                raise ClientInvalid(
                    {"stripe_customer_id": f"{customer_id} has no active subscription with price {price_id}"}
                )
    except StripeKeyRejected as error:
        raise ClientInvalid({name: error.reason for name in STRIPE_FIELDS}) from None
    except StripeRequestRejected as error:
        raise ClientInvalid({"stripe_customer_id": f"Stripe refused the check: {error.reason}"}) from None
    return target


def cap_from_amount(
    agency: Agency, values: Mapping[str, Any], *, current: RebillClient | None = None
) -> dict[str, Any]:
    """Turn a cap given in money into the cap in units the billing works with; the fields to store.

    The units are the most this client's price lets the amount buy, priced exactly as Stripe prices the
    period's quantity (billing.estimates.units_within; docs/billing-rules.md#caps-in-currency). A cap in
    units (or none) clears the amount. Raises ClientInvalid naming monthly_cap_amount when the amount is not
    a valid amount of the price's currency, buys not even one unit, or buys more than the largest cap.
    Reads the price's terms from the client's cached period when it is for this price, else from Stripe
    (billing.stripe_gateway.StripeUnavailable passes through: retry later).
    """
    amount = values.get("monthly_cap_amount")
    if amount is None:
        return {"monthly_cap_amount": None, "monthly_cap_currency": None}
    terms = _price_terms(agency, values["stripe_price_id"], current)
    kept_amount = current is not None and current.monthly_cap_amount == amount
    if kept_amount and current.monthly_cap_currency and current.monthly_cap_currency != terms.currency:
        raise ClientInvalid(
                {"monthly_cap_amount": f"the cap is {amount} {current.monthly_cap_currency.upper()} but the price "
                 f"charges {terms.currency.upper()}: give the cap again in {terms.currency.upper()}"}
            )
    try:
        budget = minor_units(amount, terms.currency)
    except AmountInvalid as error:
        raise ClientInvalid({"monthly_cap_amount": str(error)}) from None
    units = units_within(terms, budget, CAP_UNITS_MAX + 1)
    if units < 1:
        raise ClientInvalid(
            {"monthly_cap_amount": f"{amount} {terms.currency.upper()} does not cover one unit at this price"}
        )
    if units > CAP_UNITS_MAX:
        raise ClientInvalid(
            {"monthly_cap_amount": f"{amount} {terms.currency.upper()} buys more than the largest cap "
             f"({CAP_UNITS_MAX:,} units) at this price: set no cap, or a cap in units"}
        )
    return {
        "monthly_cap_amount": major_units(budget, terms.currency),  # "50" is kept as "50.00"
        "monthly_cap_currency": terms.currency,
        "monthly_cap_units": units,
    }


def _price_terms(agency: Agency, price_id: str, current: RebillClient | None) -> PriceTerms:
    if current is not None and current.stripe_price_id == price_id:
        cached = db.session.get(ClientPeriod, current.id)
        if cached is not None and cached.price_id == price_id and cached.price_terms:
            return PriceTerms.from_json(cached.price_terms)  # a price's amounts never change in Stripe
    if not agency.stripe_key_ciphertext:
        raise ClientInvalid({"monthly_cap_amount": "connect the agency's Stripe account first"})
    gateway: StripeGateway = gateway_for(agency)
    try:
        info = gateway.read_price_terms(price_id)
    except (StripeKeyRejected, StripeRequestRejected) as error:
        raise ClientInvalid({"monthly_cap_amount": f"Stripe cannot read the price: {error.reason}"}) from None
    if info.terms is None:
        raise ClientInvalid({"monthly_cap_amount": f"{info.problem}; set the cap in units instead"})
    return info.terms


def _cap_basis(values: Mapping[str, Any]) -> tuple:
    """What a cap in money is converted from: a change of either converts again."""
    amount = values.get("monthly_cap_amount")
    return (amount, values.get("stripe_price_id") if amount is not None else None)


def _check_price(price: PriceInfo, values: Mapping[str, Any]) -> None:
    if not price.usable:
        raise ClientInvalid({"stripe_price_id": price.reason or "this price cannot carry usage units"})
    if price.product_id != values["stripe_product_id"]:
        raise ClientInvalid(
            {"stripe_product_id": f"price {price.price_id} belongs to product {price.product_id}, not this one"}
        )


def _locked_client(agency: Agency, client_id: int) -> RebillClient:
    """Take the write lock / the client's row lock and return it fresh; NotFound if not this agency's."""
    if not is_row_id(client_id):
        raise NotFound("client not found")
    take_write_lock()
    client = _lock_client_row(agency.id, client_id)
    if client is None:
        raise NotFound("client not found")
    return client


def _lock_client_row(agency_id: int, client_id: int) -> RebillClient | None:
    # FOR UPDATE (waiting): aggregation never waits on us, and we hold only this one client, so no deadlock.
    return db.session.scalars(
        select(RebillClient)
        .where(RebillClient.id == client_id, RebillClient.agency_id == agency_id, RebillClient.deleted_at.is_(None))
        .with_for_update()
        .execution_options(populate_existing=True)
    ).one_or_none()


def _refuse_taken_source(agency_id: int, provider: str, source_key: str, *, except_id: int | None) -> None:
    taken = db.session.scalars(
        select(RebillClient).where(
            RebillClient.agency_id == agency_id,
            RebillClient.provider == provider,
            RebillClient.source_key == source_key,
            RebillClient.deleted_at.is_(None),
        )
    ).one_or_none()
    if taken is not None and taken.id != except_id:
        raise ClientInvalid({source_field(provider): f"already billed by client '{taken.nickname}'"})


def _field_values(client: RebillClient) -> dict[str, Any]:
    values = {name: getattr(client, name) for name in CLIENT_FIELDS}
    values["alert_thresholds"] = list(thresholds_of(client)) if client.alert_thresholds else None
    return values


def _source_key(values: Mapping[str, Any]) -> str:
    return values[source_field(values["provider"])]


def _text(
    values: Mapping[str, Any],
    name: str,
    max_length: int,
    errors: dict,
    *,
    strip: bool = False,
    single_token: bool = False,
) -> str | None:
    value = values.get(name)
    if value is None:
        errors[name] = "is required"
        return None
    if not isinstance(value, str):
        errors[name] = "must be text"
        return None
    if strip:
        value = value.strip()
    if not value or not value.strip():
        errors[name] = "must not be empty"
        return None
    if len(value) > max_length:
        errors[name] = f"must be at most {max_length} characters"
        return None
    if single_token and (value != value.strip() or any(char.isspace() for char in value)):
        errors[name] = "must not contain spaces"
        return None
    return value


def _choice(values: Mapping[str, Any], name: str, choices: tuple[str, ...], errors: dict) -> str | None:
    value = values.get(name)
    if value is None:
        errors[name] = f"is required: one of {', '.join(choices)}"
        return None
    if value not in choices:
        errors[name] = f"must be one of {', '.join(choices)}"
        return None
    return value


# One message for every wrong billing unit; the portal's live hint says the same words.
BILLING_UNIT_RULE = f"a whole number from 1 to {BILLING_UNIT_MAX:,}"


def _cap_units(value: Any, errors: dict) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= CAP_UNITS_MAX:
        errors["monthly_cap_units"] = f"must be a whole number of units from 1 to {CAP_UNITS_MAX:,}, or null"
        return None
    return value


def _cap_fields(
    fields: Mapping[str, Any], merged: Mapping[str, Any], current: Mapping[str, Any], errors: dict
) -> tuple[int | None, Any]:
    """The cap as (units, amount): one of them, or neither. An amount's form is checked when it is converted
    (its decimal places depend on the price's currency); a cap in units given alone replaces an amount, and
    clearing a cap given in money clears the units derived from it."""
    units, amount = merged.get("monthly_cap_units"), merged.get("monthly_cap_amount")
    cleared = "monthly_cap_amount" in fields and fields["monthly_cap_amount"] is None
    if cleared and "monthly_cap_units" not in fields and current.get("monthly_cap_amount") is not None:
        units = None
    if fields.get("monthly_cap_units") is not None and fields.get("monthly_cap_amount") is not None:
        message = "give the cap either in units or as an amount, not both"
        errors["monthly_cap_units"] = errors["monthly_cap_amount"] = message
        return None, None
    if "monthly_cap_units" in fields and "monthly_cap_amount" not in fields:
        amount = None
    if amount is not None:
        if not isinstance(amount, str):
            errors["monthly_cap_amount"] = "must be an amount as a decimal string (like \"50.00\"), or null"
            return None, None
        return units, amount
    return _cap_units(units, errors), None


def _thresholds(value: Any, errors: dict) -> str | None:
    """Stored as "50,80,100"; given as a list of percentages, or null for the defaults."""
    if value is None:
        return None
    try:
        return ",".join(str(percent) for percent in parse_thresholds(value))
    except ValueError as error:
        errors["alert_thresholds"] = str(error)
        return None


def _billing_unit(value: Any, errors: dict) -> int | None:
    if value is None:
        errors["billing_unit"] = f"is required: {BILLING_UNIT_RULE}"
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= BILLING_UNIT_MAX:
        errors["billing_unit"] = f"must be {BILLING_UNIT_RULE}"
        return None
    return value
