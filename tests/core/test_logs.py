"""Logs are JSON lines and never carry credentials."""

import json
import logging

from core.logs import JsonFormatter, redact


def test_redact_hides_stripe_keys_bearer_tokens_and_api_keys():
    text = "key sk_live_51HabcDEF and rk_test_xyz, header Bearer eyJhbGci.eyJzdWIi.sig, rbk_live_abc123"
    cleaned = redact(text)
    for secret in ("sk_live_51HabcDEF", "rk_test_xyz", "eyJhbGci", "rbk_live_abc123"):
        assert secret not in cleaned


def test_formatter_writes_one_json_object_with_fields():
    record = logging.LogRecord("rebill", logging.INFO, __file__, 1, "stored %s", ("sk_test_123",), None)
    record.fields = {"agency": 7, "token": "sk_test_999"}
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "stored [redacted]"
    assert entry["agency"] == 7
    assert "sk_test_999" not in json.dumps(entry)


def test_redact_hides_an_oauth_code_in_a_logged_url():
    line = '"GET /oauth/callback?code=4f1b9c2e&state=s HTTP/1.1" 303 - /x?a=1&code=zz9'
    assert redact(line) == '"GET /oauth/callback?code=[redacted]&state=s HTTP/1.1" 303 - /x?a=1&code=[redacted]'
