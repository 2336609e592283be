"""An agency's Stripe connection: validate and store its key (encrypted), forget it, list its prices.

The key is never returned, logged or stored in clear: only its ciphertext, last 4 characters and mode.
Services here flush, never commit; the portal view owns the transaction.
"""

from __future__ import annotations

import logging
from dataclasses import asdict

from flask import current_app

from billing.errors import StripeKeyInvalid
from billing.models import Agency
from billing.reporting import retry_failed_reports
from billing.stripe_events import remove_stripe_events
from billing.stripe_gateway import PriceInfo, StripeGateway, gateway_for, key_mode
from core.database import db
from core.encryption import secret_box

log = logging.getLogger("billing.stripe_connection")


def connect_stripe_key(agency: Agency, api_key: str) -> Agency:
    """Validate a pasted key with Stripe and store it encrypted; raise StripeKeyInvalid with the reason."""
    api_key = (api_key or "").strip()
    key_mode(api_key)  # refuses pk_/whsec_/garbage before any network call
    config = current_app.config
    gateway = StripeGateway(
        api_key,
        config["STRIPE_API_BASE"],
        timeout=config["STRIPE_TIMEOUT_SECONDS"],
        max_network_retries=config["STRIPE_NETWORK_ATTEMPTS"] - 1,
    )
    account = gateway.validate_key()
    agency.stripe_key_ciphertext = secret_box().encrypt(api_key)
    agency.stripe_account_id = account.account_id
    agency.stripe_mode = account.mode
    agency.stripe_key_last4 = api_key[-4:]
    agency.stripe_key_status = "ok"
    agency.stripe_key_problem = None
    # Reports refused under the old key (wrong account, missing permission) get another chance; rows older
    # than Stripe's dedupe window are still checked against Stripe before anything is resent.
    retried = retry_failed_reports(agency)
    db.session.flush()
    log.info(
        "stripe key connected",
        extra={"fields": {"agency_id": agency.id, "account": account.account_id, "mode": account.mode,
                          "reports_retried": retried}},
    )
    return agency


def disconnect_stripe(agency: Agency) -> None:
    """Forget the agency's Stripe key; its unsent units wait in the outbox until a key is connected again.

    Within Stripe's limit: a unit whose usage is older than 35 days when the key is back fails as too old to
    send (billing.reporting), and stays visible on the client's page. The webhook endpoint Rebill registered
    in the account is removed first, while the key can still do it.
    """
    remove_stripe_events(agency)
    agency.stripe_key_ciphertext = None
    agency.stripe_account_id = None
    agency.stripe_mode = None
    agency.stripe_key_last4 = None
    agency.stripe_key_status = "missing"
    agency.stripe_key_problem = None
    db.session.flush()
    log.info("stripe key disconnected", extra={"fields": {"agency_id": agency.id}})


def list_prices(agency: Agency) -> list[dict]:
    """Return the agency's products and prices as plain dicts, each price saying whether it can carry units."""
    if agency.stripe_key_status == "missing" or not agency.stripe_key_ciphertext:
        raise StripeKeyInvalid("connect a Stripe key first")
    return [
        {
            "product_id": product.product_id,
            "name": product.name,
            "prices": [price_dict(price) for price in product.prices],
        }
        for product in gateway_for(agency).list_products_with_prices()
    ]


def price_dict(price: PriceInfo) -> dict:
    """Render a PriceInfo for the portal JSON."""
    fields = asdict(price)
    fields["id"] = fields.pop("price_id")
    return fields
