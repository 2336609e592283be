"""The estimate of a period's charge, checked against amounts computed by hand from Stripe's pricing docs."""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billing.estimates import (
    AmountInvalid,
    PriceTerms,
    PriceTermsInvalid,
    Tier,
    add_amounts,
    billed_quantity,
    charge_minor_units,
    estimate,
    major_units,
    minor_units,
    price_terms,
    units_within,
)


def per_unit(amount: str, currency: str = "usd", **transform) -> PriceTerms:
    price = {"currency": currency, "billing_scheme": "per_unit", "unit_amount_decimal": amount}
    if transform:
        price["transform_quantity"] = transform
    return price_terms(price)


# Stripe's graduated example (docs.stripe.com/products-prices/pricing-models#graduated-pricing):
# units 1-5 $5 each, 6-10 $4 each, 11+ $3 each... here with a flat fee on the second tier as well.
GRADUATED = {
    "currency": "usd",
    "billing_scheme": "tiered",
    "tiers_mode": "graduated",
    "tiers": [
        {"up_to": 5, "unit_amount": 500, "flat_amount": None},
        {"up_to": 10, "unit_amount": 400, "flat_amount": 1000},
        {"up_to": None, "unit_amount_decimal": "300", "flat_amount": None},
    ],
}
VOLUME = {**GRADUATED, "tiers_mode": "volume"}


def test_per_unit_price_multiplies_the_units_by_the_unit_amount():
    # $0.10 per unit (the README's example): 37 units = $3.70.
    assert estimate(per_unit("10"), 37).amount == "3.70"
    assert estimate(per_unit("10"), 0).amount == "0.00"


def test_sub_cent_unit_amount_decimal_is_exact_and_the_line_rounds_half_up_once():
    # 0.5 cents a unit: 3 units = 1.5 cents -> 2 cents; 1000 units = $5.00 exactly (no per-unit rounding).
    assert charge_minor_units(per_unit("0.5"), 3) == 2
    assert estimate(per_unit("0.5"), 1000).amount == "5.00"
    # 12 decimal places: 0.000000000001 cents x 10^12 units = 1 cent (a float would drift here).
    assert charge_minor_units(per_unit("0.000000000001"), 10**12) == 1
    assert charge_minor_units(per_unit("0.123456789012"), 3) == 0  # 0.37 cents rounds down
    assert charge_minor_units(per_unit("0.25"), 2) == 1  # exactly half a cent rounds up


def test_unit_amount_decimal_wins_over_the_integer_field():
    price = {"currency": "usd", "unit_amount": 0, "unit_amount_decimal": "0.4"}
    assert charge_minor_units(price_terms(price), 10) == 4


def test_transform_quantity_divides_then_rounds_up_or_down():
    # Stripe's token example: $0.04 per 100 tokens, round up: 1 token bills as 1 unit, 250 as 3.
    up = per_unit("4", divide_by=100, round="up")
    assert billed_quantity(up, 1) == 1
    assert billed_quantity(up, 250) == 3
    assert estimate(up, 250).amount == "0.12"
    assert billed_quantity(up, 0) == 0
    down = per_unit("4", divide_by=100, round="down")
    assert billed_quantity(down, 299) == 2
    assert estimate(down, 299).amount == "0.08"
    assert billed_quantity(down, 99) == 0


def test_graduated_tiers_price_each_unit_in_its_own_tier():
    terms = price_terms(GRADUATED)
    assert charge_minor_units(terms, 0) == 0  # first tier reached, no flat fee on it
    assert charge_minor_units(terms, 5) == 5 * 500
    # 6 units: 5 x $5 + 1 x $4 + the second tier's $10 flat fee = $39
    assert estimate(terms, 6).amount == "39.00"
    # 12 units: 5 x 5 + 5 x 4 + 10 (flat) + 2 x 3 = $61
    assert estimate(terms, 12).amount == "61.00"


def test_graduated_first_tier_flat_fee_is_charged_even_without_usage():
    # "Flat fee and overages": $200 includes 1000 units, then $0.50 each.
    terms = price_terms(
        {
            "currency": "usd",
            "billing_scheme": "tiered",
            "tiers_mode": "graduated",
            "tiers": [
                {"up_to": 1000, "unit_amount": 0, "flat_amount": 20000},
                {"up_to": "inf", "unit_amount": 50},
            ],
        }
    )
    assert estimate(terms, 0).amount == "200.00"
    assert estimate(terms, 1000).amount == "200.00"
    assert estimate(terms, 1003).amount == "201.50"


def test_volume_tiers_price_every_unit_at_the_tier_of_the_total():
    terms = price_terms(VOLUME)
    assert estimate(terms, 5).amount == "25.00"  # 5 x $5
    assert estimate(terms, 6).amount == "34.00"  # 6 x $4 + $10 flat
    assert estimate(terms, 10).amount == "50.00"  # 10 x $4 + $10: up_to is inclusive
    assert estimate(terms, 11).amount == "33.00"  # 11 x $3


