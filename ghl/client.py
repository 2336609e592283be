"""The one gateway to GHL's API: base URL, per-service ``Version`` header, timeouts, refresh-once on 401,
backoff on 429 and typed errors.

Tokens pass through here only in memory, are sent only in the ``Authorization`` header or the token
endpoint's form body, and are never logged (docs/ghl.md §1, §4).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import requests
from authlib.integrations.requests_client import OAuth2Session, OAuthError
from flask import current_app

from core.config import app_id_of
from ghl.payloads import ID_MAX_LENGTH

log = logging.getLogger("ghl.client")

# Version header per service: conversations is documented under 2021-04-15, oauth/locations/marketplace
# under 2021-07-28 (docs/ghl.md §1.7; GoHighLevel/highlevel-api-docs apps/*.json).
DEFAULT_VERSION = "2021-07-28"
SERVICE_VERSIONS = {"conversations": "2021-04-15"}
# connect, read; every call carries one (the SDKs use 30 s; GHL's webhook deadline is ~10 s).
DEFAULT_TIMEOUT = (5.0, 20.0)
MAX_ATTEMPTS = 4  # first try + 3 retries on 429
MAX_BACKOFF_SECONDS = 15.0
# The choose-location page moved under /v2/ on 2026-05-27 (docs/oauth/Authorization.md, commit ae4d260).
CHOOSE_LOCATION_PATH = "/v2/oauth/chooselocation"
INSTALLED_LOCATIONS_PAGE = 100
TOKEN_LIFETIME_DEFAULT = 86399  # seconds; GHL's access tokens live about a day (docs/ghl.md §1.4)
TOKEN_LIFETIME_MAX = 366 * 86400


class GhlError(Exception):
    """GHL could not do what was asked; ``status`` is the HTTP status when there was one."""

    def __init__(self, message: str, *, status: int | None = None, trace_id: str | None = None):
        super().__init__(message)
        self.status = status
        self.trace_id = trace_id


class GhlUnavailable(GhlError):
    """Network failure, timeout, 5xx or an exhausted rate limit: try again later."""


class GhlRateLimited(GhlUnavailable):
    """GHL kept answering 429 after the allowed backoff."""


class GhlRejected(GhlError):
    """GHL refused the request (4xx); retrying the same request will not help."""


class GhlUnauthorized(GhlRejected):
    """GHL refused the access token even after one refresh."""


class GhlGrantRejected(GhlRejected):
    """The token endpoint refused an authorization code, refresh token or location-token request."""


class GhlResponseInvalid(GhlError):
    """GHL answered 2xx with a body we cannot use."""


class Credentials(Protocol):
    """Where the client gets an access token for a resource, and a fresh one after a 401."""

    def access_token(self) -> str:
        """Return a usable access token."""

    def refreshed_access_token(self, rejected: str) -> str:
        """Return an access token newer than ``rejected`` (refreshing it if nobody else did)."""


@dataclass(frozen=True, slots=True, repr=False)
class TokenGrant:
    """What the token endpoint (or /oauth/locationToken) returned; repr never shows the tokens."""

    access_token: str
    refresh_token: str | None
    expires_in: int
    user_type: str  # Company | Location
    company_id: str | None
    location_id: str | None
    scope: str | None = None
    user_id: str | None = None
    plan_id: str | None = None
    is_bulk_installation: bool = False
    approved_locations: tuple[str, ...] = field(default_factory=tuple)

    @property
    def resource_id(self) -> str:
        """The id this token acts for: the locationId of a Location token, else the companyId."""
        resource = self.location_id if self.user_type == "Location" else self.company_id
        if not resource:
            raise GhlResponseInvalid(f"a {self.user_type} token without its resource id")
        return resource

    def __repr__(self) -> str:
        return (
            f"TokenGrant(user_type={self.user_type!r}, company_id={self.company_id!r}, "
            f"location_id={self.location_id!r})"
        )

    @classmethod
    def from_response(cls, body: dict[str, Any], *, user_type: str | None = None, company_id: str | None = None):
        """Build a grant from a v2 token response (docs/ghl.md §1.3, §1.5)."""
        access_token = body.get("access_token")
        if not isinstance(access_token, str) or not access_token:
            raise GhlResponseInvalid("the token response has no access_token")
        kind = body.get("userType") or user_type or ("Location" if body.get("locationId") else "Company")
        if kind not in ("Company", "Location"):
            raise GhlResponseInvalid(f"unknown userType {kind!r} in the token response")
        try:
            expires_in = int(body.get("expires_in") or TOKEN_LIFETIME_DEFAULT)
        except (TypeError, ValueError, OverflowError):  # OverflowError: an infinite float
            expires_in = TOKEN_LIFETIME_DEFAULT
        approved = body.get("approvedLocations")
        return cls(
            access_token=access_token,
            refresh_token=_optional_str(body.get("refresh_token")),
            # Clamped: a lifetime beyond datetime's range would crash storing it, and refreshing early is harmless.
            expires_in=min(max(expires_in, 60), TOKEN_LIFETIME_MAX),
            user_type=kind,
            company_id=_ghl_id(body.get("companyId"), "companyId") or company_id,
            location_id=_ghl_id(body.get("locationId"), "locationId"),
            scope=_optional_str(body.get("scope")),
            user_id=_optional_str(body.get("userId")),
            plan_id=_ghl_id(body.get("planId"), "planId"),
            is_bulk_installation=bool(body.get("isBulkInstallation")),
            approved_locations=tuple(
                _ghl_id(item, "approvedLocations") for item in (approved if isinstance(approved, list) else ())
                if isinstance(item, str) and item
            ),
        )


@dataclass(frozen=True, slots=True)
class InstalledLocation:
    """One row of GET /oauth/installedLocations."""

    location_id: str
    name: str | None
    is_installed: bool


class _RetryableStatus(Exception):
    """Internal: a 429 seen inside authlib's token call, to be retried by our backoff loop."""

    def __init__(self, response: requests.Response):
        super().__init__(response.status_code)
        self.response = response


