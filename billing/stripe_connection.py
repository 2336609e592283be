"""An agency's Stripe connection: validate and store its key (encrypted), forget it, list its prices.

The key is never returned, logged or stored in clear: only its ciphertext, last 4 characters and mode.
Services here flush, never commit; the portal view owns the transaction.
"""

from __future__ import annotations

import logging
from dataclasses import asdict

from flask import current_app
from sqlalchemy import case, func, select

from billing.errors import StripeAccountChangeUnconfirmed, StripeKeyInvalid
from billing.models import Agency, UnitReport
from billing.price_usability import PriceInfo
from billing.reporting import retry_failed_reports
from billing.states import ReportStatus
from billing.stripe_events import remove_stripe_events
from billing.stripe_gateway import StripeGateway, gateway_for, key_mode
from core.database import db
from core.encryption import secret_box

log = logging.getLogger("billing.stripe_connection")


def connect_stripe_key(agency: Agency, api_key: str, *, confirm_account_change: bool = False) -> Agency:
    """Validate a pasted key with Stripe and store it encrypted; raise StripeKeyInvalid with the reason.

    A key of another mode (test/live) than the last one connected, or of another account while units
    wait to be sent, is stored only with ``confirm_account_change``; otherwise StripeAccountChangeUnconfirmed
    says what would happen.
    """
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
    if not confirm_account_change:
        check_account_change(agency, account.account_id, account.mode)
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


def check_account_change(agency: Agency, account_id: str, mode: str) -> None:
    """Refuse, with what would happen, a key of another mode, or of another account while units are pending.

    Compared with the last account connected, also after a disconnect (which keeps the account and mode),
    so disconnecting first does not make a switch silent. Clients' customers and prices live in one
    account and one mode: after a switch they must be edited; units never offered to Stripe go to the new
    account, units offered to the old one wait there for reconciliation (billing.reporting).
    """
    previous_account, previous_mode = agency.stripe_account_id, agency.stripe_mode
    if previous_account is None:
        return  # the first key of this agency
    unoffered, offered = pending_units(agency)
    pending = unoffered + offered
    current = {"account": previous_account, "mode": previous_mode}
    new = {"account": account_id, "mode": mode}
    if previous_mode and mode != previous_mode:
        message = (
            f"This is a {mode}-mode key; Rebill has been billing in {previous_mode} mode (account "
            f"{previous_account}). {mode.capitalize()} and {previous_mode} mode never share customers or prices: "
            f"every client must then be edited to {mode}-mode customers and prices"
        )
    elif account_id != previous_account and pending:
        message = (
            f"This key belongs to Stripe account {account_id}, not {previous_account}, which Rebill has been "
            "billing"
        )
    else:
        return
    if unoffered:
        message += (
            f"; the {_units(unoffered)} not yet offered to Stripe will be sent to account {account_id} "
            f"({mode} mode) instead"
        )
    if offered:
        # billing.reporting never resends a row to an account other than the one it was first offered to.
        message += (
            f"; the {_units(offered)} already offered to {previous_account} but not confirmed stay addressed to "
            "it and wait for reconciliation"
        )
    message += f". Units already in Stripe stay in {previous_account}. Connect it only if that is what you want."
    raise StripeAccountChangeUnconfirmed(message, current=current, new=new, pending_units=pending)


def pending_units(agency: Agency) -> tuple[int, int]:
    """This agency's units Stripe has not confirmed: (never offered to Stripe, offered to an account)."""
    row = db.session.execute(
        select(
            func.coalesce(func.sum(case((UnitReport.target_account.is_(None), UnitReport.units))), 0),
            func.coalesce(func.sum(case((UnitReport.target_account.is_not(None), UnitReport.units))), 0),
        ).where(UnitReport.agency_id == agency.id, UnitReport.status != ReportStatus.SENT)
    ).one()
    return int(row[0]), int(row[1])  # PostgreSQL sums a bigint as numeric


def _units(count: int) -> str:
    return f"{count} unit{'s' if count != 1 else ''}"


def disconnect_stripe(agency: Agency) -> None:
    """Forget the agency's Stripe key; its unsent units wait in the outbox until a key is connected again.

    Within Stripe's limit: a unit whose usage is older than 35 days when the key is back fails as too old to
    send (billing.reporting), and stays visible on the client's page. The webhook endpoint Rebill registered
    in the account is removed first, while the key can still do it. The account id and mode stay, so a key
    of another account or mode connected later is noticed (check_account_change).
    """
    remove_stripe_events(agency)
    agency.stripe_key_ciphertext = None
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
