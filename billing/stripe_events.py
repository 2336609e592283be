"""An agency's Stripe events: register a webhook endpoint in its account, take its signed events, act on them.

When an agency connects Stripe, Rebill registers ``<public URL>/webhooks/stripe/<route id>`` in that account
(through the agency's key) for the events below; disconnecting or uninstalling removes it. Each event is
verified with that endpoint's signing secret (stored encrypted), stored once per agency and Stripe event id,
committed, then processed; a failed one stays replayable (``flask --app app rebill stripe-events replay``).

Effects (docs/billing-rules.md):
- ``invoice.payment_failed`` marks the customer's clients ``payment_failed``; billing continues, and a client
  whose agency chose ``pause_on_payment_failure`` is also paused (its usage is recorded, not billed).
- ``invoice.paid`` clears it and resumes a client that the failure paused.
- ``customer.subscription.updated`` / ``.deleted`` re-read the customer's subscription for each client's price:
  the cached subscription item is refreshed, and a client whose price is no longer subscribed is flagged.
Payment events carry Stripe's ``created`` time; an older event applied after a newer one changes nothing
(Stripe does not promise delivery order: https://docs.stripe.com/webhooks#event-ordering).

Services flush; the webhook view, the CLI and the scheduler job commit.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import secrets
from typing import Any

import stripe
from sqlalchemy import Row, or_, select
from sqlalchemy.dialects import postgresql, sqlite

from billing.aggregation_store import take_write_lock
from billing.client_terms import set_client_status
from billing.meter_errors import flag_rejected_reports
from billing.models import Agency, RebillClient, StripeEvent, StripeEventEndpoint
from billing.states import ClientStatus
from billing.stripe_gateway import StripeGatewayError, StripeKeyRejected, gateway_for
from core.database import db, utcnow
from core.delivery_log import DeliveryLog, ReplaySummary
from core.encryption import SecretUnreadable, secret_box

log = logging.getLogger("billing.stripe_events")

EVENT_TYPES = (
    "invoice.payment_failed",
    "invoice.paid",
    "customer.subscription.updated",
    "customer.subscription.deleted",
)
WEBHOOK_PATH = "/webhooks/stripe/"
# Stripe's asynchronous meter errors come as thin events (API v2) to an event destination at the endpoint's
# URL + THIN_SUFFIX (billing.meter_errors; docs/stripe.md §1.4).
METER_ERROR_EVENT = "v1.billing.meter.error_report_triggered"
THIN_EVENT_TYPES = (METER_ERROR_EVENT,)
THIN_SUFFIX = "/thin"
# stripe-python's default: a signature older than 5 minutes is refused (replay protection).
SIGNATURE_TOLERANCE_SECONDS = 300
EVENT_ID_MAX_LENGTH = 255
FAILED_EVENT_MAX_ATTEMPTS = 5
# What the agency must add to a restricted key (Stripe dashboard: Developers → API keys → edit the key).
WEBHOOK_PERMISSION_HINT = (
    "Rebill cannot learn about failed payments and changed subscriptions: give the restricted key the "
    "'Webhook Endpoints' permission (Write), then connect the key again. Everything else keeps working."
)


DESTINATION_PERMISSION_HINT = (
    "Rebill cannot hear about meter events Stripe rejects after accepting them (an unknown customer, a "
    "timestamp out of range); the daily reconciliation compares Rebill's sent units with Stripe's totals "
    "instead. To be told at once, give the restricted key the 'Event Destinations' permission (Write), then "
    "connect the key again."
)


class StripeEventInvalid(ValueError):
    """A verified body that is not a Stripe event Rebill can store (no id, type or object)."""


# ---- registration --------------------------------------------------------------------------------------


def register_stripe_events(agency: Agency, public_url: str) -> StripeEventEndpoint:
    """Create (or re-create) the agency's webhook endpoint in its Stripe account; flushes, never raises for
    Stripe's answers: a key without the permission, or Stripe down, is recorded on the endpoint row with the
    reason, and connecting the key again retries."""
    endpoint = _endpoint_of(agency.id)
    gateway = gateway_for(agency)
    if endpoint is None:
        endpoint = StripeEventEndpoint(agency_id=agency.id)
        db.session.add(endpoint)
    else:
        if endpoint.stripe_endpoint_id:
            _delete_quietly(agency, endpoint.stripe_endpoint_id)
        if endpoint.destination_id:
            _delete_destination_quietly(agency, endpoint.destination_id)
    # A fresh route id each time: events still addressed to an old endpoint answer 404 from now on.
    endpoint.route_id = secrets.token_urlsafe(24)
    endpoint.url = public_url.rstrip("/") + WEBHOOK_PATH + endpoint.route_id
    endpoint.stripe_endpoint_id = endpoint.secret_ciphertext = None
    try:
        created = gateway.create_webhook_endpoint(
            endpoint.url, list(EVENT_TYPES), description="Rebill: failed payments and subscription changes"
        )
    except StripeKeyRejected as error:
        endpoint.status, endpoint.problem = "not_permitted", f"{error.reason}. {WEBHOOK_PERMISSION_HINT}"
    except StripeGatewayError as error:
        endpoint.status = "failed"
        endpoint.problem = f"Stripe did not register Rebill's webhook endpoint: {error.reason}; connect the key again"
    else:
        endpoint.stripe_endpoint_id = created.endpoint_id
        endpoint.secret_ciphertext = secret_box().encrypt(created.secret)
        endpoint.status, endpoint.problem = "registered", None
    _register_destination(endpoint, gateway)
    db.session.flush()
    log.info(
        "stripe webhook endpoint",
        extra={"fields": {"agency_id": agency.id, "status": endpoint.status, "endpoint": endpoint.stripe_endpoint_id}},
    )
    return endpoint


def _register_destination(endpoint: StripeEventEndpoint, gateway) -> None:
    """Create the thin-event destination for meter errors next to the webhook endpoint (same route id)."""
    for name, value in _create_destination(endpoint.url, gateway).items():
        setattr(endpoint, name, value)


def _create_destination(endpoint_url: str, gateway) -> dict[str, str | None]:
    """Ask Stripe for the destination at ``endpoint_url`` + THIN_SUFFIX; return the endpoint columns to store."""
    try:
        created = gateway.create_event_destination(
            endpoint_url + THIN_SUFFIX,
            list(THIN_EVENT_TYPES),
            name="Rebill meter errors",
            description="Rebill: meter events Stripe rejected after accepting them",
        )
    except StripeKeyRejected as error:
        status, problem = "not_permitted", f"{error.reason}. {DESTINATION_PERMISSION_HINT}"
    except StripeGatewayError as error:
        status = "failed"
        problem = (
            f"Stripe did not register Rebill's event destination for meter errors: {error.reason}; the daily "
            "reconciliation compares totals meanwhile, and Rebill tries again within the hour"
        )
    else:
        return {
            "destination_id": created.endpoint_id,
            "destination_secret_ciphertext": secret_box().encrypt(created.secret),
            "destination_status": "registered",
            "destination_problem": None,
        }
    return {
        "destination_id": None,
        "destination_secret_ciphertext": None,
        "destination_status": status,
        "destination_problem": problem,
    }


DESTINATION_RETRY_SECONDS = 3600


def register_missing_destinations() -> int:
    """The scheduler's hourly job: give registered endpoints without a meter-error destination one.

    Endpoints registered before Rebill listened to meter errors have none, and a destination Stripe could
    not create (down, refused) is tried again; one the key may not create (not_permitted) waits for the
    agency to reconnect a key with the permission. Stripe is asked with no transaction open; if the agency
    replaced its endpoint meanwhile, the new destination is deleted again. Commits per agency; returns how
    many were registered.
    """
    due = db.session.execute(
        select(StripeEventEndpoint.id, StripeEventEndpoint.agency_id, StripeEventEndpoint.route_id).where(
            StripeEventEndpoint.status == "registered",
            or_(StripeEventEndpoint.destination_status.is_(None), StripeEventEndpoint.destination_status == "failed"),
        )
    ).all()
    db.session.rollback()
    registered = 0
    for endpoint_id, agency_id, route_id in due:
        try:
            registered += _register_missing_destination(endpoint_id, agency_id, route_id)
        except Exception:
            db.session.rollback()
            log.exception("meter-error destination not registered", extra={"fields": {"agency_id": agency_id}})
    return registered


def _register_missing_destination(endpoint_id: int, agency_id: int, route_id: str) -> bool:
    agency = db.session.get(Agency, agency_id)
    endpoint = db.session.get(StripeEventEndpoint, endpoint_id)
    if agency is None or endpoint is None:
        return False
    try:
        gateway = gateway_for(agency)
    except StripeGatewayError:
        return False
    url = endpoint.url
    db.session.rollback()  # no transaction open while Stripe is asked
    fields = _create_destination(url, gateway)
    take_write_lock()
    endpoint = db.session.scalars(
        select(StripeEventEndpoint)
        .where(StripeEventEndpoint.id == endpoint_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).one_or_none()
    if endpoint is None or endpoint.route_id != route_id or endpoint.destination_status == "registered":
        db.session.rollback()
        if fields["destination_id"]:
            _delete_destination_quietly(agency, fields["destination_id"])  # the endpoint changed meanwhile
        return False
    for name, value in fields.items():
        setattr(endpoint, name, value)
    db.session.commit()
    return fields["destination_status"] == "registered"


def remove_stripe_events(agency: Agency) -> None:
    """Delete the agency's webhook endpoint in Stripe (while its key is still known) and forget it; flushes.

    If Stripe cannot be reached the endpoint is forgotten anyway: its events then answer 404, and Stripe
    disables an endpoint that keeps failing (https://docs.stripe.com/webhooks#retries).
    """
    endpoint = _endpoint_of(agency.id)
    if endpoint is None:
        return
    if endpoint.stripe_endpoint_id and agency.stripe_key_ciphertext:
        _delete_quietly(agency, endpoint.stripe_endpoint_id)
    if endpoint.destination_id and agency.stripe_key_ciphertext:
        _delete_destination_quietly(agency, endpoint.destination_id)
    db.session.delete(endpoint)
    db.session.flush()


def stripe_events_status(agency: Agency) -> dict[str, Any]:
    """Describe the agency's webhook endpoint for the portal."""
    endpoint = _endpoint_of(agency.id)
    if endpoint is None:
        return {"status": "none", "problem": None, "url": None, "meter_errors": {"status": "none", "problem": None}}
    return {
        "status": endpoint.status,
        "problem": endpoint.problem,
        "url": endpoint.url,
        # Stripe's asynchronous meter errors (billing.meter_errors): registered, not_permitted or failed.
        "meter_errors": {
            "status": endpoint.destination_status or "none",
            "problem": endpoint.destination_problem,
        },
    }


def _endpoint_of(agency_id: int) -> StripeEventEndpoint | None:
    return db.session.scalars(
        select(StripeEventEndpoint).where(StripeEventEndpoint.agency_id == agency_id)
    ).one_or_none()


def _delete_quietly(agency: Agency, stripe_endpoint_id: str) -> None:
    try:
        gateway_for(agency).delete_webhook_endpoint(stripe_endpoint_id)
    except StripeGatewayError as error:
        log.warning(
            "cannot delete a Stripe webhook endpoint; forgetting it",
            extra={"fields": {"agency_id": agency.id, "endpoint": stripe_endpoint_id, "error": error.reason}},
        )


def _delete_destination_quietly(agency: Agency, destination_id: str) -> None:
    try:
        gateway_for(agency).delete_event_destination(destination_id)
    except StripeGatewayError as error:
        log.warning(
            "cannot delete a Stripe event destination; forgetting it",
            extra={"fields": {"agency_id": agency.id, "destination": destination_id, "error": error.reason}},
        )


# ---- intake: verify, store ------------------------------------------------------------------------------


def find_endpoint(route_id: str) -> StripeEventEndpoint | None:
    """Return the registered endpoint named by a webhook URL, or None."""
    return _registered(route_id, StripeEventEndpoint.status)


def verify_signature(endpoint: StripeEventEndpoint, payload: bytes, header: str | None) -> bool:
    """Check ``Stripe-Signature`` over the raw body with the endpoint's secret (stripe-python's own check)."""
    try:
        secret = secret_box().decrypt(endpoint.secret_ciphertext or "")
        stripe.WebhookSignature.verify_header(payload, header, secret, tolerance=SIGNATURE_TOLERANCE_SECONDS)
    except (stripe.SignatureVerificationError, SecretUnreadable, UnicodeDecodeError):
        return False
    return True


def find_destination(route_id: str) -> StripeEventEndpoint | None:
    """Return the endpoint whose thin-event destination a ``.../thin`` URL names, or None."""
    return _registered(route_id, StripeEventEndpoint.destination_status)


def _registered(route_id: str, status) -> StripeEventEndpoint | None:
    """Return the endpoint of this route id whose ``status`` column (the endpoint's or the destination's) says
    registered, or None."""
    if not route_id or len(route_id) > 64:
        return None
    return db.session.scalars(
        select(StripeEventEndpoint).where(StripeEventEndpoint.route_id == route_id, status == "registered")
    ).one_or_none()


def read_thin_event(endpoint: StripeEventEndpoint, payload: bytes, header: str | None) -> dict[str, Any] | None:
    """Verify a thin event's signature with the destination's secret and parse it with stripe-python
    (``StripeClient.parse_event_notification``); return its id and type, or None when it does not verify.

    Raises StripeEventInvalid for a verified body that is no thin event notification.
    """
    agency = db.session.get(Agency, endpoint.agency_id)
    try:
        secret = secret_box().decrypt(endpoint.destination_secret_ciphertext or "")
        gateway = gateway_for(agency)
    except (SecretUnreadable, StripeGatewayError):
        return None
    try:
        notification = gateway.parse_event_notification(payload, header, secret, SIGNATURE_TOLERANCE_SECONDS)
    except (stripe.SignatureVerificationError, UnicodeDecodeError):
        return None
    except (ValueError, KeyError, TypeError):
        raise StripeEventInvalid("the body is not a Stripe thin event notification") from None
    event_id, event_type = getattr(notification, "id", None), getattr(notification, "type", None)
    if not isinstance(event_id, str) or not 0 < len(event_id) <= EVENT_ID_MAX_LENGTH:
        raise StripeEventInvalid("the event has no usable id")
    if not isinstance(event_type, str) or not 0 < len(event_type) <= 100:
        raise StripeEventInvalid("the event has no usable type")
    return {"id": event_id, "type": event_type}


def read_event(payload: bytes) -> dict[str, Any]:
    """Parse a verified body into a Stripe event; raise StripeEventInvalid if it is not one."""
    try:
        event = json.loads(payload)
    except (ValueError, RecursionError):
        raise StripeEventInvalid("the body is not JSON") from None
    if not isinstance(event, dict):
        raise StripeEventInvalid("the body is not a JSON object")
    event_id, event_type = event.get("id"), event.get("type")
    if not isinstance(event_id, str) or not 0 < len(event_id) <= EVENT_ID_MAX_LENGTH:
        raise StripeEventInvalid("the event has no usable id")
    if not isinstance(event_type, str) or not 0 < len(event_type) <= 100:
        raise StripeEventInvalid("the event has no usable type")
    data = event.get("data")
    if not isinstance(data, dict) or not isinstance(data.get("object"), dict):
        raise StripeEventInvalid("the event has no data.object")
    return event


def store_event(agency_id: int, event: dict[str, Any], body: str) -> int | None:
    """INSERT the event once per agency and event id (flushes); return its row id, None for a duplicate."""
    dialect = postgresql if db.engine.dialect.name == "postgresql" else sqlite
    statement = (
        dialect.insert(StripeEvent)
        .values(
            agency_id=agency_id,
            event_id=event["id"],
            event_type=event["type"],
            body=body,
            received_at=utcnow(),
            status="received",
            attempts=0,
        )
        .on_conflict_do_nothing(index_elements=["agency_id", "event_id"])
        .returning(StripeEvent.id)
    )
    return db.session.execute(statement).scalar()


# ---- processing ---------------------------------------------------------------------------------------


def process_event(event_row_id: int, *, force: bool = False) -> str:
    """Apply a stored event in its own transaction and record the outcome (core.delivery_log); commits,
    never raises for the handler's failures: processed, ignored, failed (error kept, replayable), duplicate
    (another run recorded it first) or received (not even the failure could be written)."""
    return EVENT_LOG.process(event_row_id, force=force)


def _handle_stored(event: Row) -> str | None:
    agency = db.session.get(Agency, event.agency_id)
    body = json.loads(event.body)
    if body.get("object") == THIN_OBJECT:
        return handle_thin_event(agency, event.body)
    return handle_event(agency, body)


THIN_OBJECT = "v2.core.event"


def handle_thin_event(agency: Agency, body: str) -> str | None:
    """Apply one stored thin event: for a meter error report, fetch the full event from Stripe and flag the
    unit reports it names (billing.meter_errors). Raises StripeGatewayError when Stripe cannot answer, so the
    event fails and is replayed."""
    event_type = json.loads(body).get("type")
    if event_type != METER_ERROR_EVENT:
        return f"event type {event_type} is not used by Rebill"
    report = gateway_for(agency).meter_error_report(body)
    return flag_rejected_reports(agency, report)


# Stored events: processed, replayed and their failures recorded as every delivery log's (core.delivery_log).
EVENT_LOG = DeliveryLog(
    StripeEvent, _handle_stored, columns=(StripeEvent.agency_id, StripeEvent.body), name="stripe event", log=log
)


def handle_event(agency: Agency, event: dict[str, Any]) -> str | None:
    """Apply one Stripe event to the agency's clients; return a note when there was nothing to do."""
    event_type = event["type"]
    stripe_object = event["data"]["object"]
    customer_id = _id_of(stripe_object.get("customer"))
    if not customer_id:
        return f"{event_type} names no customer"
    at = dt.datetime.fromtimestamp(int(event.get("created") or 0), dt.UTC)
    if event_type == "invoice.payment_failed":
        return mark_payment_failed(agency, customer_id, at, f"invoice {stripe_object.get('id')} was not paid")
    if event_type == "invoice.paid":
        return clear_payment_failed(agency, customer_id, at)
    if event_type in ("customer.subscription.updated", "customer.subscription.deleted"):
        return refresh_subscriptions(agency, customer_id)
    return f"event type {event_type} is not used by Rebill"


def mark_payment_failed(agency: Agency, customer_id: str, at: dt.datetime, reason: str) -> str | None:
    """Mark the customer's clients payment_failed; pause those whose agency asked for it. Flushes."""
    clients = _locked_clients(agency.id, customer_id)
    if not clients:
        return f"no client bills Stripe customer {customer_id}"
    for client in clients:
        if client.payment_event_at is not None and at < client.payment_event_at:
            continue  # a newer payment event was applied already
        client.payment_event_at = at
        client.payment_failed_at = at
        client.payment_problem = f"{reason}; Stripe retries the payment per the account's settings"
        if client.pause_on_payment_failure and client.status == ClientStatus.ACTIVE:
            set_client_status(client, ClientStatus.PAUSED)  # usage received before the failure counts as active usage
            client.paused_for_payment = True
    db.session.flush()
    return None


def clear_payment_failed(agency: Agency, customer_id: str, at: dt.datetime) -> str | None:
    """Clear payment_failed on the customer's clients and resume those the failure paused. Flushes."""
    clients = _locked_clients(agency.id, customer_id)
    if not clients:
        return f"no client bills Stripe customer {customer_id}"
    for client in clients:
        if client.payment_event_at is not None and at < client.payment_event_at:
            continue
        client.payment_event_at = at
        client.payment_failed_at = client.payment_problem = None
        if client.paused_for_payment and client.status == ClientStatus.PAUSED:
            set_client_status(client, ClientStatus.ACTIVE)  # usage received while paused stays unbilled
        client.paused_for_payment = False
    db.session.flush()
    return None


def refresh_subscriptions(agency: Agency, customer_id: str) -> str | None:
    """Re-read the customer's subscription item for each client's price; flag clients whose price is gone.

    Stripe is asked before any row is locked (a slow Stripe must not hold clients); raises StripeGatewayError
    when it cannot answer, so the event fails and is retried.
    """
    prices = db.session.scalars(
        select(RebillClient.stripe_price_id)
        .where(*_customer_clients(agency.id, customer_id))
        .distinct()
    ).all()
    if not prices:
        return f"no client bills Stripe customer {customer_id}"
    gateway = gateway_for(agency)
    items = {price_id: gateway.find_subscription_item(customer_id, price_id) for price_id in prices}
    for client in _locked_clients(agency.id, customer_id):
        item = items.get(client.stripe_price_id)
        if item is None:
            client.subscription_problem = (
                f"customer {customer_id} has no active subscription with price {client.stripe_price_id} any "
                "more: its units reach Stripe but no invoice bills them; subscribe the customer again or pick "
                "another price"
            )
        else:
            client.subscription_problem = None
            if client.stripe_target.is_legacy:
                client.subscription_item_id = item
    db.session.flush()
    return None


def _customer_clients(agency_id: int, customer_id: str) -> tuple:
    return (
        RebillClient.agency_id == agency_id,
        RebillClient.stripe_customer_id == customer_id,
        RebillClient.deleted_at.is_(None),
    )


def _locked_clients(agency_id: int, customer_id: str) -> list[RebillClient]:
    take_write_lock()
    # Id order, like every other writer of several clients, so two writers cannot deadlock.
    return list(
        db.session.scalars(
            select(RebillClient)
            .where(*_customer_clients(agency_id, customer_id))
            .order_by(RebillClient.id)
            .with_for_update()
            .execution_options(populate_existing=True)
        )
    )


def _id_of(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("id")
    return value if isinstance(value, str) and value else None


# ---- replay -------------------------------------------------------------------------------------------


def retry_failed_events() -> ReplaySummary:
    """The scheduler's job: replay failed (and abandoned) events, each at most FAILED_EVENT_MAX_ATTEMPTS times."""
    return EVENT_LOG.replay(max_attempts=FAILED_EVENT_MAX_ATTEMPTS)
