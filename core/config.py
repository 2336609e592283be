"""Configuration: defaults, then the environment, then the caller's mapping; checked once at start.

Nothing else in Rebill reads ``os.environ``: every setting arrives through ``app.config``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click
from cryptography.fernet import Fernet
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

# GHL's published webhook public keys, where each is published: docs/ghl.md §2.3; overridable for tests and
# key rotations.
GHL_ED25519_PUBLIC_KEY = """-----BEGIN PUBLIC KEY-----
MCowBQYDK2VwAyEAi2HR1srL4o18O8BRa7gVJY7G7bupbN3H9AwJrHCDiOg=
-----END PUBLIC KEY-----
"""

GHL_RSA_PUBLIC_KEY = """-----BEGIN PUBLIC KEY-----
MIICIjANBgkqhkiG9w0BAQEFAAOCAg8AMIICCgKCAgEAokvo/r9tVgcfZ5DysOSC
Frm602qYV0MaAiNnX9O8KxMbiyRKWeL9JpCpVpt4XHIcBOK4u3cLSqJGOLaPuXw6
dO0t6Q/ZVdAV5Phz+ZtzPL16iCGeK9po6D6JHBpbi989mmzMryUnQJezlYJ3DVfB
csedpinheNnyYeFXolrJvcsjDtfAeRx5ByHQmTnSdFUzuAnC9/GepgLT9SM4nCpv
uxmZMxrJt5Rw+VUaQ9B8JSvbMPpez4peKaJPZHBbU3OdeCVx5klVXXZQGNHOs8gF
3kvoV5rTnXV0IknLBXlcKKAQLZcY/Q9rG6Ifi9c+5vqlvHPCUJFT5XUGG5RKgOKU
J062fRtN+rLYZUV+BjafxQauvC8wSWeYja63VSUruvmNj8xkx2zE/Juc+yjLjTXp
IocmaiFeAO6fUtNjDeFVkhf5LNb59vECyrHD2SQIrhgXpO4Q3dVNA5rw576PwTzN
h/AMfHKIjE4xQA1SZuYJmNnmVZLIZBlQAF9Ntd03rfadZ+yDiOXCCs9FkHibELhC
HULgCsnuDJHcrGNd5/Ddm5hxGQ0ASitgHeMZ0kcIOwKDOzOU53lDza6/Y09T7sYJ
PQe7z0cvj7aE4B+Ax1ZoZGPzpJlZtGXCsu9aTEGEnKzmsFqwcSsnw3JB31IGKAyk
T1hhTiaCeIY/OwwwNUY2yvcCAwEAAQ==
-----END PUBLIC KEY-----
"""


DEFAULTS: dict[str, Any] = {
    "REBILL_ENV": "production",
    "DATABASE_URL": None,  # SQLite in the instance folder when unset
    "SECRET_KEY": None,
    "REBILL_ENCRYPTION_KEYS": None,
    "GHL_CLIENT_ID": None,
    "GHL_CLIENT_SECRET": None,
    "GHL_SHARED_SECRET": None,
    "GHL_APP_ID": None,  # the marketplace app's id; default: GHL_CLIENT_ID before its last "-"
    "GHL_API_BASE": "https://services.leadconnectorhq.com",
    "GHL_MARKETPLACE_BASE": "https://marketplace.gohighlevel.com",
    "GHL_SCOPES": (
        "locations.readonly conversations.readonly conversations/message.readonly "
        "oauth.readonly oauth.write"
    ),
    "GHL_REDIRECT_URI": None,
    "GHL_WEBHOOK_ED25519_KEY": GHL_ED25519_PUBLIC_KEY,
    "GHL_WEBHOOK_RSA_KEY": GHL_RSA_PUBLIC_KEY,
    # A message webhook's batch that cannot be stored within this many milliseconds (a lock held by a
    # migration, a stalled database) is cancelled and answered 429, which GHL retries (ghl.message_ingest).
    "GHL_WEBHOOK_STORE_TIMEOUT_MS": 5000,
    "STRIPE_API_BASE": "https://api.stripe.com",
    "STRIPE_TIMEOUT_SECONDS": 15,
    "STRIPE_NETWORK_ATTEMPTS": 3,
    "STRIPE_CONCURRENCY": 4,
    "REBILL_TICK_SECONDS": 60,
    "REBILL_DEMO": False,
    # Extra CSP frame-ancestors for /app beyond GHL's hosts and known white-label domains (portal.pages).
    "REBILL_FRAME_ANCESTORS": "",
    "REBILL_LOG_LEVEL": "INFO",
    # The app's external base URL; Stripe webhook endpoints are registered under it. Unset: the address the
    # portal request that connected the key came to (portal.api).
    "REBILL_PUBLIC_URL": None,
    # Let alert URLs reach private/loopback addresses (a local receiver); refused outside development/test.
    "REBILL_ALERT_PRIVATE_ADDRESSES": False,
    # GET /metrics answers only with this bearer token; unset = 404 (core.metrics).
    "REBILL_METRICS_TOKEN": None,
    # A scheduler serves its own metrics on this port (0 = not): for a scheduler in its own container.
    "REBILL_SCHEDULER_METRICS_PORT": 0,
    # Reverse proxies in front of gunicorn whose X-Forwarded-For / -Proto are trusted (0 = none; deploy/ has 1).
    "REBILL_TRUSTED_PROXIES": 0,
}

ENVIRONMENT_VARIABLES = tuple(DEFAULTS)
ENVIRONMENTS = ("production", "development", "test")
REQUIRED_OUTSIDE_DEVELOPMENT = ("SECRET_KEY", "REBILL_ENCRYPTION_KEYS")
# SECRET_KEY signs portal session tokens: whoever knows it can sign in as any agency's admin. Only
# development falls back to a public key; every other environment needs a long key of its own.
DEVELOPMENT_SECRET_KEY = "development-only-secret-key"
MIN_SECRET_KEY_CHARS = 32
KNOWN_SECRET_KEYS = {DEVELOPMENT_SECRET_KEY, "test-secret-key", "changeme", "change-me", "secret", "dev"}
# Integer settings and their smallest allowed value.
INTEGER_SETTINGS = {
    "REBILL_TICK_SECONDS": 1,
    "GHL_WEBHOOK_STORE_TIMEOUT_MS": 100,
    "STRIPE_TIMEOUT_SECONDS": 1,
    "STRIPE_NETWORK_ATTEMPTS": 1,
    "STRIPE_CONCURRENCY": 1,
    "REBILL_TRUSTED_PROXIES": 0,
    "REBILL_SCHEDULER_METRICS_PORT": 0,
}
BOOLEAN_SETTINGS = ("REBILL_DEMO", "REBILL_ALERT_PRIVATE_ADDRESSES")


class ConfigError(click.ClickException):
    """A setting is missing or invalid; the message names the variable.

    A ClickException, so the ``flask`` CLI prints it as one line instead of a traceback.
    """

def load_settings(
    instance_path: str, overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Merge defaults, environment and overrides, then check and normalise them."""
    environ = os.environ if environ is None else environ
    settings = dict(DEFAULTS)
    settings.update({name: environ[name] for name in ENVIRONMENT_VARIABLES if environ.get(name)})
    settings.update(overrides or {})
    _coerce_types(settings)
    _check_required(settings, instance_path)
    settings["DATABASE_URL"] = normalise_database_url(settings["DATABASE_URL"], instance_path)
    settings["GHL_APP_ID"] = settings["GHL_APP_ID"] or app_id_of(settings["GHL_CLIENT_ID"])
    return settings


