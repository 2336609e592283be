"""Connecting an agency's Stripe key: validated with Stripe, stored encrypted, never shown back."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import text

from billing.agencies import ensure_agency
from billing.errors import StripeAccountChangeUnconfirmed, StripeKeyInvalid
from billing.reporting import report_pending_units
from billing.stripe_connection import connect_stripe_key, disconnect_stripe, list_prices
from billing.stripe_gateway import StripeKeyRejected, gateway_for
from core.database import db
from core.encryption import secret_box


@pytest.fixture
def agency(stripe_app):
    agency = ensure_agency("company-connect")
    db.session.commit()
    return agency


@pytest.fixture
def stripe_key(stripe_server) -> str:
    key = f"rk_live_{uuid.uuid4().hex}"
    stripe_server.state.add_account(key, account_id="acct_connect", display_name="Connect Co")
    return key


def test_a_valid_key_is_stored_encrypted_with_account_mode_and_last4(agency, stripe_key, capfd):
    connect_stripe_key(agency, f"  {stripe_key}\n")
    db.session.commit()

    db.session.expire_all()
    assert (agency.stripe_account_id, agency.stripe_mode, agency.stripe_key_last4) == (
        "acct_connect", "live", stripe_key[-4:]
    )
    assert agency.stripe_key_status == "ok" and agency.stripe_key_problem is None
    assert stripe_key not in agency.stripe_key_ciphertext
    assert secret_box().decrypt(agency.stripe_key_ciphertext) == stripe_key
    row = db.session.execute(text("SELECT * FROM agency WHERE id = :id"), {"id": agency.id}).mappings().one()
    assert all(stripe_key not in str(value) for value in row.values())
    assert stripe_key not in capfd.readouterr().err  # never logged
    assert gateway_for(agency).validate_key().account_id == "acct_connect"


def test_an_invalid_key_is_refused_with_the_reason_and_nothing_is_stored(agency, stripe_server):
    with pytest.raises(StripeKeyInvalid, match="401"):
        connect_stripe_key(agency, f"sk_test_{uuid.uuid4().hex}")
    with pytest.raises(StripeKeyInvalid, match="secret key"):
        connect_stripe_key(agency, "pk_test_abcdefghijklmnop")
    db.session.rollback()
    db.session.expire_all()
    assert agency.stripe_key_ciphertext is None and agency.stripe_key_status == "missing"


def test_a_restricted_key_missing_a_permission_is_refused_naming_it(agency, stripe_server):
    key = f"rk_test_{uuid.uuid4().hex}"
    stripe_server.state.add_account(key, denied_permissions=["billing_meter_read"])
    with pytest.raises(StripeKeyInvalid, match="rak_billing_meter_read"):
        connect_stripe_key(agency, key)


def test_reconnecting_clears_the_problem_and_retries_failed_reports(world):
    setup = world.agency()
    client = world.client(setup, customer_id="cus_unknown_here")
    world.report(client, 2)
    db.session.commit()
    report_pending_units(world.clock.now())
    assert world.reports()[0].status == "failed"
    agency = world.agency_row(setup)
    agency.stripe_key_status, agency.stripe_key_problem = "needs_attention", "Stripe rejected the API key (401)"
    client = db.session.get(type(client), client.id)
    client.stripe_customer_id = world.customer(setup)

    connect_stripe_key(agency, setup.agency_key)
    db.session.commit()

    agency = world.agency_row(setup)
    assert (agency.stripe_key_status, agency.stripe_key_problem) == ("ok", None)
    assert world.reports()[0].status == "pending"
    report_pending_units(world.clock.now())
    assert world.stripe_total(setup, client) == 2


def test_disconnect_forgets_the_key_and_reporting_skips_the_agency(world):
    setup = world.agency()
    world.report(world.client(setup), 1)
    disconnect_stripe(setup.agency)
    db.session.commit()

    agency = world.agency_row(setup)
    assert agency.stripe_key_ciphertext is None and agency.stripe_key_last4 is None
    assert agency.stripe_key_status == "missing"
    assert report_pending_units(world.clock.now()).stripe_calls == 0
    with pytest.raises(StripeKeyRejected):
        gateway_for(agency)
    with pytest.raises(StripeKeyInvalid):
        list_prices(agency)


def test_list_prices_gives_plain_dicts_for_the_portal(world):
    setup = world.agency()
    world.state.create_price(setup.key, setup.product, 500, metered=False)

    products = list_prices(setup.agency)

    (product,) = products
    assert (product["product_id"], product["name"]) == (setup.product["id"], "AI units")
    usable = next(price for price in product["prices"] if price["id"] == setup.price["id"])
    assert usable == {
        "id": setup.price["id"], "product_id": setup.product["id"], "nickname": None, "unit_amount": 10,
        "currency": "usd", "interval": "month", "usable": True, "reason": None, "report_mode": "meter",
        "meter_id": setup.meter["id"], "event_name": "ai_units", "customer_key": "stripe_customer_id",
        "value_key": "value", "formula": "sum", "warning": None,
    }  # fmt: skip
    licensed = next(price for price in product["prices"] if price["id"] != setup.price["id"])
    assert licensed["usable"] is False and "licensed" in licensed["reason"]


# Another account or mode ---------------------------------------------------------------------------


def connected_with_pending_units(world, units: int = 3):
    """An agency connected through connect_stripe_key, with ``units`` waiting in the outbox."""
    setup = world.agency()
    agency = world.agency_row(setup)
    connect_stripe_key(agency, setup.agency_key)
    if units:
        world.report(world.client(setup), units)
    db.session.commit()
    return setup, agency


def test_a_key_of_another_account_is_refused_while_units_are_pending_unless_confirmed(world, stripe_server):
    setup, agency = connected_with_pending_units(world)
    other_key = f"sk_test_{uuid.uuid4().hex}"
    stripe_server.state.add_account(other_key, account_id="acct_other")
    with pytest.raises(StripeAccountChangeUnconfirmed) as refused:
        connect_stripe_key(agency, other_key)
    error = refused.value
    assert (error.current, error.new, error.pending_units) == (
        {"account": setup.account_id, "mode": "test"}, {"account": "acct_other", "mode": "test"}, 3
    )
    assert "the 3 units not yet offered to Stripe will be sent to account acct_other" in str(error)
    db.session.rollback()
    db.session.expire_all()
    assert agency.stripe_account_id == setup.account_id  # nothing stored
    assert secret_box().decrypt(agency.stripe_key_ciphertext) == setup.agency_key

    connect_stripe_key(agency, other_key, confirm_account_change=True)
    db.session.commit()
    assert agency.stripe_account_id == "acct_other"


def test_disconnecting_first_does_not_make_an_account_switch_silent(world, stripe_server):
    _, agency = connected_with_pending_units(world)
    disconnect_stripe(agency)
    db.session.commit()
    other_key = f"sk_test_{uuid.uuid4().hex}"
    stripe_server.state.add_account(other_key, account_id="acct_after_disconnect")
    with pytest.raises(StripeAccountChangeUnconfirmed):
        connect_stripe_key(agency, other_key)


def test_another_account_without_pending_units_and_a_new_key_of_the_same_account_need_no_confirmation(
    world, stripe_server
):
    setup, agency = connected_with_pending_units(world, units=0)
    same_account = f"rk_test_{uuid.uuid4().hex}"
    stripe_server.state.add_account(same_account, account_id=setup.account_id)
    connect_stripe_key(agency, same_account)  # a rotated or restricted key of the same account
    other_key = f"sk_test_{uuid.uuid4().hex}"
    stripe_server.state.add_account(other_key, account_id="acct_fresh")
    connect_stripe_key(agency, other_key)
    assert agency.stripe_account_id == "acct_fresh"


@pytest.mark.parametrize("units", [0, 2], ids=["nothing pending", "units pending"])
def test_test_and_live_are_never_mixed_silently(world, stripe_server, units):
    setup, agency = connected_with_pending_units(world, units=units)
    live_key = f"sk_live_{uuid.uuid4().hex}"
    stripe_server.state.add_account(live_key, account_id=setup.account_id)  # same account, live mode
    mixed = "live-mode key; Rebill has been billing in test mode"
    with pytest.raises(StripeAccountChangeUnconfirmed, match=mixed) as refused:
        connect_stripe_key(agency, live_key)
    assert refused.value.new == {"account": setup.account_id, "mode": "live"}
    assert ("not yet offered to Stripe" in str(refused.value)) == bool(units)
    connect_stripe_key(agency, live_key, confirm_account_change=True)
    assert agency.stripe_mode == "live"


def test_units_already_offered_to_the_old_account_are_said_to_stay_addressed_to_it(world, stripe_server):
    setup, agency = connected_with_pending_units(world, units=2)
    [report] = world.reports()
    report.target_account = setup.account_id  # first offered there; Stripe's answer never came
    db.session.commit()
    other_key = f"sk_test_{uuid.uuid4().hex}"
    stripe_server.state.add_account(other_key, account_id="acct_other")
    with pytest.raises(StripeAccountChangeUnconfirmed) as refused:
        connect_stripe_key(agency, other_key)
    assert refused.value.pending_units == 2
    message = str(refused.value)
    assert f"2 units already offered to {setup.account_id} but not confirmed stay addressed to it" in message
    assert "not yet offered" not in message
