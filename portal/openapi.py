"""The OpenAPI 3.1 document of the portal's JSON API (``/api/portal``), served at ``/api/portal/openapi.json``.

Request bodies name the fields and types the views read; the views (and the billing core behind them) check
the rest and answer 422 with ``fields``, so the request schemas stay permissive where the business rules live
(a customer id Stripe does not know is well-formed JSON, and a 422). Answers are described as they are sent;
objects allow more properties than listed, so a new field is not a breaking change.
"""

from __future__ import annotations

from typing import Any

from billing.customers import QUERY_MAX as CUSTOMER_QUERY_MAX
from billing.models import CHARGE_BY, MESSAGE_SOURCES
from billing.states import ClientStatus, Provider, ReportStatus
from capri.api_keys import NAME_MAX_LENGTH

CLIENT_STATUSES = [status.value for status in ClientStatus]
JSON = "application/json"
TEXT = {"type": "string"}
NULLABLE_TEXT = {"type": ["string", "null"]}
COUNT = {"type": "integer", "minimum": 0}
TIME = {"type": ["string", "null"], "format": "date-time"}
ROW_ID = {"type": "integer", "minimum": 1, "maximum": 2**31 - 1}
PATH_ROW_ID = {**ROW_ID, "examples": [1]}

API_DESCRIPTION = """\
The JSON API behind the portal page GoHighLevel embeds (`GET /app`). The page signs in with GHL's encrypted
user context at `POST /api/portal/session` and sends the token it gets as `Authorization: Bearer` on every
other call. Tokens live minutes; the page signs in again before they expire and after any 401.

Errors are `{"error": "..."}`; 422 adds `"fields": {field: message}`. 401: no, bad or expired token, or the
install ended. 403: the signed-in user may not do this (agency admins change billing settings; subaccount
users never see the agency's Stripe connection, prices or API keys). 404: not this agency's (or not in the
user's subaccount). 503: Stripe or the database cannot be reached; nothing was changed."""


def _error(description: str, **extra: Any) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": {"$ref": "#/components/schemas/Error"}}}, **extra}


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _object(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    return {"type": "object", "required": required or list(properties), "properties": properties}


def _body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {JSON: {"schema": schema}}}


UNAUTHORIZED = _error(
    "No, bad or expired token, or the install ended: sign in again.",
    headers={"WWW-Authenticate": {"schema": TEXT, "description": "Bearer"}},
)
COMMON = {
    "400": _error("The body is not a JSON object (or repeats a key, or nests absurdly deep)."),
    "401": UNAUTHORIZED,
    "403": _error("This user may not do this."),
    "503": _error("Stripe or the database cannot be reached right now; nothing was changed."),
}


OBJECT = {"type": "object"}
NULLABLE_TEXT = {"type": ["string", "null"]}
BOOLEAN = {"type": "boolean"}


def _operation(
    operation_id: str,
    summary: str,
    answers: dict[str, Any],
    *,
    body: dict | None = None,
    parameters: list | None = None,
    signed_in: bool = True,
) -> dict[str, Any]:
    common = ("400",) * (body is not None) + ("401", "403") * signed_in + ("503",)
    operation: dict[str, Any] = {
        "operationId": operation_id,
        "summary": summary,
        "responses": {code: COMMON[code] for code in common} | answers,
    }
    if not signed_in:
        operation["security"] = []
    if body is not None:
        operation["requestBody"] = _body(body)
    if parameters:
        operation["parameters"] = parameters
    return operation


