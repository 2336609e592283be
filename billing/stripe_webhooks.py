"""``POST /webhooks/stripe/<route id>``: verify over the raw body → store → commit → process; and its replay CLI.

Stripe retries a delivery that is not answered 2xx, for up to three days
(https://docs.stripe.com/webhooks#retries), so the answer is 200 once the event is stored (whatever
processing does: a failed event keeps its error and is replayed) or was stored before, 401 for a missing or
wrong signature (nothing stored), 404 for an endpoint Rebill does not know, 400 for a signed body that is
no Stripe event, and 503 when it cannot be stored (Stripe retries).
"""

from __future__ import annotations

import logging

from flask import Blueprint, jsonify, request
from flask.cli import AppGroup
from sqlalchemy.exc import SQLAlchemyError

from billing.stripe_events import (
    EVENT_LOG,
    StripeEventInvalid,
    find_destination,
    find_endpoint,
    process_event,
    read_event,
    read_thin_event,
    store_event,
    verify_signature,
)
from core.database import db
from core.delivery_log import replay_command

log = logging.getLogger("billing.stripe_webhooks")

blueprint = Blueprint("stripe_webhooks", __name__)


@blueprint.post("/webhooks/stripe/<route_id>")
def receive_stripe_event(route_id: str):
    """Verify, store, commit, process; answer 200 stored/duplicate, 401, 404, 400 or 503."""
    payload = request.get_data(cache=False)
    endpoint = find_endpoint(route_id)
    if endpoint is None:
        return jsonify(error="no Stripe webhook endpoint here"), 404
    agency_id = endpoint.agency_id
    if not verify_signature(endpoint, payload, request.headers.get("Stripe-Signature")):
        return jsonify(error="missing or invalid Stripe-Signature"), 401
    try:
        event = read_event(payload)
    except StripeEventInvalid as error:
        return jsonify(error=str(error)), 400
    return _store_and_process(agency_id, event, payload, "Stripe event")


@blueprint.post("/webhooks/stripe/<route_id>/thin")
def receive_stripe_thin_event(route_id: str):
    """A thin event (Stripe's meter errors) to the agency's event destination: verify with stripe-python,
    store, commit, process (the full event is fetched from Stripe then); the same answers as above."""
    payload = request.get_data(cache=False)
    endpoint = find_destination(route_id)
    if endpoint is None:
        return jsonify(error="no Stripe event destination here"), 404
    agency_id = endpoint.agency_id
    try:
        event = read_thin_event(endpoint, payload, request.headers.get("Stripe-Signature"))
    except StripeEventInvalid as error:
        return jsonify(error=str(error)), 400
    if event is None:
        return jsonify(error="missing or invalid Stripe-Signature"), 401
    return _store_and_process(agency_id, event, payload, "Stripe thin event")


def _store_and_process(agency_id: int, event: dict, payload: bytes, kind: str):
    """Store a verified event and commit, then process it; answer 200 (processed or duplicate) or 503."""
    try:
        row_id = store_event(agency_id, event, payload.decode("utf-8"))
        db.session.commit()
    except SQLAlchemyError as error:
        db.session.rollback()
        log.error(f"cannot store a {kind}; answering 503", extra={"fields": {"error": type(error).__name__}})
        return jsonify(error="cannot store the event right now; retry later"), 503
    if row_id is None:
        return jsonify(status="duplicate")
    return jsonify(status=process_event(row_id))


stripe_events_cli = AppGroup("stripe-events", help="Stripe events of the agencies' accounts.")


stripe_events_cli.add_command(
    replay_command(
        EVENT_LOG.replay,
        noun="stored Stripe event",
        help="Process stored Stripe events again (default: every one not processed).",
    )
)
