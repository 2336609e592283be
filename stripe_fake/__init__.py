"""A stateful fake of the Stripe API subset Rebill uses; see stripe_fake.app for the rules it enforces."""

from stripe_fake.app import Call, FakeStripeApp, FakeStripeState, StripeFakeError, create_app, unflatten
from stripe_fake.server import FakeStripeServer

__all__ = ["Call", "FakeStripeApp", "FakeStripeServer", "FakeStripeState", "StripeFakeError", "create_app",
           "unflatten"]
