"""Fixtures: a fake Stripe on a loopback port with a frozen clock, a registered test key and a metered setup."""

from __future__ import annotations

import uuid
from types import SimpleNamespace

import pytest

from stripe_fake import FakeStripeServer, FakeStripeState

NOON = 20_717 * 86_400 + 12 * 3_600  # a fixed, day-aligned noon (2026-09-21 12:00 UTC)


class Clock:
    """A settable clock for the fake, so time windows are exact."""

    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    """The fake's clock, frozen at NOON."""
    return Clock(NOON)


@pytest.fixture
def fake(clock):
    """A running FakeStripeServer on a fresh state."""
    with FakeStripeServer(FakeStripeState(clock=clock)) as server:
        yield server


def new_key(prefix: str = "sk_test_") -> str:
    """A unique API key with the given prefix."""
    return prefix + uuid.uuid4().hex


@pytest.fixture
def sk(fake) -> str:
    """A secret test key registered for account acct_alpha."""
    key = new_key()
    fake.state.add_account(key, account_id="acct_alpha", display_name="Alpha Agency")
    return key


@pytest.fixture
def sc(fake, sk):
    """A real StripeClient for `sk`, aimed at the fake."""
    return fake.client(sk)


@pytest.fixture
def setup(fake, sk):
    """A sum meter, a price on it, a customer and a subscription, built through the state helpers."""
    state = fake.state
    meter = state.create_meter(sk, "ai_units")
    product = state.create_product(sk, "AI units")
    price = state.create_price(sk, product, 10, meter=meter)
    customer = state.create_customer(sk, name="Client One")
    subscription = state.create_subscription(sk, customer, price)
    return SimpleNamespace(meter=meter, product=product, price=price, customer=customer,
                           subscription=subscription, item=subscription["items"]["data"][0])