def app_id_of(client_id: str | None) -> str | None:
    """Return the marketplace appId a client id names: ``<appId>-<suffix>`` (docs/ghl.md), or None."""
    if not client_id:
        return None
    return client_id.rpartition("-")[0] or client_id


def is_development(settings: Mapping[str, Any]) -> bool:
    """Tell whether the settings describe a development run (the only one with public fallbacks and the demo)."""
    return settings["REBILL_ENV"] == "development"


def normalise_database_url(url: str | None, instance_path: str) -> str:
    """Return a SQLAlchemy URL, accepting Heroku-style ``postgres://`` and defaulting to SQLite."""
    if not url:
        return f"sqlite:///{Path(instance_path) / 'rebill.sqlite3'}"
    if url.startswith("postgres://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgres://")
    elif url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    try:
        parsed = make_url(url)
    except ArgumentError as error:
        raise ConfigError(f"DATABASE_URL is not a database URL ({error})") from None
    if parsed.get_backend_name() not in {"sqlite", "postgresql"}:
        raise ConfigError(
            f"DATABASE_URL uses '{parsed.get_backend_name()}'; Rebill supports postgresql:// and sqlite://"
        )
    return url


def _coerce_types(settings: dict[str, Any]) -> None:
    for name, minimum in INTEGER_SETTINGS.items():
        try:
            settings[name] = int(settings[name])
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be an integer, got {settings[name]!r}") from None
        if settings[name] < minimum:
            raise ConfigError(f"{name} must be at least {minimum}")
    for name in BOOLEAN_SETTINGS:
        value = settings[name]
        if isinstance(value, str):
            settings[name] = value.strip().lower() in {"1", "true", "yes", "on"}
    public_url = settings["REBILL_PUBLIC_URL"]
    if public_url and not (isinstance(public_url, str) and public_url.startswith(("https://", "http://"))):
        raise ConfigError(f"REBILL_PUBLIC_URL must be an http(s) URL (https://rebill.example.com), not {public_url!r}")
    if settings["REBILL_ENV"] not in ENVIRONMENTS:
        raise ConfigError("REBILL_ENV must be production, development or test")
    if settings["REBILL_ALERT_PRIVATE_ADDRESSES"] and settings["REBILL_ENV"] == "production":
        raise ConfigError("REBILL_ALERT_PRIVATE_ADDRESSES can only be enabled in development or test")