def test_currency_minor_units_become_major_units():
    assert estimate(per_unit("100", "jpy"), 3).amount == "300"  # zero-decimal: 100 yen a unit
    assert estimate(per_unit("1000", "kwd"), 2).amount == "2.000"  # three-decimal
    assert estimate(per_unit("199", "EUR"), 1) == estimate(per_unit("199", "eur"), 1)
    assert estimate(per_unit("199", "eur"), 1).currency == "eur"
    assert major_units(-5, "usd") == "-0.05"
    assert add_amounts(["1.10", "2.25", "0.00"], "usd") == "3.35"
    assert add_amounts([], "jpy") == "0"


@pytest.mark.parametrize(
    "price",
    [
        {"currency": "usd", "billing_scheme": "tiered", "tiers_mode": "graduated", "tiers": []},
        {"currency": "usd", "billing_scheme": "tiered", "tiers_mode": "graduated", "tiers": [{"up_to": 5}]},
        {**GRADUATED, "tiers_mode": "stepped"},
        {**GRADUATED, "transform_quantity": {"divide_by": 10, "round": "up"}},
        {**GRADUATED, "tiers": [{"up_to": 10}, {"up_to": 5}, {"up_to": None}]},
        {"currency": "usd", "billing_scheme": "per_unit"},
        {"currency": "usd", "unit_amount_decimal": "ten"},
        {"currency": "", "unit_amount": 1},
        {"currency": "usd", "billing_scheme": "package", "unit_amount": 1},
        {"currency": "usd", "unit_amount": 1, "transform_quantity": {"divide_by": 0, "round": "up"}},
    ],
)
def test_prices_stripe_would_refuse_are_refused(price):
    with pytest.raises(PriceTermsInvalid):
        price_terms(price)


def test_terms_survive_the_cache_unchanged():
    for terms in (price_terms(GRADUATED), per_unit("0.000000000001", divide_by=7, round="up")):
        assert PriceTerms.from_json(terms.to_json()) == terms


# ---- properties against an independent model (Fractions, unit by unit) ----------------------------

amounts = st.decimals(min_value=0, max_value=10_000, places=4, allow_nan=False, allow_infinity=False)


@st.composite
def tiered_terms(draw):
    bounds = sorted(draw(st.sets(st.integers(1, 200), max_size=4)))
    tiers = [Tier(bound, draw(amounts), draw(amounts)) for bound in bounds]
    tiers.append(Tier(None, draw(amounts), draw(amounts)))
    return PriceTerms(currency="usd", tiers_mode=draw(st.sampled_from(["graduated", "volume"])), tiers=tuple(tiers))


