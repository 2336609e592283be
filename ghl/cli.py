"""The ``flask --app app ghl …`` commands: replay webhook deliveries, run the token job, re-sync subaccounts."""

from __future__ import annotations

import datetime as dt

import click
from flask.cli import AppGroup

from core.database import db
from core.delivery_log import replay_command
from ghl.client import GhlError
from ghl.deliveries import DELIVERY_RETENTION, prune_deliveries, replay_deliveries
from ghl.installs import sync_installed_locations
from ghl.jobs import refresh_expiring_tokens

ghl_cli = AppGroup("ghl", help="GoHighLevel integration: webhook replay, tokens, subaccounts.")


ghl_cli.add_command(
    replay_command(
        replay_deliveries,
        noun="webhook delivery",
        help="Process stored GHL webhook deliveries again (default: every one not processed).",
    )
)


@ghl_cli.command("prune-deliveries")
@click.option(
    "--older-than-days",
    type=click.FloatRange(min=0),
    default=DELIVERY_RETENTION.total_seconds() / 86400,
    show_default=True,
    help="Delete processed and ignored deliveries received longer ago than this.",
)
def prune_deliveries_command(older_than_days: float):
    """Delete old processed and ignored webhook deliveries (the scheduler does this hourly)."""
    try:
        pruned = prune_deliveries(older_than=dt.timedelta(days=older_than_days))
    except ValueError as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"pruned={pruned}")


@ghl_cli.command("refresh-tokens")
def refresh_tokens_command():
    """Refresh GHL tokens that expire within the hour and mint missing location tokens."""
    summary = refresh_expiring_tokens()
    click.echo(" ".join(f"{name}={value}" for name, value in vars(summary).items()))


@ghl_cli.command("sync-locations")
@click.option("--company", "company_id", required=True, help="The agency's GHL companyId.")
def sync_locations_command(company_id: str):
    """Re-read an agency's installed subaccounts (names, new installs) from GHL."""
    try:
        count = sync_installed_locations(company_id)
    except (LookupError, GhlError) as error:
        raise click.ClickException(str(error)) from None
    db.session.commit()
    click.echo(f"subaccounts={count}")
