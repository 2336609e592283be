"""``flask --app app rebill rotate-keys``: re-encrypt every stored secret with the newest key."""

from __future__ import annotations

import click
from flask.cli import with_appcontext

from core.encryption import rotate_stored_secrets


@click.command("rotate-keys")
@with_appcontext
def rotate_keys_command():
    """Re-encrypt every stored secret with the newest REBILL_ENCRYPTION_KEYS key (safe to re-run)."""
    results = rotate_stored_secrets()
    for result in results:
        click.echo(f"{result.column}: rotated={result.rotated} current={result.current} unreadable={result.unreadable}")
    totals = {name: sum(getattr(r, name) for r in results) for name in ("rotated", "current", "unreadable")}
    click.echo(" ".join(f"{name}={value}" for name, value in totals.items()))
    if totals["unreadable"]:
        raise click.ClickException(
            f"{totals['unreadable']} secrets cannot be read with any configured key; "
            "they stay as they are (their owners must reconnect)"
        )
    click.echo("every stored secret is under the newest key: older keys can be removed from REBILL_ENCRYPTION_KEYS")