def _path_id(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": PATH_ROW_ID}


CLIENT_FIELDS = {
    "nickname": {"type": "string", "maxLength": 120},
    "provider": {"type": "string", "enum": [provider.value for provider in Provider]},
    "channel_id": NULLABLE_TEXT,
    "location_id": NULLABLE_TEXT,
    "stripe_product_id": TEXT,
    "stripe_price_id": TEXT,
    "stripe_customer_id": TEXT,
    "charge_by": {"type": "string", "enum": list(CHARGE_BY)},
    "billing_unit": {"type": "integer", "minimum": 1},
    "message_source": {"type": ["string", "null"], "enum": [*MESSAGE_SOURCES, None]},
}

CLIENT_STATUS = {
    "type": "string",
    "enum": CLIENT_STATUSES,
    "default": ClientStatus.ACTIVE.value,
    "description": "`active` bills; `paused` records usage, never bills it; `shadow` is a dry run: usage is counted "
    "and its units shown as `would_have_billed`, nothing is sent to Stripe, and setting `active` bills only usage "
    "received from then on (docs/billing-rules.md rule 13).",
}
ESTIMATE = {
    "type": ["object", "null"],
    "required": ["amount", "currency"],
    "properties": {"amount": {"type": "string", "pattern": r"^-?\d+(\.\d+)?$"}, "currency": TEXT},
}
WOULD_HAVE_BILLED = {
    "type": ["object", "null"],
    "required": ["usage", "units", "estimate"],
    "properties": {"usage": COUNT, "units": COUNT, "estimate": ESTIMATE},
    "description": "A dry run's figures this period: its usage (by occurrence), floor(usage / billing_unit) units "
    "and what Stripe would charge for them; null when the client has no dry-run usage this period and is not "
    "in `shadow`.",
}

SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {"error": TEXT, "fields": {"type": "object", "additionalProperties": TEXT}},
    },
    "Session": _object(
        {
            "company_id": TEXT,
            "user_id": TEXT,
            "role": TEXT,
            "user_type": {"type": "string", "enum": ["agency", "location"]},
            "active_location": NULLABLE_TEXT,
            "location_scope": NULLABLE_TEXT,
            "can_manage_billing": {"type": "boolean"},
            "sees_agency_settings": {"type": "boolean"},
        }
    ),
    "SignedIn": _object({"token": TEXT, "expires_in": {"type": "integer", "minimum": 1}, "session": _ref("Session")}),
    "StripeConnection": _object(
        {
            "connected": {"type": "boolean"},
            "account": NULLABLE_TEXT,
            "mode": {"type": ["string", "null"], "enum": ["test", "live", None]},
            "last4": NULLABLE_TEXT,
            "status": TEXT,
            "problem": NULLABLE_TEXT,
        },
        required=["connected", "account", "mode", "last4", "status"],
    ),
    "Client": _object(
        {
            "id": ROW_ID,
            "nickname": TEXT,
            "provider": CLIENT_FIELDS["provider"],
            "channel_id": NULLABLE_TEXT,
            "location_id": NULLABLE_TEXT,
            "subaccount_name": NULLABLE_TEXT,
            "charge_by": CLIENT_FIELDS["charge_by"],
            "billing_unit": CLIENT_FIELDS["billing_unit"],
            "message_source": CLIENT_FIELDS["message_source"],
            "status": CLIENT_STATUS,
            "would_have_billed": WOULD_HAVE_BILLED,
            "counted_usage": COUNT,
            "units_logged": COUNT,
            "remainder": COUNT,
            "created_at": {"type": "string", "format": "date-time"},
            # Agency users get the Stripe ids; subaccount users the plan's name instead (README: Security).
            "stripe_product_id": TEXT,
            "stripe_price_id": TEXT,
            "stripe_customer_id": TEXT,
            "plan": NULLABLE_TEXT,
        },
        required=[
            "id",
            "nickname",
            "provider",
            "charge_by",
            "billing_unit",
            "status",
            "counted_usage",
            "units_logged",
            "remainder",
        ],
    ),
    "ClientFields": {
        "type": "object",
        "properties": {**CLIENT_FIELDS, "status": CLIENT_STATUS},
        "description": "Any of the client's fields; the billing core checks them (422 with fields).",
    },
    "NewClient": {
        "type": "object",
        "required": [
            "nickname",
            "provider",
            "stripe_product_id",
            "stripe_price_id",
            "stripe_customer_id",
            "charge_by",
            "billing_unit",
        ],
        "properties": {**CLIENT_FIELDS, "status": CLIENT_STATUS, "bill_unmapped_usage": {"type": "boolean"}},
    },
    "ClientUsage": _object(
        {
            "client_id": ROW_ID,
            "counted_usage": COUNT,
            "units_logged": COUNT,
            "units_reported": COUNT,
            "units_awaiting_stripe": COUNT,
            "remainder": COUNT,
            "daily": {"type": "array", "items": {"type": "object"}},
            "reports": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["units", "status", "created_at", "sent_at"],
                    "properties": {
                        "units": COUNT,
                        "status": {"type": "string", "enum": [status.value for status in ReportStatus]},
                        "created_at": TIME,
                        "sent_at": TIME,
                        "identifier": TEXT,
                        "last_error": NULLABLE_TEXT,
                        "note": TEXT,
                    },
                },
            },
        }
    ),
    "ApiKey": _object(
        {
            "id": ROW_ID,
            "prefix": TEXT,
            "name": NULLABLE_TEXT,
            "created_at": TIME,
            "last_used_at": TIME,
            "revoked_at": TIME,
        }
    ),
}