def _model(terms: PriceTerms, units: int) -> int:
    """Price unit by unit with Fractions: the tier of the n-th unit is the first whose up_to >= n."""
    quantity = -(-units // terms.divide_by) if terms.round == "up" else units // terms.divide_by
    if terms.tiers_mode is None:
        exact = Fraction(terms.unit_amount) * quantity
    else:

        def tier_of(n):
            return next(i for i, t in enumerate(terms.tiers) if t.up_to is None or n <= t.up_to)

        if terms.tiers_mode == "volume":
            tier = terms.tiers[tier_of(max(quantity, 1))] if quantity else terms.tiers[0]
            exact = Fraction(tier.unit_amount) * quantity + Fraction(tier.flat_amount)
        else:
            reached = {0} | {tier_of(n) for n in range(1, quantity + 1)}
            exact = sum((Fraction(terms.tiers[tier_of(n)].unit_amount) for n in range(1, quantity + 1)), Fraction(0))
            exact += sum(Fraction(terms.tiers[i].flat_amount) for i in reached)
    whole, rest = divmod(exact, 1)
    return int(whole) + (1 if rest >= Fraction(1, 2) else 0)


@given(tiered_terms(), st.integers(0, 400))
def test_tiered_charge_matches_a_unit_by_unit_model(terms, units):
    assert charge_minor_units(terms, units) == _model(terms, units)


@given(amounts, st.integers(1, 1000), st.sampled_from(["up", "down"]), st.integers(0, 10**6))
def test_per_unit_charge_matches_the_model(amount, divide_by, rounding, units):
    terms = PriceTerms(currency="usd", unit_amount=amount, divide_by=divide_by, round=rounding)
    assert charge_minor_units(terms, units) == _model(terms, units)


@given(tiered_terms(), st.integers(0, 300))
def test_graduated_charge_never_falls_as_units_grow(terms, units):
    if terms.tiers_mode == "graduated":
        assert charge_minor_units(terms, units + 1) >= charge_minor_units(terms, units)


@given(st.integers(-(10**15), 10**15), st.sampled_from(["usd", "jpy", "kwd"]))
def test_major_units_string_is_exactly_the_minor_amount(minor, currency):
    exponent = {"usd": 2, "jpy": 0, "kwd": 3}[currency]
    text = major_units(minor, currency)
    assert Decimal(text) * (10**exponent) == minor
    assert ("." in text) == (exponent > 0)


# ---- caps in currency: the units an amount buys ----------------------------------------------------------


def test_an_amount_buys_the_largest_count_it_covers_per_unit_and_after_transform_quantity():
    assert units_within(per_unit("2.5"), 5000, 10**12) == 2000  # 2.5 cents a unit: $50 buys 2000 units
    # Half up rounding of the line: 2001 units cost 5002.5 -> 5003 cents, 2000 cost exactly 5000.
    assert units_within(per_unit("2.5"), 5002, 10**12) == 2000
    assert units_within(per_unit("2.5"), 5003, 10**12) == 2001
    # Billed per started hundred (divide_by=100, round up) at 40 cents: $2 buys 5 hundreds = 500 units.
    assert units_within(per_unit("40", divide_by=100, round="up"), 200, 10**12) == 500
    # Rounded down, the 99 units after the fifth hundred are free: 599 units cost $2.
    assert units_within(per_unit("40", divide_by=100, round="down"), 200, 10**12) == 599
    assert units_within(per_unit("300"), 299, 10**12) == 0  # not even one unit
    assert units_within(per_unit("0"), 1, 10**12) == 10**12  # a free price: the limit


def test_graduated_tiers_and_the_first_tiers_flat_fee_count_toward_the_amount():
    terms = price_terms(GRADUATED)
    # 5 x $5 = $25; units 6-10 add a $10 flat fee and $4 each: 7 units = 25 + 10 + 8 = $43.
    assert units_within(terms, 4300, 10**12) == 7
    assert units_within(terms, 4299, 10**12) == 6
    flat_first = price_terms({**GRADUATED, "tiers": [{"up_to": 10, "unit_amount": 100, "flat_amount": 2000},
                                                     {"up_to": None, "unit_amount": 50}]})
    assert units_within(flat_first, 1999, 10**12) == 0  # the flat fee alone is over the amount
    assert units_within(flat_first, 2300, 10**12) == 3


def test_a_volume_price_stops_before_the_first_count_over_the_amount_even_if_more_units_cost_less():
    terms = price_terms(VOLUME)  # 1-5 at $5, 6-10 at $4 + $10 flat, 11+ at $3 each for every unit
    assert charge_minor_units(terms, 5) == 2500 and charge_minor_units(terms, 6) == 3400
    # $30 covers 5 units ($25); 6 units cost $34 although 10 units at $3 would be $30: a cap of 5 is the
    # largest under which every count the period can end on is within $30 (a cap of 10 would allow $34-$50).
    assert units_within(terms, 3000, 10**12) == 5
    # $50 covers every count up to 10 ($50), then 11-16 at $3 ($33-$48); 17 units are $51.
    assert units_within(terms, 5000, 10**12) == 16
    assert units_within(terms, 6000, 10**12) == 20


@given(tiered_terms(), st.integers(0, 200_000))
def test_the_units_an_amount_buys_match_a_count_by_count_model(terms, amount):
    limit = 300
    expected = 0
    if charge_minor_units(terms, 0) <= amount:
        while expected < limit and charge_minor_units(terms, expected + 1) <= amount:
            expected += 1
    assert units_within(terms, amount, limit) == expected


@given(amounts, st.integers(1, 1000), st.sampled_from(["up", "down"]), st.integers(0, 10**7))
def test_per_unit_caps_are_the_largest_count_within_the_amount(amount, divide_by, rounding, budget):
    terms = PriceTerms(currency="usd", unit_amount=amount, divide_by=divide_by, round=rounding)
    units = units_within(terms, budget, 10**12)
    assert charge_minor_units(terms, units) <= budget
    assert units == 10**12 or charge_minor_units(terms, units + 1) > budget


@pytest.mark.parametrize(
    ("text", "currency", "minor"),
    [("50", "usd", 5000), ("50.5", "usd", 5050), ("0.01", "usd", 1), ("1000", "jpy", 1000), ("1.234", "kwd", 1234)],
)
def test_amounts_are_read_exactly_in_minor_units(text, currency, minor):
    assert minor_units(text, currency) == minor


@pytest.mark.parametrize(
    ("text", "currency"),
    [("0", "usd"), ("0.00", "usd"), ("-5", "usd"), ("5.001", "usd"), ("5.5", "jpy"), ("1e3", "usd"), ("", "usd"),
     (" ", "usd"), ("5.", "usd"), (".5", "usd"), ("NaN", "usd"), ("\u0665", "usd"), (50, "usd"), (50.0, "usd"),
     (None, "usd"), ("9" * 30, "usd")],
)
def test_amounts_that_are_not_positive_decimal_strings_in_the_currency_are_refused(text, currency):
    with pytest.raises(AmountInvalid):
        minor_units(text, currency)
