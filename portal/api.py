"""The portal's JSON API (docs/contract.md §5): bearer-token sessions, one agency per request, thin views.

Every route except the two session routes needs ``Authorization: Bearer <token>`` from POST /session.
Errors are JSON ``{"error": ...}``: 401 no/bad/expired token, 403 not allowed, 404 not this agency's,
422 invalid fields (with ``fields``), 503 Stripe unreachable.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
from collections.abc import Callable
from dataclasses import asdict

from flask import Blueprint, abort, current_app, g, jsonify, request

from billing.agencies import find_agency
from billing.alert_sender import AlertUrlRefused
from billing.alerts import list_alerts, set_alert_url, thresholds_of
from billing.clients import STRIPE_FIELDS, create_client, delete_client, get_client, list_clients, update_client
from billing.errors import BillingError, StripeAccountChangeUnconfirmed, StripeKeyInvalid
from billing.models import Agency, RebillClient
from billing.periods import ClientMoney, client_money, refresh_client_period
from billing.states import Provider
from billing.stripe_connection import connect_stripe_key, disconnect_stripe, list_prices
from billing.stripe_events import register_stripe_events, stripe_events_status
from billing.stripe_gateway import StripeGatewayError, StripeUnavailable
from billing.usage import client_usage, unmapped_usage
from capri.api_keys import NAME_MAX_LENGTH, create_api_key, list_api_keys, revoke_api_key
from core.database import db
from core.errors import ClientInvalid, NotFound
from ghl.locations import list_subaccounts
from ghl.sso import SsoPayloadInvalid, decrypt_sso_payload, parse_sso_user
from portal.customer_view import client_for_customer, usage_for_customer
from portal.demo import demo_enabled, demo_session
from portal.openapi import openapi_document
from portal.sessions import (
    SIGN_IN_REFUSED,
    TOKEN_SECONDS,
    PortalSession,
    SessionRefused,
    SubaccountRequired,
    TooManySignIns,
    admit_request,
    count_sign_in,
    open_session,
    read_session,
    sign_session,
)

log = logging.getLogger("portal.api")

blueprint = Blueprint("portal_api", __name__, url_prefix="/api/portal")

OPEN_ENDPOINTS = {"portal_api.create_session", "portal_api.create_demo_session", "portal_api.get_openapi_document"}
MAX_STRIPE_KEY_CHARS = 255


# ---- authentication, authorisation, errors --------------------------------------------------------


@blueprint.before_request
def authenticate():
    """Load the session and agency from the bearer token (all routes but the session routes)."""
    if request.endpoint in OPEN_ENDPOINTS:
        return
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise SessionRefused("sign in first: Authorization: Bearer <token> is missing")
    session = read_session(token.strip())
    if session.demo and not demo_enabled(current_app):
        raise SessionRefused("demo sessions work only in demo mode")
    g.portal_session = session
    g.agency = admit_request(session)


def _allowed_if(permitted: Callable[[PortalSession], bool], reason: str):
    """Make a view answer 403 with ``reason`` unless ``permitted`` says yes for the signed-in session."""

    def decorate(view):
        @functools.wraps(view)
        def wrapper(*args, **kwargs):
            if not permitted(g.portal_session):
                abort(403, reason)
            return view(*args, **kwargs)

        return wrapper

    return decorate


billing_admin = _allowed_if(
    lambda session: session.can_manage_billing, "only agency admins can change billing settings"
)
# A subaccount user is the agency's customer, and an agency user who is not an admin sees one subaccount as
# its customer does: the agency's Stripe account, prices and API keys are not theirs.
agency_user = _allowed_if(
    lambda session: session.sees_agency_settings,
    "only agency admins can see the agency's Stripe connection, prices and API keys",
)


@blueprint.errorhandler(SessionRefused)
def session_refused(error: SessionRefused):
    """Answer 401 with a Bearer challenge."""
    return jsonify(error=str(error)), 401, {"WWW-Authenticate": 'Bearer realm="rebill-portal"'}


@blueprint.errorhandler(SubaccountRequired)
def subaccount_required(error: SubaccountRequired):
    """Answer 403: this user sees one subaccount at a time and opened none."""
    return jsonify(error=str(error)), 403


@blueprint.errorhandler(TooManySignIns)
def too_many_sign_ins(error: TooManySignIns):
    """Answer 429 with the seconds until the next window."""
    return jsonify(error=str(error)), 429, {"Retry-After": str(error.retry_after)}


@blueprint.errorhandler(NotFound)
def not_found(error: NotFound):
    """Answer 404: not this agency's, or gone."""
    return jsonify(error=str(error) or "not found"), 404


