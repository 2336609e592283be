"""Rebill's application factory: it reads like a table of contents of the service."""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click
from flask import Flask, jsonify
from flask.logging import default_handler
from sqlalchemy.exc import InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from werkzeug.exceptions import HTTPException
from werkzeug.middleware.proxy_fix import ProxyFix

from core.config import ConfigError, load_settings
from core.database import db, migrate
from core.encryption import SecretBox
from core.json_bodies import StrictJsonProvider
from core.logs import configure_logging

log = logging.getLogger("rebill")

# Token refresh looks an hour ahead (ghl.jobs.REFRESH_AHEAD), so every 10 minutes is plenty.
GHL_JOB_SECONDS = 600
# Webhook deliveries are kept for days (ghl.deliveries.DELIVERY_RETENTION); pruning hourly keeps each run small.
GHL_PRUNE_SECONDS = 3600
# The first retry of an alert delivery is due 30 s after a failure (billing.alerts.FIRST_BACKOFF).
ALERT_DELIVERY_SECONDS = 15


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Build a configured Rebill app; ``config`` overrides defaults and the environment."""
    app = Flask(__name__, instance_relative_config=True)
    app.json = StrictJsonProvider(app)
    Path(app.instance_path).mkdir(parents=True, exist_ok=True)
    settings = load_settings(app.instance_path, config)
    app.config.update(settings)
    app.config["SQLALCHEMY_DATABASE_URI"] = settings["DATABASE_URL"]
    app.config["MAX_CONTENT_LENGTH"] = 8 * 1024 * 1024
    if settings["REBILL_TRUSTED_PROXIES"]:
        # Behind the reverse proxy (deploy/): take the client address and scheme from the headers it sets,
        # trusting only the last REBILL_TRUSTED_PROXIES hops (a client can put anything before them).
        count = settings["REBILL_TRUSTED_PROXIES"]
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=count, x_proto=count)
    configure_logging(settings["REBILL_LOG_LEVEL"])
    # Flask's plain-text handler would print tracebacks outside the JSON lines; the root's handler has them.
    app.logger.removeHandler(default_handler)
    register_extensions(app)
    register_blueprints(app)
    register_metrics(app)
    register_errorhandlers(app)
    register_commands(app)
    return app


def register_extensions(app: Flask) -> None:
    """Bind the unbound extensions to this app."""
    import billing.models  # noqa: F401  (tables must be known to the metadata for migrations)
    import capri.models  # noqa: F401
    import core.rate_limits  # noqa: F401
    import ghl.models  # noqa: F401

    db.init_app(app)
    migrate.init_app(app, db, directory=str(Path(__file__).parent / "migrations"))
    app.extensions["rebill.secret_box"] = SecretBox(app.config["REBILL_ENCRYPTION_KEYS"])


def register_blueprints(app: Flask) -> None:
    """Mount every feature's routes."""
    from billing.stripe_webhooks import blueprint as stripe_webhooks
    from capri.views import blueprint as capri_usage_api
    from core.health import blueprint as health
    from ghl.oauth import blueprint as ghl_oauth
    from ghl.webhooks import MessageWebhookDispatch
    from ghl.webhooks import blueprint as ghl_webhooks
    from portal import money  # noqa: F401  (adds the money routes to the portal API blueprint)
    from portal.api import blueprint as portal_api
    from portal.pages import blueprint as portal_pages

    app.register_blueprint(health)
    app.register_blueprint(ghl_oauth)
    app.register_blueprint(ghl_webhooks)
    app.register_blueprint(stripe_webhooks)
    app.register_blueprint(capri_usage_api)
    app.register_blueprint(portal_pages)
    app.register_blueprint(portal_api)
    # GHL's message webhooks, the one hot route, are answered in front of Flask (ghl.webhooks).
    app.wsgi_app = MessageWebhookDispatch(app, app.wsgi_app)


def register_metrics(app: Flask) -> None:
    """Mount GET /metrics with the database gauges of each package (core.metrics)."""
    from billing.backlog import backlog_gauges
    from core.metrics import blueprint as metrics
    from core.metrics import register_scrape_gauges

    app.register_blueprint(metrics)
    register_scrape_gauges(app, backlog_gauges)


