"""GHL custom-page SSO: decrypt and check the user-context blob GHL hands the embedded page.

GHL makes the blob with ``CryptoJS.AES.encrypt(JSON.stringify(user), SharedSecret)``: CryptoJS passphrase
mode, which is OpenSSL's ``Salted__`` format (EVP_BytesToKey with MD5, AES-256-CBC, PKCS#7). The Shared
Secret is used as a UTF-8 passphrase, never base64-decoded. See docs/ghl.md §3.3-3.4;
https://marketplace.gohighlevel.com/docs/other/user-context-marketplace-apps
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass

from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from core.json_bodies import loads_strictly

OPENSSL_MAGIC = b"Salted__"
SALT_BYTES = 8
KEY_BYTES = 32  # AES-256
IV_BYTES = 16
MAX_PAYLOAD_CHARS = 16_384  # a real blob is a few hundred characters
USER_TYPES = ("agency", "location")
MAX_ID_CHARS = 64  # GHL ids are ~20 characters; our columns hold 64


class SsoPayloadInvalid(ValueError):
    """The blob is not a user context encrypted with our Shared Secret."""


@dataclass(frozen=True, slots=True)
class SsoUser:
    """The checked fields of a decrypted GHL user context."""

    user_id: str
    company_id: str
    role: str  # "admin" | "user" (GHL may add others; only "admin" grants billing changes)
    user_type: str  # "agency" | "location": the USER's type, not the page's context
    active_location: str | None  # present only when the page is open inside a subaccount
    email: str | None
    user_name: str | None


def evp_bytes_to_key(passphrase: bytes, salt: bytes) -> tuple[bytes, bytes]:
    """Derive (key, iv) as OpenSSL EVP_BytesToKey with MD5 and one iteration, as CryptoJS does."""
    derived, block = b"", b""
    while len(derived) < KEY_BYTES + IV_BYTES:
        # MD5 is what the CryptoJS/OpenSSL format fixes; it is not our choice of hash.
        block = hashlib.md5(block + passphrase + salt, usedforsecurity=False).digest()
        derived += block
    return derived[:KEY_BYTES], derived[KEY_BYTES : KEY_BYTES + IV_BYTES]


def decrypt_sso_payload(payload: str, shared_secret: str) -> dict:
    """Decrypt a CryptoJS passphrase-mode blob with the app's Shared Secret and return the JSON object."""
    if not shared_secret:
        raise SsoPayloadInvalid("no Shared Secret configured")
    if not isinstance(payload, str) or not payload or len(payload) > MAX_PAYLOAD_CHARS:
        raise SsoPayloadInvalid("the payload must be a non-empty base64 string")
    try:
        raw = base64.b64decode(payload.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise SsoPayloadInvalid("the payload is not base64") from None
    body = raw[len(OPENSSL_MAGIC) + SALT_BYTES :]
    if not raw.startswith(OPENSSL_MAGIC) or not body or len(body) % IV_BYTES:
        raise SsoPayloadInvalid("the payload is not in CryptoJS/OpenSSL salted format")
    salt = raw[len(OPENSSL_MAGIC) : len(OPENSSL_MAGIC) + SALT_BYTES]
    key, iv = evp_bytes_to_key(shared_secret.encode("utf-8"), salt)
    decryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
    padded = decryptor.update(body) + decryptor.finalize()
    unpadder = padding.PKCS7(algorithms.AES.block_size).unpadder()
    try:
        plaintext = unpadder.update(padded) + unpadder.finalize()
        # A wrong secret usually fails the padding check but can pass it with garbage: JSON decides.
        # Strictly: with a repeated key the last one would win, so a payload such as
        # {"type": "location", "role": "user", …, "type": "agency", "role": "admin"} is refused whole.
        data = loads_strictly(plaintext.decode("utf-8"))
    except ValueError:
        raise SsoPayloadInvalid("the payload does not decrypt with the Shared Secret") from None
    if not isinstance(data, dict):
        raise SsoPayloadInvalid("the payload is not a JSON object")
    return data


def parse_sso_user(data: dict) -> SsoUser:
    """Check the decrypted fields (docs/ghl.md §3.4) and return them typed."""
    user_type = _text(data, "type", required=True)
    if user_type not in USER_TYPES:
        raise SsoPayloadInvalid(f"type must be one of {', '.join(USER_TYPES)}")
    active_location = _text(data, "activeLocation", required=user_type == "location", limit=MAX_ID_CHARS)
    return SsoUser(
        user_id=_text(data, "userId", required=True, limit=MAX_ID_CHARS),
        company_id=_text(data, "companyId", required=True, limit=MAX_ID_CHARS),
        role=_text(data, "role", required=True, limit=MAX_ID_CHARS),
        user_type=user_type,
        active_location=active_location,
        email=_text(data, "email", limit=320),
        user_name=_text(data, "userName", limit=255),
    )


def _text(data: dict, name: str, *, required: bool = False, limit: int = 64) -> str | None:
    value = data.get(name)
    if value is None or value == "":
        if required:
            raise SsoPayloadInvalid(f"{name} is missing")
        return None
    if not isinstance(value, str) or len(value) > limit or not value.isprintable():
        raise SsoPayloadInvalid(f"{name} must be a short string")
    return value