def openapi_document() -> dict[str, Any]:
    """Return the OpenAPI 3.1 document for ``/api/portal``."""
    client_id, key_id = [_path_id("client_id")], [_path_id("key_id")]
    client_answer = _json("The client.", _ref("Client"))
    gone = _error("Not this agency's client (or not in the user's subaccount), or deleted.")
    stripe_answer = _json("The agency's Stripe connection (never the key).", _ref("StripeConnection"))
    paths = {
        "/api/portal/session": {
            "post": _operation(
                "openSession",
                "Exchange GHL's encrypted user context for a bearer token",
                {
                    "200": _json("Signed in.", _ref("SignedIn")),
                    "401": _error("Sign-in refused: one text for every reason."),
                    "403": _error("An agency user who is not an admin opened Rebill outside a subaccount."),
                    "429": _error(
                        "Too many sign-ins from this address this minute.",
                        headers={"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}},
                    ),
                },
                body=_object({"payload": {"type": "string", "maxLength": 16384}}),
                signed_in=False,
            )
        },
        "/api/portal/demo-session": {
            "post": _operation(
                "openDemoSession",
                "Sign in as the demo agency's admin (demo mode only; 404 otherwise)",
                {"200": _json("Signed in.", _ref("SignedIn")), "404": _error("Not in demo mode.")},
                signed_in=False,
            )
        },
        "/api/portal/me": {
            "get": _operation(
                "getMe",
                "The signed-in user and agency",
                {
                    "200": _json(
                        "Who is signed in.", _object({"session": _ref("Session"), "agency": {"type": "object"}})
                    )
                },
            )
        },
        "/api/portal/stripe-key": {
            "get": _operation("getStripeConnection", "The agency's Stripe connection", {"200": stripe_answer}),
            "put": _operation(
                "connectStripe",
                "Check and store the agency's Stripe secret or restricted key (agency admins)",
                {
                    "200": stripe_answer,
                    "409": _json(
                        "A key of another Stripe mode, or of another account while units are pending: nothing "
                        "stored; send it again with confirm_account_change true to connect it.",
                        _object({
                            "error": {"type": "string"},
                            "confirm": {"type": "string", "enum": ["confirm_account_change"]},
                            "current": {"type": "object"},
                            "new": {"type": "object"},
                            "pending_units": {"type": "integer", "minimum": 0},
                        }),
                    ),
                    "422": _error("Stripe refused the key, or it is not a Stripe key."),
                },
                body={
                    **_object({"api_key": {"type": "string", "maxLength": 255}}),
                    "properties": {
                        "api_key": {"type": "string", "maxLength": 255},
                        "confirm_account_change": {"type": "boolean"},
                    },
                },
            ),
            "delete": _operation(
                "disconnectStripe", "Forget the agency's Stripe key (agency admins)", {"200": stripe_answer}
            ),
        },
        "/api/portal/prices": {
            "get": _operation(
                "listPrices",
                "The agency's Stripe products and prices, each usable or not",
                {
                    "200": _json("Products with prices.", _object({"products": {"type": "array"}})),
                    "422": _error("No Stripe key connected, or Stripe refused it."),
                },
            )
        },
        "/api/portal/subaccounts": {
            "get": _operation(
                "listSubaccounts",
                "The agency's installed subaccounts (the user's one, for a subaccount-scoped session)",
                {"200": _json("Subaccounts.", _object({"subaccounts": {"type": "array"}}))},
            )
        },
        "/api/portal/clients": {
            "get": _operation(
                "listClients",
                "The clients the user may see",
                {"200": _json("Clients.", _object({"clients": {"type": "array", "items": _ref("Client")}}))},
            ),
            "post": _operation(
                "addClient",
                "Add a client (agency admins)",
                {"201": client_answer, "422": _error("A field is refused; see fields.")},
                body=_ref("NewClient"),
            ),
        },
        "/api/portal/clients/{client_id}": {
            "get": _operation("getClient", "One client", {"200": client_answer, "404": gone}, parameters=client_id),
            "patch": _operation(
                "editClient",
                "Change a client's fields, pause or resume it (agency admins)",
                {"200": client_answer, "404": gone, "422": _error("A field is refused; see fields.")},
                body=_ref("ClientFields"),
                parameters=client_id,
            ),
            "delete": _operation(
                "deleteClient",
                "Delete a client; its history stays (agency admins)",
                {"204": {"description": "Deleted."}, "404": gone},
                parameters=client_id,
            ),
        },
        "/api/portal/clients/{client_id}/usage": {
            "get": _operation(
                "getClientUsage",
                "A client's counted usage, units and recent Stripe reports",
                {"200": _json("Usage.", _ref("ClientUsage")), "404": gone},
                parameters=client_id,
            )
        },
        "/api/portal/summary": {
            "get": _operation(
                "getMoneySummary",
                "This period's estimated charges and units per currency; clients and failing ones",
                {
                    "200": _json(
                        "The summary.",
                        _object(
                            {"totals": {"type": "array"}, "clients": COUNT, "clients_failing": COUNT},
                            required=["totals", "clients", "clients_failing"],
                        ),
                    )
                },
            )
        },
        "/api/portal/customers": {
            "get": _operation(
                "searchCustomers",
                "Search the agency's Stripe customers by name, email or id (agency users)",
                {
                    "200": _json("Matching customers.", _object({"customers": {"type": "array"}})),
                    "400": _error("q is too long."),
                    "422": _error("No Stripe key connected, or Stripe refused it."),
                },
                parameters=[
                    {"name": "q", "in": "query", "required": False, "schema": {**TEXT, "maxLength": CUSTOMER_QUERY_MAX}}
                ],
            )
        },
        "/api/portal/statement": {
            "get": _operation(
                "getStatements",
                "Each visible client's statement: this period, daily usage, previous periods (names, no Stripe ids)",
                {"200": _json("Statements.", _object({"statements": {"type": "array"}}))},
            )
        },
        "/api/portal/clients/{client_id}/export.csv": {
            "get": _operation(
                "exportClientCsv",
                "A client's usage events and unit reports from `from` to `to` (UTC dates, both included) as CSV",
                {
                    "200": {"description": "The CSV.", "content": {"text/csv": {"schema": TEXT}}},
                    "400": _error("from or to is not a date, from is after to, or the range is too long."),
                    "404": gone,
                },
                parameters=[
                    *client_id,
                    {"name": "from", "in": "query", "required": False, "schema": {**TEXT, "format": "date"}},
                    {"name": "to", "in": "query", "required": False, "schema": {**TEXT, "format": "date"}},
                ],
            )
        },
        "/api/portal/unmapped-usage": {
            "get": _operation(
                "listUnmappedUsage",
                "Channels and subaccounts with usage but no client",
                {"200": _json("Unmapped usage.", _object({"unmapped": {"type": "array"}}))},
            )
        },
        "/api/portal/api-keys": {
            "get": _operation(
                "listApiKeys",
                "The agency's usage API keys, by prefix",
                {"200": _json("Keys.", _object({"api_keys": {"type": "array", "items": _ref("ApiKey")}}))},
            ),
            "post": _operation(
                "createApiKey",
                "Create a usage API key, shown once (agency admins)",
                {
                    "201": _json("The key, in this answer only.", {**_ref("ApiKey"), "required": ["id", "key"]}),
                    "422": _error("The name is refused."),
                },
                body={
                    "type": "object",
                    "properties": {"name": {"type": ["string", "null"], "maxLength": NAME_MAX_LENGTH}},
                },
            ),
        },
        "/api/portal/api-keys/{key_id}": {
            "delete": _operation(
                "revokeApiKey",
                "Revoke a usage API key (agency admins)",
                {"204": {"description": "Revoked."}, "404": _error("Not this agency's key.")},
                parameters=key_id,
            )
        },
        "/api/portal/alerts": {
            "get": _operation(
                "listAlerts",
                "The latest spend alerts, each with its delivery log",
                {"200": _json("Alerts, newest first.", _object({"alerts": {"type": "array", "items": OBJECT}}))},
            )
        },
        "/api/portal/alert-settings": {
            "get": _operation(
                "getAlertSettings",
                "Where spend alerts are POSTed (agency users)",
                {"200": _json("The alert URL.", _object({"url": NULLABLE_TEXT, "secret_set": BOOLEAN}))},
            ),
            "put": _operation(
                "putAlertSettings",
                "Set or remove the alert URL; a new signing secret is in this answer only (agency admins)",
                {
                    "200": _json(
                        "The alert URL; `secret` only when one was made.",
                        {
                            **_object({"url": {"type": ["string", "null"]}, "secret_set": {"type": "boolean"}}),
                            "properties": {
                                "url": {"type": ["string", "null"]},
                                "secret_set": {"type": "boolean"},
                                "secret": {"type": "string"},
                            },
                        },
                    ),
                    "422": _error("The URL is refused (https only, a host, no credentials)."),
                },
                body={
                    "type": "object",
                    "properties": {"url": {"type": ["string", "null"]}, "new_secret": {"type": "boolean"}},
                },
            ),
        },
        "/api/portal/openapi.json": {
            "get": {
                "operationId": "getPortalOpenApiDocument",
                "summary": "This document",
                "security": [],
                "responses": {"200": _json("The OpenAPI document.", {"type": "object"})},
            }
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "Rebill portal API", "version": "1.0.0", "description": API_DESCRIPTION},
        "security": [{"portalToken": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "portalToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "The token POST /api/portal/session answers; it lives minutes.",
                }
            },
            "schemas": SCHEMAS,
        },
    }
