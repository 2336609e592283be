"""stripe-python's HTTP transport for every Stripe gateway: urllib3, with one keep-alive pool per process.

The SDK still builds every request, retries, and parses answers and errors; this module only carries the bytes.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import stripe
import urllib3

DEFAULT_TIMEOUT_SECONDS = 15
# Idle keep-alive connections kept per Stripe host; more concurrent calls than this open extra connections.
KEEPALIVE_CONNECTIONS = 32


class StripeHttpClient(stripe.HTTPClient):
    """stripe-python's HTTP transport on urllib3, with one keep-alive pool shared by every gateway and thread.

    stripe-python takes any ``stripe.HTTPClient`` (it ships requests-, httpx-, pycurl-based ones); the SDK still
    builds every request, retries (``max_network_retries``), and parses answers and errors. This transport
    does less per call than ``RequestsClient``, whose ``requests.Session`` re-reads the proxy variables and
    ``~/.netrc`` from the environment on every request (Rebill reads its environment once, in core.config;
    Stripe calls go direct), and it keeps one pool of connections for all agencies, so a reporting tick reuses
    a handful of connections instead of opening one per agency and thread. TLS is verified against
    stripe-python's CA bundle, as ``RequestsClient`` does.
    """

    name = "urllib3"

    def __init__(self, timeout: float = DEFAULT_TIMEOUT_SECONDS):
        super().__init__()
        # As requests' single timeout: the same limit for connecting and for each wait on the answer.
        self._timeout = urllib3.Timeout(connect=timeout, read=timeout)

    def request(self, method: str, url: str, headers: Any, post_data: Any = None, **_: Any):
        response = self._send(method, url, headers, post_data, preload_content=True)
        return response.data, response.status, response.headers

    def request_stream(self, method: str, url: str, headers: Any, post_data: Any = None, **_: Any):
        response = self._send(method, url, headers, post_data, preload_content=False)
        return response, response.status, response.headers

    def close(self) -> None:
        """Nothing to release per gateway: the pool is the process's, shared by every gateway."""

    def _send(self, method: str, url: str, headers: Any, post_data: Any, *, preload_content: bool):
        try:
            return _stripe_pool().request(
                method.upper(),
                url,
                body=post_data,
                headers=headers,
                timeout=self._timeout,
                retries=False,  # the SDK retries (max_network_retries), with its idempotency key
                redirect=False,
                preload_content=preload_content,
            )
        except Exception as error:
            raise _connection_error(error) from error


def _connection_error(error: Exception) -> stripe.APIConnectionError:
    """Classify a transport failure as ``RequestsClient`` does: timeouts and broken connections are retryable."""
    if isinstance(error, urllib3.exceptions.SSLError):
        return stripe.APIConnectionError(f"Could not verify Stripe's SSL certificate: {error}", should_retry=False)
    # requests' Timeout and ConnectionError: a timeout, a refused or broken connection, an answer cut short.
    retryable = (urllib3.exceptions.TimeoutError, urllib3.exceptions.ProtocolError)
    return stripe.APIConnectionError(
        f"Unexpected error communicating with Stripe (network error: {type(error).__name__}: {error})",
        should_retry=isinstance(error, retryable),
    )


_pools: dict[int, urllib3.PoolManager] = {}
_pools_lock = threading.Lock()


def _stripe_pool() -> urllib3.PoolManager:
    """Return this process's connection pool for Stripe, made on first use (thread-safe; one pool per host).

    Keyed by process id: a pool made before a fork (gunicorn --preload) is never shared with the child.
    """
    pid = os.getpid()
    pool = _pools.get(pid)
    if pool is None:
        with _pools_lock:
            pool = _pools.get(pid)
            if pool is None:
                pool = urllib3.PoolManager(
                    maxsize=KEEPALIVE_CONNECTIONS,
                    block=False,
                    cert_reqs="CERT_REQUIRED",
                    ca_certs=stripe.ca_bundle_path,
                )
                _pools.clear()
                _pools[pid] = pool
    return pool
