"""The demo agency on the built-in fake Stripe: seed both, then keep a little usage flowing.

Loaded only by ``flask rebill demo`` once demo mode is confirmed (portal.demo): it imports the fake Stripe,
which no production process needs.
"""

from __future__ import annotations

import random
import signal
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import SplitResult

import click

from billing.agencies import ensure_agency
from billing.clients import create_client, list_clients, update_client
from billing.ledger import UsageRecord, record_usage
from billing.models import Agency
from billing.states import Provider, UsageSource
from billing.stripe_connection import connect_stripe_key
from billing.stripe_events import register_stripe_events
from core.database import db, utcnow
from core.errors import RebillError
from ghl.locations import upsert_location
from portal.demo import DEMO_AGENCY_NAME, DEMO_COMPANY_ID
from stripe_fake import FakeStripeServer, FakeStripeState, SignedDelivery

DEMO_STRIPE_KEY = "sk_test_rebilldemo0000000000000000"
DEMO_ACCOUNT_ID = "acct_rebilldemo"
DEMO_METER_EVENT = "rebill_demo_units"
DEMO_LOCATIONS = {"demo-loc-bright": "Bright Smiles Dental", "demo-loc-sunny": "Sunny Side Realty"}
DEMO_CHANNEL = "demo-chat-acme"
DEMO_UNMAPPED_CHANNEL = "demo-chat-newco"
# After this many usage rounds the demo's fake Stripe fails Bright Smiles' invoice payment and delivers the
# signed invoice.payment_failed event to Rebill's webhook endpoint, so the portal shows a payment failure.
PAYMENT_FAILURE_ROUND = 6
PAYMENT_FAILURE_CLIENT = "Bright Smiles"
DEMO_ID_SEED = "rebill-demo"


@dataclass(frozen=True)
class DemoStripe:
    """What the fake Stripe holds for the demo agency."""

    api_key: str
    product_id: str
    price_id: str  # metered, on a sum meter: usable
    licensed_price_id: str  # a flat monthly price: shown, but disabled with the reason
    customer_ids: dict[str, str]  # customer name → cus_…


def seed_fake_stripe(
    state: FakeStripeState, api_key: str = DEMO_STRIPE_KEY, account_id: str = DEMO_ACCOUNT_ID
) -> DemoStripe:
    """Give a fake Stripe account a meter, a product with a metered and a licensed price, and customers."""
    state.add_account(api_key, account_id=account_id, display_name="Demo Agency (fake Stripe)")
    meter = state.create_meter(api_key, DEMO_METER_EVENT, display_name="AI usage units")
    product = state.create_product(api_key, name="AI usage")
    price = state.create_price(api_key, product, unit_amount=10, meter=meter)  # $0.10 per unit per month
    licensed = state.create_price(api_key, product, unit_amount=4900, metered=False)
    customers = {}
    for name in ("Acme Chat Co", *DEMO_LOCATIONS.values()):
        customer = state.create_customer(api_key, name=name, email=f"billing@{name.split()[0].lower()}.example")
        state.create_subscription(api_key, customer, price)
        customers[name] = customer["id"]
    return DemoStripe(api_key, product["id"], price["id"], licensed["id"], customers)


def seed_demo_agency(stripe: DemoStripe, public_url: str | None = None) -> Agency:
    """Create (or re-point at a fresh fake Stripe) the demo agency, its subaccounts and clients; flushes.

    With ``public_url`` (where Rebill's web process answers) its Stripe events are registered there too.
    """
    agency = ensure_agency(DEMO_COMPANY_ID, DEMO_AGENCY_NAME)
    for location_id, name in DEMO_LOCATIONS.items():
        upsert_location(agency.id, location_id, name=name, installed=True)
    connect_stripe_key(agency, stripe.api_key)
    if public_url:
        register_stripe_events(agency, public_url)
    wanted = [
        {
            "nickname": "Acme Chat Co",
            "provider": Provider.CAPRI_API,
            "channel_id": DEMO_CHANNEL,
            "charge_by": "tokens",
            "billing_unit": 1000,
            "stripe_customer_id": stripe.customer_ids["Acme Chat Co"],
        },
        {
            "nickname": "Bright Smiles",
            "provider": "ghl",
            "location_id": "demo-loc-bright",
            "charge_by": "messages",
            "message_source": "platform",
            "billing_unit": 5,
            "stripe_customer_id": stripe.customer_ids[DEMO_LOCATIONS["demo-loc-bright"]],
        },
    ]
    existing = {client.nickname: client for client in list_clients(agency)}
    for fields in wanted:
        fields |= {"stripe_product_id": stripe.product_id, "stripe_price_id": stripe.price_id}
        client = existing.get(fields["nickname"])
        if client is None:
            create_client(agency, fields)
        else:
            # The fake Stripe starts empty on every run: point the client at this run's ids.
            update_client(agency, client.id, {key: fields[key] for key in fields if key.startswith("stripe_")})
    return agency


