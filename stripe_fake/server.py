"""Run the fake Stripe app on a loopback port in a daemon thread (tests, benchmarks, the demo)."""

from __future__ import annotations

import threading
from typing import Any

import stripe
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

from stripe_fake.app import FakeStripeApp, FakeStripeState


class _QuietHandler(WSGIRequestHandler):
    """Skip werkzeug's per-request access log (noise in tests, cost in benchmarks)."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass


class FakeStripeServer:
    """Context manager serving a FakeStripeState over HTTP on 127.0.0.1 (port 0 = any free port)."""

    def __init__(self, state: FakeStripeState | None = None, host: str = "127.0.0.1", port: int = 0):
        self.state = state or FakeStripeState()
        self.app = FakeStripeApp(self.state)
        self._host, self._port = host, port
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> FakeStripeServer:
        """Bind and serve in a daemon thread; idempotent."""
        if self._server is None:
            self.state.arm_hangs()
            self._server = make_server(self._host, self._port, self.app, threaded=True,
                                       request_handler=_QuietHandler)
            # A short poll interval keeps stop() fast; shutdown() waits for the loop to notice.
            self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                            name="stripe-fake", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Release hung requests, stop serving and close the socket; idempotent."""
        if self._server is None:
            return
        self.state.release_hangs()
        self._server.shutdown()  # serve_forever closes the listening socket on its way out
        self._thread.join(timeout=5)
        self._server = self._thread = None

    @property
    def url(self) -> str:
        """Base URL, e.g. http://127.0.0.1:54321."""
        if self._server is None:
            raise RuntimeError("FakeStripeServer is not running; call start() first")
        return f"http://{self._host}:{self._server.server_port}"

    @property
    def base_addresses(self) -> dict[str, str]:
        """The `base_addresses` argument for stripe.StripeClient."""
        return {"api": self.url, "meter_events": self.url}

    def client(self, api_key: str, **kwargs: Any) -> stripe.StripeClient:
        """A real StripeClient aimed at this server (0 network retries unless overridden)."""
        kwargs.setdefault("max_network_retries", 0)
        return stripe.StripeClient(api_key, base_addresses=self.base_addresses, **kwargs)

    def __enter__(self) -> FakeStripeServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
