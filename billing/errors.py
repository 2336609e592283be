"""Typed errors of the billing core; the portal maps them to HTTP answers (422, 502, 503).

Not found and refused fields are shared by every package: core.errors.
"""

from __future__ import annotations

from core.errors import RebillError


class BillingError(RebillError):
    """Base of every error the billing core raises on purpose."""


class StripeAccountChangeUnconfirmed(BillingError):
    """A key of another Stripe account or mode needs the agency's confirmation (HTTP 409); nothing was stored."""

    def __init__(self, message: str, *, current: dict, new: dict, pending_units: int):
        self.current = current
        self.new = new
        self.pending_units = pending_units
        super().__init__(message)


class StripeKeyInvalid(BillingError):
    """A pasted Stripe key was refused; ``reason`` says why in words an agency can act on (HTTP 422)."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)