@blueprint.errorhandler(ClientInvalid)
def client_invalid(error: ClientInvalid):
    """Answer 422 naming each refused field."""
    return jsonify(error=str(error) or "the client is not valid", fields=error.errors), 422


@blueprint.errorhandler(StripeAccountChangeUnconfirmed)
def stripe_account_change_unconfirmed(error: StripeAccountChangeUnconfirmed):
    """Answer 409 saying what connecting the key would do; the page asks and resends with the confirmation."""
    return jsonify(
        error=str(error),
        confirm="confirm_account_change",
        current=error.current,
        new=error.new,
        pending_units=error.pending_units,
    ), 409


@blueprint.errorhandler(StripeKeyInvalid)
def stripe_key_invalid(error: StripeKeyInvalid):
    """Answer 422 with Stripe's reason for refusing the key."""
    return jsonify(error=error.reason, fields={"api_key": error.reason}), 422


@blueprint.errorhandler(StripeUnavailable)
def stripe_unavailable(error: StripeUnavailable):
    """Answer 503: Stripe is down or slow, nothing was changed."""
    return jsonify(error="Stripe cannot be reached right now; try again in a minute"), 503


@blueprint.errorhandler(StripeGatewayError)
def stripe_refused(error: StripeGatewayError):
    """Answer 422 with what Stripe refused (a revoked key, a missing permission)."""
    return jsonify(error=error.reason), 422


@blueprint.errorhandler(BillingError)
def billing_error(error: BillingError):
    """Answer 422 for any other refusal of the billing core."""
    return jsonify(error=str(error)), 422


# ---- session ---------------------------------------------------------------------------------------


@blueprint.post("/session")
def create_session():
    """Exchange GHL's encrypted user context for a short-lived bearer token."""
    count_sign_in(request.remote_addr)
    db.session.commit()  # the attempt counts whatever the outcome
    payload = _json_body().get("payload")
    secret = current_app.config.get("GHL_SHARED_SECRET")
    if not secret:
        abort(503, "GHL_SHARED_SECRET is not configured, so nobody can sign in")
    try:
        user = parse_sso_user(decrypt_sso_payload(payload, secret))
    except SsoPayloadInvalid as error:
        log.info("sso payload refused: %s", error)
        raise SessionRefused(SIGN_IN_REFUSED) from None
    session = open_session(user)
    log.info("portal session opened", extra={"fields": {"company_id": user.company_id, "user_id": user.user_id}})
    return _session_answer(session)


@blueprint.post("/demo-session")
def create_demo_session():
    """Sign in as the demo agency's admin; exists only in demo mode (development)."""
    if not demo_enabled(current_app):
        abort(404)
    session = demo_session()
    if find_agency(session.company_id) is None:
        abort(503, "the demo agency is not seeded yet; `flask rebill demo` (started by make run) seeds it")
    return _session_answer(session)


@blueprint.get("/openapi.json")
def get_openapi_document():
    """Serve the OpenAPI document of this API."""
    return jsonify(openapi_document())


@blueprint.get("/me")
def me():
    """Describe the signed-in user and agency."""
    return jsonify(session=_session_json(g.portal_session), agency={"name": g.agency.name})


# ---- Stripe ----------------------------------------------------------------------------------------


@blueprint.get("/stripe-key")
@agency_user
def stripe_status():
    """Show the agency's Stripe connection (never the key)."""
    return jsonify(_stripe_json(g.agency))


