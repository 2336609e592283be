"""Spend alerts: a client's billed units this period crossed a threshold of its monthly cap.

Each threshold (default 50, 80 and 100 % of ``monthly_cap_units``) fires once per client and period: the
alert row's unique key (client, period start, threshold) makes that hold also when two scheduler processes
check at the same moment. Every alert is listed in the portal and, when the agency set an alert URL, is POSTed
there as signed JSON (``X-Rebill-Signature: t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>``, the scheme
Stripe uses), retried with exponential backoff, each attempt kept in the delivery log. The body is flat JSON,
so a GHL workflow's "Inbound Webhook" trigger can map its fields (to text or email the client).

The check and the delivery are scheduler jobs; each commits its own work.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import logging
import secrets
from dataclasses import dataclass

from flask import current_app
from sqlalchemy import select, update
from sqlalchemy.dialects import postgresql, sqlite

from billing.alert_sender import AlertSender, check_alert_url
from billing.models import Agency, AlertDelivery, RebillClient, SpendAlert
from billing.periods import client_periods, units_in_periods
from core.database import db, utcnow
from core.encryption import SecretUnreadable, secret_box

log = logging.getLogger("billing.alerts")

DEFAULT_THRESHOLDS = (50, 80, 100)
MAX_THRESHOLDS = 10
SIGNATURE_HEADER = "X-Rebill-Signature"
EVENT_TYPE = "rebill.spend_threshold_reached"
# Attempts at 0, 30 s, 1, 2, 4, 8, 16, 32 minutes: about an hour of receiver trouble is ridden out.
MAX_ATTEMPTS = 8
FIRST_BACKOFF = dt.timedelta(seconds=30)
# A delivery being sent is leased this long, so a second scheduler does not send it at the same time.
SEND_LEASE = dt.timedelta(minutes=2)
DELIVERY_BATCH = 100


# ---- thresholds -----------------------------------------------------------------------------------------


def parse_thresholds(value: object) -> tuple[int, ...]:
    """Validate thresholds given as a list of whole percentages 1-100; raise ValueError with the reason."""
    if not isinstance(value, list) or not value or len(value) > MAX_THRESHOLDS:
        raise ValueError(f"give 1 to {MAX_THRESHOLDS} percentages of the cap, e.g. [50, 80, 100]")
    if not all(isinstance(item, int) and not isinstance(item, bool) and 1 <= item <= 100 for item in value):
        raise ValueError("each threshold is a whole percentage of the cap from 1 to 100")
    return tuple(sorted(set(value)))


def thresholds_of(client: RebillClient) -> tuple[int, ...]:
    """The client's thresholds, or the defaults."""
    if not client.alert_thresholds:
        return DEFAULT_THRESHOLDS
    return tuple(int(part) for part in client.alert_thresholds.split(","))


# ---- firing -----------------------------------------------------------------------------------------------


def check_spend_alerts(now: dt.datetime | None = None) -> int:
    """Fire every threshold a capped client has reached this period and not fired yet; commit; return how many."""
    now = now or utcnow()
    clients = db.session.scalars(
        select(RebillClient)
        .where(RebillClient.monthly_cap_units.is_not(None), RebillClient.deleted_at.is_(None))
        .order_by(RebillClient.id)
    ).all()
    periods = client_periods(clients, now)
    units = units_in_periods(periods, now)
    urls = _alert_urls({client.agency_id for client in clients})
    fired = 0
    for client in clients:
        start, end = periods[client.id]
        reached = units.get(client.id, 0)
        for threshold in thresholds_of(client):
            if reached * 100 < threshold * client.monthly_cap_units:
                continue
            alert_id = _insert_alert(client, start, threshold, reached, now)
            if alert_id is None:
                continue  # fired before in this period (or by a concurrent check)
            fired += 1
            if urls.get(client.agency_id):
                body = _alert_body(client, alert_id, threshold, reached, start, end, now)
                db.session.add(
                    AlertDelivery(
                        alert_id=alert_id,
                        agency_id=client.agency_id,
                        body=body,
                        status="pending",
                        attempts=0,
                        next_attempt_at=now,
                    )
                )
    db.session.commit()
    if fired:
        log.info("spend alerts fired", extra={"fields": {"alerts": fired}})
    return fired


