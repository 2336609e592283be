"""Portal sessions: a GHL user context, checked against our installs, becomes a short-lived bearer token.

No cookies: inside the GHL iframe our cookies are third-party and browsers drop them, so the page keeps
the token in memory and sends ``Authorization: Bearer`` (docs/ghl.md §3.5). The SSO blob has no
expiry of its own (docs/ghl.md §3.4), which is why it is exchanged at once for a token that does.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from flask import current_app
from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer

from billing.agencies import find_agency
from billing.models import Agency
from ghl.installs import is_agency_installed, is_location_installed
from ghl.sso import SsoUser

TOKEN_SALT = "rebill.portal.session.v1"
TOKEN_SECONDS = 3600


class SessionRefused(Exception):
    """The user may not open the portal, or the bearer token is missing, forged or expired."""


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
    demo: bool = False

    @property
    def can_manage_billing(self) -> bool:
        """Tell whether this user may change billing settings (agency admins only, docs/contract.md §1)."""
        return self.user_type == "agency" and self.role == "admin"

    @property
    def sees_agency_settings(self) -> bool:
        """Tell whether this user may read the agency's own settings (Stripe account, prices, API keys).

        Agency users only: a subaccount user is the agency's customer and sees their subaccount only.
        """
        return self.user_type == "agency"


def open_session(user: SsoUser) -> PortalSession:
    """Admit a decrypted GHL user if Rebill is installed for their agency or their subaccount."""
    if find_agency(user.company_id) is None:
        raise SessionRefused("Rebill is not installed for this agency")
    agency_installed = is_agency_installed(user.company_id)
    if user.user_type == "agency" and agency_installed:
        scope = None
    elif user.active_location and (
        agency_installed or is_location_installed(user.active_location, company_id=user.company_id)
    ):
        scope = user.active_location
    else:
        raise SessionRefused("Rebill is not installed for this agency or subaccount")
    return PortalSession(
        company_id=user.company_id,
        user_id=user.user_id,
        role=user.role,
        user_type=user.user_type,
        active_location=user.active_location,
        location_scope=scope,
    )


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


def session_agency(session: PortalSession) -> Agency:
    """Return the session's agency; SessionRefused if it no longer exists."""
    agency = find_agency(session.company_id)
    if agency is None:
        raise SessionRefused("Rebill is not installed for this agency")
    return agency


def _serializer() -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(current_app.config["SECRET_KEY"], salt=TOKEN_SALT)
