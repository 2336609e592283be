"""What tests/core/test_gunicorn_worker.py serves under gunicorn: an app that answers with its worker's pid,
and the worker class with a long deferral, so that which worker takes a connection does not depend on how
fast the machine schedules the sibling."""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

from gevent.monkey import get_original

from core.gunicorn_worker import BalancedGeventWorker, BalancedStreamServer

_blocking_sleep = get_original("time", "sleep")  # not gevent's: it holds the worker's whole loop


class AnnouncedServer(BalancedStreamServer):
    """The worker's server, which tells the test (a file named by its pid) once it accepts: from then on the
    worker counts as a sibling, and the test may connect."""

    def start(self):
        super().start()
        (Path(os.environ["READY_DIR"]) / str(os.getpid())).touch()


class AnnouncedWorker(BalancedGeventWorker):
    @property
    def server_class(self):
        return partial(AnnouncedServer, worker=self)


class PatientWorker(AnnouncedWorker):
    max_deferral = 5.0


class HastyWorker(AnnouncedWorker):
    max_deferral = 0.5


def app(environ, start_response):
    if environ["PATH_INFO"] == "/hold":
        # Holds the worker's one thread (gevent has not patched this sleep away: the worker's loop stops too),
        # as a long CPU-bound request would; the marker file tells the test it has begun.
        Path(os.environ["HOLD_MARKER"]).touch()
        _blocking_sleep(float(environ["QUERY_STRING"]))
    body = str(os.getpid()).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
