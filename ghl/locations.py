"""Subaccounts (GHL locations) of an agency: what GHL told us through installs, syncs and Location* webhooks."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite

from billing.agencies import ensure_agency
from core.database import db, is_postgresql, utcnow
from ghl.models import GhlLocation
from ghl.payloads import PayloadInvalid, identifier, text

NAME_MAX_LENGTH = 255


def list_subaccounts(agency_id: int) -> list[GhlLocation]:
    """Return the agency's subaccounts where Rebill is installed, by name."""
    return list(
        db.session.scalars(
            select(GhlLocation)
            .where(GhlLocation.agency_id == agency_id, GhlLocation.is_installed.is_(True))
            .order_by(GhlLocation.name, GhlLocation.location_id)
        )
    )


def find_location(location_id: str) -> GhlLocation | None:
    """Return the stored subaccount with this locationId, installed or not."""
    return db.session.scalars(select(GhlLocation).where(GhlLocation.location_id == location_id)).one_or_none()


def upsert_location(
    agency_id: int, location_id: str, *, name: str | None = None, installed: bool | None = None
) -> GhlLocation:
    """Create or update a subaccount (safe under concurrent webhooks); flushes only.

    ``installed``: True marks it installed, False uninstalled (history kept), None leaves the state as is
    (a new row then starts as not installed: GHL told us it exists, not that Rebill is in it).
    """
    now = utcnow()
    dialect = postgresql if is_postgresql() else sqlite
    db.session.execute(
        dialect.insert(GhlLocation)
        .values(
            agency_id=agency_id,
            location_id=location_id,
            name=_clean_name(name),
            is_installed=bool(installed),
            uninstalled_at=None,
            created_at=now,
            updated_at=now,
        )
        .on_conflict_do_nothing(index_elements=["location_id"])
    )
    location = db.session.scalars(
        select(GhlLocation).where(GhlLocation.location_id == location_id).execution_options(populate_existing=True)
    ).one()
    if name and location.name != _clean_name(name):
        location.name = _clean_name(name)
    if installed is True and not location.is_installed:
        location.is_installed = True
        location.uninstalled_at = None
    elif installed is False and location.is_installed:
        location.is_installed = False
        location.uninstalled_at = now
    db.session.flush()
    return location


def record_location_event(event: dict[str, Any]) -> str | None:
    """Handle LocationCreate / LocationUpdate: the subaccount id is ``id``, not ``locationId`` (docs/ghl.md §2.2)."""
    location_id = identifier(event, "id")
    if not location_id:
        raise PayloadInvalid(f"{event.get('type')} without an id")
    name = text(event, "name", NAME_MAX_LENGTH)
    existing = find_location(location_id)
    if existing is not None:
        upsert_location(existing.agency_id, location_id, name=name)
        return None
    company_id = identifier(event, "companyId")
    if not company_id:
        raise PayloadInvalid(f"{event.get('type')} for an unknown subaccount without a companyId")
    upsert_location(ensure_agency(company_id).id, location_id, name=name)
    return None


def _clean_name(name: str | None) -> str | None:
    if not isinstance(name, str):
        return None
    # NUL: PostgreSQL text cannot hold it, and one in a name must not fail the whole webhook.
    return name.replace("\x00", "").strip()[:NAME_MAX_LENGTH] or None
