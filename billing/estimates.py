"""What Stripe will charge for a number of units on a price, computed exactly (Decimal, never float).

Pure: no database, no Stripe calls. The gateway turns a Stripe price into ``PriceTerms``
(``price_terms``); ``charge`` applies them to a period's total quantity the way Stripe prices a metered
invoice line (https://docs.stripe.com/api/prices/object, https://docs.stripe.com/products-prices/pricing-models):

- ``transform_quantity`` divides the period's quantity by ``divide_by`` and rounds ``up`` or ``down``, before
  the unit price applies (Stripe's token example: ``divide_by=100, round=up``). Stripe refuses it together
  with tiers, so a tiered price never carries one.
- ``per_unit``: quantity x ``unit_amount_decimal`` (minor units, up to 12 decimal places).
- ``tiered`` + ``graduated``: each tier prices the units that fall in it (``unit_amount`` each) plus its
  ``flat_amount`` once when any quantity reaches it; the first tier is always reached, so its flat amount is
  charged even for 0 units (Stripe's "flat fee and overages" model is built on exactly that).
- ``tiered`` + ``volume``: the tier holding the whole quantity prices every unit, plus that tier's flat amount.
- A tier holds the quantities above the previous tier's ``up_to`` up to and including its own; ``up_to`` of
  the last tier is ``inf`` (None here).

The line total is rounded once, half up, to whole minor units (Stripe invoices in integer minor units; the
exact rounding rule for sub-cent prices is not documented: half up is what Stripe's invoice previews show).
Minor units become a major-unit decimal string with the currency's exponent
(https://docs.stripe.com/currencies#zero-decimal).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, ROUND_FLOOR, ROUND_HALF_UP, Decimal
from typing import Any

# https://docs.stripe.com/currencies#zero-decimal
ZERO_DECIMAL_CURRENCIES = frozenset(
    ("bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga", "pyg", "rwf", "ugx", "vnd", "vuv", "xaf", "xof", "xpf")
)
# https://docs.stripe.com/currencies#three-decimal
THREE_DECIMAL_CURRENCIES = frozenset(("bhd", "jod", "kwd", "omr", "tnd"))


class PriceTermsInvalid(ValueError):
    """A price that Stripe would not accept, or that Rebill cannot price (the reason says which)."""


@dataclass(frozen=True)
class Tier:
    """One pricing tier, amounts in minor units; ``up_to`` None is Stripe's ``inf``."""

    up_to: int | None
    unit_amount: Decimal = Decimal(0)
    flat_amount: Decimal = Decimal(0)


