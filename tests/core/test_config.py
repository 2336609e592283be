"""The factory's configuration: defaults → environment → the caller's mapping, checked at start."""

import pytest

from app import create_app
from core.config import ConfigError, is_development, load_settings, normalise_database_url

STRONG_KEY = "kJ3v9Qm2Xw8Lr5Tz0Yb7Nc4Hd6Fg1Sa-Pq"


def test_production_without_secret_key_names_the_variable(tmp_path):
    with pytest.raises(ConfigError, match="SECRET_KEY"):
        load_settings(str(tmp_path), {}, environ={"REBILL_ENCRYPTION_KEYS": "x"})


def test_production_without_encryption_keys_names_the_variable(tmp_path):
    with pytest.raises(ConfigError, match="REBILL_ENCRYPTION_KEYS"):
        load_settings(str(tmp_path), {}, environ={"SECRET_KEY": "s"})


def test_environment_overrides_defaults_and_mapping_overrides_environment(tmp_path):
    environ = {"REBILL_ENV": "development", "REBILL_TICK_SECONDS": "15", "GHL_API_BASE": "https://env.example"}
    settings = load_settings(str(tmp_path), {"GHL_API_BASE": "https://mapping.example"}, environ=environ)
    assert settings["REBILL_TICK_SECONDS"] == 15
    assert settings["GHL_API_BASE"] == "https://mapping.example"
    assert settings["STRIPE_API_BASE"] == "https://api.stripe.com"


def test_development_generates_and_keeps_an_encryption_key(tmp_path):
    first = load_settings(str(tmp_path), {}, environ={"REBILL_ENV": "development"})
    second = load_settings(str(tmp_path), {}, environ={"REBILL_ENV": "development"})
    assert first["REBILL_ENCRYPTION_KEYS"] == second["REBILL_ENCRYPTION_KEYS"]


@pytest.mark.parametrize("env", ["production", "test"])
def test_demo_mode_is_refused_outside_development(tmp_path, env):
    environ = {"REBILL_ENV": env, "SECRET_KEY": STRONG_KEY, "REBILL_ENCRYPTION_KEYS": "k", "REBILL_DEMO": "1"}
    with pytest.raises(ConfigError, match="REBILL_DEMO"):
        load_settings(str(tmp_path), {}, environ=environ)


@pytest.mark.parametrize("env", ["production", "test"])
@pytest.mark.parametrize("key", [None, "s", "k" * 64, "development-only-secret-key", "ab" * 15 + "c"])
def test_outside_development_a_missing_short_or_known_secret_key_stops_the_start(tmp_path, env, key):
    environ = {"REBILL_ENV": env, "REBILL_ENCRYPTION_KEYS": "k"} | ({"SECRET_KEY": key} if key else {})
    with pytest.raises(ConfigError, match="SECRET_KEY"):
        load_settings(str(tmp_path), {}, environ=environ)


def test_outside_development_a_long_random_secret_key_is_accepted(tmp_path):
    settings = load_settings(str(tmp_path), {}, environ={"SECRET_KEY": STRONG_KEY, "REBILL_ENCRYPTION_KEYS": "k"})
    assert settings["SECRET_KEY"] == STRONG_KEY


def test_only_development_falls_back_to_a_public_key_and_enables_the_demo(tmp_path):
    settings = load_settings(str(tmp_path), {}, environ={"REBILL_ENV": "development", "REBILL_DEMO": "1"})
    assert settings["REBILL_DEMO"] is True
    assert is_development(settings)
    assert not is_development({"REBILL_ENV": "test"})


@pytest.mark.parametrize("value", ["abc", "0", "-5"])
def test_tick_seconds_must_be_a_positive_integer(tmp_path, value):
    with pytest.raises(ConfigError, match="REBILL_TICK_SECONDS"):
        load_settings(str(tmp_path), {"REBILL_ENV": "development", "REBILL_TICK_SECONDS": value}, environ={})


def test_default_database_is_sqlite_in_the_instance_folder(tmp_path):
    assert normalise_database_url(None, str(tmp_path)) == f"sqlite:///{tmp_path / 'rebill.sqlite3'}"


@pytest.mark.parametrize("url", ["postgres://u@h/d", "postgresql://u@h/d"])
def test_postgres_urls_use_psycopg3(tmp_path, url):
    assert normalise_database_url(url, str(tmp_path)) == "postgresql+psycopg://u@h/d"


@pytest.mark.parametrize(
    ("url", "message"), [("not a url", "not a database URL"), ("mysql://u@h/d", "supports postgresql")]
)
def test_wrong_database_url_is_one_clear_line(tmp_path, url, message):
    with pytest.raises(ConfigError, match=message) as error:
        normalise_database_url(url, str(tmp_path))
    assert "\n" not in str(error.value)
    assert "DATABASE_URL" in str(error.value)


def test_bad_encryption_keys_fail_the_start(tmp_path):
    config = {"REBILL_ENV": "test", "SECRET_KEY": STRONG_KEY, "REBILL_ENCRYPTION_KEYS": "not-a-fernet-key"}
    with pytest.raises(ConfigError, match="REBILL_ENCRYPTION_KEYS"):
        create_app(config)


@pytest.mark.parametrize(
    ("environ", "app_id"),
    [
        ({"GHL_CLIENT_ID": "68a32958b5154ca8bbdc4d40-meh5chaj"}, "68a32958b5154ca8bbdc4d40"),
        ({"GHL_CLIENT_ID": "app-with-dash-meh5chaj"}, "app-with-dash"),  # before the LAST "-"
        ({"GHL_CLIENT_ID": "nodash"}, "nodash"),
        ({"GHL_CLIENT_ID": "68a32958b5154ca8bbdc4d40-meh5chaj", "GHL_APP_ID": "explicit"}, "explicit"),
        ({}, None),
    ],
)
def test_ghl_app_id_defaults_to_the_client_id_before_its_last_dash(tmp_path, environ, app_id):
    settings = load_settings(str(tmp_path), {}, environ={"REBILL_ENV": "development"} | environ)
    assert settings["GHL_APP_ID"] == app_id
