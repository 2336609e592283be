"""GHL SSO decryption, pinned against real crypto-js 4.2.0 output (fixtures/make_cryptojs_sso.js)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from ghl.sso import SsoPayloadInvalid, decrypt_sso_payload, parse_sso_user
from tests.portal.cryptojs import cryptojs_encrypt, ghl_sso_payload

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "cryptojs_sso.json").read_text())
CASES = FIXTURE["cases"]


@pytest.mark.parametrize("case", CASES, ids=[case["name"] for case in CASES])
def test_decrypts_real_cryptojs_output(case):
    assert decrypt_sso_payload(case["payload"], case["shared_secret"]) == json.loads(case["plaintext"])


@pytest.mark.parametrize("case", CASES, ids=[case["name"] for case in CASES])
def test_test_helper_encrypts_byte_for_byte_like_cryptojs(case):
    salt = base64.b64decode(case["payload"])[8:16]
    assert cryptojs_encrypt(case["plaintext"], case["shared_secret"], salt=salt) == case["payload"]


def test_round_trips_a_fresh_payload():
    user = {"userId": "u1", "companyId": "c1", "role": "admin", "type": "agency"}
    assert decrypt_sso_payload(ghl_sso_payload("s3cret", **user), "s3cret") == user


def test_the_secret_is_a_passphrase_not_base64():
    case = CASES[0]
    encoded_secret = base64.b64encode(case["shared_secret"].encode()).decode()
    with pytest.raises(SsoPayloadInvalid):
        decrypt_sso_payload(case["payload"], encoded_secret)


@pytest.mark.parametrize(
    "payload",
    [
        "",
        "not base64 !!",
        base64.b64encode(b"Salted__12345678").decode(),  # no ciphertext
        base64.b64encode(b"Salted__12345678" + b"x" * 15).decode(),  # not whole blocks
        base64.b64encode(b"NotSalt_12345678" + b"x" * 16).decode(),
        "A" * 20_000,
        None,
        42,
    ],
)
def test_rejects_malformed_payloads(payload):
    with pytest.raises(SsoPayloadInvalid):
        decrypt_sso_payload(payload, "test-shared-secret")


def test_rejects_a_wrong_secret_every_time():
    # A wrong key passes the PKCS#7 check about 1 time in 256; the JSON check must still refuse.
    for index in range(300):
        payload = ghl_sso_payload(f"right-{index}", userId="u", companyId="c", role="admin", type="agency")
        with pytest.raises(SsoPayloadInvalid):
            decrypt_sso_payload(payload, f"wrong-{index}")


def test_rejects_json_that_is_not_an_object():
    with pytest.raises(SsoPayloadInvalid):
        decrypt_sso_payload(cryptojs_encrypt("[1, 2]", "k"), "k")


def test_rejects_an_empty_secret():
    with pytest.raises(SsoPayloadInvalid):
        decrypt_sso_payload(CASES[0]["payload"], "")


def test_parses_agency_and_location_context():
    agency = parse_sso_user(json.loads(CASES[0]["plaintext"]))
    assert (agency.company_id, agency.user_id, agency.role, agency.user_type, agency.active_location) == (
        "GNb7aIv4rQFVb9iwNl5K",
        "MKQJ7wOVVmNOMvrnKKKK",
        "admin",
        "agency",
        None,
    )
    inside = parse_sso_user(json.loads(CASES[1]["plaintext"]))
    assert inside.active_location == "yLKVZpNppIdYpah4RjNE"
    assert inside.user_name == "Zoë Ångström 日本"


@pytest.mark.parametrize(
    "change",
    [
        {"userId": None},
        {"companyId": ""},
        {"role": None},
        {"type": "superuser"},
        {"type": "location"},  # location users always come with activeLocation
        {"companyId": 123},
        {"companyId": "x" * 65},
        {"userId": "line\nbreak"},
        {"activeLocation": ["loc"]},
    ],
)
def test_parse_rejects_missing_or_odd_fields(change):
    data = {"userId": "u", "companyId": "c", "role": "admin", "type": "agency"} | change
    data = {key: value for key, value in data.items() if value is not None}
    with pytest.raises(SsoPayloadInvalid):
        parse_sso_user(data)
