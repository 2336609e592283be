"""Test helpers for Stripe reporting: a shared shiftable clock and builders over the fake Stripe's state."""

from __future__ import annotations

import datetime as dt
import itertools
import time
import uuid
from dataclasses import dataclass

from sqlalchemy import select

from billing.agencies import ensure_agency
from billing.models import Agency, RebillClient, UnitReport
from billing.price_usability import PriceInfo
from billing.reporting import report_pending_units
from billing.stripe_events import register_stripe_events
from billing.units import report_identifier
from core.database import db, utcnow
from core.encryption import secret_box
from stripe_fake import FakeStripeServer

_numbers = itertools.count(1)


# The public URL Rebill registers its Stripe webhook endpoints under in tests.
PUBLIC_URL = "https://rebill.example.test"


def connected(world, **agency):
    """An agency of the world with its Stripe event endpoints registered."""
    setup = world.agency(**agency)
    register_stripe_events(setup.agency, PUBLIC_URL)
    db.session.commit()
    return setup


def tick(world, budget=None, **shift):
    """Commit the test's writes, then run one reporting pass at the world's (shifted) now."""
    if shift:
        world.clock.advance(**shift)
    db.session.commit()
    return report_pending_units(world.clock.now(), budget=budget)


def new_key(prefix: str = "sk_test_") -> str:
    """A fresh key of the given kind (the fake knows it once an account is added for it)."""
    return prefix + uuid.uuid4().hex


def now_ts() -> int:
    """A Unix timestamp a few seconds ago (Stripe refuses event timestamps in the future)."""
    return int(dt.datetime.now(dt.UTC).timestamp()) - 5


def by_id(products) -> dict[str, PriceInfo]:
    """The listed prices by id."""
    return {price.price_id: price for product in products for price in product.prices}


def send(gateway, metered, units=3, identifier="rep-1", formula="sum", attempt=1, timestamp=None):
    """Send units to the meter "ai_units" of ``metered["customer"]`` through the gateway."""
    return gateway.send_meter_units(
        event_name="ai_units", customer_key="stripe_customer_id", value_key="value",
        customer_id=metered["customer"], units=units, identifier=identifier, timestamp=timestamp or now_ts(),
        formula=formula, attempt=attempt,
    )  # fmt: skip


class ShiftedClock:
    """Real time plus an offset: lets a test be 25 hours or 36 days later for both Rebill and the fake."""

    def __init__(self):
        self.offset = dt.timedelta(0)

    def __call__(self) -> float:
        return time.time() + self.offset.total_seconds()

    def now(self) -> dt.datetime:
        """Return the shifted now as an aware UTC datetime."""
        return utcnow() + self.offset

    def advance(self, **delta: float) -> None:
        """Move time forward."""
        self.offset += dt.timedelta(**delta)


@dataclass
class StripeSetup:
    """One agency with its Stripe account in the fake: key, meter (or none for legacy), product and price."""

    agency: Agency
    key: str  # opens the account holding the objects below
    agency_key: str  # what the agency stored (== key unless the test made it unknown to Stripe)
    account_id: str
    product: dict
    price: dict
    meter: dict | None

    @property
    def legacy(self) -> bool:
        return self.meter is None


