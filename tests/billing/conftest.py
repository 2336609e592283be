"""Fixtures for the Stripe half of the billing core: a fake Stripe reached by the real SDK, an app and gateway on it."""

from __future__ import annotations

import pytest

from billing.stripe_gateway import StripeGateway
from stripe_fake import FakeStripeServer, FakeStripeState
from tests.billing.stripe_support import ShiftedClock, StripeWorld, new_key


@pytest.fixture
def stripe_clock() -> ShiftedClock:
    """Real time, shifted by tests that need to be a day or a month later (shared by Rebill and the fake)."""
    return ShiftedClock()


@pytest.fixture
def stripe_server(stripe_clock):
    """A running fake Stripe on a loopback port."""
    with FakeStripeServer(FakeStripeState(clock=stripe_clock)) as server:
        yield server


@pytest.fixture
def http(stripe_app):
    """A test client of ``stripe_app``, for posting Stripe's signed deliveries."""
    return stripe_app.test_client()


@pytest.fixture
def stripe_app(make_app, stripe_server):
    """An app (both backends) whose Stripe is the fake; one HTTP attempt per call so faults reach Rebill."""
    app = make_app(STRIPE_API_BASE=stripe_server.url, STRIPE_NETWORK_ATTEMPTS=1, STRIPE_CONCURRENCY=2)
    with app.app_context():
        yield app


@pytest.fixture
def world(stripe_app, stripe_server, stripe_clock) -> StripeWorld:
    """Builders for agencies, Stripe objects, clients and outbox rows, and readers of the fake's ledger."""
    return StripeWorld(stripe_server, stripe_clock)


@pytest.fixture
def key(stripe_server) -> str:
    """A secret key registered for account acct_agency in the fake."""
    api_key = new_key()
    stripe_server.state.add_account(api_key, account_id="acct_agency", display_name="Agency One")
    return api_key


@pytest.fixture
def gateway(stripe_server, key) -> StripeGateway:
    """A gateway on ``key`` without the SDK's retries, so every fault reaches the test."""
    return StripeGateway(key, stripe_server.url, timeout=5, max_network_retries=0)


@pytest.fixture
def catalog(stripe_server, key):
    """One product per kind of price Rebill must tell apart."""
    state = stripe_server.state
    meters = {
        formula: state.create_meter(key, f"units_{formula}", formula=formula) for formula in ("sum", "count", "last")
    }
    inactive = state.create_meter(key, "units_old")
    stripe_server.client(key).v1.billing.meters.deactivate(inactive["id"])
    product = state.create_product(key, "AI units")
    other = state.create_product(key, "Seats")
    prices = {
        "sum": state.create_price(key, product, 10, meter=meters["sum"]),
        "count": state.create_price(key, product, 10, meter=meters["count"]),
        "last": state.create_price(key, product, 10, meter=meters["last"]),
        "inactive_meter": state.create_price(key, product, 10, meter=inactive),
        "legacy": state.create_price(key, product, 10),
        "transform": state.create_price(
            key, product, 10, meter=meters["sum"], transform_quantity={"divide_by": 1000, "round": "up"}
        ),
        "licensed": state.create_price(key, other, 900, metered=False),
    }
    return {"meters": meters, "prices": prices, "product": product, "other": other}


@pytest.fixture
def metered(stripe_server, key):
    """A sum meter "ai_units" and a customer of ``key``'s account."""
    state = stripe_server.state
    meter = state.create_meter(key, "ai_units")
    return {"meter": meter, "customer": state.create_customer(key)["id"]}
