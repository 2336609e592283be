"""GHL tables: OAuth tokens, agency-level installs, subaccounts (locations) and raw webhook deliveries."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import Boolean, ForeignKey, Integer, String, Text, false, true
from sqlalchemy.orm import Mapped, mapped_column

from core.database import BigId, TimestampMixin, UTCDateTime, db, utcnow


class GhlToken(TimestampMixin, db.Model):
    """One OAuth token pair per resource (a companyId or a locationId), encrypted at rest."""

    __tablename__ = "ghl_token"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    resource_id: Mapped[str] = mapped_column(String(64), unique=True)
    user_type: Mapped[str] = mapped_column(String(16))  # Company | Location
    company_id: Mapped[str] = mapped_column(String(64), index=True)
    location_id: Mapped[str | None] = mapped_column(String(64))
    access_token_ciphertext: Mapped[str] = mapped_column(Text)
    refresh_token_ciphertext: Mapped[str | None] = mapped_column(Text)
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    scope: Mapped[str | None] = mapped_column(Text)
    needs_reauth: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    reauth_reason: Mapped[str | None] = mapped_column(Text)
    refreshed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())


class GhlCompanyInstall(TimestampMixin, db.Model):
    """Rebill installed at agency level (a Company install), from the OAuth callback or the INSTALL webhook."""

    __tablename__ = "ghl_company_install"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    agency_id: Mapped[int] = mapped_column(ForeignKey("agency.id"), unique=True)
    is_installed: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())
    installed_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    uninstalled_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    plan_id: Mapped[str | None] = mapped_column(String(64))


class GhlLocation(TimestampMixin, db.Model):
    """A subaccount of an agency, as GHL reported it (installedLocations, LocationCreate/Update, INSTALL)."""

    __tablename__ = "ghl_location"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    agency_id: Mapped[int] = mapped_column(ForeignKey("agency.id"), index=True)
    location_id: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str | None] = mapped_column(String(255))
    is_installed: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())
    uninstalled_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())


class GhlWebhookDelivery(db.Model):
    """A verified webhook exactly as received, stored before processing so nothing accepted is lost."""

    __tablename__ = "ghl_webhook_delivery"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    webhook_id: Mapped[str] = mapped_column(String(128), unique=True)
    event_type: Mapped[str] = mapped_column(String(64))
    company_id: Mapped[str | None] = mapped_column(String(64))
    location_id: Mapped[str | None] = mapped_column(String(64))
    body: Mapped[str] = mapped_column(Text)
    signature_scheme: Mapped[str] = mapped_column(String(16))  # ed25519 | rsa
    received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # received | processed | failed | ignored
    status: Mapped[str] = mapped_column(String(12), default="received", server_default="received")
    error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    processed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
