"""Demo mode: seeding on the fake Stripe, usage that turns into units, and the demo session."""

from __future__ import annotations

import json
import os
import random
import secrets
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

from cryptography.fernet import Fernet
from sqlalchemy import func, select

from billing.agencies import find_agency
from billing.clients import list_clients
from billing.jobs import run_tick
from billing.models import UsageEvent
from core.database import db
from portal.demo import DEMO_COMPANY_ID
from portal.demo_agency import (
    DEMO_METER_EVENT,
    DEMO_UNMAPPED_CHANNEL,
    PAYMENT_FAILURE_CLIENT,
    demo_payment_failure,
    generate_demo_usage,
    seed_demo_agency,
    seed_fake_stripe,
)
from stripe_fake import FakeStripeServer


def test_demo_usage_becomes_units_in_the_fake_stripe(make_app, fake_stripe):
    app = make_app(STRIPE_API_BASE=fake_stripe.url, REBILL_DEMO=True, REBILL_ENV="development")
    stripe = seed_fake_stripe(fake_stripe.state)
    with app.app_context():
        agency = seed_demo_agency(stripe)
        db.session.commit()
        rng = random.Random(7)
        for _ in range(4):
            generate_demo_usage(agency, rng)
            db.session.commit()

        summary = run_tick()

        clients = {client.nickname: client for client in list_clients(agency)}
        tokens = clients["Acme Chat Co"]
        assert tokens.units_logged >= 1 and summary.units_sent == sum(c.units_logged for c in clients.values())
        assert tokens.units_logged == tokens.counted_usage // 1000
        customer = stripe.customer_ids["Acme Chat Co"]
        assert fake_stripe.state.total_units(stripe.api_key, customer, DEMO_METER_EVENT) == tokens.units_logged
        unmapped = db.session.scalar(
            select(func.count()).select_from(UsageEvent).where(UsageEvent.channel_id == DEMO_UNMAPPED_CHANNEL)
        )
        assert unmapped == 4


def test_the_demo_shows_a_payment_failure_delivered_as_a_signed_stripe_event(make_app, fake_stripe):
    app = make_app(STRIPE_API_BASE=fake_stripe.url, REBILL_DEMO=True, REBILL_ENV="development")
    stripe = seed_fake_stripe(fake_stripe.state)
    with app.app_context():
        agency = seed_demo_agency(stripe, "http://127.0.0.1:5000")
        db.session.commit()
        [delivery] = demo_payment_failure(fake_stripe.state, stripe)

        answer = app.test_client().post(urlsplit(delivery.url).path, data=delivery.body, headers=delivery.headers)

        assert answer.get_json() == {"status": "processed"}
        failed = {client.nickname for client in list_clients(agency) if client.payment_failed_at is not None}
        assert failed == {PAYMENT_FAILURE_CLIENT}


def test_seeding_again_reuses_the_clients_and_points_them_at_the_new_fake(make_app):
    with FakeStripeServer() as first:
        app = make_app(STRIPE_API_BASE=first.url, REBILL_DEMO=True, REBILL_ENV="development")
        with app.app_context():
            seed_demo_agency(seed_fake_stripe(first.state))
            db.session.commit()
            before = {client.nickname: client.id for client in list_clients(find_agency(DEMO_COMPANY_ID))}
    with FakeStripeServer() as second:
        app = make_app(STRIPE_API_BASE=second.url, REBILL_DEMO=True, REBILL_ENV="development")
        stripe = seed_fake_stripe(second.state)
        with app.app_context():
            agency = seed_demo_agency(stripe)
            db.session.commit()
            after = {client.nickname: (client.id, client.stripe_customer_id) for client in list_clients(agency)}
    assert {name: client_id for name, (client_id, _) in after.items()} == before
    assert after["Acme Chat Co"][1] == stripe.customer_ids["Acme Chat Co"]


def demo_app(make_app):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return make_app(STRIPE_API_BASE=f"http://127.0.0.1:{port}", REBILL_DEMO=True, REBILL_ENV="development")


def run_demo_command(app, stripe_file, rounds=2):
    args = ["rebill", "demo", "--rounds", str(rounds), "--seconds", "0", "--stripe-file", str(stripe_file)]
    return app.test_cli_runner().invoke(args=args)


def test_the_demo_command_serves_the_fake_stripe_seeds_and_records_usage(make_app, tmp_path):
    app = demo_app(make_app)

    result = run_demo_command(app, tmp_path / "demo-stripe.json")

    assert result.exit_code == 0, result.output
    assert "fake Stripe on" in result.output
    with app.app_context():
        assert db.session.scalar(select(func.count()).select_from(UsageEvent)) == 6
    client = app.test_client()
    session = client.post("/api/portal/demo-session")
    assert session.status_code == 200
    headers = {"Authorization": f"Bearer {session.get_json()['token']}"}
    names = [row["nickname"] for row in client.get("/api/portal/clients", headers=headers).get_json()["clients"]]
    assert names == ["Acme Chat Co", "Bright Smiles"]
    assert 'data-demo="on"' in client.get("/app?demo=1").get_data(as_text=True)
    assert 'data-demo="off"' in client.get("/app").get_data(as_text=True)


