"""ghl.signatures: the Ed25519 verdict is libsodium's, exactly as PyNaCl's VerifyKey.verify gives it.

The verifier calls libsodium's crypto_sign_open itself, without an output buffer (no copy of the body per
delivery); PyNaCl's VerifyKey.verify calls the same function with one. Over valid signatures, tampered ones
and the malformed kinds libsodium is stricter on than other implementations (a non-canonical S, a
small-order R), both must agree on every body.
"""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from ghl.signatures import WebhookVerifier
from tests.ghl.fake_ghl import public_pem

KEY = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
VERIFIER = WebhookVerifier(public_pem(KEY), None)
PYNACL_KEY = VerifyKey(KEY.public_key().public_bytes_raw())
GROUP_ORDER = 2**252 + 27742317777372353535851937790883648493  # L: an S of L or more is not canonical
IDENTITY_POINT = (1).to_bytes(32, "little")  # a small-order R


def pynacl_accepts(signature: bytes, body: bytes) -> bool:
    try:
        PYNACL_KEY.verify(body, signature)
    except BadSignatureError:
        return False
    return True


def verifier_accepts(signature: bytes, body: bytes) -> bool:
    headers = {"X-GHL-Signature": base64.b64encode(signature).decode()}
    return VERIFIER.verify(body, headers) == "ed25519"


def altered(signature: bytes, kind: str, position: int, random_bytes: bytes) -> bytes:
    """The signature as ``kind`` spoils it: the malformed kinds libsodium refuses, a flipped bit, noise."""
    r, s = signature[:32], int.from_bytes(signature[32:], "little")
    return {
        "valid": signature,
        "flipped bit": bytes(b ^ (1 << (position % 8)) if i == position // 8 else b for i, b in enumerate(signature)),
        "S plus L": r + (s + GROUP_ORDER).to_bytes(32, "little"),
        "top bits of S set": signature[:63] + bytes([signature[63] | 0xE0]),
        "small-order R": IDENTITY_POINT + signature[32:],
        "small-order R, zero S": IDENTITY_POINT + bytes(32),
        "zeros": bytes(64),
        "random": random_bytes,
    }[kind]


KINDS = ["valid", "flipped bit", "S plus L", "top bits of S set", "small-order R", "small-order R, zero S", "zeros",
         "random"]  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(
    body=st.binary(max_size=2048),
    kind=st.sampled_from(KINDS),
    position=st.integers(0, 511),
    random_bytes=st.binary(min_size=64, max_size=64),
    signed_body_differs=st.booleans(),
)
def test_the_ed25519_verdict_is_pynacl_s(body, kind, position, random_bytes, signed_body_differs):
    signature = altered(KEY.sign(body + b"!" if signed_body_differs else body), kind, position, random_bytes)
    assert verifier_accepts(signature, body) is pynacl_accepts(signature, body)


@pytest.mark.parametrize("body", [b"", b"{}", b'{"type":"OutboundMessage"}' * 300])
def test_a_valid_signature_verifies_and_every_malformed_kind_is_refused(body):
    signature = KEY.sign(body)
    assert verifier_accepts(signature, body) and pynacl_accepts(signature, body)
    for kind in ["flipped bit", "S plus L", "top bits of S set", "small-order R", "small-order R, zero S", "zeros"]:
        spoiled = altered(signature, kind, 3, b"")
        assert not verifier_accepts(spoiled, body), kind
        assert not pynacl_accepts(spoiled, body), kind
