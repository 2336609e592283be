"""``flask --app app rebill api-key …``: create, list and revoke an agency's usage API keys."""

from __future__ import annotations

import click
from flask.cli import AppGroup

from billing.agencies import find_agency
from billing.models import Agency
from capri.api_keys import create_api_key, list_api_keys, revoke_api_key
from core.database import db
from core.errors import ClientInvalid, NotFound

api_key_cli = AppGroup("api-key", help="Usage API keys of an agency.")

company_option = click.option("--company", "company_id", required=True, help="The agency's GHL companyId.")


@api_key_cli.command("create")
@company_option
@click.option("--name", default=None, help="A label to recognise the key by (e.g. 'production').")
def create_command(company_id: str, name: str | None):
    """Create a key and print it once; only its hash is kept."""
    agency = _agency(company_id)
    try:
        api_key, full_key = create_api_key(agency.id, name)
    except ClientInvalid as error:
        raise click.BadParameter(error.errors["name"], param_hint="--name") from None
    db.session.commit()
    click.echo(full_key)
    click.echo(
        f"Created API key {api_key.id} ({api_key.prefix}) for {company_id}. "
        "Store it now: it is shown only this once.",
        err=True,
    )


@api_key_cli.command("list")
@company_option
def list_command(company_id: str):
    """List the agency's keys (prefix, name, last use, status), never the keys themselves."""
    agency = _agency(company_id)
    keys = list_api_keys(agency.id)
    if not keys:
        click.echo(f"no API keys for {company_id}", err=True)
    for api_key in keys:
        status = f"revoked {api_key.revoked_at:%Y-%m-%d %H:%M}Z" if api_key.revoked_at else "active"
        last_used = f"{api_key.last_used_at:%Y-%m-%d %H:%M}Z" if api_key.last_used_at else "never"
        click.echo(
            f"{api_key.id}\t{api_key.prefix}\t{api_key.name or '-'}\t"
            f"created {api_key.created_at:%Y-%m-%d %H:%M}Z\tlast used {last_used}\t{status}"
        )


@api_key_cli.command("revoke")
@company_option
@click.argument("key")
def revoke_command(company_id: str, key: str):
    """Revoke a key, named by its id or its prefix (as `list` shows them)."""
    agency = _agency(company_id)
    key_id = _key_id(agency, key)
    try:
        revoke_api_key(agency.id, key_id)
    except NotFound:
        raise click.ClickException(f"no API key {key!r} for {company_id} (see `rebill api-key list`)") from None
    db.session.commit()
    click.echo(f"revoked API key {key}")


def _agency(company_id: str) -> Agency:
    agency = find_agency(company_id)
    if agency is None:
        raise click.ClickException(
            f"no agency with companyId {company_id!r}: the agency must install Rebill from the GHL marketplace first"
        )
    return agency


def _key_id(agency: Agency, key: str) -> int:
    if key.isascii() and key.isdigit() and len(key) <= 18:
        return int(key)
    for api_key in list_api_keys(agency.id):
        if api_key.prefix == key:
            return api_key.id
    return -1