@blueprint.put("/stripe-key")
@billing_admin
def put_stripe_key():
    """Validate and store the agency's Stripe secret or restricted key."""
    api_key = _json_body().get("api_key")
    if not isinstance(api_key, str) or not api_key.strip() or len(api_key) > MAX_STRIPE_KEY_CHARS:
        raise StripeKeyInvalid("paste a Stripe secret key (sk_…) or restricted key (rk_…)")
    confirm = _json_body().get("confirm_account_change", False)
    if not isinstance(confirm, bool):
        raise StripeKeyInvalid("confirm_account_change must be true or false")
    agency = connect_stripe_key(g.agency, api_key.strip(), confirm_account_change=confirm)
    db.session.commit()
    # Committed first: the key works whatever the registration's outcome (a restricted key may lack the
    # permission; the answer's "events" says which one to add).
    register_stripe_events(agency, current_app.config["REBILL_PUBLIC_URL"] or request.host_url)
    db.session.commit()
    return jsonify(_stripe_json(agency))


@blueprint.delete("/stripe-key")
@billing_admin
def delete_stripe_key():
    """Forget the agency's Stripe key."""
    disconnect_stripe(g.agency)
    db.session.commit()
    return jsonify(_stripe_json(g.agency))


@blueprint.get("/prices")
@agency_user
def prices():
    """List the agency's Stripe products and prices, each marked usable or not, with the reason."""
    return jsonify(products=_jsonable(list_prices(g.agency)))


# ---- subaccounts, clients, usage -------------------------------------------------------------------


@blueprint.get("/subaccounts")
def subaccounts():
    """List the agency's installed GHL subaccounts."""
    return jsonify(subaccounts=[{"location_id": loc, "name": name} for loc, name in _subaccount_names().items()])


@blueprint.get("/clients")
def clients():
    """List the agency's clients with their counters."""
    names = _subaccount_names()
    visible = [client for client in list_clients(g.agency) if _in_scope(client)]
    money = client_money(g.agency, visible)
    return jsonify(clients=_as_viewer_sees([_client_json(client, names, money[client.id]) for client in visible]))


@blueprint.post("/clients")
@billing_admin
def add_client():
    """Add a client ("Add User")."""
    body = _json_body()
    bill_unmapped = body.pop("bill_unmapped_usage", False)
    if not isinstance(bill_unmapped, bool):
        raise ClientInvalid({"bill_unmapped_usage": "must be true or false"})
    _check_scope_of_fields(body)
    client = create_client(g.agency, body, bill_unmapped_usage=bill_unmapped, known_location_ids=_installed_locations)
    db.session.commit()
    _refresh_period(client)
    return jsonify(_client_json(client, _subaccount_names(), _money(client))), 201


@blueprint.get("/clients/<int:client_id>")
def client(client_id: int):
    """Show one client."""
    client = _visible_client(client_id)
    return jsonify(_as_viewer_sees([_client_json(client, _subaccount_names(), _money(client))])[0])


@blueprint.patch("/clients/<int:client_id>")
@billing_admin
def edit_client(client_id: int):
    """Change a client's fields, including pause/resume (status) and billing unit."""
    fields = _json_body()
    _visible_client(client_id)
    _check_scope_of_fields(fields)
    client = update_client(g.agency, client_id, fields, known_location_ids=_installed_locations)
    db.session.commit()
    if any(name in fields for name in STRIPE_FIELDS):
        _refresh_period(client)
    return jsonify(_client_json(client, _subaccount_names(), _money(client)))


@blueprint.delete("/clients/<int:client_id>")
@billing_admin
def remove_client(client_id: int):
    """Delete a client (its history is kept)."""
    _visible_client(client_id)
    delete_client(g.agency, client_id)
    db.session.commit()
    return "", 204


@blueprint.get("/clients/<int:client_id>/usage")
def usage(client_id: int):
    """Show a client's counted usage, units logged and reported, daily series and recent Stripe reports."""
    _visible_client(client_id)
    answer = _jsonable(client_usage(g.agency, client_id))
    return jsonify(answer if g.portal_session.sees_agency_settings else usage_for_customer(answer))


