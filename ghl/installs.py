"""Installs of Rebill in GHL: the OAuth callback's work, INSTALL / UNINSTALL webhooks, and install state.

INSTALL webhooks may arrive before or after the OAuth callback (docs/ghl.md §2.2), so every step is
an idempotent upsert. Calls to GHL happen before any row is written, so no lock is held across a network
call and a failed call leaves nothing half-written.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite

from billing.agencies import (
    end_agency_sessions,
    ensure_agency,
    find_agency,
    mark_agency_installed,
    mark_agency_uninstalled,
)
from billing.clients import pause_agency_clients, pause_clients_for_location
from billing.models import Agency
from billing.stripe_events import remove_stripe_events
from core.database import db, is_postgresql, utcnow
from ghl.client import GhlClient, GhlError, GhlResponseInvalid, InstalledLocation, TokenGrant, ghl_client
from ghl.locations import find_location, upsert_location
from ghl.models import GhlCompanyInstall, GhlLocation
from ghl.payloads import PayloadInvalid, identifier, text
from ghl.tokens import StoredCredentials, has_usable_token, mark_uninstalled, save_grant

log = logging.getLogger("ghl.installs")


@dataclass
class InstallResult:
    """What an OAuth install stored, for the success page and logs."""

    agency_id: int
    company_id: str
    user_type: str
    location_ids: list[str] = field(default_factory=list)
    tokens_minted: int = 0
    problems: list[str] = field(default_factory=list)


def exchange_authorization_code(code: str, *, client: GhlClient | None = None) -> TokenGrant:
    """Exchange the callback's code for a token pair; raises GhlGrantRejected / GhlUnavailable."""
    grant = (client or ghl_client()).exchange_code(code)
    if not grant.company_id:
        raise GhlResponseInvalid("GHL's token answer has no companyId")
    if grant.user_type == "Location" and not grant.location_id:
        raise GhlResponseInvalid("GHL's Location token answer has no locationId")
    return grant


def record_oauth_install(grant: TokenGrant) -> InstallResult:
    """Store the install a code exchange produced: agency, encrypted token, install state. Flushes only."""
    agency = ensure_agency(grant.company_id)
    save_grant(grant)
    result = InstallResult(agency_id=agency.id, company_id=grant.company_id, user_type=grant.user_type)
    mark_agency_installed(agency.id)
    if grant.user_type == "Company":
        _mark_company_installed(agency.id, plan_id=grant.plan_id)
    else:
        upsert_location(agency.id, grant.location_id, installed=True)
        result.location_ids.append(grant.location_id)
    return result


def complete_install(result: InstallResult, grant: TokenGrant, *, client: GhlClient | None = None) -> InstallResult:
    """Finish an install after its token is committed: sync subaccounts, mint location tokens. Flushes only.

    Company installs: list installedLocations (all pages) with names, mint a location token for each
    approved location that has none. Location installs: fetch the subaccount's name. A failing GHL call
    is noted in ``problems`` and retried later (the INSTALL webhooks and the token job), never fatal.
    """
    client = client or ghl_client()
    if grant.user_type != "Company":
        try:
            details = client.get_location(StoredCredentials(grant.resource_id), grant.resource_id)
        except GhlError as error:
            result.problems.append(f"could not read the subaccount's name: {error}")
        else:
            upsert_location(result.agency_id, grant.resource_id, name=text(details, "name"))
        return result

    company = StoredCredentials(grant.company_id)
    installed: list[InstalledLocation] = []
    try:
        installed = client.installed_locations(company, company_id=grant.company_id)
    except GhlError as error:
        result.problems.append(f"could not list the installed subaccounts: {error}")
    minted: list[TokenGrant] = []
    for location_id in sorted(set(grant.approved_locations)):
        if has_usable_token(location_id):
            continue
        try:
            minted.append(client.mint_location_token(company, company_id=grant.company_id, location_id=location_id))
        except GhlError as error:
            result.problems.append(f"could not get a token for subaccount {location_id}: {error}")
    for location in installed:
        if location.is_installed:
            upsert_location(result.agency_id, location.location_id, name=location.name, installed=True)
    for location_id in grant.approved_locations:
        upsert_location(result.agency_id, location_id, installed=True)
    for location_grant in minted:
        save_grant(location_grant, company_id=grant.company_id)
    result.location_ids = sorted({location.location_id for location in installed} | set(grant.approved_locations))
    result.tokens_minted = len(minted)
    return result


