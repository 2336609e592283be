"""Agency API keys for the usage API: created once, shown once, stored only as a hash with a visible prefix.

A key reads ``rbk_<prefix>_<secret>``: ``prefix`` (12 characters) is stored in clear so the portal and the
CLI can name a key without knowing it, and is the indexed lookup; ``secret`` is 43 characters drawn with
``secrets`` from a 62-letter alphabet (256 bits). Both parts use only letters and digits, so a double click
selects the whole key and ``_`` separates the parts unambiguously.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import logging
import secrets
import string

from sqlalchemy import or_, select, update

from billing.models import Agency, is_row_id
from capri.models import ApiKey
from core.database import db, utcnow
from core.errors import ClientInvalid, NotFound

KEY_SCHEME = "rbk"
PREFIX_LENGTH = 12
SECRET_LENGTH = 43  # 43 * log2(62) = 256 bits
KEY_ALPHABET = string.ascii_letters + string.digits
KEY_LENGTH = len(KEY_SCHEME) + 1 + PREFIX_LENGTH + 1 + SECRET_LENGTH
NAME_MAX_LENGTH = 120
# last_used_at is for people ("used today?"), not for auditing each request: refreshing it at most once a
# minute keeps the hot path of the usage API free of a write per request.
LAST_USED_RESOLUTION = dt.timedelta(minutes=1)

log = logging.getLogger("capri.api_keys")


def create_api_key(agency_id: int, name: str | None = None) -> tuple[ApiKey, str]:
    """Create a key for an agency; return the row and the full key, which is never retrievable again."""
    if db.session.get(Agency, agency_id) is None:
        raise NotFound("agency not found")
    name = (name or "").strip() or None
    if name is not None and len(name) > NAME_MAX_LENGTH:
        raise ClientInvalid({"name": f"at most {NAME_MAX_LENGTH} characters"})
    # 62^12 ≈ 3·10^21 prefixes: a collision (the unique constraint would refuse it) is not worth a retry loop.
    prefix = f"{KEY_SCHEME}_{_random_text(PREFIX_LENGTH)}"
    full_key = f"{prefix}_{_random_text(SECRET_LENGTH)}"
    api_key = ApiKey(agency_id=agency_id, name=name, prefix=prefix, key_hash=hash_api_key(full_key))
    db.session.add(api_key)
    db.session.flush()
    return api_key, full_key


def revoke_api_key(agency_id: int, key_id: int) -> None:
    """Revoke one of the agency's keys; revoking twice keeps the first time. Other agencies' ids → NotFound."""
    if not is_row_id(key_id):
        raise NotFound("API key not found")
    api_key = db.session.scalars(
        select(ApiKey).where(ApiKey.id == key_id, ApiKey.agency_id == agency_id)
    ).one_or_none()
    if api_key is None:
        raise NotFound("API key not found")
    if api_key.revoked_at is None:
        api_key.revoked_at = utcnow()
        db.session.flush()


def list_api_keys(agency_id: int) -> list[ApiKey]:
    """Return all of the agency's keys, newest first, revoked ones included (``revoked_at`` set)."""
    return list(
        db.session.scalars(
            select(ApiKey).where(ApiKey.agency_id == agency_id).order_by(ApiKey.created_at.desc(), ApiKey.id.desc())
        )
    )


def authenticate(bearer: str) -> ApiKey | None:
    """Return the live key a bearer token names, or None (unknown, revoked, agency uninstalled); touch its use.

    The last use is refreshed at most once a minute.
    """
    prefix = _prefix_of(bearer)
    if prefix is None:
        return None
    row = db.session.execute(
        select(ApiKey, Agency.uninstalled_at).join(Agency, Agency.id == ApiKey.agency_id).where(ApiKey.prefix == prefix)
    ).one_or_none()
    api_key, agency_uninstalled_at = row if row is not None else (None, None)
    # Compare the hashes in constant time, so response timing tells nothing about how much of a guess matched.
    if api_key is None or not hmac.compare_digest(api_key.key_hash, hash_api_key(bearer)):
        return None
    if agency_uninstalled_at is not None:
        # The agency removed Rebill: nothing it sends is billed until it installs again.
        log.info("API key of an uninstalled agency used", extra={"fields": {"agency_id": api_key.agency_id}})
        return None
    if api_key.revoked_at is not None:
        # Ids only: an operator can tell the agency which of its integrations still uses a revoked key.
        log.info("revoked API key used", extra={"fields": {"api_key_id": api_key.id, "agency_id": api_key.agency_id}})
        return None
    _touch(api_key)
    return api_key


def hash_api_key(full_key: str) -> str:
    """Return the stored form of a key: hex SHA-256.

    A plain fast hash is right here, unlike for passwords: the key carries 256 random bits, so there is no
    dictionary to try and brute force is hopeless, and a slow KDF (bcrypt, scrypt) would only add its cost to
    every usage request.
    """
    return hashlib.sha256(full_key.encode()).hexdigest()


def _prefix_of(bearer: str) -> str | None:
    """Return the prefix of a well-formed key, or None for anything that cannot be one of ours."""
    if not isinstance(bearer, str) or len(bearer) != KEY_LENGTH:
        return None
    parts = bearer.split("_")
    if len(parts) != 3 or parts[0] != KEY_SCHEME:
        return None
    if len(parts[1]) != PREFIX_LENGTH or len(parts[2]) != SECRET_LENGTH:
        return None
    if not all(character in KEY_ALPHABET for character in parts[1] + parts[2]):
        return None
    return f"{parts[0]}_{parts[1]}"


def _touch(api_key: ApiKey) -> None:
    """Record a use when the last recorded one is older than the resolution (a guarded UPDATE, no read-modify)."""
    now = utcnow()
    threshold = now - LAST_USED_RESOLUTION
    if api_key.last_used_at is not None and api_key.last_used_at > threshold:
        return
    # The WHERE makes concurrent requests cheap: after the first one commits, the others update no row.
    db.session.execute(
        update(ApiKey)
        .where(ApiKey.id == api_key.id, or_(ApiKey.last_used_at.is_(None), ApiKey.last_used_at <= threshold))
        .values(last_used_at=now)
    )


def _random_text(length: int) -> str:
    return "".join(secrets.choice(KEY_ALPHABET) for _ in range(length))
