"""The usage API the AI platform calls: ``POST /api/v1/usage``, ``GET /api/v1/status`` and the OpenAPI document."""

from __future__ import annotations

from flask import Blueprint, jsonify, request

from billing.spend import source_status
from capri.api_keys import authenticate
from capri.openapi import openapi_document
from capri.usage import report_usage
from capri.validation import (
    CHANNEL_MAX_LENGTH,
    LOCATION_ID_MAX_LENGTH,
    MAX_BODY_BYTES,
    BatchTooLarge,
    BodyInvalid,
    parse_usage_body,
)
from core.database import db
from core.metrics import observe_ingest

blueprint = Blueprint("capri", __name__, url_prefix="/api/v1")


# The platform may ask before every answer: a few seconds of caching spares Rebill the repeats, and a
# change (a pause, a cap reached) still shows within them.
STATUS_MAX_AGE_SECONDS = 5


@blueprint.post("/usage")
@observe_ingest("usage_api")
def post_usage():
    """Record a batch of usage events for the agency the bearer key belongs to."""
    api_key = authenticate(_bearer_token(request.headers.get("Authorization", "")) or "")
    if api_key is None:
        return _unauthorized()
    raw = _read_body(MAX_BODY_BYTES)
    if raw is None:
        return jsonify(error=f"the body is larger than {MAX_BODY_BYTES // (1024 * 1024)} MiB; split the batch"), 413
    try:
        events = parse_usage_body(raw)
    except BodyInvalid as error:
        return jsonify(error=str(error)), 400
    except BatchTooLarge as error:
        return jsonify(error=str(error)), 413
    results = report_usage(api_key.agency_id, events)
    db.session.commit()
    return jsonify(results=results)


@blueprint.get("/status")
def get_status():
    """Say whether a channel or subaccount may spend now: its client's status and this period's units."""
    api_key = authenticate(_bearer_token(request.headers.get("Authorization", "")) or "")
    if api_key is None:
        return _unauthorized()
    channel, location_id = request.args.get("channel"), request.args.get("location_id")
    unknown = sorted(set(request.args) - {"channel", "location_id"})
    if unknown:
        return jsonify(error=f"unknown query parameter {unknown[0]!r}: send channel or location_id"), 400
    if (channel is None) == (location_id is None):
        return jsonify(error="send exactly one of ?channel= or ?location_id="), 400
    value, limit = (channel, CHANNEL_MAX_LENGTH) if channel is not None else (location_id, LOCATION_ID_MAX_LENGTH)
    if not value or len(value) > limit:
        return jsonify(error=f"the channel or location_id must be 1 to {limit} characters"), 400
    answer = source_status(api_key.agency_id, channel=channel, location_id=location_id)
    db.session.commit()  # authenticate may have stamped the key's last use
    response = jsonify(status=answer.status, period={"units": answer.units, "cap_units": answer.cap_units})
    response.headers["Cache-Control"] = f"private, max-age={STATUS_MAX_AGE_SECONDS}"
    return response


@blueprint.get("/openapi.json")
def get_openapi_document():
    """Serve the OpenAPI document of this API."""
    return jsonify(openapi_document())


def _unauthorized():
    response = jsonify(error="a valid API key is required: Authorization: Bearer <key>")
    # RFC 6750 §3: a 401 for a bearer-protected resource names the scheme.
    response.headers["WWW-Authenticate"] = 'Bearer realm="rebill-usage"'
    return response, 401


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
