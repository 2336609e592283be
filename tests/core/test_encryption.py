"""Secrets at rest: MultiFernet, newest key first, rotation without losing old secrets."""

import pytest
from cryptography.fernet import Fernet

from core.encryption import SecretBox, SecretUnreadable


def test_round_trip_does_not_store_the_plaintext():
    box = SecretBox(Fernet.generate_key().decode())
    token = box.encrypt("sk_test_abcdef1234")
    assert "sk_test" not in token
    assert box.decrypt(token) == "sk_test_abcdef1234"


def test_rotation_reads_old_tokens_and_rewrites_them_under_the_newest_key():
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    token = SecretBox(old).encrypt("secret")
    rotated_box = SecretBox(f"{new},{old}")
    assert rotated_box.decrypt(token) == "secret"
    rotated = rotated_box.rotate(token)
    assert SecretBox(new).decrypt(rotated) == "secret"


def test_a_secret_from_a_removed_key_is_reported_not_garbled():
    token = SecretBox(Fernet.generate_key().decode()).encrypt("secret")
    with pytest.raises(SecretUnreadable):
        SecretBox(Fernet.generate_key().decode()).decrypt(token)