@blueprint.get("/unmapped-usage")
def unmapped():
    """List channels and subaccounts with usage but no client."""
    scope = g.portal_session.location_scope
    names = _subaccount_names()
    rows = [
        row | ({"subaccount_name": names.get(row["location_id"])} if row.get("location_id") else {})
        for row in unmapped_usage(g.agency)
        if scope is None or row.get("location_id") == scope
    ]
    return jsonify(unmapped=_jsonable(rows))


# ---- spend alerts ------------------------------------------------------------------------------------


@blueprint.get("/alerts")
def alerts():
    """List the agency's latest spend alerts, each with its delivery log."""
    scope = g.portal_session.location_scope
    visible = {client.id for client in list_clients(g.agency) if _in_scope(client)} if scope else None
    rows = [row for row in list_alerts(g.agency) if visible is None or row["client_id"] in visible]
    return jsonify(alerts=_jsonable(rows))


@blueprint.get("/alert-settings")
@agency_user
def alert_settings():
    """Show where alerts are POSTed (the signing secret is never shown again)."""
    return jsonify(url=g.agency.alert_url, secret_set=g.agency.alert_secret_ciphertext is not None)


@blueprint.put("/alert-settings")
@billing_admin
def put_alert_settings():
    """Set or remove (null) the alert URL; a new signing secret is in this answer only."""
    body = _json_body()
    new_secret = body.get("new_secret", False)
    if not isinstance(new_secret, bool):
        raise ClientInvalid({"new_secret": "must be true or false"})
    try:
        secret = set_alert_url(g.agency, body.get("url"), new_secret=new_secret)
    except AlertUrlRefused as error:
        raise ClientInvalid({"url": str(error)}) from None
    db.session.commit()
    answer = {"url": g.agency.alert_url, "secret_set": g.agency.alert_secret_ciphertext is not None}
    return jsonify(answer | ({"secret": secret} if secret else {}))


# ---- API keys for the Capri adapter ---------------------------------------------------------------


@blueprint.get("/api-keys")
@agency_user
def api_keys():
    """List the agency's API keys by prefix (the keys themselves are not stored)."""
    return jsonify(api_keys=[_api_key_json(key) for key in list_api_keys(g.agency.id)])


@blueprint.post("/api-keys")
@billing_admin
def add_api_key():
    """Create an API key; the full key is in this answer and nowhere else, ever."""
    name = _json_body().get("name")
    if name is not None and (not isinstance(name, str) or len(name.strip()) > NAME_MAX_LENGTH):
        abort(422, f"name must be text of at most {NAME_MAX_LENGTH} characters")
    api_key, full_key = create_api_key(g.agency.id, name)
    db.session.commit()
    return jsonify(_api_key_json(api_key) | {"key": full_key}), 201


@blueprint.delete("/api-keys/<int:key_id>")
@billing_admin
def remove_api_key(key_id: int):
    """Revoke an API key."""
    revoke_api_key(g.agency.id, key_id)
    db.session.commit()
    return "", 204


# ---- helpers ---------------------------------------------------------------------------------------


def _json_body() -> dict:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        abort(400, "the body must be a JSON object")
    return body


def _in_scope(client: RebillClient) -> bool:
    scope = g.portal_session.location_scope
    return scope is None or (client.provider == Provider.GHL and client.location_id == scope)


def _visible_client(client_id: int) -> RebillClient:
    client = get_client(g.agency, client_id)
    if not _in_scope(client):
        raise NotFound("client not found")
    return client


def _check_scope_of_fields(fields: dict) -> None:
    scope = g.portal_session.location_scope
    if scope is None:
        return
    provider = fields.get("provider", Provider.GHL)
    if provider != Provider.GHL or fields.get("location_id", scope) != scope or fields.get("channel_id"):
        abort(403, "from inside a subaccount you can only manage that subaccount's client")


def _installed_locations() -> list[str]:
    return [location.location_id for location in list_subaccounts(g.agency.id)]


def _subaccount_names() -> dict[str, str | None]:
    scope = g.portal_session.location_scope
    return {
        location.location_id: location.name
        for location in list_subaccounts(g.agency.id)
        if scope is None or location.location_id == scope
    }


