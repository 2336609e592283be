"""A stateful fake of the Stripe API subset Rebill uses; see stripe_fake.app for the rules it enforces."""

from stripe_fake.app import (
    Call,
    FakeStripeApp,
    FakeStripeState,
    SignedDelivery,
    StripeFakeError,
    create_app,
    stripe_signature,
    unflatten,
)
from stripe_fake.server import FakeStripeServer

__all__ = ["Call", "FakeStripeApp", "FakeStripeServer", "FakeStripeState", "SignedDelivery", "StripeFakeError",
           "create_app", "stripe_signature", "unflatten"]