def sync_installed_locations(company_id: str, *, client: GhlClient | None = None) -> int:
    """Re-read the agency's installed subaccounts (names, new installs) from GHL; flushes only."""
    agency = find_agency(company_id)
    if agency is None:
        raise LookupError(f"no agency for company {company_id}")
    installed = (client or ghl_client()).installed_locations(StoredCredentials(company_id), company_id=company_id)
    for location in installed:
        if location.is_installed:
            upsert_location(agency.id, location.location_id, name=location.name, installed=True)
    return len(installed)


def record_install_event(event: dict[str, Any], *, client: GhlClient | None = None) -> str | None:
    """Handle an INSTALL webhook: agency-level (no locationId) or one subaccount of a (bulk) install."""
    company_id = identifier(event, "companyId")
    location_id = identifier(event, "locationId")
    if not company_id:
        # Installs to "future locations" may come without companyId (AppInstall.md); we know it if we
        # have seen the subaccount (LocationCreate, a sync). Otherwise fail: replayable once we know it.
        known = find_location(location_id) if location_id else None
        if known is None:
            raise PayloadInvalid("INSTALL without companyId for a subaccount we do not know yet")
        company_id = db.session.get(Agency, known.agency_id).company_id
    minted = _mint_if_possible(company_id, location_id, client) if location_id else None
    agency = ensure_agency(company_id, name=text(event, "companyName"))
    mark_agency_installed(agency.id)
    details = event.get("whitelabelDetails")
    if event.get("isWhitelabelCompany") and isinstance(details, dict) and text(details, "domain"):
        agency.whitelabel_domain = text(details, "domain")
    if location_id:
        upsert_location(agency.id, location_id, installed=True)
    else:
        _mark_company_installed(agency.id, plan_id=identifier(event, "planId"))
    if minted is not None:
        save_grant(minted, company_id=company_id)
    return None


def record_uninstall_event(event: dict[str, Any]) -> str | None:
    """Handle an UNINSTALL webhook; an agency-level one deactivates all its subaccounts and pauses every
    client, API-channel ones included (history kept)."""
    company_id = identifier(event, "companyId")
    location_id = identifier(event, "locationId")
    if location_id:
        location = find_location(location_id)
        agency = db.session.get(Agency, location.agency_id) if location else None
        agency = agency or (find_agency(company_id) if company_id else None)
        if agency is None:
            return f"UNINSTALL for subaccount {location_id}, which Rebill never knew"
        uninstall_locations(agency.id, [location_id])
        if is_installed_anywhere(agency.id):
            end_agency_sessions(agency.id)
        else:
            mark_agency_uninstalled(agency.id)
        return None
    if not company_id:
        raise PayloadInvalid("UNINSTALL names neither a companyId nor a locationId")
    agency = find_agency(company_id)
    if agency is None:
        return f"UNINSTALL for company {company_id}, which Rebill never knew"
    install = db.session.scalars(select(GhlCompanyInstall).where(GhlCompanyInstall.agency_id == agency.id)).first()
    if install is not None and install.is_installed:
        install.is_installed = False
        install.uninstalled_at = utcnow()
    installed = db.session.scalars(
        select(GhlLocation.location_id).where(GhlLocation.agency_id == agency.id, GhlLocation.is_installed.is_(True))
    ).all()
    uninstall_locations(agency.id, list(installed))
    pause_agency_clients(agency.id)
    remove_stripe_events(agency)  # nobody of the agency can act on its Stripe events any more
    mark_uninstalled([company_id])
    mark_agency_uninstalled(agency.id)
    return None


