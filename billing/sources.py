"""Which client a usage event belongs to: the one mapping its API channel, or the one mapping its GHL subaccount.

A usage event names exactly one of ``channel_id`` (usage API) or ``location_id`` (GHL subaccount); the
client that bills it has the matching ``provider`` and that id as its ``source_key``. These functions are
the one place that correspondence is written.
"""

from __future__ import annotations

ClientKey = tuple[int, str, str]  # (agency_id, provider, source_key): at most one live client per key

CHANNEL_PROVIDER = "capri_api"
SUBACCOUNT_PROVIDER = "ghl"


def client_source(channel_id: str | None, location_id: str | None) -> tuple[str, str | None]:
    """Return (provider, source_key) of the client that bills usage of this channel or else this subaccount."""
    if channel_id is not None:
        return CHANNEL_PROVIDER, channel_id
    return SUBACCOUNT_PROVIDER, location_id


def client_key(agency_id: int, channel_id: str | None, location_id: str | None) -> ClientKey:
    """Return the key of the live client of an agency that bills usage of this channel or else this subaccount."""
    if channel_id is not None:
        return agency_id, CHANNEL_PROVIDER, channel_id
    return agency_id, SUBACCOUNT_PROVIDER, location_id


def source_field(provider: str) -> str:
    """Return the field (of a client and of a usage event) that holds a provider's source key."""
    return "channel_id" if provider == CHANNEL_PROVIDER else "location_id"
