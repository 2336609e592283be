"""The OpenAPI 3.1 document of the usage API, built from the same limits the validator enforces."""

from __future__ import annotations

from typing import Any

from billing.spend import SOURCE_STATUSES
from capri.validation import (
    CHANNEL_MAX_LENGTH,
    COUNT_FIELDS,
    COUNT_MAX,
    EARLIEST_OCCURRED_AT,
    FLAG_OLDER_THAN_STRIPE_WINDOW,
    ID_MAX_LENGTH,
    LOCATION_ID_MAX_LENGTH,
    MAX_BODY_BYTES,
    MAX_EVENTS,
    MAX_STRUCTURE_BYTES,
    MODEL_MAX_LENGTH,
    OCCURRED_AT_MAX_LENGTH,
)

# No C0/C1 control characters (NUL included): they cannot be stored or shown faithfully. The end is
# "(?![\s\S])" (nothing follows), not "$": Python's re, which jsonschema uses, lets "$" match before a
# final newline, so "a\n" would pass Python's check while the validator (and ECMA-262) refuse it.
PRINTABLE_TEXT = "^[^\\u0000-\\u001F\\u007F-\\u009F]*(?![\\s\\S])"

API_DESCRIPTION = f"""\
The AI platform reports token and message usage to Rebill here, per Capri API channel or per GHL
subaccount (`location_id`). Rebill counts it against the agency's clients and logs Stripe units.

**Authentication.** `Authorization: Bearer <API key>`; the agency creates keys in the Rebill portal or with
`flask --app app rebill api-key create --company <companyId>`. The key alone decides the agency: there is no
agency field in the body.

**Batches.** Up to {MAX_EVENTS} events and {MAX_BODY_BYTES // (1024 * 1024)} MiB per request. Each event is
checked on its own and is accepted or rejected whole; the answer has one result per event, in order.
Per-event validation happens in the answer, not in the request: an invalid event is a `rejected` result in
a 200, and only a body that is not `{{"events": [...]}}` is a 400.

**Idempotency.** `id` is the idempotency key, scoped to the agency. An id that was accepted before (in an
earlier batch or earlier in the same batch) answers `duplicate` and is not counted again, *even when the
repeated event carries different contents*: the first accepted version is the one that counts. A rejected
event does not use up its id, so it can be corrected and sent again. Checks run before the idempotency
lookup, so a malformed repeat of an accepted id answers `rejected`.

**Strictness.** Unknown fields are rejected (a misspelt count silently ignored would under-bill). For the
optional fields `null` means "not given". Counts are JSON integers written without fraction or exponent.

**Mapping.** Usage for a channel or subaccount that no client maps yet is kept and shown to the agency as
unmapped usage; it is not billed retroactively unless the agency chooses so.
"""

EVENT_DESCRIPTION = f"""\
One usage fact. Exactly one of `channel` or `location_id`; at least one of the counts above 0.
`occurred_at` must carry a timezone, must not be more than 5 minutes in the future and not before
{EARLIEST_OCCURRED_AT.date().isoformat()}. Events older than 35 days are accepted into the ledger but
flagged `{FLAG_OLDER_THAN_STRIPE_WINDOW}`: Stripe refuses meter events that old, so their units may be
reported with a later timestamp or not reach Stripe in that period."""


EVENTS_DESCRIPTION = """\
The events, each validated on its own in the answer, not by the request's schema: an event that is not a
valid `UsageEvent` does not fail the request (no 400); its result is `rejected` with a `reason`, and the
other events of the batch are still recorded."""


STATUS_DESCRIPTION = """\
Whether the client mapping this API channel (`channel`) or GHL subaccount (`location_id`) may spend now,
and its billed units this period. Ask before serving a request and refuse as your product prefers (403
like Assistable, 429 like LiteLLM) when the status is not `active`:

- `active`: billed normally.
- `paused`: the agency paused the client; usage is recorded, never billed.
- `capped`: this period's billed units reached the client's monthly cap (`period.cap_units`); usage is
  recorded, not billed, until the period rolls over or the agency raises the cap.
- `payment_failed`: Stripe could not collect the client's last invoice (billing continues unless the agency
  chose to pause the client for it).
- `shadow`: counted and shown, never sent to Stripe.
- `unmapped`: no client maps this channel or subaccount.

The answer may be cached for a few seconds (`Cache-Control: private, max-age=5`)."""


