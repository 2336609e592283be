"""Secrets at rest: Fernet with rotating keys (newest first), so a key can be replaced without downtime.

https://cryptography.io/en/latest/fernet/#cryptography.fernet.MultiFernet
"""

from __future__ import annotations

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from flask import current_app

from core.config import ConfigError


class SecretBox:
    """Encrypt and decrypt short secrets (API keys, OAuth tokens) with the configured Fernet keys."""

    def __init__(self, keys: str):
        names = [key.strip() for key in keys.split(",") if key.strip()]
        try:
            self._fernet = MultiFernet([Fernet(key) for key in names])
        except (ValueError, TypeError):
            raise ConfigError(
                "REBILL_ENCRYPTION_KEYS must be comma-separated Fernet keys "
                '(make one with: python -c "from cryptography.fernet import Fernet; '
                'print(Fernet.generate_key().decode())")'
            ) from None

    def encrypt(self, plaintext: str) -> str:
        """Encrypt with the newest key."""
        return self._fernet.encrypt(plaintext.encode()).decode()

    def decrypt(self, ciphertext: str) -> str:
        """Decrypt with whichever configured key made the token."""
        try:
            return self._fernet.decrypt(ciphertext.encode()).decode()
        except InvalidToken:
            raise SecretUnreadable("a stored secret cannot be decrypted with REBILL_ENCRYPTION_KEYS") from None

    def rotate(self, ciphertext: str) -> str:
        """Re-encrypt a token under the newest key."""
        return self._fernet.rotate(ciphertext.encode()).decode()


class SecretUnreadable(RuntimeError):
    """A stored secret was made by a key that is no longer configured."""


def secret_box() -> SecretBox:
    """Return the current app's SecretBox."""
    return current_app.extensions["rebill.secret_box"]
