"""Which client a usage event belongs to, and what the event measures for it.

A usage event names exactly one of ``channel_id`` (usage API) or ``location_id`` (GHL subaccount); the
client that bills it has the matching ``provider`` and that id as its ``source_key``. These functions are
the one place that correspondence is written. What an event of its source counts for the client depends
on the client's ``charge_by`` and ``message_source`` (docs/billing-rules.md#what-counts).
"""

from __future__ import annotations

from billing.states import Provider, UsageSource

ClientKey = tuple[int, str, str]  # (agency_id, provider, source_key): at most one live client per key
# Plain words for client_key, which runs once per aggregated event (an enum member lookup there is measurable).
_CHANNEL, _SUBACCOUNT = Provider.CAPRI_API.value, Provider.GHL.value


def client_source(channel_id: str | None, location_id: str | None) -> tuple[str, str | None]:
    """Return (provider, source_key) of the client that bills usage of this channel or else this subaccount."""
    if channel_id is not None:
        return Provider.CAPRI_API, channel_id
    return Provider.GHL, location_id


def client_key(agency_id: int, channel_id: str | None, location_id: str | None) -> ClientKey:
    """Return the key of the live client of an agency that bills usage of this channel or else this subaccount."""
    if channel_id is not None:
        return agency_id, _CHANNEL, channel_id
    return agency_id, _SUBACCOUNT, location_id


def source_field(provider: str) -> str:
    """Return the field (of a client and of a usage event) that holds a provider's source key."""
    return "channel_id" if provider == Provider.CAPRI_API else "location_id"


# The GHL message directions each message source counts; "platform" counts the AI platform's `messages`.
GHL_DIRECTIONS = {"ghl_outbound": ("outbound",), "ghl_inbound": ("inbound",), "ghl_all": ("outbound", "inbound")}


def usage_measure(charge_by: str, provider: str, message_source: str | None):
    """Return the function (source, input, output, messages, direction) -> usage for a client's settings."""
    # Plain words: this runs once per event.
    usage_api, webhook = UsageSource.USAGE_API.value, UsageSource.GHL_WEBHOOK.value
    if charge_by == "tokens":
        # Tokens are reported only by the AI platform, through the usage API.
        return lambda source, inputs, outputs, messages, direction: inputs + outputs if source == usage_api else 0
    if provider == Provider.CAPRI_API or message_source == "platform":
        return lambda source, inputs, outputs, messages, direction: messages if source == usage_api else 0
    directions = GHL_DIRECTIONS.get(message_source or "ghl_outbound", ())
    return lambda source, inputs, outputs, messages, direction: (
        messages if source == webhook and direction in directions else 0
    )
