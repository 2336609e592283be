"""The agency's Stripe customers, as the customer picker searches them."""

from __future__ import annotations

from dataclasses import asdict

from billing.errors import StripeKeyInvalid
from billing.models import Agency
from billing.stripe_gateway import gateway_for

QUERY_MAX = 200
RESULTS = 20


def find_customers(agency: Agency, query: str) -> list[dict]:
    """Return up to 20 of the agency's Stripe customers matching ``query`` (name, email or id), as dicts."""
    if not agency.stripe_key_ciphertext:
        raise StripeKeyInvalid("connect a Stripe key first")
    return [asdict(customer) for customer in gateway_for(agency).search_customers(query, limit=RESULTS)]
