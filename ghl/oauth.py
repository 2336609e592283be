"""The install flow: ``GET /oauth/install`` sends the installer to GHL's choose-location page,
``GET /oauth/callback?code=`` exchanges the code and stores the install (docs/ghl.md §1).

A failed callback ends on an error page with a 4xx or 502, never a 500 and never the success page.
"""

from __future__ import annotations

import logging
import secrets

from flask import Blueprint, Response, current_app, make_response, redirect, render_template, request, url_for
from itsdangerous import BadSignature, URLSafeTimedSerializer
from sqlalchemy.exc import SQLAlchemyError

from core.database import db
from ghl.client import GhlError, GhlGrantRejected, ghl_client
from ghl.installs import complete_install, exchange_authorization_code, record_oauth_install

log = logging.getLogger("ghl.oauth")

blueprint = Blueprint("ghl_oauth", __name__)

STATE_SALT = "rebill.ghl.oauth-state.v1"
OUTCOME_SALT = "rebill.ghl.install-outcome.v1"
STATE_MAX_AGE_SECONDS = 3600
CODE_MAX_LENGTH = 2048


@blueprint.get("/oauth/install")
def install():
    """Redirect to GHL's choose-location page with our scopes and a signed state."""
    try:
        client = ghl_client()
    except GhlError:
        return _failed("Rebill's GHL app credentials are not configured.", 503)
    config = current_app.config
    url = client.authorization_url(config["GHL_MARKETPLACE_BASE"], config["GHL_SCOPES"], issue_state())
    return redirect(url)


@blueprint.get("/oauth/callback")
def callback():
    """Exchange the code, commit the install, then sync subaccounts; show the outcome."""
    if request.args.get("error"):
        reason = request.args.get("error_description") or request.args["error"]
        return _failed(f"GHL did not authorise the install: {reason[:200]}", 400)
    code = request.args.get("code", "")
    if not code or len(code) > CODE_MAX_LENGTH:
        return _failed("The install link is missing its authorization code.", 400)
    # Marketplace-started installs carry no state (docs/ghl.md §1.2); a state we did not sign is refused.
    state = request.args.get("state")
    if state is not None and not state_is_valid(state):
        return _failed("The install link has expired or was not issued by Rebill. Start the install again.", 400)
    try:
        grant = exchange_authorization_code(code)
    except GhlGrantRejected:
        return _failed("GHL refused the authorization code (expired or already used). Start the install again.", 400)
    except GhlError as error:
        log.warning("GHL code exchange failed", extra={"fields": {"error": type(error).__name__}})
        return _failed("GHL could not be reached to finish the install. Try again in a minute.", 502)
    try:
        # Commit the token first: the code is spent and the refresh token rotates, so losing this pair
        # to a later failure would leave a dead install.
        result = record_oauth_install(grant)
        db.session.commit()
    except SQLAlchemyError:
        db.session.rollback()
        log.exception("cannot store a GHL install")
        return _failed("Rebill could not save the install. Try again in a minute.", 503)
    try:
        complete_install(result, grant)
        db.session.commit()
    except (GhlError, SQLAlchemyError) as error:
        db.session.rollback()
        result.problems.append(f"subaccounts will sync later ({type(error).__name__})")
    log.info(
        "GHL install stored",
        extra={"fields": {"company_id": result.company_id, "user_type": result.user_type,
                          "locations": len(result.location_ids), "problems": len(result.problems)}},
    )
    # POST/redirect/GET: the success page is another URL, so reloading it never spends the single-use
    # code again, and the code leaves the address bar (and the history) at once.
    outcome = {"user_type": result.user_type, "locations": len(result.location_ids), "problems": bool(result.problems)}
    return _private(redirect(url_for(".installed", outcome=_outcome_serializer().dumps(outcome)), 303))


@blueprint.get("/oauth/installed")
def installed():
    """Show what an install stored (from the callback's signed summary); reloading calls nobody."""
    try:
        outcome = _outcome_serializer().loads(request.args.get("outcome", ""), max_age=STATE_MAX_AGE_SECONDS)
    except BadSignature:
        outcome = None  # an old or altered link: say nothing about any install
    return _private(make_response(render_template("ghl/installed.html", outcome=outcome)))


def issue_state() -> str:
    """Return a signed, timestamped state for the authorize URL."""
    return _state_serializer().dumps({"nonce": secrets.token_urlsafe(16)})


def state_is_valid(state: str) -> bool:
    """Tell whether a callback's state is one we issued within the last hour."""
    try:
        _state_serializer().loads(state, max_age=STATE_MAX_AGE_SECONDS)
    except BadSignature:  # SignatureExpired is a BadSignature
        return False
    return True


def _state_serializer() -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(current_app.config["SECRET_KEY"], salt=STATE_SALT)


def _outcome_serializer() -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(current_app.config["SECRET_KEY"], salt=OUTCOME_SALT)


def _private(response: Response) -> Response:
    """Keep an install page out of caches and out of the Referer header of anything it links to."""
    response.headers["Cache-Control"] = "no-store"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


def _failed(reason: str, status: int):
    page = render_template("ghl/install_failed.html", reason=reason, retry_url=url_for(".install"))
    return _private(make_response(page, status))
