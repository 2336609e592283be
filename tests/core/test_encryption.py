"""Secrets at rest: MultiFernet, newest key first, rotation without losing old secrets."""

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import select

from billing.agencies import ensure_agency, find_agency
from billing.stripe_gateway import gateway_for
from core.database import db
from core.encryption import SecretBox, SecretUnreadable, encrypted_columns, secret_box
from ghl.client import TokenGrant
from ghl.models import GhlToken
from ghl.tokens import access_token, save_grant


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


# rotate-keys over a real database ------------------------------------------------------------------


def store_secrets(app, stripe_key: str = "sk_test_rotate1234") -> None:
    """An agency with a Stripe key and an OAuth token pair, written by the code that writes them."""
    with app.app_context():
        agency = ensure_agency("rotation-company")
        agency.stripe_key_ciphertext = secret_box().encrypt(stripe_key)  # what stripe_connection stores
        save_grant(TokenGrant(access_token="ghl-access", refresh_token="ghl-refresh", expires_in=86399,
                              user_type="Company", company_id="rotation-company", location_id=None))
        db.session.commit()


def rotate(app) -> tuple[int, str]:
    result = app.test_cli_runner().invoke(args=["rebill", "rotate-keys"])
    return result.exit_code, result.output


def test_after_rotate_keys_the_old_key_can_be_removed(make_app):
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    store_secrets(make_app(REBILL_ENCRYPTION_KEYS=old))
    both = make_app(REBILL_ENCRYPTION_KEYS=f"{new},{old}")
    code, output = rotate(both)
    assert code == 0, output
    assert "agency.stripe_key_ciphertext: rotated=1 current=0 unreadable=0" in output
    assert "ghl_token.refresh_token_ciphertext: rotated=1" in output
    assert output.splitlines()[-2] == "rotated=3 current=0 unreadable=0"
    code, output = rotate(both)  # idempotent: a second run rewrites nothing
    assert (code, output.splitlines()[-2]) == (0, "rotated=0 current=3 unreadable=0")

    only_new = make_app(REBILL_ENCRYPTION_KEYS=new)
    with only_new.app_context():
        assert access_token("rotation-company") == "ghl-access"
        token = db.session.scalars(select(GhlToken)).one()
        assert secret_box().decrypt(token.refresh_token_ciphertext) == "ghl-refresh"
        gateway_for(find_agency("rotation-company"))  # the Stripe key decrypts: no StripeKeyRejected
        for column in encrypted_columns():
            for ciphertext in db.session.scalars(select(column).where(column.is_not(None))):
                secret_box().decrypt(ciphertext)


def test_a_half_done_rotation_is_finished_by_running_it_again(make_app):
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    store_secrets(make_app(REBILL_ENCRYPTION_KEYS=old))
    both = make_app(REBILL_ENCRYPTION_KEYS=f"{new},{old}")
    with both.app_context():  # as if a run stopped after the Stripe keys
        agency = find_agency("rotation-company")
        agency.stripe_key_ciphertext = secret_box().rotate(agency.stripe_key_ciphertext)
        db.session.commit()
    code, output = rotate(both)
    assert (code, output.splitlines()[-2]) == (0, "rotated=2 current=1 unreadable=0")


def test_secrets_no_configured_key_can_read_are_reported_and_left_alone(make_app):
    lost, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    store_secrets(make_app(REBILL_ENCRYPTION_KEYS=lost))
    app = make_app(REBILL_ENCRYPTION_KEYS=new)
    code, output = rotate(app)
    assert code == 1
    assert "rotated=0 current=0 unreadable=3" in output and "cannot be read" in output
    with make_app(REBILL_ENCRYPTION_KEYS=lost).app_context():
        assert access_token("rotation-company") == "ghl-access"  # untouched