def uninstall_locations(agency_id: int, location_ids: list[str]) -> None:
    """Mark subaccounts uninstalled, retire their tokens and pause their clients (history kept). Flushes."""
    for location_id in location_ids:
        location = find_location(location_id)
        if location is not None and location.agency_id == agency_id:
            upsert_location(agency_id, location_id, installed=False)
        pause_clients_for_location(agency_id, location_id)
    mark_uninstalled(location_ids)


def is_agency_installed(company_id: str) -> bool:
    """Tell whether Rebill is installed at agency level for this GHL company."""
    return bool(
        db.session.scalar(
            select(GhlCompanyInstall.is_installed)
            .join(Agency, Agency.id == GhlCompanyInstall.agency_id)
            .where(Agency.company_id == company_id)
        )
    )


def is_installed_anywhere(agency_id: int) -> bool:
    """Tell whether Rebill is still installed at agency level or in at least one subaccount of the agency."""
    company = select(GhlCompanyInstall.id).where(
        GhlCompanyInstall.agency_id == agency_id, GhlCompanyInstall.is_installed.is_(True)
    )
    location = select(GhlLocation.id).where(GhlLocation.agency_id == agency_id, GhlLocation.is_installed.is_(True))
    return bool(db.session.scalar(select(company.exists() | location.exists())))


def is_location_installed(location_id: str, company_id: str | None = None) -> bool:
    """Tell whether Rebill is installed in this subaccount (and, if given, that it belongs to company_id)."""
    query = select(GhlLocation.is_installed).where(GhlLocation.location_id == location_id)
    if company_id is not None:
        query = query.join(Agency, Agency.id == GhlLocation.agency_id).where(Agency.company_id == company_id)
    return bool(db.session.scalar(query))


def is_location_uninstalled(location_id: str) -> bool:
    """Tell whether Rebill was uninstalled from this subaccount (known and not installed now)."""
    return db.session.scalar(select(GhlLocation.is_installed).where(GhlLocation.location_id == location_id)) is False


def _mark_company_installed(agency_id: int, *, plan_id: str | None) -> None:
    now = utcnow()
    dialect = postgresql if is_postgresql() else sqlite
    db.session.execute(
        dialect.insert(GhlCompanyInstall)
        .values(agency_id=agency_id, is_installed=True, installed_at=now, created_at=now, updated_at=now)
        .on_conflict_do_nothing(index_elements=["agency_id"])
    )
    install = db.session.scalars(
        select(GhlCompanyInstall)
        .where(GhlCompanyInstall.agency_id == agency_id)
        .execution_options(populate_existing=True)
    ).one()
    if not install.is_installed:
        install.is_installed = True
        install.installed_at = now
        install.uninstalled_at = None
    if plan_id:
        install.plan_id = plan_id
    db.session.flush()


def _mint_if_possible(company_id: str, location_id: str, client: GhlClient | None) -> TokenGrant | None:
    """Mint a location token when the company token is stored and the location has no usable one.

    The SDKs' webhook managers do this on every per-location INSTALL (docs/ghl.md §1.5). Without a company token yet
    (INSTALL before the callback), the callback mints for approvedLocations; a failure here is retried
    by the token job, so it never fails the delivery.
    """
    if not has_usable_token(company_id) or has_usable_token(location_id):
        return None
    try:
        return (client or ghl_client()).mint_location_token(
            StoredCredentials(company_id), company_id=company_id, location_id=location_id
        )
    except GhlError as error:
        log.warning(
            "could not mint a location token on INSTALL",
            extra={"fields": {"location_id": location_id, "error": str(error)}},
        )
        return None