def _check_required(settings: dict[str, Any], instance_path: str) -> None:
    if not is_development(settings):
        missing = [name for name in REQUIRED_OUTSIDE_DEVELOPMENT if not settings.get(name)]
        if missing:
            raise ConfigError(
                f"{', '.join(missing)} must be set when REBILL_ENV is {settings['REBILL_ENV']} "
                "(see README: Configuration)"
            )
        if settings["REBILL_DEMO"]:
            raise ConfigError("REBILL_DEMO can only be enabled when REBILL_ENV=development")
        _check_secret_key(str(settings["SECRET_KEY"]))
        return
    if not settings.get("SECRET_KEY"):
        settings["SECRET_KEY"] = DEVELOPMENT_SECRET_KEY
    if not settings.get("REBILL_ENCRYPTION_KEYS"):
        settings["REBILL_ENCRYPTION_KEYS"] = _development_encryption_key(instance_path)


def _check_secret_key(key: str) -> None:
    # Few distinct characters ("xxxx…") is a placeholder, not a random key.
    if len(key) < MIN_SECRET_KEY_CHARS or len(set(key)) < 8 or key.strip().lower() in KNOWN_SECRET_KEYS:
        raise ConfigError(
            f"SECRET_KEY must be a random value of at least {MIN_SECRET_KEY_CHARS} characters, not a short or "
            "published one; make one with: python -c \"import secrets; print(secrets.token_urlsafe(48))\""
        )


def _development_encryption_key(instance_path: str) -> str:
    """Keep one generated key in the instance folder so development data survives restarts."""
    key_file = Path(instance_path) / "development-encryption.key"
    if not key_file.exists():
        key_file.parent.mkdir(parents=True, exist_ok=True)
        key_file.write_text(Fernet.generate_key().decode())
        key_file.chmod(0o600)
    return key_file.read_text().strip()