def _text(max_length: int, description: str) -> dict[str, Any]:
    return {
        "type": "string",
        "minLength": 1,
        "maxLength": max_length,
        "pattern": PRINTABLE_TEXT,
        "description": description,
    }


def _optional(schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "type": [schema["type"], "null"]}


def _count(name: str, description: str) -> dict[str, Any]:
    maximum = COUNT_MAX[name]
    return {"type": ["integer", "null"], "minimum": 0, "maximum": maximum, "default": 0, "description": description}


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def openapi_document() -> dict[str, Any]:
    """Return the OpenAPI 3.1 document for ``/api/v1``."""
    usage_event = {
        "type": "object",
        "description": EVENT_DESCRIPTION,
        "required": ["id", "occurred_at"],
        "additionalProperties": False,
        "properties": {
            "id": _text(ID_MAX_LENGTH, "Idempotency key of the event, unique per agency (any Unicode text)."),
            "channel": _optional(_text(CHANNEL_MAX_LENGTH, "The Capri API channel id the agency typed in.")),
            "location_id": _optional(_text(LOCATION_ID_MAX_LENGTH, "The GHL subaccount (locationId).")),
            "input_tokens": _count("input_tokens", "Input (prompt) tokens of one AI call or run."),
            "output_tokens": _count("output_tokens", "Output (completion) tokens of one AI call or run."),
            "messages": _count("messages", "Messages."),
            "model": _optional(_text(MODEL_MAX_LENGTH, "The model that served the request, for display.")),
            "occurred_at": {
                "type": "string",
                "format": "date-time",
                "maxLength": OCCURRED_AT_MAX_LENGTH,
                "description": "When the usage happened: ISO-8601 with a timezone, e.g. 2026-11-26T12:00:00Z.",
                "examples": ["2026-11-26T12:00:00Z"],
            },
        },
        # Exactly one of channel / location_id (a null counts as absent).
        "oneOf": [
            {"required": ["channel"], "properties": {"channel": {"type": "string"}}},
            {"required": ["location_id"], "properties": {"location_id": {"type": "string"}}},
        ],
        # At least one count above zero.
        "anyOf": [
            {"required": [name], "properties": {name: {"type": "integer", "minimum": 1}}} for name in COUNT_FIELDS
        ],
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "Rebill usage API", "version": "1.0.0", "description": API_DESCRIPTION},
        "paths": {
            "/api/v1/usage": {
                "post": {
                    "operationId": "reportUsage",
                    "summary": "Report a batch of usage events",
                    "security": [{"apiKey": []}],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/UsageBatch"}}},
                    },
                    "responses": {
                        "200": {
                            "description": "One result per event, in the order sent.",
                            "content": {
                                "application/json": {"schema": {"$ref": "#/components/schemas/UsageResults"}}
                            },
                        },
                        "400": _error('The body is not a JSON object of the shape {"events": [...]}.'),
                        "401": {
                            **_error("The API key is missing, malformed, unknown or revoked."),
                            "headers": {
                                "WWW-Authenticate": {"schema": {"type": "string"}, "description": "Bearer"}
                            },
                        },
                        "413": _error(
                            f"More than {MAX_EVENTS} events, a body above the byte limit, or more than "
                            f"{MAX_STRUCTURE_BYTES} of the bytes '[', '{{' and ',' (more than {MAX_EVENTS} valid "
                            "events can hold)."
                        ),
                    },
                }
            },
            "/api/v1/status": {
                "get": {
                    "operationId": "getStatus",
                    "summary": "May this channel or subaccount spend now?",
                    "description": STATUS_DESCRIPTION,
                    "security": [{"apiKey": []}],
                    "parameters": [
                        {
                            "name": "channel",
                            "in": "query",
                            "description": "The Capri API channel id (send this or location_id).",
                            "schema": {"type": "string", "minLength": 1, "maxLength": CHANNEL_MAX_LENGTH},
                        },
                        {
                            "name": "location_id",
                            "in": "query",
                            "description": "The GHL subaccount (send this or channel).",
                            "schema": {"type": "string", "minLength": 1, "maxLength": LOCATION_ID_MAX_LENGTH},
                        },
                    ],
                    "responses": {
                        "200": {
                            "description": "The client's status and this period's billed units.",
                            "headers": {
                                "Cache-Control": {"schema": {"type": "string"}, "description": "private, max-age=5"}
                            },
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Status"}}},
                        },
                        "400": _error("Neither or both of channel and location_id, or one too long."),
                        "401": {
                            **_error("The API key is missing, malformed, unknown or revoked."),
                            "headers": {
                                "WWW-Authenticate": {"schema": {"type": "string"}, "description": "Bearer"}
                            },
                        },
                    },
                }
            },
            "/api/v1/openapi.json": {
                "get": {
                    "operationId": "getOpenApiDocument",
                    "summary": "This document",
                    "security": [],
                    "responses": {
                        "200": {
                            "description": "The OpenAPI document.",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        }
                    },
                }
            },
        },
        "components": {
            "securitySchemes": {
                "apiKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An agency API key, rbk_<prefix>_<secret>, shown once when created.",
                }
            },
            "schemas": {
                "UsageBatch": {
                    "type": "object",
                    "required": ["events"],
                    "additionalProperties": False,
                    "properties": {
                        "events": {
                            "type": "array",
                            "maxItems": MAX_EVENTS,
                            "description": EVENTS_DESCRIPTION,
                            # Any JSON value is accepted here: a UsageEvent counts, anything else is
                            # rejected in the answer, so a schema-violating event is a 200, never a 400.
                            "items": {
                                "anyOf": [
                                    {"$ref": "#/components/schemas/UsageEvent"},
                                    {"description": "Any other value: answered `rejected` with a reason."},
                                ]
                            },
                        }
                    },
                },
                "UsageEvent": usage_event,
                "UsageResults": {
                    "type": "object",
                    "required": ["results"],
                    "additionalProperties": False,
                    "properties": {"results": {"type": "array", "items": {"$ref": "#/components/schemas/UsageResult"}}},
                },
                "UsageResult": {
                    "type": "object",
                    "required": ["id", "status"],
                    "additionalProperties": False,
                    "properties": {
                        "id": {
                            "type": ["string", "null"],
                            "description": "The event's id as sent; null when the event had no string id.",
                        },
                        "status": {"type": "string", "enum": ["accepted", "duplicate", "rejected"]},
                        "reason": {"type": "string", "description": "Why the event was rejected (rejected only)."},
                        "flags": {
                            "type": "array",
                            "items": {"type": "string", "enum": [FLAG_OLDER_THAN_STRIPE_WINDOW]},
                            "description": "Warnings about an accepted or duplicate event.",
                        },
                    },
                    "if": {"properties": {"status": {"const": "rejected"}}},
                    "then": {"required": ["reason"], "not": {"required": ["flags"]}},
                    "else": {"not": {"required": ["reason"]}},
                },
                "Status": {
                    "type": "object",
                    "required": ["status", "period"],
                    "additionalProperties": False,
                    "properties": {
                        "status": {"type": "string", "enum": list(SOURCE_STATUSES)},
                        "period": {
                            "type": "object",
                            "required": ["units", "cap_units"],
                            "additionalProperties": False,
                            "properties": {
                                "units": {
                                    "type": "integer",
                                    "minimum": 0,
                                    "description": "Units billed this period (sent to Stripe or waiting to be).",
                                },
                                "cap_units": {
                                    "type": ["integer", "null"],
                                    "minimum": 1,
                                    "description": "The client's monthly cap in units; null without a cap.",
                                },
                            },
                        },
                    },
                },
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {"error": {"type": "string"}},
                },
            },
        },
    }
