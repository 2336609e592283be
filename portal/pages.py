"""The page GHL embeds (``GET /app``) and the headers that let GHL, and only GHL-like parents, frame it.

Framing (docs/ghl.md §3.5): no ``X-Frame-Options`` at all (DENY/SAMEORIGIN break the iframe and
ALLOW-FROM is dead), CSP ``frame-ancestors`` instead. GHL's own hosts are fixed; a white-label agency
serves GHL from its own domain, which we learn at install (``Agency.whitelabel_domain``). ``/app`` is one
URL for every agency and we only know who is looking after the SSO handshake, so the header lists GHL's
hosts plus every white-label domain of an agency that installed Rebill. Framing does not authenticate
anyone (the encrypted SSO payload does), but it decides who may hand the page a payload: the page takes
the SSO answer only from its parent window and only from an origin in this same list (rendered into the
page), so another window or frame cannot sign the user into someone else's agency (login CSRF).

Past MAX_WHITELABEL_ANCESTORS domains the header would outgrow proxies' header limits. Then the list
names only the white-label domain the request comes from: a browser loading the iframe sends the
parent's origin as ``Referer`` (the default strict-origin-when-cross-origin policy keeps the origin),
and it is allowed if an agency installed with it. Never ``https:`` (any parent).
"""

from __future__ import annotations

import logging
import re

from flask import Blueprint, Flask, current_app, render_template, request
from sqlalchemy import select

from billing.clients import BILLING_UNIT_MAX, BILLING_UNIT_RULE
from billing.models import Agency
from core.config import ConfigError
from core.database import db
from portal.demo import demo_enabled

log = logging.getLogger("portal.pages")

blueprint = Blueprint("portal_pages", __name__)

# docs/ghl.md §3.5: the standard UI and the white-label hosts GHL itself serves.
GHL_FRAME_ANCESTORS = (
    "https://app.gohighlevel.com",
    "https://*.gohighlevel.com",
    "https://*.leadconnectorhq.com",
    "https://*.msgsndr.com",
)
MAX_WHITELABEL_ANCESTORS = 100
HOSTNAME = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$")
# A CSP host-source: scheme://host[:port] with an optional leading wildcard label, or 'self'.
HOST_SOURCE = re.compile(r"^('self'|https?://(\*\.)?[A-Za-z0-9.-]+(:(\d{1,5}|\*))?)$")


@blueprint.record_once
def check_frame_ancestors_setting(state) -> None:
    """Refuse to start with a REBILL_FRAME_ANCESTORS entry that is not a CSP host source."""
    parse_extra_ancestors(state.app)


@blueprint.get("/")
def landing_page():
    """Say what Rebill is and where to open it (and, in the development demo, link the demo)."""
    response = current_app.make_response(render_template("portal/index.html", demo=demo_enabled(current_app)))
    response.headers["Content-Security-Policy"] = "default-src 'self'; frame-ancestors 'none'"
    return response


@blueprint.get("/app")
def portal_page():
    """Serve the embedded portal; its script runs the SSO handshake with the GHL parent."""
    demo = demo_enabled(current_app) and request.args.get("demo") == "1"
    ancestors = frame_ancestors()
    page = render_template(
        "portal/app.html",
        demo=demo,
        demo_available=demo_enabled(current_app),
        frame_ancestors=ancestors,
        # The open page re-reads its numbers after each scheduler tick.
        refresh_seconds=min(max(current_app.config["REBILL_TICK_SECONDS"], 5), 60),
        billing_unit_max=BILLING_UNIT_MAX,
        billing_unit_rule=BILLING_UNIT_RULE,
    )
    response = current_app.make_response(page)
    response.headers["Content-Security-Policy"] = content_security_policy(ancestors)
    response.headers.pop("X-Frame-Options", None)
    response.headers["Cache-Control"] = "no-store"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


def frame_ancestors() -> list[str]:
    """List who may frame this /app response: GHL, white-label domains, and REBILL_FRAME_ANCESTORS."""
    domains = db.session.scalars(
        select(Agency.whitelabel_domain).where(Agency.whitelabel_domain.is_not(None)).distinct()
    )
    whitelabel = sorted({origin for domain in domains if (origin := whitelabel_origin(domain))})
    if len(whitelabel) > MAX_WHITELABEL_ANCESTORS:
        parent = whitelabel_origin(request.referrer or "")
        whitelabel = [parent] if parent in whitelabel else []
    return ["'self'", *GHL_FRAME_ANCESTORS, *whitelabel, *parse_extra_ancestors(current_app)]


def whitelabel_origin(domain: str) -> str | None:
    """Turn a stored white-label domain (``app.agency.com`` or ``https://app.agency.com/``) into an origin."""
    host = domain.strip().lower().removeprefix("https://").removeprefix("http://").split("/", 1)[0]
    return f"https://{host}" if HOSTNAME.match(host) else None


def content_security_policy(ancestors: list[str]) -> str:
    """Build /app's CSP: our own scripts and styles only, API calls to ourselves, framed by ``ancestors``."""
    return "; ".join(
        [
            "default-src 'self'",
            "script-src 'self'",
            "style-src 'self'",
            "img-src 'self' data:",
            "connect-src 'self'",
            "object-src 'none'",
            "base-uri 'none'",
            "form-action 'self'",
            "frame-ancestors " + " ".join(ancestors),
        ]
    )


def parse_extra_ancestors(app: Flask) -> list[str]:
    """Split REBILL_FRAME_ANCESTORS into CSP host sources; ConfigError on anything else."""
    entries = (app.config.get("REBILL_FRAME_ANCESTORS") or "").split()
    wrong = [entry for entry in entries if not HOST_SOURCE.match(entry)]
    if wrong:
        raise ConfigError(
            f"REBILL_FRAME_ANCESTORS entries must look like https://host[:port] or 'self', not {wrong[0]!r}"
        )
    return entries
