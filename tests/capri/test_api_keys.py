"""API keys: shown once, stored hashed, refused when revoked or unknown, scoped to their agency."""

from __future__ import annotations

import datetime as dt
import hashlib

import pytest
from sqlalchemy import select, text

from billing.agencies import ensure_agency
from capri.api_keys import authenticate, create_api_key, list_api_keys, revoke_api_key
from capri.models import ApiKey
from core.database import db, utcnow
from core.errors import ClientInvalid, NotFound


def test_a_created_key_is_stored_only_as_a_hash_with_its_visible_prefix(app_context):
    agency = ensure_agency("company-a")
    api_key, full_key = create_api_key(agency.id, "production")
    db.session.commit()

    assert full_key.startswith(api_key.prefix + "_")
    assert api_key.prefix.startswith("rbk_") and len(api_key.prefix) == 16
    assert len(full_key) == 16 + 1 + 43
    assert api_key.key_hash == hashlib.sha256(full_key.encode()).hexdigest()
    stored = db.session.execute(text("SELECT * FROM api_key")).mappings().one()
    assert full_key not in {str(value) for value in stored.values()}
    assert stored["name"] == "production"


def test_keys_are_unique_and_random(app_context):
    agency = ensure_agency("company-a")
    keys = {create_api_key(agency.id)[1] for _ in range(20)}
    assert len(keys) == 20
    assert len({key.split("_")[1] for key in keys}) == 20


def test_authenticate_returns_the_key_of_its_agency(app_context):
    a, b = ensure_agency("company-a"), ensure_agency("company-b")
    _, key_a = create_api_key(a.id)
    _, key_b = create_api_key(b.id)
    db.session.commit()
    assert authenticate(key_a).agency_id == a.id
    assert authenticate(key_b).agency_id == b.id


@pytest.mark.parametrize(
    "mangle",
    [
        lambda key: key[:-1] + ("A" if key[-1] != "A" else "B"),  # right prefix, wrong secret
        lambda key: key[:-1],  # too short
        lambda key: key + "x",  # too long
        lambda key: key.replace("rbk_", "rbx_"),  # wrong scheme
        lambda key: key.replace("_", "-"),
        lambda key: key.upper(),
        lambda key: "",
        lambda key: " " + key,
        lambda key: key[:20] + "é" + key[21:],  # not from the alphabet
        lambda key: "rbk_" + "a" * 12 + "_" + "b" * 43,  # well formed, unknown
    ],
)
def test_authenticate_refuses_anything_but_the_exact_key(app_context, mangle):
    agency = ensure_agency("company-a")
    _, full_key = create_api_key(agency.id)
    db.session.commit()
    assert authenticate(mangle(full_key)) is None


def test_a_revoked_key_is_refused_and_revoking_twice_keeps_the_first_time(app_context):
    agency = ensure_agency("company-a")
    api_key, full_key = create_api_key(agency.id)
    db.session.commit()
    revoke_api_key(agency.id, api_key.id)
    db.session.commit()
    first_revocation = api_key.revoked_at
    revoke_api_key(agency.id, api_key.id)
    db.session.commit()
    assert authenticate(full_key) is None
    assert api_key.revoked_at == first_revocation


def test_another_agencys_key_id_is_not_found_and_stays_live(app_context):
    a, b = ensure_agency("company-a"), ensure_agency("company-b")
    key_b, full_key_b = create_api_key(b.id)
    db.session.commit()
    with pytest.raises(NotFound):
        revoke_api_key(a.id, key_b.id)
    with pytest.raises(NotFound):
        revoke_api_key(a.id, 999_999)
    assert authenticate(full_key_b) is not None


def test_list_shows_only_the_agencys_keys_newest_first_revoked_included(app_context):
    a, b = ensure_agency("company-a"), ensure_agency("company-b")
    first, _ = create_api_key(a.id, "first")
    create_api_key(a.id, "second")
    create_api_key(b.id, "other")
    revoke_api_key(a.id, first.id)
    db.session.commit()
    listed = list_api_keys(a.id)
    assert [key.name for key in listed] == ["second", "first"]
    assert listed[1].revoked_at is not None and listed[0].revoked_at is None


def test_create_checks_the_agency_and_the_name(app_context):
    with pytest.raises(NotFound):
        create_api_key(12345)
    agency = ensure_agency("company-a")
    with pytest.raises(ClientInvalid, match="120"):
        create_api_key(agency.id, "x" * 121)
    api_key, _ = create_api_key(agency.id, "   ")
    assert api_key.name is None


def _last_used(key_id: int) -> dt.datetime | None:
    db.session.expire_all()
    return db.session.get(ApiKey, key_id).last_used_at


def test_last_use_is_recorded_at_most_once_a_minute(app_context):
    agency = ensure_agency("company-a")
    api_key, full_key = create_api_key(agency.id)
    db.session.commit()
    assert api_key.last_used_at is None

    authenticate(full_key)
    db.session.commit()
    first_use = _last_used(api_key.id)
    assert first_use is not None and utcnow() - first_use < dt.timedelta(seconds=30)

    # Within the minute: no write (the stored value stays exactly the same).
    authenticate(full_key)
    db.session.commit()
    assert _last_used(api_key.id) == first_use

    # Older than a minute: refreshed.
    long_ago = utcnow() - dt.timedelta(minutes=5)
    db.session.execute(
        ApiKey.__table__.update().where(ApiKey.id == api_key.id).values(last_used_at=long_ago)
    )
    db.session.commit()
    authenticate(full_key)
    db.session.commit()
    assert _last_used(api_key.id) > long_ago + dt.timedelta(minutes=4)


def test_a_refused_key_records_no_use(app_context):
    agency = ensure_agency("company-a")
    api_key, full_key = create_api_key(agency.id)
    revoke_api_key(agency.id, api_key.id)
    db.session.commit()
    authenticate(full_key)
    db.session.commit()
    assert db.session.scalar(select(ApiKey.last_used_at).where(ApiKey.id == api_key.id)) is None
