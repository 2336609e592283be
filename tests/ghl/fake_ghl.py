"""GHL as our tests see it: recorded payloads, webhook signing with test keys, token answers."""

from __future__ import annotations

import base64
import copy
import datetime as dt
import itertools
import json
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from sqlalchemy import func, select

from core.database import db, utcnow
from ghl.client import TokenGrant
from ghl.models import GhlToken, GhlWebhookDelivery
from ghl.tokens import save_grant

FIXTURES = Path(__file__).parent.parent / "fixtures" / "ghl"
CLIENT_ID = "6650aaaabbbbccccdddd0001-lx1abcde"  # tests/conftest.py base_config
APP_ID = CLIENT_ID.split("-")[0]
API = "https://services.leadconnectorhq.test"
TOKEN_URL = f"{API}/oauth/token"
LOCATION_TOKEN_URL = f"{API}/oauth/locationToken"
INSTALLED_LOCATIONS_URL = f"{API}/oauth/installedLocations"
COMPANY_ID = "GNb7aIv4rQFVb9iwNl5K"


def load_payload(name: str) -> dict:
    """Return a recorded payload from tests/fixtures/ghl/<name>.json (a fresh copy)."""
    return copy.deepcopy(json.loads((FIXTURES / f"{name}.json").read_text()))


class Signer:
    """Sign webhook bodies the way GHL does, with test keys."""

    def __init__(self):
        self.ed25519_key = ed25519.Ed25519PrivateKey.generate()
        self.rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def ed25519(self, body: bytes) -> str:
        return base64.b64encode(self.ed25519_key.sign(body)).decode()

    def rsa(self, body: bytes) -> str:
        return base64.b64encode(self.rsa_key.sign(body, padding.PKCS1v15(), hashes.SHA256())).decode()

    def headers(self, body: bytes, scheme: str = "ed25519") -> dict[str, str]:
        if scheme == "ed25519":
            return {"X-GHL-Signature": self.ed25519(body), "Content-Type": "application/json"}
        return {"X-WH-Signature": self.rsa(body), "Content-Type": "application/json"}

    def config(self) -> dict[str, str]:
        """The two config variables that make an app trust these keys."""
        return {
            "GHL_WEBHOOK_ED25519_KEY": public_pem(self.ed25519_key),
            "GHL_WEBHOOK_RSA_KEY": public_pem(self.rsa_key),
        }


def public_pem(private_key) -> str:
    return (
        private_key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


_webhook_ids = itertools.count(1)


def encode(payload: dict, *, webhook_id: str | None = "auto", app_id: str | None = APP_ID) -> bytes:
    """Serialise a payload as GHL sends it (compact JSON), adding webhookId, appId and timestamp."""
    payload = dict(payload)
    if webhook_id == "auto":
        payload["webhookId"] = f"wh-{next(_webhook_ids):06d}"
    elif webhook_id is not None:
        payload["webhookId"] = webhook_id
    if app_id is not None:
        payload["appId"] = app_id
    payload.setdefault("timestamp", utcnow().isoformat().replace("+00:00", "Z"))
    return json.dumps(payload, separators=(",", ":")).encode()


class WebhookSender:
    """Post signed webhooks to the app, as GHL would."""

    def __init__(self, client, signer: Signer):
        self.client = client
        self.signer = signer

    def send(self, payload: dict, *, scheme: str = "ed25519", **options):
        body = encode(payload, **options)
        return self.post(body, self.signer.headers(body, scheme))

    def post(self, body: bytes, headers: dict[str, str]):
        return self.client.post("/webhooks/ghl", data=body, headers=headers)


def installed_locations_server(locations: list[dict], *, page_cap: int, count: bool = True):
    """A ``responses`` callback for GET /oauth/installedLocations that honours skip but caps every page at
    ``page_cap`` rows whatever ``limit`` asks (the spec states no maximum), with or without ``count``."""

    def answer(request):
        query = parse_qs(urlsplit(request.url).query)
        skip = int(query["skip"][0])
        limit = min(int(query["limit"][0]), page_cap)
        body = {"locations": locations[skip : skip + limit], "installToFutureLocations": True}
        if count:
            body["count"] = len(locations)
        return 200, {"Content-Type": "application/json"}, json.dumps(body)

    return answer


def delivery_count() -> int:
    return db.session.scalar(select(func.count()).select_from(GhlWebhookDelivery))


def deliveries() -> list[GhlWebhookDelivery]:
    db.session.expire_all()
    return list(db.session.scalars(select(GhlWebhookDelivery).order_by(GhlWebhookDelivery.id)))


def token_answer(access: str, refresh: str | None = None, **fields) -> dict:
    """A token-endpoint answer as GHL sends it."""
    answer = {"access_token": access, "token_type": "Bearer", "expires_in": 86399} | fields
    if refresh:
        answer["refresh_token"] = refresh
    return answer


def store_token(
    resource_id: str,
    *,
    user_type: str = "Company",
    company_id: str = COMPANY_ID,
    access: str = "access-0",
    refresh: str | None = "refresh-0",
    expires_at: dt.datetime | None = None,
) -> None:
    """Store a token row (committed), optionally already expired."""
    save_grant(
        TokenGrant(
            access_token=access,
            refresh_token=refresh,
            expires_in=86399,
            user_type=user_type,
            company_id=company_id,
            location_id=resource_id if user_type == "Location" else None,
        )
    )
    db.session.commit()
    if expires_at is not None:
        token = db.session.scalars(select(GhlToken).where(GhlToken.resource_id == resource_id)).one()
        token.expires_at = expires_at
        db.session.commit()


def stored_token(resource_id: str) -> GhlToken | None:
    db.session.expire_all()
    return db.session.scalars(select(GhlToken).where(GhlToken.resource_id == resource_id)).one_or_none()


def an_hour_ago() -> dt.datetime:
    return utcnow() - dt.timedelta(hours=1)
