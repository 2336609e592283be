"""Fixtures for the Stripe half of the billing core: a fake Stripe reached by the real SDK, and an app on it."""

from __future__ import annotations

import pytest

from stripe_fake import FakeStripeServer, FakeStripeState
from tests.billing.stripe_support import ShiftedClock, StripeWorld


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
def stripe_app(make_app, stripe_server):
    """An app (both backends) whose Stripe is the fake; one HTTP attempt per call so faults reach Rebill."""
    app = make_app(STRIPE_API_BASE=stripe_server.url, STRIPE_NETWORK_ATTEMPTS=1, STRIPE_CONCURRENCY=2)
    with app.app_context():
        yield app


@pytest.fixture
def world(stripe_app, stripe_server, stripe_clock) -> StripeWorld:
    """Builders for agencies, Stripe objects, clients and outbox rows, and readers of the fake's ledger."""
    return StripeWorld(stripe_server, stripe_clock)