class StripeWorld:
    """Build Stripe-side and database-side test data together, and read the fake's ledger."""

    def __init__(self, server: FakeStripeServer, clock: ShiftedClock):
        self.server = server
        self.state = server.state
        self.clock = clock

    def agency(
        self,
        company_id: str | None = None,
        *,
        formula: str = "sum",
        legacy: bool = False,
        key: str | None = None,
        denied: tuple[str, ...] = (),
        register_key: bool = True,
        event_name: str = "ai_units",
    ) -> StripeSetup:
        """Create an agency whose encrypted key opens an account in the fake with a metered price."""
        key = key or f"sk_test_{uuid.uuid4().hex}"
        setup_key = key
        if register_key:
            account_id = self.state.add_account(key, denied_permissions=denied)
        else:
            setup_key = f"sk_test_{uuid.uuid4().hex}"  # objects live in an account this agency's key cannot open
            account_id = self.state.add_account(setup_key)
        meter = None if legacy else self.state.create_meter(setup_key, event_name, formula=formula)
        product = self.state.create_product(setup_key, "AI units")
        price = self.state.create_price(setup_key, product, 10, meter=meter)
        agency = ensure_agency(company_id or f"company-{next(_numbers)}")
        agency.stripe_key_ciphertext = secret_box().encrypt(key)
        agency.stripe_key_last4 = key[-4:]
        agency.stripe_mode = "test"
        agency.stripe_key_status = "ok"
        db.session.flush()
        return StripeSetup(
            agency=agency,
            key=setup_key,
            agency_key=key,
            account_id=account_id,
            product=product,
            price=price,
            meter=meter,
        )

    def customer(self, setup: StripeSetup, *, subscribe: bool = True, start: dt.datetime | None = None) -> str:
        """Create a customer, subscribed to the setup's price unless told otherwise; return its id."""
        customer = self.state.create_customer(setup.key, name=f"Customer {next(_numbers)}")
        if subscribe:
            start_date = int((start or self.clock.now() - dt.timedelta(days=1)).timestamp())
            self.state.create_subscription(setup.key, customer, setup.price, start_date=start_date)
        return customer["id"]

    def client(
        self,
        setup: StripeSetup,
        *,
        customer_id: str | None = None,
        source_key: str | None = None,
        billing_unit: int = 1000,
        charge_by: str = "tokens",
    ) -> RebillClient:
        """Insert a client row as create_client leaves it after its Stripe checks (meter fields cached)."""
        number = next(_numbers)
        source_key = source_key or f"chan-{number}"
        meter = setup.meter
        client = RebillClient(
            agency_id=setup.agency.id,
            nickname=f"Client {number}",
            provider="capri_api",
            channel_id=source_key,
            source_key=source_key,
            stripe_product_id=setup.product["id"],
            stripe_price_id=setup.price["id"],
            stripe_customer_id=customer_id or self.customer(setup),
            charge_by=charge_by,
            billing_unit=billing_unit,
            report_mode="legacy" if meter is None else "meter",
            meter_id=meter and meter["id"],
            meter_event_name=meter and meter["event_name"],
            meter_customer_key=meter and meter["customer_mapping"]["event_payload_key"],
            meter_value_key=meter and meter["value_settings"]["event_payload_key"],
            meter_formula=meter and meter["default_aggregation"]["formula"],
        )
        db.session.add(client)
        db.session.flush()
        return client

    def report(
        self, client: RebillClient, units: int, *, at: dt.datetime | None = None, identifier: str | None = None
    ) -> UnitReport:
        """Write an outbox row as aggregation does (next sequence number, due now)."""
        client.report_sequence += 1
        client.units_logged += units
        now = self.clock.now()
        report = UnitReport(
            agency_id=client.agency_id,
            client_id=client.id,
            identifier=identifier or report_identifier(client.report_prefix, client.id, client.report_sequence),
            units=units,
            usage_timestamp=at or now - dt.timedelta(seconds=5),
            status="pending",
            attempts=0,
            next_attempt_at=now - dt.timedelta(seconds=5),
        )
        db.session.add(report)
        db.session.flush()
        return report

    # ---- reading the fake -------------------------------------------------------------------------------

    def stripe_total(self, setup: StripeSetup, client: RebillClient) -> int:
        """Units Stripe holds for this client's customer (meter total, or legacy usage-record total)."""
        if setup.legacy:
            item = self.subscription_item(setup, client.stripe_customer_id)
            return self.state.usage_record_total(setup.key, item)
        return self.state.total_units(setup.key, client.stripe_customer_id, setup.meter["event_name"])

    def subscription_item(self, setup: StripeSetup, customer_id: str) -> str:
        """The customer's subscription item on the setup's price, read from the fake over HTTP."""
        client = self.server.client(setup.key)
        subscriptions = client.v1.subscriptions.list({"customer": customer_id, "price": setup.price["id"]})
        return subscriptions.data[0]["items"].data[0].id

    def calls(self, path: str = "/v1/billing/meter_events", method: str = "POST") -> list:
        """Requests the fake saw on one path (prefix match)."""
        return [call for call in self.state.calls if call.path.startswith(path) and call.method == method]

    def reports(self, client: RebillClient | None = None) -> list[UnitReport]:
        """Outbox rows, fresh from the database, oldest first."""
        db.session.expire_all()
        query = select(UnitReport).order_by(UnitReport.id)
        if client is not None:
            query = query.where(UnitReport.client_id == client.id)
        return list(db.session.scalars(query))

    def agency_row(self, setup: StripeSetup) -> Agency:
        """The agency row, fresh from the database."""
        db.session.expire_all()
        return db.session.get(Agency, setup.agency.id)