def test_the_demo_keeps_its_fake_stripe_ids_and_state_across_restarts(make_app, tmp_path):
    app = demo_app(make_app)
    stripe_file = tmp_path / "demo-stripe.json"
    assert run_demo_command(app, stripe_file).exit_code == 0
    with app.app_context():
        first = {c.nickname: (c.stripe_customer_id, c.stripe_price_id) for c in demo_clients()}
    objects_before = json.loads(stripe_file.read_text())["tenants"][0]["objects"]

    result = run_demo_command(app, stripe_file, rounds=1)  # `make run` again

    assert result.exit_code == 0, result.output
    with app.app_context():
        assert {c.nickname: (c.stripe_customer_id, c.stripe_price_id) for c in demo_clients()} == first
    saved = json.loads(stripe_file.read_text())
    assert saved["tenants"][0]["objects"].keys() == objects_before.keys()
    assert saved["tenants"][0]["objects"]["customer"] == objects_before["customer"]  # kept, not seeded again
    assert saved["extra"]["customer_ids"]["Acme Chat Co"] == first["Acme Chat Co"][0]


def test_a_fresh_demo_stripe_makes_the_same_ids(tmp_path):
    from stripe_fake import FakeStripeState

    made = [seed_fake_stripe(FakeStripeState(id_seed="rebill-demo")) for _ in range(2)]
    assert made[0] == made[1]


def test_the_readme_lists_the_demo_stripes_fixed_ids(tmp_path):
    from portal.demo_agency import DEMO_ACCOUNT_ID, DEMO_STRIPE_KEY, open_demo_stripe

    _, stripe = open_demo_stripe(tmp_path / "absent.json")
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    documented = [DEMO_STRIPE_KEY, DEMO_ACCOUNT_ID, stripe.product_id, stripe.price_id, stripe.licensed_price_id]
    for name, customer_id in stripe.customer_ids.items():
        assert f"customer {name} " in readme
        documented.append(customer_id)
    assert [value for value in documented if f"`{value}`" not in readme] == []


def demo_clients():
    return list_clients(find_agency(DEMO_COMPANY_ID))


def test_the_demo_command_refuses_outside_demo_mode(make_app):
    result = make_app().test_cli_runner().invoke(args=["rebill", "demo", "--rounds", "1"])
    assert result.exit_code != 0
    assert "demo mode is off" in result.output


def test_a_demo_token_is_refused_once_demo_mode_is_off(make_app, fake_stripe):
    demo_app = make_app(STRIPE_API_BASE=fake_stripe.url, REBILL_DEMO=True, REBILL_ENV="development")
    with demo_app.app_context():
        seed_demo_agency(seed_fake_stripe(fake_stripe.state))
        db.session.commit()
    token = demo_app.test_client().post("/api/portal/demo-session").get_json()["token"]

    plain = make_app(STRIPE_API_BASE=fake_stripe.url)
    answer = plain.test_client().get("/api/portal/me", headers={"Authorization": f"Bearer {token}"})

    assert answer.status_code == 401


def test_the_demo_session_waits_for_the_demo_agency(make_app):
    answer = make_app(REBILL_DEMO=True, REBILL_ENV="development").test_client().post("/api/portal/demo-session")
    assert answer.status_code == 503
    assert "not seeded yet" in answer.get_json()["error"]


PRODUCTION_WORKER = """
import json, sys
from app import create_app
client = create_app().test_client()
client.get("/healthz"), client.get("/app?demo=1"), client.post("/api/portal/demo-session")
print(json.dumps(sorted(name for name in sys.modules if name.startswith(("stripe_fake", "portal.demo_agency")))))
"""


def test_a_production_app_never_loads_the_demo_or_the_fake_stripe(tmp_path):
    environment = {key: value for key, value in os.environ.items() if not key.startswith(("REBILL_", "DATABASE_URL"))}
    environment |= {
        "REBILL_ENV": "production",
        "SECRET_KEY": secrets.token_urlsafe(32),  # production refuses a short key
        "REBILL_ENCRYPTION_KEYS": Fernet.generate_key().decode(),
        "DATABASE_URL": f"sqlite:///{tmp_path / 'rebill.sqlite3'}",
    }
    result = subprocess.run(
        [sys.executable, "-c", PRODUCTION_WORKER],
        cwd=Path(__file__).resolve().parents[2], env=environment, capture_output=True, text=True, timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []
