"""The usage API the AI platform calls: ``POST /api/v1/usage`` and its OpenAPI document."""

from __future__ import annotations

from flask import Blueprint, jsonify, request

from capri.api_keys import authenticate
from capri.openapi import openapi_document
from capri.usage import report_usage
from capri.validation import MAX_BODY_BYTES, BodyInvalid, TooManyEvents, parse_usage_body
from core.database import db

blueprint = Blueprint("capri", __name__, url_prefix="/api/v1")


@blueprint.post("/usage")
def post_usage():
    """Record a batch of usage events for the agency the bearer key belongs to."""
    api_key = authenticate(_bearer_token(request.headers.get("Authorization", "")) or "")
    if api_key is None:
        response = jsonify(error="a valid API key is required: Authorization: Bearer <key>")
        # RFC 6750 §3: a 401 for a bearer-protected resource names the scheme.
        response.headers["WWW-Authenticate"] = 'Bearer realm="rebill-usage"'
        return response, 401
    raw = _read_body(MAX_BODY_BYTES)
    if raw is None:
        return jsonify(error=f"the body is larger than {MAX_BODY_BYTES // (1024 * 1024)} MiB; split the batch"), 413
    try:
        events = parse_usage_body(raw)
    except BodyInvalid as error:
        return jsonify(error=str(error)), 400
    except TooManyEvents as error:
        return jsonify(error=str(error)), 413
    results = report_usage(api_key.agency_id, events)
    db.session.commit()
    return jsonify(results=results)


@blueprint.get("/openapi.json")
def get_openapi_document():
    """Serve the OpenAPI document of this API."""
    return jsonify(openapi_document())


def _read_body(limit: int) -> bytes | None:
    """Return the request body, or None when it is longer than ``limit`` bytes.

    Read in chunks up to the limit rather than trusting Content-Length: a chunked body has none, and
    Werkzeug's own limit would silently cut such a body short instead of refusing it.
    """
    if request.content_length is not None and request.content_length > limit:
        return None
    chunks, size = [], 0
    while chunk := request.stream.read(64 * 1024):
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _bearer_token(header: str) -> str | None:
    """Return the credentials of a ``Bearer`` Authorization header (scheme case-insensitive, RFC 7235 §2.1)."""
    scheme, _, credentials = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return credentials.strip() or None
