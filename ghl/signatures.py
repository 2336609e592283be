"""Verify GHL webhook signatures over the raw request body (docs/ghl.md §2.3).

``X-GHL-Signature``: Ed25519 (current). ``X-WH-Signature``: RSA PKCS#1 v1.5 + SHA-256 (legacy, deprecated
2026-07-01). Both base64. Ed25519 is checked first when present and never falls back to RSA (as the
SDKs do); a request with neither header is rejected — never "skip verification".
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any, Protocol

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from nacl import bindings as nacl_bindings  # importing it runs sodium_init(), once per process
from nacl._sodium import ffi as _sodium_ffi
from nacl._sodium import lib as _sodium

from core.config import ConfigError

ED25519_HEADER = "X-GHL-Signature"
RSA_HEADER = "X-WH-Signature"
ED25519_SIGNATURE_BYTES = nacl_bindings.crypto_sign_BYTES  # 64
MAX_SIGNATURE_CHARS = 2048  # a 4096-bit RSA signature is 684 base64 characters
_RSA_PADDING = padding.PKCS1v15()
_NULL = _sodium_ffi.NULL
_SHA256 = hashes.SHA256()


class HeaderLookup(Protocol):
    """What the verifier reads of a request's headers: werkzeug's Headers, or ghl.webhooks.WsgiHeaders."""

    def get(self, name: str, default: str | None = None) -> str | None: ...


class WebhookVerifier:
    """Both of GHL's public keys, parsed once per app."""

    def __init__(self, ed25519_pem: str | None, rsa_pem: str | None):
        ed25519 = _load_key(ed25519_pem, Ed25519PublicKey, "GHL_WEBHOOK_ED25519_KEY")
        # Ed25519 is verified by libsodium (PyNaCl), which costs less CPU than OpenSSL's implementation (see
        # bench/README.md): the signature check is the largest single cost of the webhook hot path.
        self._ed25519: bytes | None = None if ed25519 is None else ed25519.public_bytes_raw()
        self._rsa = _load_key(rsa_pem, RSAPublicKey, "GHL_WEBHOOK_RSA_KEY")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> WebhookVerifier:
        """Build from GHL_WEBHOOK_ED25519_KEY / GHL_WEBHOOK_RSA_KEY; a malformed key stops the start."""
        return cls(config.get("GHL_WEBHOOK_ED25519_KEY"), config.get("GHL_WEBHOOK_RSA_KEY"))

    def verify(self, body: bytes, headers: HeaderLookup) -> str | None:
        """Return the scheme that verified ``body`` ("ed25519" or "rsa"), or None if none did."""
        signature = headers.get(ED25519_HEADER)
        if signature:
            return "ed25519" if self._verify_ed25519(signature, body) else None
        signature = headers.get(RSA_HEADER)
        if signature:
            return "rsa" if self._verify_rsa(signature, body) else None
        return None

    def _verify_ed25519(self, signature: str, body: bytes) -> bool:
        raw = _decode(signature)
        if self._ed25519 is None or raw is None or len(raw) != ED25519_SIGNATURE_BYTES:
            return False
        # The libsodium call PyNaCl's VerifyKey.verify makes (crypto_sign_open over signature + body, so
        # exactly its verdict, libsodium's strictness on malformed signatures included), without the copy of
        # the body it allocates and returns: given no output buffer, libsodium only verifies. Nothing is
        # shared between calls, so concurrent requests (threads or greenlets) cannot meet here.
        signed = raw + body
        return _sodium.crypto_sign_open(_NULL, _NULL, signed, len(signed), self._ed25519) == 0

    def _verify_rsa(self, signature: str, body: bytes) -> bool:
        raw = _decode(signature)
        if self._rsa is None or raw is None:
            return False
        try:
            self._rsa.verify(raw, body, _RSA_PADDING, _SHA256)
        except (InvalidSignature, ValueError):
            return False
        return True


def _decode(signature: str) -> bytes | None:
    if len(signature) > MAX_SIGNATURE_CHARS:
        return None
    try:
        return base64.b64decode(signature.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None


def _load_key(pem: str | None, expected: type, setting: str):
    if not pem:
        return None  # that scheme is then always rejected
    try:
        key = serialization.load_pem_public_key(pem.encode())
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(f"{setting} is not a PEM public key") from None
    if not isinstance(key, expected):
        raise ConfigError(f"{setting} is not an {expected.__name__.removesuffix('PublicKey')} public key")
    return key