def generate_demo_usage(agency: Agency, rng: random.Random) -> int:
    """Record one round of demo usage (a mapped channel, a mapped subaccount, an unmapped channel); flushes."""
    usage = [
        {"channel_id": DEMO_CHANNEL, "input_tokens": rng.randint(300, 900), "output_tokens": rng.randint(100, 500),
         "messages": 1},
        {"location_id": "demo-loc-bright", "input_tokens": rng.randint(50, 200), "output_tokens": rng.randint(50, 200),
         "messages": rng.randint(1, 3)},
        {"channel_id": DEMO_UNMAPPED_CHANNEL, "input_tokens": rng.randint(100, 400),
         "output_tokens": rng.randint(50, 150), "messages": 1},
    ]
    now = utcnow()
    records = [
        UsageRecord(
            source=UsageSource.USAGE_API, source_event_id=f"demo-{uuid.uuid4()}", occurred_at=now, model="gpt-4o-mini",
            **row,
        )
        for row in usage
    ]
    return sum(record_usage(agency.id, records))


def demo_payment_failure(state: FakeStripeState, stripe: DemoStripe) -> list[SignedDelivery]:
    """Fail one demo customer's invoice in the fake Stripe: the signed events to deliver to Rebill."""
    customer = stripe.customer_ids[DEMO_LOCATIONS["demo-loc-bright"]]
    return state.invoice_event(stripe.api_key, "invoice.payment_failed", customer)


def open_demo_stripe(snapshot: Path) -> tuple[FakeStripeState, DemoStripe]:
    """Return the demo's fake Stripe as the last run left it (``snapshot``), or freshly seeded.

    Ids are repeatable either way (the same seed calls give the same ids), so clients added in the demo keep
    pointing at customers and prices that exist after a restart.
    """
    state = FakeStripeState(id_seed=DEMO_ID_SEED)
    if snapshot.exists():
        try:
            return state, DemoStripe(**state.load(snapshot))
        except (ValueError, KeyError, TypeError) as error:
            click.echo(f"demo: {snapshot} is unreadable ({error!r}); starting the fake Stripe afresh")
            state = FakeStripeState(id_seed=DEMO_ID_SEED)
    return state, seed_fake_stripe(state)


def run_demo(address: SplitResult, public_url: str, seconds: int, rounds: int, snapshot: Path) -> None:
    """Serve the fake Stripe at ``address`` (kept in ``snapshot`` across runs), seed it and the demo agency
    (events to ``public_url``), record usage."""
    state, stripe = open_demo_stripe(snapshot)
    server = FakeStripeServer(state, host=address.hostname, port=address.port).start()
    click.echo(f"demo: fake Stripe on {server.url} (kept in {snapshot})")
    try:
        agency = seed_demo_agency(stripe, public_url)
        db.session.commit()
    except RebillError as error:
        server.stop()
        raise click.ClickException(f"could not seed the demo agency: {error}") from None
    # `make run` ends its processes with SIGTERM: leave through `finally`, which saves the fake Stripe.
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    click.echo(f"demo: agency {DEMO_AGENCY_NAME!r} ready; open /app?demo=1. Usage every {seconds}s.")
    rng, done, undelivered = random.Random(), 0, []
    try:
        while True:
            generate_demo_usage(agency, rng)
            db.session.commit()
            done += 1
            if done == PAYMENT_FAILURE_ROUND:
                undelivered = demo_payment_failure(server.state, stripe)
                click.echo(f"demo: Stripe failed {PAYMENT_FAILURE_CLIENT}'s invoice payment; telling Rebill")
            # Like Stripe, deliver again until Rebill answers 2xx (the web process may still be starting).
            undelivered = [delivery for delivery in undelivered if not 200 <= delivery.send() < 300]
            state.save(snapshot, asdict(stripe))
            if rounds and done >= rounds:
                break
            time.sleep(seconds)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        state.save(snapshot, asdict(stripe))
        signal.signal(signal.SIGTERM, previous_handler)
