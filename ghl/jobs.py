"""Scheduled GHL work: keep tokens fresh, mint missing location tokens, retry failed webhook deliveries.

Jobs select work by database state, so a missed or doubled run does no harm; each commits its own work.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass

from sqlalchemy import select

from billing.models import Agency
from core.database import db, utcnow
from core.delivery_log import ReplaySummary
from ghl.client import GhlClient, GhlError, ghl_client
from ghl.deliveries import replay_deliveries
from ghl.models import GhlCompanyInstall, GhlLocation, GhlToken
from ghl.tokens import ReauthRequired, StoredCredentials, has_usable_token, refresh_access_token, save_grant

log = logging.getLogger("ghl.jobs")

# About an hour before expiry (docs/ghl.md §1.4): access tokens live ~24 h, so every install's
# refresh token is also renewed daily and never reaches its one-year death by disuse.
REFRESH_AHEAD = dt.timedelta(hours=1)
FAILED_DELIVERY_MAX_ATTEMPTS = 5


@dataclass
class TokenRefreshSummary:
    """What one token job run did."""

    refreshed: int = 0
    needs_reauth: int = 0
    unavailable: int = 0
    minted: int = 0


def refresh_expiring_tokens(
    *, ahead: dt.timedelta = REFRESH_AHEAD, client: GhlClient | None = None
) -> TokenRefreshSummary:
    """Refresh every usable token expiring within ``ahead``, then mint tokens for installed subaccounts
    of agency installs that have none. Safe to run from several processes (row locks + re-read)."""
    summary = TokenRefreshSummary()
    resource_ids = db.session.scalars(
        select(GhlToken.resource_id)
        .where(GhlToken.needs_reauth.is_(False), GhlToken.expires_at <= utcnow() + ahead)
        .order_by(GhlToken.expires_at)
    ).all()
    db.session.rollback()
    if not resource_ids and not _locations_without_token():
        return summary
    client = client or ghl_client()
    for resource_id in resource_ids:
        try:
            refresh_access_token(resource_id, margin=ahead, client=client)
            summary.refreshed += 1
        except ReauthRequired:
            summary.needs_reauth += 1
        except GhlError as error:
            summary.unavailable += 1
            log.warning("token refresh failed; retrying next run",
                        extra={"fields": {"resource_id": resource_id, "error": type(error).__name__}})
    summary.minted = mint_missing_location_tokens(client=client)
    log.info("GHL token job finished", extra={"fields": vars(summary)})
    return summary


def mint_missing_location_tokens(*, client: GhlClient | None = None) -> int:
    """Mint a token for each installed subaccount of an agency install that has none; commits each."""
    minted = 0
    for location_id, company_id in _locations_without_token():
        if not has_usable_token(company_id):
            continue
        try:
            grant = (client or ghl_client()).mint_location_token(
                StoredCredentials(company_id), company_id=company_id, location_id=location_id
            )
        except GhlError as error:
            log.warning("location token mint failed; retrying next run",
                        extra={"fields": {"location_id": location_id, "error": type(error).__name__}})
            continue
        save_grant(grant, company_id=company_id)
        db.session.commit()
        minted += 1
    return minted


def retry_failed_deliveries() -> ReplaySummary:
    """Replay failed (and abandoned) webhook deliveries, each at most FAILED_DELIVERY_MAX_ATTEMPTS times."""
    return replay_deliveries(max_attempts=FAILED_DELIVERY_MAX_ATTEMPTS)


def _locations_without_token() -> list[tuple[str, str]]:
    rows = db.session.execute(
        select(GhlLocation.location_id, Agency.company_id)
        .join(Agency, Agency.id == GhlLocation.agency_id)
        .join(GhlCompanyInstall, GhlCompanyInstall.agency_id == GhlLocation.agency_id)
        .outerjoin(GhlToken, GhlToken.resource_id == GhlLocation.location_id)
        .where(GhlLocation.is_installed.is_(True), GhlCompanyInstall.is_installed.is_(True), GhlToken.id.is_(None))
        .order_by(GhlLocation.id)
    ).all()
    db.session.rollback()
    return [(row.location_id, row.company_id) for row in rows]
