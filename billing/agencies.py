"""Agencies: the tenants of Rebill, keyed by their GHL companyId."""

from __future__ import annotations

from sqlalchemy import select
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