def _session_answer(session: PortalSession):
    return jsonify(token=sign_session(session), expires_in=TOKEN_SECONDS, session=_session_json(session))


def _session_json(session: PortalSession) -> dict:
    return asdict(session) | {
        "can_manage_billing": session.can_manage_billing,
        "sees_agency_settings": session.sees_agency_settings,
    }


def _stripe_json(agency: Agency) -> dict:
    connected = agency.stripe_key_ciphertext is not None
    return {
        "connected": connected,
        # A disconnected agency keeps its last account and mode (to notice a switch); they are not shown.
        "account": agency.stripe_account_id if connected else None,
        "mode": agency.stripe_mode if connected else None,
        "last4": agency.stripe_key_last4,
        "status": agency.stripe_key_status,
        "problem": agency.stripe_key_problem,
        "events": stripe_events_status(agency),
    }


def _money(client: RebillClient) -> ClientMoney:
    return client_money(g.agency, [client])[client.id]


def _refresh_period(client: RebillClient) -> None:
    """Read the client's new period and price from Stripe now (its own commit: the client is already saved)."""
    refresh_client_period(g.agency, client)
    db.session.commit()


def _client_json(client: RebillClient, subaccount_names: dict[str, str | None], money: ClientMoney) -> dict:
    return {
        "id": client.id,
        "nickname": client.nickname,
        "provider": client.provider,
        "channel_id": client.channel_id,
        "location_id": client.location_id,
        "subaccount_name": subaccount_names.get(client.location_id) if client.location_id else None,
        "stripe_product_id": client.stripe_product_id,
        "stripe_price_id": client.stripe_price_id,
        "stripe_customer_id": client.stripe_customer_id,
        "charge_by": client.charge_by,
        "billing_unit": client.billing_unit,
        "message_source": client.message_source,
        "status": client.status,
        "monthly_cap_units": client.monthly_cap_units,
        # A cap given as money (docs/contract.md §5): the amount as set, its currency, and in any case what
        # the cap in units costs at the client's price, so the portal shows both.
        "monthly_cap_amount": client.monthly_cap_amount,
        "monthly_cap_currency": client.monthly_cap_currency,
        "cap_estimate": None
        if money.cap_estimate is None
        else {"amount": money.cap_estimate.amount, "currency": money.cap_estimate.currency},
        "alert_thresholds": list(thresholds_of(client)),
        "pause_on_payment_failure": client.pause_on_payment_failure,
        "payment_failed": client.payment_failed_at is not None,
        "payment_problem": client.payment_problem,
        "paused_for_payment": client.paused_for_payment,
        "subscription_problem": client.subscription_problem,
        "report_mode": client.report_mode,
        "counted_usage": client.counted_usage,
        "units_logged": client.units_logged,
        "remainder": client.remainder,
        "created_at": client.created_at.isoformat(),
        # This period's units and estimated charge, and whether they reach an invoice (docs/contract.md §5).
        "period": money.period_json(),
        "billing_state": money.billing_state,
        "billing_problem": money.billing_problem,
        "product_name": money.product_name,
        "price_name": money.price_name,
        "customer_name": money.customer_name,
        # A dry run's figures this period (status shadow, or shadow earlier in it): never sent to Stripe.
        "would_have_billed": money.would_have_billed.to_json() if money.would_have_billed else None,
    }


def _as_viewer_sees(clients: list[dict]) -> list[dict]:
    """Return clients' JSON as is for agency admins; for anyone else with names instead of Stripe ids."""
    if g.portal_session.sees_agency_settings:
        return clients
    return [client_for_customer(client) for client in clients]


def _api_key_json(api_key) -> dict:
    return {
        "id": api_key.id,
        "prefix": api_key.prefix,
        "name": api_key.name,
        "created_at": _jsonable(api_key.created_at),
        "last_used_at": _jsonable(api_key.last_used_at),
        "revoked_at": _jsonable(api_key.revoked_at),
    }


def _jsonable(value):
    """Turn service results into JSON values: ISO-8601 datetimes, lists for tuples, dicts for dataclasses."""
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    if hasattr(value, "__dataclass_fields__"):
        return _jsonable(asdict(value))
    return value