def _insert_alert(client: RebillClient, start: dt.datetime, threshold: int, units: int, now: dt.datetime) -> int | None:
    dialect = postgresql if db.engine.dialect.name == "postgresql" else sqlite
    statement = (
        dialect.insert(SpendAlert)
        .values(
            agency_id=client.agency_id,
            client_id=client.id,
            period_start=start,
            threshold_percent=threshold,
            units=units,
            cap_units=client.monthly_cap_units,
            created_at=now,
        )
        .on_conflict_do_nothing(index_elements=["client_id", "period_start", "threshold_percent"])
        .returning(SpendAlert.id)
    )
    return db.session.execute(statement).scalar()


def _alert_body(
    client: RebillClient, alert_id: int, threshold: int, units: int, start: dt.datetime, end: dt.datetime,
    now: dt.datetime,
) -> str:
    return json.dumps(
        {
            "type": EVENT_TYPE,
            "alert_id": alert_id,
            "client_id": client.id,
            "client_nickname": client.nickname,
            "channel_id": client.channel_id,
            "location_id": client.location_id,
            "threshold_percent": threshold,
            "units": units,
            "cap_units": client.monthly_cap_units,
            "capped": units >= client.monthly_cap_units,
            "period_start": start.isoformat(),
            "period_end": end.isoformat(),
            "created_at": now.isoformat(),
        },
        separators=(",", ":"),
    )


def _alert_urls(agency_ids: set[int]) -> dict[int, str | None]:
    if not agency_ids:
        return {}
    rows = db.session.execute(select(Agency.id, Agency.alert_url).where(Agency.id.in_(agency_ids))).all()
    return {row.id: row.alert_url for row in rows}


# ---- delivering -------------------------------------------------------------------------------------------


@dataclass
class DeliverySummary:
    """What one delivery run did."""

    delivered: int = 0
    retrying: int = 0
    failed: int = 0


def deliver_alerts(now: dt.datetime | None = None, sender: AlertSender | None = None) -> DeliverySummary:
    """POST every due alert delivery once; commit each outcome (a slow receiver holds no lock meanwhile)."""
    now = now or utcnow()
    sender = sender or alert_sender()
    due = db.session.scalars(
        select(AlertDelivery.id)
        .where(AlertDelivery.status == "pending", AlertDelivery.next_attempt_at <= now)
        .order_by(AlertDelivery.next_attempt_at, AlertDelivery.id)
        .limit(DELIVERY_BATCH)
    ).all()
    db.session.rollback()
    summary = DeliverySummary()
    for delivery_id in due:
        outcome = _deliver_one(delivery_id, now, sender)
        if outcome is not None:
            setattr(summary, outcome, getattr(summary, outcome) + 1)
    return summary


def _deliver_one(delivery_id: int, now: dt.datetime, sender: AlertSender) -> str | None:
    claimed = db.session.execute(
        update(AlertDelivery)
        .where(AlertDelivery.id == delivery_id, AlertDelivery.status == "pending", AlertDelivery.next_attempt_at <= now)
        .values(next_attempt_at=now + SEND_LEASE)
    ).rowcount
    db.session.commit()
    if not claimed:
        return None  # another scheduler took it
    delivery = db.session.get(AlertDelivery, delivery_id)
    agency = db.session.get(Agency, delivery.agency_id)
    url, secret = agency.alert_url, _secret_of(agency)
    db.session.rollback()  # no transaction stays open while the receiver answers
    if not url or secret is None:
        result_code, error = None, "the agency removed its alert URL (or its secret cannot be decrypted)"
        give_up = True
    else:
        timestamp = int(now.timestamp())
        body = delivery.body.encode()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "Rebill-Alerts/1",
            SIGNATURE_HEADER: sign(body, secret, timestamp),
        }
        result = sender.post(url, body, headers)
        result_code, error = result.status_code, result.error
        give_up = False
        if result.delivered:
            _record(delivery_id, status="delivered", code=result_code, error=None, delivered_at=now)
            return "delivered"
    attempts = delivery.attempts + 1
    if give_up or attempts >= MAX_ATTEMPTS:
        _record(delivery_id, status="failed", code=result_code, error=error)
        log.warning("alert delivery gave up", extra={"fields": {"delivery_id": delivery_id, "error": error}})
        return "failed"
    _record(delivery_id, status="pending", code=result_code, error=error, next_attempt_at=now + backoff(attempts))
    return "retrying"


