"""Encrypt a GHL SSO payload exactly as GHL does: ``CryptoJS.AES.encrypt(JSON.stringify(user), secret)``.

Byte-for-byte CryptoJS passphrase mode (a random 8-byte salt, OpenSSL ``Salted__`` framing, EVP_BytesToKey
with MD5, AES-256-CBC, PKCS#7, standard base64). tests/portal/test_sso.py pins it against real crypto-js
4.2.0 output (fixtures/cryptojs_sso.json).
"""

from __future__ import annotations

import base64
import json
import os

from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from ghl.sso import OPENSSL_MAGIC, evp_bytes_to_key


def cryptojs_encrypt(plaintext: str, passphrase: str, salt: bytes | None = None) -> str:
    """Return what ``CryptoJS.AES.encrypt(plaintext, passphrase).toString()`` returns for this salt."""
    salt = os.urandom(8) if salt is None else salt
    key, iv = evp_bytes_to_key(passphrase.encode("utf-8"), salt)
    padder = padding.PKCS7(128).padder()
    padded = padder.update(plaintext.encode("utf-8")) + padder.finalize()
    encryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    body = encryptor.update(padded) + encryptor.finalize()
    return base64.b64encode(OPENSSL_MAGIC + salt + body).decode("ascii")


def ghl_sso_payload(secret: str, **user) -> str:
    """Encrypt a user context the way GHL's custom page receives it (JSON.stringify has no spaces)."""
    return cryptojs_encrypt(json.dumps(user, separators=(",", ":"), ensure_ascii=False), secret)
