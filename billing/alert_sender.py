"""The gateway to agencies' alert URLs: an HTTPS POST to an address the agency typed in, safely.

An agency's alert URL is untrusted input that makes Rebill send requests (server-side request forgery):
every address its host resolves to must be a public one, and the connection is pinned to the address that
was checked, so DNS cannot answer differently between the check and the connect (DNS rebinding). No
redirects are followed (a 3xx is an answer, not a new destination), no proxy from the environment is used,
and connecting and each read wait at most ``timeout`` seconds. TLS is verified against the real host name.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter
from requests.certs import where as ca_bundle

DEFAULT_TIMEOUT_SECONDS = 5.0
URL_MAX_LENGTH = 2000
# (host, port) -> the IP addresses it resolves to; socket.getaddrinfo in production.
Resolver = Callable[[str, int], list[str]]


class AlertUrlRefused(ValueError):
    """The URL may not be called: not HTTPS, or its host is (or resolves to) a non-public address."""


@dataclass(frozen=True)
class SendResult:
    """What the receiver answered: its status code, or None and the reason when nothing usable came back."""

    status_code: int | None
    error: str | None = None

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def resolve_host(host: str, port: int) -> list[str]:
    """Every address the system resolver gives for host:port (IPv4 and IPv6)."""
    return sorted({info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)})


def check_alert_url(url: object) -> str:
    """Return the URL if its form is acceptable (https, a host, no credentials); raise AlertUrlRefused."""
    if not isinstance(url, str) or not url.strip() or len(url) > URL_MAX_LENGTH:
        raise AlertUrlRefused(f"the alert URL must be an https:// address of at most {URL_MAX_LENGTH} characters")
    url = url.strip()
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError for a port that is not a number or out of range)
    except ValueError:
        raise AlertUrlRefused("the alert URL is not a valid address") from None
    if parts.scheme != "https" or not parts.hostname:
        raise AlertUrlRefused("the alert URL must start with https:// and name a host")
    if parts.username or parts.password:
        raise AlertUrlRefused("the alert URL must not carry a user name or password")
    return url


def public_address(address: str) -> bool:
    """Tell whether an IP address is publicly routable (not private, loopback, link-local, reserved, ...)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is loopback
    return ip.is_global and not ip.is_multicast


class AlertSender:
    """POST JSON to an agency's alert URL with the checks above; ``allow_private`` only in tests/development."""

    def __init__(
        self,
        *,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        allow_private: bool = False,
        resolver: Resolver = resolve_host,
        ca_certs: str | None = None,
    ):
        self._timeout = timeout
        self._allow_private = allow_private
        self._resolver = resolver
        # The CA bundle receivers' certificates must chain to: certifi's (via requests) unless a test trusts
        # its own CA; verification itself is never optional.
        self._ca_certs = ca_certs or ca_bundle()

    def checked_address(self, url: str) -> str:
        """Resolve the URL's host and return the one address to connect to; raise AlertUrlRefused."""
        parts = urlsplit(check_alert_url(url))
        host, port = parts.hostname, parts.port or 443
        try:
            addresses = self._resolver(host, port)
        except (OSError, UnicodeError) as error:
            raise AlertUrlRefused(f"the alert URL's host {host} cannot be resolved ({error})") from None
        if not addresses:
            raise AlertUrlRefused(f"the alert URL's host {host} has no address")
        if not self._allow_private:
            refused = [address for address in addresses if not public_address(address)]
            if refused:
                # Every address is checked: a host answering one public and one private address is refused.
                raise AlertUrlRefused(
                    f"the alert URL's host {host} resolves to a private, loopback or link-local address "
                    f"({refused[0]}); use a public https:// address"
                )
        return addresses[0]

    def post(self, url: str, body: bytes, headers: dict[str, str]) -> SendResult:
        """POST once; never raises for the receiver's failures (they come back in the SendResult)."""
        try:
            address = self.checked_address(url)
        except AlertUrlRefused as error:
            return SendResult(None, str(error))
        with requests.Session() as session:
            session.trust_env = False  # no proxy or netrc from the environment
            session.mount("https://", _PinnedAdapter(address, self._ca_certs))
            try:
                response = session.post(
                    url, data=body, headers=headers, timeout=self._timeout, allow_redirects=False
                )
            except requests.RequestException as error:
                return SendResult(None, f"{type(error).__name__}: {error}"[:500])
        return SendResult(response.status_code, None if 200 <= response.status_code < 300 else response.text[:500])


class _PinnedAdapter(HTTPAdapter):
    """Connect to a checked IP address while TLS (SNI and certificate) and Host use the URL's host name."""

    def __init__(self, address: str, ca_certs: str | None = None):
        self._address = address
        self._ca_certs = ca_certs or ca_bundle()
        self._pools: list[urllib3.HTTPSConnectionPool] = []
        super().__init__(max_retries=0)

    def get_connection_with_tls_context(self, request, verify, proxies=None, cert=None):
        return self._pool(request.url)

    def get_connection(self, url, proxies=None):  # requests < 2.32.2
        return self._pool(url)

    def _pool(self, url: str) -> urllib3.HTTPSConnectionPool:
        parts = urlsplit(url)
        pool = urllib3.HTTPSConnectionPool(
            self._address,
            parts.port or 443,
            server_hostname=parts.hostname,
            assert_hostname=parts.hostname,
            cert_reqs="CERT_REQUIRED",
            ca_certs=self._ca_certs,
            retries=False,
        )
        self._pools.append(pool)
        return pool

    def cert_verify(self, conn, url, verify, cert) -> None:
        # requests would set the pool's verification from the `verify` argument (its default CA bundle, or
        # none at all for verify=False), overwriting what _pool chose: verification here is not negotiable.
        conn.cert_reqs = "CERT_REQUIRED"
        conn.ca_certs = self._ca_certs
        conn.ca_cert_dir = None

    def close(self) -> None:
        for pool in self._pools:
            pool.close()
        super().close()

    def add_headers(self, request, **kwargs) -> None:
        # urllib3 would name the pinned IP in Host; the receiver routes on the URL's host name.
        parts = urlsplit(request.url)
        request.headers["Host"] = parts.netloc.rsplit("@", 1)[-1]