@dataclass(frozen=True)
class PriceTerms:
    """How a Stripe price turns a quantity into money."""

    currency: str
    unit_amount: Decimal | None = None  # per_unit prices, minor units per unit
    tiers_mode: str | None = None  # "graduated" | "volume" for tiered prices
    tiers: tuple[Tier, ...] = ()
    divide_by: int = 1
    round: str = "down"  # transform_quantity rounding: "up" | "down"

    def __post_init__(self):
        if not isinstance(self.currency, str) or not self.currency:
            raise PriceTermsInvalid("the price has no currency")
        if self.divide_by < 1 or self.round not in ("up", "down"):
            raise PriceTermsInvalid("transform_quantity needs divide_by >= 1 and round up or down")
        if self.tiers_mode is None:
            if self.unit_amount is None:
                raise PriceTermsInvalid("a per-unit price needs a unit amount")
            return
        if self.tiers_mode not in ("graduated", "volume"):
            raise PriceTermsInvalid(f"unknown tiers_mode '{self.tiers_mode}'")
        if self.divide_by != 1:
            raise PriceTermsInvalid("Stripe does not combine transform_quantity with tiers")
        if not self.tiers or self.tiers[-1].up_to is not None:
            raise PriceTermsInvalid("the last tier must reach up_to=inf")
        bounds = [tier.up_to for tier in self.tiers[:-1]]
        if any(bound is None or bound < 1 for bound in bounds) or bounds != sorted(set(bounds)):
            raise PriceTermsInvalid("tier bounds must be positive and increasing, with only the last one inf")

    def to_json(self) -> str:
        """Serialise for a cache column (decimals as strings, so nothing is rounded on the way)."""
        return json.dumps(
            {
                "currency": self.currency,
                "unit_amount": None if self.unit_amount is None else str(self.unit_amount),
                "tiers_mode": self.tiers_mode,
                "tiers": [[tier.up_to, str(tier.unit_amount), str(tier.flat_amount)] for tier in self.tiers],
                "divide_by": self.divide_by,
                "round": self.round,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> PriceTerms:
        """Read what ``to_json`` wrote."""
        data = json.loads(text)
        return cls(
            currency=data["currency"],
            unit_amount=None if data["unit_amount"] is None else Decimal(data["unit_amount"]),
            tiers_mode=data["tiers_mode"],
            tiers=tuple(Tier(up_to, Decimal(unit), Decimal(flat)) for up_to, unit, flat in data["tiers"]),
            divide_by=data["divide_by"],
            round=data["round"],
        )


@dataclass(frozen=True)
class Estimate:
    """A charge: ``amount`` in major units as a decimal string ("12.30"), and its currency."""

    amount: str
    currency: str
    minor_units: int = field(compare=False, default=0)


def price_terms(price: Mapping[str, Any]) -> PriceTerms:
    """Read a Stripe price (as a dict, ``tiers`` expanded for tiered prices) into PriceTerms."""
    scheme = price.get("billing_scheme") or "per_unit"
    transform = price.get("transform_quantity") or {}
    common = {
        "currency": (price.get("currency") or "").lower(),
        "divide_by": int(transform["divide_by"]) if transform.get("divide_by") is not None else 1,
        "round": transform.get("round") or "down",
    }
    if scheme == "tiered":
        tiers = price.get("tiers")
        if not tiers:
            raise PriceTermsInvalid("the tiered price came without its tiers (expand[]=tiers)")
        return PriceTerms(tiers_mode=price.get("tiers_mode"), tiers=tuple(_tier(tier) for tier in tiers), **common)
    if scheme != "per_unit":
        raise PriceTermsInvalid(f"unknown billing_scheme '{scheme}'")
    return PriceTerms(unit_amount=_amount(price, "unit_amount"), **common)


def billed_quantity(terms: PriceTerms, units: int) -> int:
    """Apply transform_quantity to a period's units: divide_by, then round up or down."""
    if units < 0:
        raise ValueError("units cannot be negative")
    rounding = ROUND_CEILING if terms.round == "up" else ROUND_FLOOR
    return int((Decimal(units) / terms.divide_by).to_integral_value(rounding))


def charge_minor_units(terms: PriceTerms, units: int) -> int:
    """Return what Stripe charges for ``units`` in one period, in whole minor units (cents)."""
    quantity = billed_quantity(terms, units)
    if terms.tiers_mode is None:
        exact = quantity * terms.unit_amount
    elif terms.tiers_mode == "volume":
        tier = next(tier for tier in terms.tiers if tier.up_to is None or quantity <= tier.up_to)
        exact = quantity * tier.unit_amount + tier.flat_amount
    else:
        exact = _graduated(terms.tiers, quantity)
    return int(exact.to_integral_value(ROUND_HALF_UP))


def estimate(terms: PriceTerms, units: int) -> Estimate:
    """Return the charge for ``units`` in one period, in major units of the price's currency."""
    minor = charge_minor_units(terms, units)
    return Estimate(amount=major_units(minor, terms.currency), currency=terms.currency, minor_units=minor)


def currency_exponent(currency: str) -> int:
    """Return how many decimal places the currency's major unit has in Stripe amounts."""
    currency = currency.lower()
    if currency in ZERO_DECIMAL_CURRENCIES:
        return 0
    if currency in THREE_DECIMAL_CURRENCIES:
        return 3
    return 2


def major_units(minor: int, currency: str) -> str:
    """Turn an integer amount in minor units into a major-unit decimal string: 1234 usd -> "12.34"."""
    exponent = currency_exponent(currency)
    return str(Decimal(minor).scaleb(-exponent).quantize(Decimal(1).scaleb(-exponent)))


def add_amounts(amounts: Sequence[str], currency: str) -> str:
    """Sum major-unit decimal strings of one currency exactly (each already has the currency's places)."""
    minor = sum((Decimal(amount).scaleb(currency_exponent(currency)) for amount in amounts), Decimal(0))
    return major_units(int(minor), currency)


def _graduated(tiers: Sequence[Tier], quantity: int) -> Decimal:
    total = Decimal(0)
    floor = 0
    for tier in tiers:
        ceiling = quantity if tier.up_to is None else min(quantity, tier.up_to)
        in_tier = max(ceiling - floor, 0)
        if in_tier or floor == 0:  # the first tier is always reached, even by quantity 0
            total += in_tier * tier.unit_amount + tier.flat_amount
        if tier.up_to is None or quantity <= tier.up_to:
            break
        floor = tier.up_to
    return total


def _tier(tier: Mapping[str, Any]) -> Tier:
    up_to = tier.get("up_to")
    if up_to in (None, "inf"):
        up_to = None
    return Tier(
        up_to=None if up_to is None else int(up_to),
        unit_amount=_amount(tier, "unit_amount", default=Decimal(0)),
        flat_amount=_amount(tier, "flat_amount", default=Decimal(0)),
    )


def _amount(source: Mapping[str, Any], name: str, default: Decimal | None = None) -> Decimal | None:
    """Prefer the ``<name>_decimal`` string (exact, up to 12 places) over the integer field."""
    for key in (f"{name}_decimal", name):
        value = source.get(key)
        if value is not None:
            try:
                return Decimal(str(value))
            except ArithmeticError:
                raise PriceTermsInvalid(f"{key} is not a number: {value!r}") from None
    return default


class AmountInvalid(ValueError):
    """An amount of money that is not a positive decimal in the currency's major units."""


AMOUNT_MAX_DIGITS = 18


def minor_units(amount: object, currency: str) -> int:
    """Turn a major-unit decimal string ("50.00" usd) into whole minor units (5000); raise AmountInvalid.

    Only strings: a float would already have been rounded on the way. More decimal places than the currency
    has (docs.stripe.com/currencies) are refused rather than rounded, so the amount stored is the one typed.
    """
    exponent = currency_exponent(currency)
    places = f"at most {exponent} decimal places" if exponent else "no decimal places"
    rule = f"must be a positive amount of {currency.upper()} as a decimal string (like \"50.00\"), {places}"
    if not isinstance(amount, str) or not amount.strip() or len(amount) > AMOUNT_MAX_DIGITS + 1:
        raise AmountInvalid(rule)
    text = amount.strip()
    whole, dot, fraction = text.partition(".")
    if not (whole.isdigit() and whole.isascii()) or (dot and not (fraction.isdigit() and fraction.isascii())):
        raise AmountInvalid(rule)
    if len(fraction) > exponent:
        raise AmountInvalid(rule)
    minor = int(Decimal(text).scaleb(exponent))
    if minor <= 0:
        raise AmountInvalid(rule)
    return minor


def units_within(terms: PriceTerms, amount_minor: int, limit: int) -> int:
    """Return the largest unit count n <= limit such that every count up to n costs at most amount_minor.

    For per-unit and graduated prices the charge never falls as units grow, so this is simply the largest n
    whose charge is within the amount. A volume price can charge less for more units (the whole quantity
    drops into a cheaper tier), so the largest n within the amount could sit above counts that cost more; a
    cap there would let a client stop in between and be charged over the amount. The count returned is the
    end of the first stretch within the amount, so wherever the client's period ends below the cap, its
    charge is within the amount. 0 when not even one unit (or a first tier's flat fee) fits.
    """
    if amount_minor < 0 or limit < 0:
        raise ValueError("amount and limit cannot be negative")
    if terms.tiers_mode == "volume":
        segments, start = [], 0
        for tier in terms.tiers:
            end = limit if tier.up_to is None else min(tier.up_to, limit)
            if start <= end:
                segments.append((start, end))
            if tier.up_to is None or tier.up_to >= limit:
                break
            start = tier.up_to + 1
    else:
        segments = [(0, limit)]
    best = 0
    for low, high in segments:
        # Within a segment the charge never falls: binary search its last count within the amount.
        if charge_minor_units(terms, low) > amount_minor:
            break
        found, top = low, high
        while found < top:
            middle = (found + top + 1) // 2
            if charge_minor_units(terms, middle) <= amount_minor:
                found = middle
            else:
                top = middle - 1
        best = found
        if found < high:
            break
    return best
