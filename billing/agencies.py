"""Agencies: the tenants of Rebill, keyed by their GHL companyId."""

from __future__ import annotations

from sqlalchemy import select, update
from sqlalchemy.dialects import postgresql, sqlite

from billing.models import Agency
from core.database import db, utcnow


def ensure_agency(company_id: str, name: str | None = None) -> Agency:
    """Return the agency for a GHL company, creating it if new (safe under concurrent installs)."""
    if not company_id:
        raise ValueError("company_id is required")
    dialect = postgresql if db.engine.dialect.name == "postgresql" else sqlite
    now = utcnow()
    statement = (
        dialect.insert(Agency)
        .values(company_id=company_id, name=name, created_at=now, updated_at=now)
        .on_conflict_do_nothing(index_elements=["company_id"])
    )
    db.session.execute(statement)
    agency = db.session.scalars(select(Agency).where(Agency.company_id == company_id)).one()
    if name and agency.name != name:
        agency.name = name
    return agency


def find_agency(company_id: str) -> Agency | None:
    """Return the agency for a GHL company, or None."""
    return db.session.scalars(select(Agency).where(Agency.company_id == company_id)).one_or_none()


def mark_agency_installed(agency_id: int) -> None:
    """Record that Rebill is installed again (agency level or a subaccount); a reinstall ends old sessions."""
    db.session.execute(
        update(Agency)
        .where(Agency.id == agency_id, Agency.uninstalled_at.is_not(None))
        .values(uninstalled_at=None, session_generation=Agency.session_generation + 1)
    )


def mark_agency_uninstalled(agency_id: int) -> None:
    """Record that Rebill is installed nowhere in the agency any more; its portal sessions end."""
    db.session.execute(
        update(Agency)
        .where(Agency.id == agency_id)
        .values(uninstalled_at=utcnow(), session_generation=Agency.session_generation + 1)
    )


def end_agency_sessions(agency_id: int) -> None:
    """Make every portal token of the agency signed so far invalid (an uninstall in one of its subaccounts)."""
    db.session.execute(
        update(Agency)
        .where(Agency.id == agency_id)
        .values(session_generation=Agency.session_generation + 1)
    )
