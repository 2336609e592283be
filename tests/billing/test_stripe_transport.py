"""The urllib3 transport under every gateway (billing.stripe_transport): timeouts, the SDK's retries, proxies."""

from __future__ import annotations

import pytest

from billing.stripe_gateway import StripeGateway, StripeUnavailable
from tests.billing.stripe_support import send


def test_a_timeout_is_unavailable(stripe_server, key, metered):
    stripe_server.state.inject("/v1/billing/meter_events", "timeout", seconds=30)
    with pytest.raises(StripeUnavailable, match="reached"):
        send(StripeGateway(key, stripe_server.url, timeout=0.3, max_network_retries=0), metered)
    stripe_server.state.release_hangs()
    assert stripe_server.state.meter_events(key) == []


def test_the_sdk_retries_a_500_with_the_same_idempotency_key(stripe_server, key, metered):
    stripe_server.state.inject("/v1/billing/meter_events", "server_error")
    send(StripeGateway(key, stripe_server.url, max_network_retries=1), metered)
    posts = [c for c in stripe_server.state.calls if c.method == "POST"]
    assert [c.status for c in posts] == [500, 200] and len({c.idempotency_key for c in posts}) == 1


def test_the_sdk_retries_a_dropped_connection_with_the_same_idempotency_key(stripe_server, key, metered):
    stripe_server.state.inject("/v1/billing/meter_events", "accept_then_drop")  # applied, answer lost
    send(StripeGateway(key, stripe_server.url, max_network_retries=1), metered)
    posts = [c for c in stripe_server.state.calls if c.method == "POST"]
    assert len(posts) == 2 and len({c.idempotency_key for c in posts}) == 1
    assert [event["payload"]["value"] for event in stripe_server.state.meter_events(key)] == ["3"]


def test_a_refused_connection_is_unavailable(key, metered):
    with pytest.raises(StripeUnavailable, match="reached"):
        send(StripeGateway(key, "http://127.0.0.1:9", max_network_retries=0), metered)  # discard port: closed


def test_stripe_calls_ignore_proxy_settings_in_the_environment(monkeypatch, gateway, metered):
    # Rebill reads its environment once (core.config); a proxy variable set for other tools changes nothing.
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    assert send(gateway, metered).events_accepted == 1