# The database is down, unreachable or out of connections: the same request can succeed later.
DATABASE_UNAVAILABLE = (OperationalError, InterfaceError, PoolTimeout)


def register_errorhandlers(app: Flask) -> None:
    """Answer every error as JSON; an unreachable database is a 503, any other database error a logged 500."""

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException):
        # Keep the error's own headers (a 405's Allow, RFC 9110 §15.5.6), not its HTML content type.
        headers = [(name, value) for name, value in error.get_headers() if name.lower() != "content-type"]
        return jsonify(error=error.description), error.code, headers

    @app.errorhandler(SQLAlchemyError)
    def database_error(error: SQLAlchemyError):
        db.session.rollback()
        if isinstance(error, DATABASE_UNAVAILABLE):
            log.error("database unavailable: %s", type(error).__name__)
            return jsonify(error="the database is unavailable, try again"), 503
        # A value the database refused (a check we lack): a bug to fix, not an outage to wait out.
        log.error("database error", exc_info=error)
        return jsonify(error="internal error"), 500


def register_commands(app: Flask) -> None:
    """Register CLI groups; database failures in any command print one clear line."""
    from billing.alerts import check_spend_alerts, deliver_alerts
    from billing.cli import SCHEDULED_JOBS, rebill_cli
    from billing.stripe_events import retry_failed_events
    from billing.stripe_webhooks import stripe_events_cli
    from capri.cli import api_key_cli
    from core.cli import rotate_keys_command
    from ghl.cli import ghl_cli
    from ghl.deliveries import prune_deliveries
    from ghl.jobs import refresh_expiring_tokens, retry_failed_deliveries
    from portal.demo import demo_command

    # Housekeeping, run by the scheduler holding the housekeeping lock (billing.cli); composed here because
    # billing never imports ghl.
    app.extensions[SCHEDULED_JOBS] = [
        ("ghl-refresh-tokens", refresh_expiring_tokens, GHL_JOB_SECONDS),
        ("ghl-retry-deliveries", retry_failed_deliveries, GHL_JOB_SECONDS),
        ("stripe-retry-events", retry_failed_events, GHL_JOB_SECONDS),
        ("ghl-prune-deliveries", prune_deliveries, GHL_PRUNE_SECONDS),
        # Alerts follow the units a tick logs; deliveries retry on their own backoff (billing.alerts).
        ("spend-alerts", check_spend_alerts, app.config["REBILL_TICK_SECONDS"]),
        ("spend-alert-deliveries", deliver_alerts, ALERT_DELIVERY_SECONDS),
    ]
    rebill_cli.add_command(api_key_cli)
    rebill_cli.add_command(stripe_events_cli)
    rebill_cli.add_command(rotate_keys_command)
    rebill_cli.add_command(demo_command)  # composed here: billing never imports portal
    app.cli.add_command(rebill_cli)
    app.cli.add_command(ghl_cli)
    for command in _walk_commands(app.cli):
        # The groups are module-level and outlive each app: wrap every callback once only.
        if not getattr(command.callback, "rebill_clear_errors", False):
            command.callback = _clear_database_errors(command.callback)


def _walk_commands(group: click.Group):
    for command in group.commands.values():
        if isinstance(command, click.Group):
            yield from _walk_commands(command)
        elif command.callback is not None:
            yield command


def _clear_database_errors(callback):
    """Wrap a CLI callback so a wrong DATABASE_URL is one line, not a traceback wall."""

    @functools.wraps(callback)
    def wrapper(*args, **kwargs):
        try:
            return callback(*args, **kwargs)
        except OperationalError as error:
            reason = str(error.orig).strip().splitlines()[0] if error.orig else str(error)
            raise click.ClickException(f"cannot reach the database at DATABASE_URL: {reason}") from None
        except ConfigError as error:
            raise click.ClickException(str(error)) from None

    wrapper.rebill_clear_errors = True
    return wrapper
