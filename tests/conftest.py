"""Shared fixtures: a fresh app per test on SQLite and on PostgreSQL, migrated by Alembic.

PostgreSQL: one throwaway database per test session (so parallel runs never collide), migrated once,
truncated before every test. SQLite: one migrated template file per session, copied per test.
Without a reachable PostgreSQL the PostgreSQL leg is skipped locally, and fails when CI=true.
"""

from __future__ import annotations

import os
import secrets
import shutil
import uuid

import psycopg
import pytest
from cryptography.fernet import Fernet
from flask_migrate import upgrade
from sqlalchemy import text

from app import create_app
from core.database import db
from stripe_fake import FakeStripeServer

POSTGRES_ADMIN_URL = os.environ.get("REBILL_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
TEST_ENCRYPTION_KEY = Fernet.generate_key().decode()
# Random like a real deployment's (core.config refuses short or published keys outside development).
TEST_SECRET_KEY = secrets.token_urlsafe(32)
BACKENDS = ["sqlite", "postgresql"]


def base_config(database_url: str, **overrides) -> dict:
    """Return the configuration every test app starts from."""
    config = {
        "REBILL_ENV": "test",
        "TESTING": True,
        "DATABASE_URL": database_url,
        "SECRET_KEY": TEST_SECRET_KEY,
        "REBILL_ENCRYPTION_KEYS": TEST_ENCRYPTION_KEY,
        "GHL_CLIENT_ID": "6650aaaabbbbccccdddd0001-lx1abcde",
        "GHL_CLIENT_SECRET": "test-ghl-client-secret",
        "GHL_SHARED_SECRET": "test-shared-secret",
        "GHL_API_BASE": "https://services.leadconnectorhq.test",
        "GHL_MARKETPLACE_BASE": "https://marketplace.gohighlevel.test",
        "STRIPE_API_BASE": "http://127.0.0.1:9",
    }
    config.update(overrides)
    return config


def _migrate(database_url: str) -> None:
    app = create_app(base_config(database_url))
    with app.app_context():
        upgrade()
        db.engine.dispose()


@pytest.fixture(scope="session")
def postgres_database_url():
    """Create, migrate and finally drop one PostgreSQL database for this session."""
    try:
        admin = psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as error:
        if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
            pytest.fail(f"CI=true but PostgreSQL is unreachable at {POSTGRES_ADMIN_URL}: {error}")
        pytest.skip(f"PostgreSQL unreachable at {POSTGRES_ADMIN_URL}; PostgreSQL leg skipped")
    name = f"rebill_test_{uuid.uuid4().hex[:12]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    url = POSTGRES_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + f"/{name}"
    try:
        _migrate(url)
        yield url
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory):
    """Migrate one SQLite file per session; tests get copies."""
    path = tmp_path_factory.mktemp("sqlite-template") / "template.sqlite3"
    _migrate(f"sqlite:///{path}")
    return path


@pytest.fixture(params=BACKENDS)
def database_url(request, tmp_path):
    """Yield an empty, migrated database of each backend, isolated for this test."""
    if request.param == "sqlite":
        path = tmp_path / "rebill.sqlite3"
        shutil.copy(request.getfixturevalue("sqlite_template"), path)
        yield f"sqlite:///{path}"
        return
    url = request.getfixturevalue("postgres_database_url")
    _truncate_all(url)
    yield url


def _truncate_all(url: str) -> None:
    tables = ", ".join(f'"{table.name}"' for table in db.metadata.sorted_tables)
    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as conn:
        conn.execute(f"TRUNCATE {tables} RESTART IDENTITY CASCADE")


@pytest.fixture
def backend(database_url) -> str:
    """Name the backend of this test's database: sqlite or postgresql."""
    return "postgresql" if database_url.startswith("postgresql") else "sqlite"


@pytest.fixture
def make_app(database_url):
    """Build apps on this test's database with extra configuration."""
    apps = []

    def factory(**overrides):
        app = create_app(base_config(database_url, **overrides))
        apps.append(app)
        return app

    yield factory
    for app in apps:
        with app.app_context():
            db.session.remove()
            db.engine.dispose()


@pytest.fixture
def app(make_app):
    """A test app on this test's database."""
    return make_app()


@pytest.fixture
def client(app):
    """A test client for the app."""
    return app.test_client()


@pytest.fixture
def runner(app):
    """A CLI runner for the app."""
    return app.test_cli_runner()


@pytest.fixture
def app_context(app):
    """Push an app context for service-level tests."""
    with app.app_context():
        yield app


@pytest.fixture
def postgres_only(backend):
    """Skip the SQLite leg of a test that needs PostgreSQL row locks."""
    if backend != "postgresql":
        pytest.skip("needs PostgreSQL row-level locking")


def execute_sql(sql: str, **params):
    """Run raw SQL in the current app context and return the result."""
    return db.session.execute(text(sql), params)


def drop_connections(database_url: str) -> int:
    """Terminate every other session on the test database, as a database restart would; return how many."""
    with psycopg.connect(database_url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as admin:
        return len(
            admin.execute(
                # With a timeout, each call returns once that session has ended (PostgreSQL 14+).
                "SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            ).fetchall()
        )


@pytest.fixture
def fake_stripe():
    """A fake Stripe on a loopback port, reached by the real stripe-python client."""
    with FakeStripeServer() as server:
        yield server
