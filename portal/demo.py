"""Demo mode: a demo agency on the built-in fake Stripe, with usage flowing, so a newcomer sees units move.

Development only: core.config refuses REBILL_DEMO outside REBILL_ENV=development, and ``demo_enabled``
checks both again, so a production app can neither open ``/app?demo=1`` nor mint a demo session.
``flask --app app rebill demo`` (started by ``make run``) serves the fake Stripe at STRIPE_API_BASE, seeds
it and the database, then records a little usage every few seconds; the scheduler turns it into units.

Every web worker imports this module (the portal asks whether demo mode is on), so it holds only the mode,
the session and the command; the demo itself, with the fake Stripe, is portal.demo_agency, which only the
command loads, in demo mode.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import click
from flask import Flask, current_app
from flask.cli import with_appcontext

from core.config import is_development
from portal.sessions import PortalSession

DEMO_COMPANY_ID = "demo-agency"
DEMO_AGENCY_NAME = "Demo Agency"
GENERATOR_SECONDS = 5


def demo_session() -> PortalSession:
    """Return the demo agency admin's session (callers check that demo mode is on)."""
    return PortalSession(
        company_id=DEMO_COMPANY_ID,
        user_id="demo-admin",
        role="admin",
        user_type="agency",
        active_location=None,
        location_scope=None,
        demo=True,
    )


def demo_enabled(app: Flask) -> bool:
    """Tell whether demo mode is on: REBILL_DEMO in a development run, never in production."""
    return bool(app.config.get("REBILL_DEMO")) and is_development(app.config)


@click.command("demo")
@click.option("--seconds", default=GENERATOR_SECONDS, show_default=True, help="Seconds between usage rounds.")
@click.option("--rounds", default=0, help="Stop after this many usage rounds (0 = run until interrupted).")
@click.option(
    "--stripe-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Where the fake Stripe is kept between runs (default: demo-stripe.json in the instance folder).",
)
@with_appcontext
def demo_command(seconds: int, rounds: int, stripe_file: Path | None):
    """Serve the fake Stripe at STRIPE_API_BASE, seed the demo agency and keep usage flowing (demo mode)."""
    app = current_app._get_current_object()
    if not demo_enabled(app):
        raise click.ClickException("demo mode is off: run with REBILL_ENV=development REBILL_DEMO=1 (make run)")
    address = urlsplit(app.config["STRIPE_API_BASE"])
    if address.scheme != "http" or address.hostname not in {"127.0.0.1", "localhost"} or not address.port:
        raise click.ClickException("in demo mode STRIPE_API_BASE must be a local http://127.0.0.1:<port> address")
    from portal.demo_agency import run_demo  # the fake Stripe: loaded in demo mode only

    snapshot = stripe_file or Path(app.instance_path) / "demo-stripe.json"
    run_demo(address, app.config["REBILL_PUBLIC_URL"] or "http://127.0.0.1:5000", seconds, rounds, snapshot)
