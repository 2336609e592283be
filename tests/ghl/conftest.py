"""GHL test fixtures: test key pairs injected through the two config variables (so the real verifier
runs), a webhook sender, and GHL's HTTP API faked at the transport with ``responses``."""

from __future__ import annotations

import pytest
import responses

from tests.ghl.fake_ghl import Signer, WebhookSender


@pytest.fixture(scope="session")
def signer() -> Signer:
    """One Ed25519 and one RSA test key pair for the session (RSA generation is slow)."""
    return Signer()


@pytest.fixture
def ghl_config(signer) -> dict:
    """Config trusting the test keys instead of GHL's published ones."""
    return signer.config() | {"GHL_REDIRECT_URI": "https://rebill.test/oauth/callback"}


@pytest.fixture
def app(make_app, ghl_config):
    """The test app, verifying webhooks with the test keys."""
    return make_app(**ghl_config)


@pytest.fixture
def ghl_api():
    """GHL's HTTP API, faked at the transport; a request nobody registered fails the test."""
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


@pytest.fixture
def webhooks(client, signer) -> WebhookSender:
    """Signed webhook deliveries to the test app."""
    return WebhookSender(client, signer)
