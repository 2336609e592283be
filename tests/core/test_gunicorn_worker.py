"""core.gunicorn_worker: gunicorn's gevent worker sharing new connections evenly between its workers.

The share rule and the master's slots are tested directly; the rest under a real gunicorn with two workers
(tests/core/gunicorn_worker_app.py), over keep-alive connections opened one at a time, each answered with the
pid of the worker that accepted it. The workers there defer for up to 5 s, so that which worker takes a
connection follows the rule, not how soon the machine runs the sibling.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

from core.gunicorn_worker import ConnectionShares

ROOT = Path(__file__).resolve().parents[2]
STARTUP_SECONDS = 60


def shares_with(*held: int, slots: int = 4) -> ConnectionShares:
    shares = ConnectionShares(slots=slots)
    for slot, connections in enumerate(held):
        shares.live[slot] = 1
        shares.connections[slot] = connections
    return shares


@pytest.mark.parametrize(
    ("held", "slot", "over"),
    [
        ((0, 0), 0, False),  # the first connection: anyone
        ((1, 0), 0, True),  # 2 would be over the share of 1 each
        ((1, 0), 1, False),
        ((1, 1), 0, False),  # 2 + 1 shared by two: 2 each, rounded up
        ((8, 7), 0, True),
        ((8, 7), 1, False),
        ((3, 13), 0, False),
        ((3, 13), 1, True),
        ((5,), 0, False),  # alone: never defers
        ((2, 2, 2), 0, False),
        ((3, 2, 2), 0, True),
    ],
)
def test_a_worker_is_over_its_share_when_one_more_connection_would_put_it_above_the_rounded_up_average(
    held, slot, over
):
    assert shares_with(*held).over_share(slot) is over


def test_a_released_slot_no_longer_counts_among_the_workers():
    shares = shares_with(1, 0)
    assert shares.over_share(0)
    shares.release(1)
    assert not shares.over_share(0)  # alone now


def finished_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_the_master_reserves_free_slots_and_takes_back_only_those_of_workers_that_ended():
    shares = ConnectionShares(slots=3)
    running = SimpleNamespace(pid=os.getpid())
    ended = SimpleNamespace(pid="[booting]")
    forking = SimpleNamespace(pid="[booting]")  # gunicorn's until it sets the pid after the fork
    assert [shares.reserve(running), shares.reserve(ended), shares.reserve(forking)] == [0, 1, 2]
    shares.connections[1] = 7  # its last count, left when it was killed
    assert shares.reserve(SimpleNamespace(pid="[booting]")) is None  # every slot is live

    ended.pid = finished_pid()
    replacement = SimpleNamespace(pid="[booting]")
    assert shares.reserve(replacement) == 1
    assert shares.connections[1] == 0  # the dead worker's connections died with it

    shares.release(0)  # a worker that ended on its own gives its slot back
    assert shares.reserve(SimpleNamespace(pid="[booting]")) == 0


class Gunicorn:
    """gunicorn with two workers of ``worker_class`` serving tests/core/gunicorn_worker_app.py."""

    def __init__(self, worker_class: str, directory: Path):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.ready = directory / "ready"
        self.ready.mkdir(parents=True)
        config = directory / "gunicorn_test.conf.py"
        config.write_text(
            "import pathlib\n"
            "def post_worker_init(worker):\n"
            f"    pathlib.Path({str(self.ready)!r}, str(worker.pid)).touch()\n"
        )
        self.connections = []
        self.log = directory / "gunicorn.log"
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "gunicorn", "-c", str(config), "--workers", "2", "--worker-class",
                 f"tests.core.gunicorn_worker_app.{worker_class}", "--bind", f"127.0.0.1:{self.port}",
                 "tests.core.gunicorn_worker_app:app"],
                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        self.wait_for_workers(2)

    def wait_for_workers(self, count: int) -> list[int]:
        """The pids of the workers that have loaded the app and are about to serve, once there are ``count``."""
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gunicorn exited: {self.log.read_text()}")
            pids = [int(path.name) for path in self.ready.iterdir()]
            if len(pids) >= count:
                return pids
            time.sleep(0.05)  # waiting for a process to start, not for an outcome
        raise RuntimeError(f"gunicorn's workers did not start: {self.log.read_text()}")

    def connect(self, path: str = "/") -> tuple[socket.socket, int]:
        """A new keep-alive connection, its first request answered: the connection and the worker's pid."""
        connection = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        self.connections.append(connection)
        return connection, ask(connection, path)

    def stop(self) -> None:
        for connection in self.connections:
            connection.close()
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(30)


def ask(connection: socket.socket, path: str = "/", *, close: bool = False) -> int:
    """Send one request on ``connection``; the answering worker's pid (with ``close``, after the server closed)."""
    header = "Connection: close\r\n" if close else ""
    connection.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\n{header}\r\n".encode())
    pid = answered_pid(connection)
    if close:
        assert connection.recv(4096) == b""  # the server closed its end
    return pid


def answered_pid(connection: socket.socket) -> int:
    """Read one answer from ``connection``: the pid it carries."""
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += connection.recv(4096)
    head, _, body = answer.partition(b"\r\n\r\n")
    length = next(int(line[15:]) for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:"))
    while len(body) < length:
        body += connection.recv(4096)
    return int(body)


@pytest.fixture
def gunicorn(tmp_path):
    servers = []

    def start(worker_class: str = "PatientWorker") -> Gunicorn:
        servers.append(Gunicorn(worker_class, tmp_path / f"server-{len(servers)}"))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def test_connections_opened_one_after_another_alternate_between_the_two_workers(gunicorn):
    server = gunicorn()
    opened = [server.connect() for _ in range(16)]
    assert sorted(Counter(pid for _, pid in opened).values()) == [8, 8]
    for count in range(1, 17):  # after every connection, neither worker holds two more than the other
        split = Counter(pid for _, pid in opened[:count]).most_common()
        assert split[0][1] - (split[1][1] if len(split) > 1 else 0) <= 1, (count, split)
    for connection, pid in opened:  # kept alive: the same worker answers again
        assert ask(connection) == pid


def test_a_worker_whose_connections_closed_takes_the_next_ones(gunicorn):
    server = gunicorn()
    opened = [server.connect() for _ in range(8)]
    first = opened[0][1]
    for connection, pid in opened:
        if pid == first:
            ask(connection, close=True)  # the worker counts the connection out before it closes it
    again = [server.connect() for _ in range(4)]
    assert [pid for _, pid in again] == [first] * 4  # its sibling still holds 4, it now none


def test_a_worker_over_its_share_still_accepts_when_its_sibling_is_held(gunicorn):
    server = gunicorn("HastyWorker")  # leaves a connection to the sibling for at most 0.5 s
    held, held_pid = server.connect()
    _, free_pid = server.connect()
    assert held_pid != free_pid
    held.sendall(b"GET /hold?3 HTTP/1.1\r\nHost: test\r\n\r\n")  # its worker's one thread is held for 3 s
    started = time.monotonic()
    taken = [server.connect() for _ in range(6)]
    elapsed = time.monotonic() - started
    assert [pid for _, pid in taken] == [free_pid] * 6  # over its share from the second on
    # Only the first over its share waited the 0.5 s: then the free worker saw its sibling accept nothing and
    # took the rest at once (6 waits would be 2.5 s). All before the held worker was let go.
    assert 0.5 <= elapsed < 1.5
    assert answered_pid(held) == held_pid  # the held worker answers once let go
