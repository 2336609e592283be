"""Portal fixtures: installed agencies on a seeded fake Stripe, and signed-in GHL users."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from billing.agencies import ensure_agency
from core.database import db
from ghl.installs import record_install_event
from ghl.locations import upsert_location
from portal.demo_agency import seed_fake_stripe
from tests.portal.cryptojs import ghl_sso_payload

SHARED_SECRET = "test-shared-secret"  # tests/conftest.py base_config's GHL_SHARED_SECRET


@dataclass
class Tenant:
    """An installed agency with its own fake Stripe account."""

    company_id: str
    agency_id: int
    stripe_key: str
    product_id: str
    price_id: str
    licensed_price_id: str
    customer_id: str
    location_id: str


@pytest.fixture
def portal_app(make_app, fake_stripe):
    """The app, talking to the fake Stripe."""
    return make_app(STRIPE_API_BASE=fake_stripe.url)


@pytest.fixture
def portal_client(portal_app):
    """A test client of the portal app."""
    return portal_app.test_client()


def install_tenant(app, fake_stripe, company_id: str, *, agency_install: bool = True) -> Tenant:
    """Install Rebill for an agency (or only one subaccount of it) and seed its own fake Stripe account."""
    stripe_key = f"sk_test_{company_id.replace('-', '')}0000000000"
    seeded = seed_fake_stripe(fake_stripe.state, stripe_key, account_id=f"acct_{company_id.replace('-', '')}")
    location_id = f"{company_id}-loc-1"
    with app.app_context():
        agency = ensure_agency(company_id, f"Agency {company_id}")
        if agency_install:
            record_install_event({"type": "INSTALL", "companyId": company_id})
        else:
            record_install_event({"type": "INSTALL", "companyId": company_id, "locationId": location_id})
        upsert_location(agency.id, location_id, name=f"Subaccount of {company_id}", installed=True)
        db.session.commit()
        agency_id = agency.id
    return Tenant(
        company_id=company_id,
        agency_id=agency_id,
        stripe_key=stripe_key,
        product_id=seeded.product_id,
        price_id=seeded.price_id,
        licensed_price_id=seeded.licensed_price_id,
        customer_id=next(iter(seeded.customer_ids.values())),
        location_id=location_id,
    )


@pytest.fixture
def tenant_a(portal_app, fake_stripe) -> Tenant:
    """Agency A, installed at agency level."""
    return install_tenant(portal_app, fake_stripe, "company-a")


@pytest.fixture
def tenant_b(portal_app, fake_stripe) -> Tenant:
    """Agency B, installed at agency level."""
    return install_tenant(portal_app, fake_stripe, "company-b")


def sso_payload(company_id: str, *, role: str = "admin", user_type: str = "agency", location: str | None = None,
                user_id: str = "user-1", secret: str = SHARED_SECRET) -> str:
    """Encrypt a GHL user context exactly as GHL does."""
    user = {"userId": user_id, "companyId": company_id, "role": role, "type": user_type,
            "userName": "Pat Example", "email": "pat@example.com"}
    if location:
        user["activeLocation"] = location
    return ghl_sso_payload(secret, **user)


def sign_in(client, company_id: str, **user) -> dict:
    """Sign in through POST /api/portal/session and return the Authorization header."""
    answer = client.post("/api/portal/session", json={"payload": sso_payload(company_id, **user)})
    assert answer.status_code == 200, answer.get_json()
    return {"Authorization": f"Bearer {answer.get_json()['token']}"}


def client_fields(tenant: Tenant, **overrides) -> dict:
    """Valid "Add User" fields for a Capri API client of the tenant."""
    fields = {
        "nickname": "Acme",
        "provider": "capri_api",
        "channel_id": "chan-acme",
        "stripe_product_id": tenant.product_id,
        "stripe_price_id": tenant.price_id,
        "stripe_customer_id": tenant.customer_id,
        "charge_by": "tokens",
        "billing_unit": 1000,
    }
    fields.update(overrides)
    return fields
