"""Portal sessions: a GHL user context, checked against our installs, becomes a short-lived bearer token.

No cookies: inside the GHL iframe our cookies are third-party and browsers drop them, so the page keeps
the token in memory and sends ``Authorization: Bearer`` (docs/ghl.md §3.5). The SSO blob has no
expiry of its own (docs/ghl.md §3.4), which is why it is exchanged at once for a token that does.

A token is not trusted on its own word for long: it lives TOKEN_SECONDS (the page renews it silently
through the same SSO handshake before it expires and on any 401), and every request checks again that
the install still admits the user (``admit_request``) and that the agency's session generation is the
one the token was signed under. An uninstall or a reinstall bumps the generation (billing.agencies), so
no token signed before it works afterwards, even if the install comes back.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

from flask import current_app
from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer

from billing.agencies import find_agency
from billing.models import Agency
from core.rate_limits import count_hit
from ghl.installs import is_agency_installed, is_location_installed, is_location_uninstalled
from ghl.sso import SsoUser

log = logging.getLogger("portal.sessions")

# v2: tokens carry the agency's session generation; v1 tokens (without it) are refused as malformed.
TOKEN_SALT = "rebill.portal.session.v2"
# Minutes, not an hour: a GHL role change or a removed user is picked up at the next renewal.
TOKEN_SECONDS = 600
# One text for every refused sign-in: a different answer for "decrypted, but not installed" would tell
# whoever tampers with payloads that a forged one decrypted to valid JSON.
SIGN_IN_REFUSED = "GoHighLevel sign-in failed; reload the page inside GoHighLevel"
# Sign-ins per client address and minute, counted in the database so all workers share the count. A page
# signs in once when opened and once per TOKEN_SECONDS while open: 30 a minute lets hundreds of pages
# behind one office address work, and keeps a script from probing payloads at speed.
SIGN_INS_PER_WINDOW = 30
SIGN_IN_WINDOW_SECONDS = 60


class SessionRefused(Exception):
    """The user may not open the portal, or the bearer token is missing, forged or expired."""


class SubaccountRequired(Exception):
    """An agency user who is not an admin opened Rebill outside a subaccount."""

    def __init__(self) -> None:
        super().__init__(
            "open Rebill inside one of your subaccounts: agency users who are not admins see one subaccount at a time"
        )


class TooManySignIns(Exception):
    """This client address signed in too often in the current window."""

    def __init__(self, retry_after: int) -> None:
        super().__init__("too many sign-ins from this address; try again in a minute")
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class PortalSession:
    """Who is signed in, for which agency, and what they may see and change."""

    company_id: str
    user_id: str
    role: str
    user_type: str
    active_location: str | None
    # Set when this session may see only one subaccount: a subaccount user, or an agency whose only
    # install is that subaccount (docs/contract.md §3: a location-only install shows that subaccount).
    location_scope: str | None
    generation: int = 0  # the agency's session_generation when the token was signed
    demo: bool = False

    @property
    def can_manage_billing(self) -> bool:
        """Tell whether this user may change billing settings (agency admins only, docs/contract.md §1)."""
        return self.user_type == "agency" and self.role == "admin"

    @property
    def sees_agency_settings(self) -> bool:
        """Tell whether this user may read the agency's own settings (Stripe account, prices, API keys).

        Agency admins only. A subaccount user is the agency's customer; an agency user who is not an admin
        is limited to the subaccount open in GHL (README: Security) and sees it as its customer does, with
        no agency-wide settings or Stripe ids. An admin of an agency that installed Rebill only in some
        subaccounts is limited to one too, but sets the agency's Stripe connection, so reads it.
        """
        return self.can_manage_billing


def open_session(user: SsoUser) -> PortalSession:
    """Admit a decrypted GHL user if Rebill is installed for their agency or their subaccount."""
    agency = find_agency(user.company_id)
    try:
        if agency is None:
            raise SessionRefused("Rebill is not installed for this agency")
        scope = _admitted_scope(user.company_id, user.user_type, user.role, user.active_location)
    except SessionRefused as refused:
        log.info("sign-in refused: %s", refused, extra={"fields": {"company_id": user.company_id}})
        raise SessionRefused(SIGN_IN_REFUSED) from None
    return PortalSession(
        company_id=user.company_id,
        user_id=user.user_id,
        role=user.role,
        user_type=user.user_type,
        active_location=user.active_location,
        location_scope=scope,
        generation=agency.session_generation,
    )


def count_sign_in(address: str | None) -> None:
    """Count a sign-in attempt of a client address; TooManySignIns past the limit. Flushes only."""
    hits, seconds_left = count_hit(f"portal-session:{address or 'unknown'}", window_seconds=SIGN_IN_WINDOW_SECONDS)
    if hits > SIGN_INS_PER_WINDOW:
        raise TooManySignIns(retry_after=max(seconds_left, 1))


def admit_request(session: PortalSession) -> Agency:
    """Return the session's agency if its token still holds: same generation, install still admits it."""
    agency = find_agency(session.company_id)
    if agency is None:
        raise SessionRefused("Rebill is not installed for this agency")
    if session.demo:
        return agency  # the demo agency is seeded, not installed; demo tokens work only in demo mode
    if agency.session_generation != session.generation:
        raise SessionRefused("the session ended (Rebill was uninstalled or reinstalled); reload the page")
    scope = _admitted_scope(session.company_id, session.user_type, session.role, session.active_location)
    if scope != session.location_scope:
        raise SessionRefused("the install changed since this session began; reload the page")
    return agency


def _admitted_scope(company_id: str, user_type: str, role: str, active_location: str | None) -> str | None:
    """Return the subaccount a user is limited to (None: the whole agency); SessionRefused if not admitted.

    Agency admins of an agency-level install see the agency. Everyone else sees the subaccount the page is
    open in, if Rebill is installed there (an installed subaccount row, or an agency-level install with no
    record of that subaccount's uninstall): subaccount users, anyone of an agency that installed Rebill
    only in some subaccounts, and agency users who are not admins. GHL can restrict those to some of the
    agency's subaccounts, and it only lets them open the ones they may see; their list is not in the SSO
    payload, so the one they have open is the scope (README: Security).
    """
    agency_installed = is_agency_installed(company_id)
    if user_type == "agency" and agency_installed:
        if role == "admin":
            return None
        if not active_location:
            raise SubaccountRequired()
    if active_location and (
        is_location_installed(active_location, company_id=company_id)
        or (agency_installed and not is_location_uninstalled(active_location))
    ):
        return active_location
    raise SessionRefused("Rebill is not installed for this agency or subaccount")


def sign_session(session: PortalSession) -> str:
    """Sign a session into a bearer token valid for TOKEN_SECONDS."""
    return _serializer().dumps(asdict(session))


def read_session(token: str) -> PortalSession:
    """Return the session a bearer token carries; SessionRefused if it is forged, malformed or expired."""
    try:
        data = _serializer().loads(token, max_age=TOKEN_SECONDS)
    except SignatureExpired:
        raise SessionRefused("the session expired; reload the page") from None
    except BadSignature:
        raise SessionRefused("the session token is not valid") from None
    try:
        return PortalSession(**data)
    except TypeError:
        raise SessionRefused("the session token is not valid") from None


def _serializer() -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(current_app.config["SECRET_KEY"], salt=TOKEN_SALT)
