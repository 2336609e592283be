"""GET /metrics: token-protected Prometheus text, one view over every process sharing PROMETHEUS_MULTIPROC_DIR."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from flask import request
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import base_config

REPO = Path(__file__).parents[2]
TOKEN = "metrics-test-token"


def scrape(client, token: str | None = TOKEN):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return client.get("/metrics", headers=headers)


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """Every sample of a scrape: (name, sorted labels) -> value."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_are_not_served_without_a_configured_token(client):
    assert scrape(client).status_code == 404
    assert scrape(client, None).status_code == 404


@pytest.mark.parametrize("token", [None, "wrong-token", TOKEN + "x"])
def test_metrics_need_the_bearer_token(make_app, token):
    client = make_app(REBILL_METRICS_TOKEN=TOKEN).test_client()
    response = scrape(client, token)
    assert response.status_code == 401
    assert response.json == {"error": "a valid metrics token is required: Authorization: Bearer <token>"}
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="rebill-metrics"'


def test_metrics_are_prometheus_text_with_the_documented_names(make_app):
    client = make_app(REBILL_METRICS_TOKEN=TOKEN).test_client()
    response = scrape(client)
    assert response.status_code == 200
    assert response.content_type.startswith("text/plain; version=")
    names = {family.name for family in text_string_to_metric_families(response.get_data(as_text=True))}
    assert {
        "rebill_ghl_webhooks_received",
        "rebill_usage_events_received",
        "rebill_ingest_request_duration_seconds",
        "rebill_aggregation_duration_seconds",
        "rebill_reporting_duration_seconds",
        "rebill_units_sent",
        "rebill_unit_reports",
        "rebill_stripe_calls",
        "rebill_ghl_token_refreshes",
        "rebill_scheduler_job_runs",
        "rebill_outbox_units",
        "rebill_outbox_reports",
        "rebill_outbox_oldest_pending_age_seconds",
        "rebill_usage_events_pending",
        "rebill_metrics_database_up",
    } <= names
    assert samples(response.get_data(as_text=True))[("rebill_metrics_database_up", ())] == 1


def test_an_unreachable_database_still_serves_the_process_metrics(make_app):
    app = make_app(REBILL_METRICS_TOKEN=TOKEN, DATABASE_URL="postgresql://nobody@127.0.0.1:9/none")
    response = scrape(app.test_client())
    assert response.status_code == 200
    values = samples(response.get_data(as_text=True))
    assert values[("rebill_metrics_database_up", ())] == 0
    assert ("rebill_outbox_units", (("status", "pending"),)) not in values


SCRIPT_INCREMENT = """
from core.metrics import STRIPE_CALLS
STRIPE_CALLS.labels("ok").inc(3)
"""
SCRIPT_SCRAPE = """
import sys
import urllib.request
from app import create_app
from core.metrics import STRIPE_CALLS
STRIPE_CALLS.labels("ok").inc(2)
app = create_app({"REBILL_ENV": "development", "DATABASE_URL": sys.argv[1], "REBILL_METRICS_TOKEN": "t"})
print(app.test_client().get("/metrics", headers={"Authorization": "Bearer t"}).get_data(as_text=True))
"""


def test_a_scrape_sums_every_process_sharing_the_multiprocess_directory(tmp_path, sqlite_template):
    database = tmp_path / "rebill.sqlite3"
    shutil.copy(sqlite_template, database)
    directory = tmp_path / "prometheus"
    directory.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory), "REBILL_LOG_LEVEL": "ERROR"}
    # Another process (as a scheduler would) counts 3 Stripe calls and exits; the scraping one counts 2.
    subprocess.run([sys.executable, "-c", SCRIPT_INCREMENT], cwd=REPO, env=env, check=True)
    scraped = subprocess.run(
        [sys.executable, "-c", SCRIPT_SCRAPE, f"sqlite:///{database}"],
        cwd=REPO, env=env, check=True, capture_output=True, text=True,
    )  # fmt: skip
    values = samples(scraped.stdout)
    assert values[("rebill_stripe_calls_total", (("outcome", "ok"),))] == 5
    assert values[("rebill_metrics_database_up", ())] == 1


def _remote_address_app(make_app, **config):
    app = make_app(**config)
    app.add_url_rule("/remote", "remote", lambda: {"address": request.remote_addr, "scheme": request.scheme})
    return app.test_client()


def test_behind_one_trusted_proxy_the_client_address_is_the_proxys_last_hop(make_app):
    client = _remote_address_app(make_app, REBILL_TRUSTED_PROXIES=1)
    headers = {"X-Forwarded-For": "203.0.113.9, 198.51.100.7", "X-Forwarded-Proto": "https"}
    # The client may forge the first entry; only the one our proxy appended is trusted.
    assert client.get("/remote", headers=headers).json == {"address": "198.51.100.7", "scheme": "https"}


def test_without_a_trusted_proxy_forwarded_headers_are_ignored(make_app):
    client = _remote_address_app(make_app)
    headers = {"X-Forwarded-For": "198.51.100.7", "X-Forwarded-Proto": "https"}
    assert client.get("/remote", headers=headers).json == {"address": "127.0.0.1", "scheme": "http"}


def test_trusted_proxies_must_be_a_small_non_negative_integer(tmp_path):
    from core.config import ConfigError, load_settings

    with pytest.raises(ConfigError, match="REBILL_TRUSTED_PROXIES must be at least 0"):
        load_settings(str(tmp_path), base_config("sqlite://", REBILL_TRUSTED_PROXIES="-1"))


def test_a_process_without_a_web_server_serves_its_own_instruments():
    from core.metrics import GHL_TOKEN_REFRESHES, serve_process_metrics

    GHL_TOKEN_REFRESHES.labels("refreshed").inc()
    server = serve_process_metrics(0, "127.0.0.1")  # port 0: any free port
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/metrics", timeout=5) as answer:
            values = samples(answer.read().decode())
    finally:
        server.shutdown()
        server.server_close()
    assert values[("rebill_ghl_token_refreshes_total", (("outcome", "refreshed"),))] >= 1