class GhlClient:
    """GHL's v2 API for one marketplace app (its client id and secret)."""

    def __init__(
        self,
        *,
        api_base: str,
        client_id: str,
        client_secret: str,
        redirect_uri: str | None = None,
        app_id: str | None = None,
        timeout: tuple[float, float] = DEFAULT_TIMEOUT,
        max_attempts: int = MAX_ATTEMPTS,
        sleep: Callable[[float], None] = time.sleep,
        session: requests.Session | None = None,
    ):
        if not client_id or not client_secret:
            raise GhlError("GHL_CLIENT_ID and GHL_CLIENT_SECRET must be set to talk to GHL")
        self.api_base = api_base.rstrip("/")
        self.client_id = client_id
        self._client_secret = client_secret
        self.redirect_uri = redirect_uri
        # The marketplace appId (GHL_APP_ID): installedLocations asks for it, webhooks name it.
        self.app_id = app_id or app_id_of(client_id)
        self.timeout = timeout
        self.max_attempts = max(1, max_attempts)
        self._sleep = sleep
        self._session = session or requests.Session()

    # OAuth ---------------------------------------------------------------------------------------

    def authorization_url(self, marketplace_base: str, scopes: str, state: str) -> str:
        """Build the choose-location URL an installer is sent to."""
        url, _ = self._oauth_session().create_authorization_url(
            marketplace_base.rstrip("/") + CHOOSE_LOCATION_PATH,
            state=state,
            scope=" ".join(scopes.split()),
            redirect_uri=self.redirect_uri,
        )
        # Form-style '+' for spaces is ambiguous outside form bodies; GHL's docs URL-encode them as %20.
        return url.replace("+", "%20")

    def exchange_code(self, code: str) -> TokenGrant:
        """Exchange an authorization code for a token pair (POST /oauth/token, form-encoded).

        No ``user_type``: it asks for a token type ("Company" | "Location", apps/oauth.json), and the code
        already belongs to whoever installed. GHL's own app template sends none (docs/ghl.md); the answer's
        ``userType`` is stored and sent back on every refresh.
        """
        body = self._token_call(
            lambda session: session.fetch_token(
                self._url("/oauth/token"),
                grant_type="authorization_code",
                code=code,
                redirect_uri=self.redirect_uri,
            ),
            "/oauth/token",
        )
        return TokenGrant.from_response(body)

    def refresh(self, refresh_token: str, *, user_type: str, company_id: str | None = None) -> TokenGrant:
        """Trade a (single-use, rotating) refresh token for a new pair."""
        body = self._token_call(
            lambda session: session.refresh_token(
                self._url("/oauth/token"), refresh_token=refresh_token, user_type=user_type
            ),
            "/oauth/token",
        )
        return TokenGrant.from_response(body, user_type=user_type, company_id=company_id)

    def mint_location_token(self, company: Credentials, *, company_id: str, location_id: str) -> TokenGrant:
        """Get a location token from the agency token (POST /oauth/locationToken, scope oauth.write)."""
        try:
            body = self.request(
                "POST",
                "/oauth/locationToken",
                credentials=company,
                data={"companyId": company_id, "locationId": location_id},
            )
        except GhlRejected as error:
            raise GhlGrantRejected(str(error), status=error.status, trace_id=error.trace_id) from None
        body.setdefault("locationId", location_id)
        return TokenGrant.from_response(body, user_type="Location", company_id=company_id)

    def installed_locations(self, company: Credentials, *, company_id: str) -> list[InstalledLocation]:
        """List every location where the app is installed, following skip/limit pages.

        Pages until ``count`` rows were read or a page is empty, never stopping at a short page: the spec
        (apps/oauth.json) defaults ``limit`` to 20 and states no maximum, so a server capping pages below
        our limit must not end the listing early. A page that adds no new location also ends it (a
        server ignoring ``skip`` would otherwise be asked forever).
        """
        found: dict[str, InstalledLocation] = {}
        skip = 0
        while True:
            body = self.request(
                "GET",
                "/oauth/installedLocations",
                credentials=company,
                params={
                    "companyId": company_id,
                    "appId": self.app_id,
                    "isInstalled": "true",
                    "skip": str(skip),
                    "limit": str(INSTALLED_LOCATIONS_PAGE),
                },
            )
            page = body.get("locations")
            if not isinstance(page, list):
                raise GhlResponseInvalid("installedLocations answered without a locations list")
            known = len(found)
            for item in page:
                location_id = _optional_str(item.get("_id") or item.get("id")) if isinstance(item, dict) else None
                if location_id:
                    found[location_id] = InstalledLocation(
                        location_id=location_id,
                        name=_optional_str(item.get("name")),
                        is_installed=item.get("isInstalled", True) is not False,
                    )
            skip += len(page)
            total = body.get("count")
            counted = isinstance(total, int) and not isinstance(total, bool)
            if not page or len(found) == known or (counted and skip >= total):
                return list(found.values())

    def get_location(self, credentials: Credentials, location_id: str) -> dict[str, Any]:
        """Return a location's details (GET /locations/{id}, scope locations.readonly)."""
        body = self.request("GET", f"/locations/{location_id}", credentials=credentials)
        location = body.get("location", body)
        return location if isinstance(location, dict) else {}

    # Plumbing ------------------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        *,
        credentials: Credentials,
        params: dict[str, str] | None = None,
        data: dict[str, str] | None = None,
        json: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Call an authenticated endpoint; on 401 get a refreshed token and retry exactly once."""
        url = self._url(path)
        headers = {"Accept": "application/json", "Version": version_for(path)}
        token = credentials.access_token()
        response = self._send(method, url, token, headers=headers, params=params, data=data, json=json)
        if response.status_code == 401:
            # The SDKs refresh and retry once (docs/ghl.md §1.4); a second 401 is final.
            token = credentials.refreshed_access_token(token)
            response = self._send(method, url, token, headers=headers, params=params, data=data, json=json)
        return _answer(response, path)

    def _send(self, method: str, url: str, token: str, *, headers: dict[str, str], **kwargs) -> requests.Response:
        """Send with a timeout, backing off on 429 as the X-RateLimit-* headers suggest."""
        headers = headers | {"Authorization": f"Bearer {token}"}
        for attempt in range(self.max_attempts):
            try:
                response = self._session.request(method, url, headers=headers, timeout=self.timeout, **kwargs)
            except requests.RequestException as error:
                raise GhlUnavailable(f"GHL unreachable: {type(error).__name__}") from None
            if response.status_code != 429:
                return response
            self._back_off(response, attempt, url)
        raise AssertionError("unreachable")  # _back_off raises on the last attempt

    def _back_off(self, response: requests.Response, attempt: int, url: str) -> None:
        """Sleep before retrying a 429, or raise GhlRateLimited when retrying cannot help now."""
        delay = retry_delay(response.headers, attempt)
        if delay is None or attempt + 1 >= self.max_attempts:
            log.warning(
                "GHL rate limit exhausted",
                extra={"fields": {"url": _path_of(url), "trace_id": _trace_id(response)}},
            )
            raise GhlRateLimited("GHL rate limit reached; try again later", status=429, trace_id=_trace_id(response))
        log.info("GHL answered 429; backing off", extra={"fields": {"url": _path_of(url), "seconds": delay}})
        self._sleep(delay)

    def _token_call(self, call: Callable[[OAuth2Session], Any], path: str) -> dict[str, Any]:
        """Run an authlib token-endpoint call with our timeout, backoff and typed errors."""
        for attempt in range(self.max_attempts):
            session = self._oauth_session()
            try:
                return dict(call(session))
            except _RetryableStatus as retry:
                self._back_off(retry.response, attempt, path)
            except OAuthError as error:
                raise GhlGrantRejected(f"GHL refused the grant: {error.error}") from None
            except requests.RequestException as error:
                raise GhlUnavailable(f"GHL unreachable: {type(error).__name__}") from None
            except (ValueError, OverflowError) as error:  # OverflowError: authlib reading an infinite expires_in
                raise GhlResponseInvalid(f"GHL's token endpoint answered an unusable body: {error}") from None
            finally:
                session.close()
        raise AssertionError("unreachable")

    def _oauth_session(self) -> OAuth2Session:
        """An authlib session posting client_id/client_secret in the form body, as GHL expects."""
        session = OAuth2Session(
            client_id=self.client_id,
            client_secret=self._client_secret,
            token_endpoint_auth_method="client_secret_post",
            redirect_uri=self.redirect_uri,
            default_timeout=self.timeout,
        )
        # Share our transport (connection pool, and what tests intercept).
        session.adapters = self._session.adapters
        session.register_compliance_hook("access_token_response", _check_token_response)
        session.register_compliance_hook("refresh_token_response", _check_token_response)
        return session

    def _url(self, path: str) -> str:
        return self.api_base + path


def ghl_client(**overrides: Any) -> GhlClient:
    """Return a client configured from the current app (GHL_API_BASE, GHL_CLIENT_ID, …)."""
    config = current_app.config
    options: dict[str, Any] = {
        "api_base": config["GHL_API_BASE"],
        "client_id": config.get("GHL_CLIENT_ID") or "",
        "client_secret": config.get("GHL_CLIENT_SECRET") or "",
        "redirect_uri": config.get("GHL_REDIRECT_URI"),
        "app_id": config.get("GHL_APP_ID"),
    }
    options.update(overrides)
    return GhlClient(**options)


def version_for(path: str) -> str:
    """Return the Version header for an API path, by its service (first path segment)."""
    service = path.lstrip("/").split("/", 1)[0]
    return SERVICE_VERSIONS.get(service, DEFAULT_VERSION)


def retry_delay(headers: Any, attempt: int) -> float | None:
    """Seconds to wait before retrying a 429, or None when the daily budget is spent.

    GHL documents X-RateLimit-* headers but not Retry-After (docs/ghl.md §4): honour Retry-After if
    present; if the burst window is used up, wait one window (X-RateLimit-Interval-Milliseconds);
    otherwise back off exponentially, capped.
    """
    if headers.get("X-RateLimit-Daily-Remaining") == "0":
        return None
    retry_after = _number(headers.get("Retry-After"))
    if retry_after is not None:
        return min(max(retry_after, 0.0), MAX_BACKOFF_SECONDS)
    interval_ms = _number(headers.get("X-RateLimit-Interval-Milliseconds"))
    if headers.get("X-RateLimit-Remaining") == "0" and interval_ms:
        return min(interval_ms / 1000.0, MAX_BACKOFF_SECONDS)
    return min(0.5 * (2**attempt), MAX_BACKOFF_SECONDS)


def _check_token_response(response: requests.Response) -> requests.Response:
    """Turn a non-2xx token-endpoint answer into a typed error before authlib parses it."""
    if response.status_code == 429:
        raise _RetryableStatus(response)
    if response.status_code >= 500:
        raise GhlUnavailable(
            f"GHL's token endpoint answered {response.status_code}",
            status=response.status_code,
            trace_id=_trace_id(response),
        )
    if response.status_code >= 400:
        # 400 "Location is not active", invalid_grant, an expired code… (highlevel-api-docs#249)
        reason = _reason(response)
        log.warning(
            "GHL refused a token grant",
            extra={"fields": {"status": response.status_code, "reason": reason, "trace_id": _trace_id(response)}},
        )
        raise GhlGrantRejected(reason, status=response.status_code, trace_id=_trace_id(response))
    return response


def _answer(response: requests.Response, path: str) -> dict[str, Any]:
    """Return a 2xx JSON object, or raise the typed error for the status."""
    status = response.status_code
    trace_id = _trace_id(response)
    if 200 <= status < 300:
        try:
            body = response.json()
        except ValueError:
            raise GhlResponseInvalid(f"GHL answered {path} with a non-JSON body", status=status) from None
        if not isinstance(body, dict):
            raise GhlResponseInvalid(f"GHL answered {path} with a non-object body", status=status)
        return body
    reason = _reason(response)
    log.warning("GHL call failed", extra={"fields": {"path": path, "status": status, "trace_id": trace_id}})
    if status == 401:
        raise GhlUnauthorized(reason, status=status, trace_id=trace_id)
    if status >= 500:
        raise GhlUnavailable(f"GHL answered {status}: {reason}", status=status, trace_id=trace_id)
    raise GhlRejected(reason, status=status, trace_id=trace_id)


def _reason(response: requests.Response) -> str:
    """A short human reason from a GHL error body (``message`` may be a string or a list)."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        message = body.get("message") or body.get("error_description") or body.get("error")
        if isinstance(message, list):
            message = "; ".join(str(item) for item in message)
        if message:
            return str(message)[:300]
    return f"HTTP {response.status_code}"


def _trace_id(response: requests.Response) -> str | None:
    """GHL puts a traceId in every answer (docs/oauth/Overview.md); log it, it is not a secret."""
    try:
        body = response.json()
    except ValueError:
        return None
    trace = body.get("traceId") if isinstance(body, dict) else None
    return str(trace) if trace else None


def _path_of(url: str) -> str:
    return requests.utils.urlparse(url).path


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _optional_str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _ghl_id(value: Any, name: str) -> str | None:
    """A GHL id from a token answer, or None; one longer than our id columns is an unusable answer."""
    value = _optional_str(value)
    if value is not None and len(value) > ID_MAX_LENGTH:
        raise GhlResponseInvalid(f"the token response's {name} is longer than {ID_MAX_LENGTH} characters")
    return value
