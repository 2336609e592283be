"""Typed errors of the billing core; the portal maps them to HTTP answers (404, 422)."""

from __future__ import annotations


class BillingError(Exception):
    """Base of every error the billing core raises on purpose."""


class NotFound(BillingError):
    """The thing does not exist for this agency (other agencies' ids and deleted clients included)."""


class ClientInvalid(BillingError):
    """A client's fields were refused; ``errors`` maps each refused field to a message (HTTP 422)."""

    def __init__(self, errors: dict[str, str]):
        self.errors = dict(errors)
        super().__init__("; ".join(f"{field}: {message}" for field, message in self.errors.items()))


class StripeKeyInvalid(BillingError):
    """A pasted Stripe key was refused; ``reason`` says why in words an agency can act on (HTTP 422)."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)
