"""Secrets at rest: Fernet with rotating keys (newest first), so a key can be replaced without downtime.

https://cryptography.io/en/latest/fernet/#cryptography.fernet.MultiFernet

Every encrypted column is named ``*_ciphertext``; ``rotate_stored_secrets`` finds them all by that name,
so a secret added later is rotated without touching this module.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from flask import current_app
from sqlalchemy import Column, select, update

from core.config import ConfigError
from core.database import db


class SecretBox:
    """Encrypt and decrypt short secrets (API keys, OAuth tokens) with the configured Fernet keys."""

    def __init__(self, keys: str):
        names = [key.strip() for key in keys.split(",") if key.strip()]
        try:
            fernets = [Fernet(key) for key in names]
            self._newest = fernets[0]
            self._fernet = MultiFernet(fernets)
        except (ValueError, TypeError, IndexError):
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
        try:
            return self._fernet.rotate(ciphertext.encode()).decode()
        except InvalidToken:
            raise SecretUnreadable("a stored secret cannot be decrypted with REBILL_ENCRYPTION_KEYS") from None

    def is_current(self, ciphertext: str) -> bool:
        """Tell whether a token was made with the newest key (so rotating it would change nothing)."""
        try:
            self._newest.decrypt(ciphertext.encode())
        except InvalidToken:
            return False
        return True


class SecretUnreadable(RuntimeError):
    """A stored secret was made by a key that is no longer configured."""


def secret_box() -> SecretBox:
    """Return the current app's SecretBox."""
    return current_app.extensions["rebill.secret_box"]


@dataclass
class ColumnRotation:
    """What rotation found in one encrypted column."""

    column: str
    rotated: int = 0
    current: int = 0
    unreadable: int = 0


ROTATION_BATCH = 200


def encrypted_columns() -> list[Column]:
    """Every ``*_ciphertext`` column of the mapped tables, in a stable order."""
    return [
        column
        for table in db.metadata.sorted_tables
        for column in table.columns
        if column.name.endswith("_ciphertext")
    ]


def rotate_stored_secrets(*, batch: int = ROTATION_BATCH) -> list[ColumnRotation]:
    """Re-encrypt every stored secret not yet under the newest key; commits per batch.

    Idempotent and resumable: a secret already under the newest key is only counted, so a run stopped
    half-way is finished by running it again. Each row is rewritten only if its ciphertext is still the
    one read (a token refreshed meanwhile was written under the newest key anyway). A secret no
    configured key can read is counted as unreadable and left as it is.
    """
    box = secret_box()
    results = []
    for column in encrypted_columns():
        table = column.table
        [key] = table.primary_key.columns
        result = ColumnRotation(f"{table.name}.{column.name}")
        last = None
        while True:
            query = select(key, column).where(column.is_not(None)).order_by(key).limit(batch)
            rows = db.session.execute(query if last is None else query.where(key > last)).all()
            for row_id, ciphertext in rows:
                if box.is_current(ciphertext):
                    result.current += 1
                    continue
                try:
                    rotated = box.rotate(ciphertext)
                except SecretUnreadable:
                    result.unreadable += 1
                    continue
                changed = db.session.execute(
                    update(table).where(key == row_id, column == ciphertext).values({column.name: rotated})
                ).rowcount
                if changed:
                    result.rotated += 1
                else:
                    result.current += 1  # rewritten meanwhile, under the newest key
            db.session.commit()
            if len(rows) < batch:
                break
            last = rows[-1][0]
        results.append(result)
    return results