def _record(delivery_id: int, *, status: str, code: int | None, error: str | None, **values) -> None:
    db.session.execute(
        update(AlertDelivery)
        .where(AlertDelivery.id == delivery_id)
        .values(
            status=status,
            attempts=AlertDelivery.attempts + 1,
            last_attempt_at=utcnow(),
            last_status_code=code,
            last_error=error[:1000] if error else None,
            **values,
        )
    )
    db.session.commit()


def backoff(attempts: int) -> dt.timedelta:
    """Wait before the next attempt after ``attempts`` failed ones: 30 s, 1 min, 2 min, ... doubling."""
    return FIRST_BACKOFF * 2 ** (attempts - 1)


def sign(body: bytes, secret: str, timestamp: int) -> str:
    """``t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>``: receivers recompute it and compare."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def alert_sender() -> AlertSender:
    """The sender for this app: private addresses only where configuration allows it (test, development)."""
    config = current_app.config
    allowed = bool(config["REBILL_ALERT_PRIVATE_ADDRESSES"]) and config["REBILL_ENV"] != "production"
    return AlertSender(allow_private=allowed)


# ---- the agency's settings ---------------------------------------------------------------------------------


def set_alert_url(agency: Agency, url: str | None, *, new_secret: bool = False) -> str | None:
    """Set (or with None remove) the agency's alert URL; return a new signing secret when one was made.

    The secret is made with the first URL or on request, stored encrypted, and shown only in this answer.
    Raises billing.alert_sender.AlertUrlRefused for a URL of the wrong form. Flushes.
    """
    if url is None:
        agency.alert_url = None
        db.session.flush()
        return None
    agency.alert_url = check_alert_url(url)
    secret = None
    if new_secret or not agency.alert_secret_ciphertext:
        secret = f"rbwhsec_{secrets.token_urlsafe(32)}"
        agency.alert_secret_ciphertext = secret_box().encrypt(secret)
    db.session.flush()
    return secret


def _secret_of(agency: Agency) -> str | None:
    if not agency.alert_secret_ciphertext:
        return None
    try:
        return secret_box().decrypt(agency.alert_secret_ciphertext)
    except SecretUnreadable:
        return None


def list_alerts(agency: Agency, limit: int = 100) -> list[dict]:
    """The agency's latest alerts, newest first, each with its deliveries (the delivery log)."""
    alerts = db.session.execute(
        select(SpendAlert, RebillClient.nickname)
        .join(RebillClient, RebillClient.id == SpendAlert.client_id)
        .where(SpendAlert.agency_id == agency.id)
        .order_by(SpendAlert.id.desc())
        .limit(limit)
    ).all()
    ids = [alert.id for alert, _ in alerts]
    deliveries: dict[int, list[dict]] = {alert_id: [] for alert_id in ids}
    for delivery in db.session.scalars(
        select(AlertDelivery).where(AlertDelivery.alert_id.in_(ids)).order_by(AlertDelivery.id)
    ):
        deliveries[delivery.alert_id].append(
            {
                "id": delivery.id,
                "status": delivery.status,
                "attempts": delivery.attempts,
                "last_attempt_at": delivery.last_attempt_at,
                "last_status_code": delivery.last_status_code,
                "last_error": delivery.last_error,
                "next_attempt_at": delivery.next_attempt_at if delivery.status == "pending" else None,
                "delivered_at": delivery.delivered_at,
            }
        )
    return [
        {
            "id": alert.id,
            "client_id": alert.client_id,
            "client_nickname": nickname,
            "threshold_percent": alert.threshold_percent,
            "units": alert.units,
            "cap_units": alert.cap_units,
            "period_start": alert.period_start,
            "created_at": alert.created_at,
            "deliveries": deliveries[alert.id],
        }
        for alert, nickname in alerts
    ]
