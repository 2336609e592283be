"""Stored GHL tokens: encrypted at rest, decrypted only in memory, refreshed under a row lock.

GHL refresh tokens rotate and are single-use (docs/ghl.md §1.4): two workers refreshing the same
install at once would leave one holding a dead refresh token. So a refresh takes the token row's lock,
re-reads it, and calls GHL only if nobody refreshed it meanwhile; the new pair is committed in its own
transaction right away, because losing it to a caller's rollback would kill the install.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from core.database import db, is_postgresql, utcnow
from core.encryption import secret_box
from core.metrics import GHL_TOKEN_REFRESHES
from ghl.client import GhlClient, GhlError, GhlGrantRejected, GhlRejected, TokenGrant, ghl_client
from ghl.models import GhlToken

log = logging.getLogger("ghl.tokens")

# Refresh this long before expiry (the SDKs use 30 s; a margin covers clock skew and slow calls).
REFRESH_MARGIN = dt.timedelta(minutes=5)
UNINSTALLED_REASON = "uninstalled"
# SQLite's write lock is database-wide, so a row lock there would make a nested company refresh (inside
# a location re-mint) wait on itself; SQLite is the single-process development backend, so a process
# lock serialises refreshes instead. PostgreSQL uses SELECT … FOR UPDATE.
_SQLITE_REFRESH_LOCK = threading.RLock()


class TokenMissing(GhlError):
    """No token is stored for this company or location."""


class ReauthRequired(GhlError):
    """The stored token is dead (GHL refused its refresh, or the app was uninstalled); the agency must reinstall."""


@dataclass(frozen=True, slots=True)
class StoredCredentials:
    """Credentials backed by the ghl_token row of one company or location."""

    resource_id: str

    def access_token(self) -> str:
        """Return a usable access token, refreshing it first if it expires soon."""
        return access_token(self.resource_id)

    def refreshed_access_token(self, rejected: str) -> str:
        """Return a token newer than the one GHL just rejected with 401."""
        return refresh_access_token(self.resource_id, rejected=rejected)


def save_grant(grant: TokenGrant, *, company_id: str | None = None) -> None:
    """Store (insert or replace) a token pair, encrypted, and clear any needs-reauth mark. Flushes only."""
    company = grant.company_id or company_id
    if not company:
        raise ValueError("a GHL token must belong to a company")
    box = secret_box()
    now = utcnow()
    values = {
        "user_type": grant.user_type,
        "company_id": company,
        "location_id": grant.location_id if grant.user_type == "Location" else None,
        "access_token_ciphertext": box.encrypt(grant.access_token),
        "refresh_token_ciphertext": box.encrypt(grant.refresh_token) if grant.refresh_token else None,
        "expires_at": now + dt.timedelta(seconds=grant.expires_in),
        "scope": grant.scope,
        "needs_reauth": False,
        "reauth_reason": None,
        "refreshed_at": now,
        "updated_at": now,
    }
    dialect = postgresql if is_postgresql() else sqlite
    statement = dialect.insert(GhlToken).values(resource_id=grant.resource_id, created_at=now, **values)
    db.session.execute(statement.on_conflict_do_update(index_elements=["resource_id"], set_=values))


def has_usable_token(resource_id: str) -> bool:
    """Tell whether a token is stored for the resource and not marked as needing reauthorisation."""
    needs_reauth = db.session.scalar(select(GhlToken.needs_reauth).where(GhlToken.resource_id == resource_id))
    return needs_reauth is False


def mark_uninstalled(resource_ids: list[str]) -> None:
    """Retire the tokens of uninstalled resources (kept, never deleted; a reinstall replaces them). Flushes."""
    if not resource_ids:
        return
    for token in db.session.scalars(select(GhlToken).where(GhlToken.resource_id.in_(resource_ids))):
        token.needs_reauth = True
        token.reauth_reason = UNINSTALLED_REASON
    db.session.flush()


def access_token(resource_id: str, *, client: GhlClient | None = None) -> str:
    """Return a usable access token for a company or location, refreshing it first if it expires soon."""
    row = db.session.execute(
        select(GhlToken.access_token_ciphertext, GhlToken.expires_at, GhlToken.needs_reauth, GhlToken.reauth_reason)
        .where(GhlToken.resource_id == resource_id)
    ).one_or_none()
    if row is None:
        raise TokenMissing(f"no GHL token stored for {resource_id}")
    if row.needs_reauth:
        raise ReauthRequired(f"the GHL token for {resource_id} needs reauthorisation ({row.reauth_reason})")
    if row.expires_at - utcnow() > REFRESH_MARGIN:
        return secret_box().decrypt(row.access_token_ciphertext)
    return refresh_access_token(resource_id, client=client)


def refresh_access_token(
    resource_id: str,
    *,
    rejected: str | None = None,
    margin: dt.timedelta = REFRESH_MARGIN,
    client: GhlClient | None = None,
) -> str:
    """Refresh a token under its row lock, unless a concurrent caller already did; return the access token.

    ``rejected``: the access token GHL just answered 401 to; refresh unless the stored one differs.
    Without it, refresh only if the token expires within ``margin``. A refused refresh marks the token
    needs_reauth (committed, never deleted) and raises ReauthRequired; GhlUnavailable leaves it as is.
    """
    box = secret_box()
    with _refresh_lock(), Session(db.engine, expire_on_commit=False) as session:
        with session.begin():
            token = session.scalars(
                select(GhlToken).where(GhlToken.resource_id == resource_id).with_for_update()
            ).one_or_none()
            if token is None:
                raise TokenMissing(f"no GHL token stored for {resource_id}")
            if token.needs_reauth:
                raise ReauthRequired(f"the GHL token for {resource_id} needs reauthorisation ({token.reauth_reason})")
            current = box.decrypt(token.access_token_ciphertext)
            if rejected is None and token.expires_at - utcnow() > margin:
                return current  # refreshed by someone else while we waited for the lock
            if rejected is not None and current != rejected:
                return current  # someone else replaced the rejected token already
            try:
                grant = _renew(token, client or ghl_client())
            except GhlGrantRejected as error:
                token.needs_reauth = True
                token.reauth_reason = f"refresh refused: {error}"[:500]
                refused = error
            except GhlError:  # GHL unreachable or failing: the token stays as it is
                GHL_TOKEN_REFRESHES.labels("unavailable").inc()
                raise
            else:
                _apply(token, grant)
                GHL_TOKEN_REFRESHES.labels("refreshed").inc()
                log.info("GHL token refreshed", extra={"fields": {"resource_id": resource_id}})
                return grant.access_token
        # The needs_reauth mark is committed by now; tell the caller.
        GHL_TOKEN_REFRESHES.labels("reauth_required").inc()
        log.warning("GHL token needs reauthorisation", extra={"fields": {"resource_id": resource_id}})
        raise ReauthRequired(f"GHL refused to refresh the token for {resource_id}: {refused}") from None


def _renew(token: GhlToken, client: GhlClient) -> TokenGrant:
    """Refresh with the stored refresh token; a refused location refresh falls back to a re-mint."""
    box = secret_box()
    refresh_token = box.decrypt(token.refresh_token_ciphertext) if token.refresh_token_ciphertext else None
    if token.user_type != "Location":
        if not refresh_token:
            raise GhlGrantRejected("no refresh token stored")
        return client.refresh(refresh_token, user_type=token.user_type, company_id=token.company_id)
    refused: GhlGrantRejected | None = None
    if refresh_token:
        try:
            return client.refresh(refresh_token, user_type="Location", company_id=token.company_id)
        except GhlGrantRejected as error:
            refused = error
    # The official SDKs fall back to /oauth/locationToken when a location refresh fails (docs/ghl.md §1.4).
    try:
        return _mint(token.company_id, token.resource_id, client)
    except (TokenMissing, ReauthRequired, GhlRejected) as error:
        raise GhlGrantRejected(f"{refused or 'no refresh token'}; re-mint failed: {error}") from None


def _mint(company_id: str, location_id: str, client: GhlClient) -> TokenGrant:
    return client.mint_location_token(StoredCredentials(company_id), company_id=company_id, location_id=location_id)


def _apply(token: GhlToken, grant: TokenGrant) -> None:
    box = secret_box()
    now = utcnow()
    token.access_token_ciphertext = box.encrypt(grant.access_token)
    if grant.refresh_token:
        token.refresh_token_ciphertext = box.encrypt(grant.refresh_token)
    token.expires_at = now + dt.timedelta(seconds=grant.expires_in)
    token.scope = grant.scope or token.scope
    token.needs_reauth = False
    token.reauth_reason = None
    token.refreshed_at = now


def _refresh_lock() -> AbstractContextManager:
    return nullcontext() if is_postgresql() else _SQLITE_REFRESH_LOCK
