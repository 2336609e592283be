"""core.gunicorn_worker: gunicorn's gevent worker sharing new connections evenly between its workers.

The share rule and the master's slots are tested directly; the rest under a real gunicorn with two workers
(tests/core/gunicorn_worker_app.py), over keep-alive connections opened one at a time, each answered with the
pid of the worker that accepted it. The workers there defer for up to 5 s, so that which worker takes a
connection follows the rule, not how soon the machine runs the sibling.
"""

from __future__ import annotations

import logging
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
from gevent.pool import Pool
from gunicorn.config import Config

from core.gunicorn_worker import BalancedGeventWorker, BalancedStreamServer, ConnectionShares, Deferral

ROOT = Path(__file__).resolve().parents[2]
STARTUP_SECONDS = 60


def shares_with(*held: int, slots: int = 4) -> ConnectionShares:
    shares = ConnectionShares(slots=slots)
    for slot, connections in enumerate(held):
        shares.reserved[slot] = shares.accepting[slot] = 1
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
    assert shares.reserve(SimpleNamespace(pid="[booting]")) is None  # every slot is reserved

    ended.pid = finished_pid()
    replacement = SimpleNamespace(pid="[booting]")
    assert shares.reserve(replacement) == 1
    assert shares.connections[1] == 0  # the dead worker's connections died with it

    shares.release(0)  # a worker that ended on its own gives its slot back
    assert shares.reserve(SimpleNamespace(pid="[booting]")) == 0


def test_the_master_takes_back_every_dead_workers_slot_not_only_the_first_free_one():
    # After a reload the new workers sit in slots 2 and 3 and the old ones gave 0 and 1 back; then one of the
    # new ones is killed. Its replacement takes slot 0, and the dead one's slot 3 must not stay live: two
    # accepting workers counted as three are both over their share at once, and both wait.
    shares = ConnectionShares(slots=4)
    old = [SimpleNamespace(pid=os.getpid()) for _ in range(2)]
    new = [SimpleNamespace(pid=os.getpid()), SimpleNamespace(pid=os.getpid())]
    assert [shares.reserve(worker) for worker in old + new] == [0, 1, 2, 3]
    shares.release(0)
    shares.release(1)
    shares.connections[2], shares.connections[3] = 2, 1
    for slot in (2, 3):
        shares.started(slot)
    new[1].pid = finished_pid()
    assert shares.reserve(SimpleNamespace(pid="[booting]")) == 0
    assert list(shares.reserved) == [1, 0, 1, 0]
    assert list(shares.accepting) == [0, 0, 1, 0]
    assert not shares.over_share(2)  # alone among the accepting workers: the booting one is no sibling yet
    shares.started(0)
    assert not shares.over_share(0)  # 0 against 2: its share


def test_a_wait_lasts_at_most_max_deferral_then_the_worker_takes_connections_until_a_sibling_accepts_again():
    deferral = Deferral(max_deferral=0.01)
    assert deferral.leave_to_sibling(siblings_accepted=5, now=100.0)
    assert deferral.leave_to_sibling(siblings_accepted=5, now=100.009)
    assert not deferral.leave_to_sibling(siblings_accepted=5, now=100.010)  # ran out: take it
    assert not deferral.leave_to_sibling(siblings_accepted=5, now=100.011)  # no sibling accepted since: no new wait
    assert not deferral.leave_to_sibling(siblings_accepted=5, now=105.0)
    assert deferral.leave_to_sibling(siblings_accepted=6, now=105.001)  # one did: waits again, a fresh wait
    assert deferral.leave_to_sibling(siblings_accepted=6, now=105.010)


def test_a_wait_ends_when_a_sibling_took_the_connection_and_the_next_one_waits_afresh():
    deferral = Deferral(max_deferral=0.01)
    assert deferral.leave_to_sibling(siblings_accepted=0, now=1.0)
    deferral.end()  # the socket went quiet: a sibling took it
    assert deferral.leave_to_sibling(siblings_accepted=1, now=2.0)  # long after: still a whole wait ahead
    assert deferral.leave_to_sibling(siblings_accepted=1, now=2.009)


def test_a_worker_closing_more_than_ten_short_lived_connections_a_second_does_not_wait():
    deferral = Deferral(max_deferral=0.01)
    for tick in range(10):
        deferral.closed(lifetime=0.002, now=tick / 10)
    assert deferral.leave_to_sibling(siblings_accepted=0, now=0.95)  # ~6 lately (10 a second, decaying): not above
    deferral.end()
    for tick in range(10):
        deferral.closed(lifetime=0.002, now=0.91 + tick / 200)  # then 10 in 50 ms
    assert not deferral.leave_to_sibling(
        siblings_accepted=0, now=0.96
    )  # a split of such connections evens out by itself
    assert deferral.leave_to_sibling(siblings_accepted=0, now=4.0)  # then none for a few seconds
    deferral.end()
    for tick in range(20):  # long-lived ones closing together (nginx reloading) count for nothing
        deferral.closed(lifetime=30.0, now=4.1 + tick / 1000)
    assert deferral.leave_to_sibling(siblings_accepted=0, now=4.12)


@pytest.fixture
def server(monkeypatch):
    """A worker's server on a listening socket of its own, in this process, beside one accepting sibling; its
    waits last up to a minute, so that none runs out between two steps of a test on a busy machine."""
    monkeypatch.setattr(BalancedGeventWorker, "_shares", ConnectionShares(slots=4))  # this test's own table
    monkeypatch.setattr(BalancedGeventWorker, "max_deferral", 60.0)
    config = Config()
    config.set("workers", 2)
    worker = BalancedGeventWorker(1, os.getpid(), [], None, 30, config, logging.getLogger(__name__))
    sibling = worker.shares.reserve(SimpleNamespace(pid=os.getpid()))
    worker.shares.started(sibling)
    listener = socket.create_server(("127.0.0.1", 0))
    server = BalancedStreamServer(listener, worker=worker, spawn=Pool(4))
    server.start()
    yield server
    server.close()
    listener.close()
    worker.tmp.close()


def test_a_worker_gives_its_slot_back_when_its_server_closes_before_its_requests_end(server):
    worker = server._worker
    slot = worker.slot
    worker.shares.opened(slot)  # a request still running, as during gunicorn's graceful stop
    server.close()
    assert worker.slot is None
    assert worker.shares.accepting[slot] == worker.shares.reserved[slot] == 0
    assert worker.shares.connections[slot] == 0
    assert not worker.shares.over_share(1)  # the sibling is alone: it waits for no one
    server.do_close(socket.socket())  # the request ends afterwards: the given-back slot stays untouched
    assert worker.shares.connections[slot] == 0


def test_a_worker_that_left_a_connection_to_a_sibling_starts_a_fresh_wait_for_the_next_one(server):
    worker = server._worker
    worker.shares.opened(worker.slot)  # 1 against the sibling's 0: over its share
    with socket.create_connection(server.address):
        assert server.do_read() is None  # left to the sibling
        assert server._deferral.since is not None
        since = server._deferral.since
        server._look_again()  # still pending: the watcher calls do_read again at once
        assert server.do_read() is None
        assert server._deferral.since == since  # the same wait goes on
        taken, _ = server.socket.accept()  # the sibling takes it
        taken.close()
        server._look_again()
        assert server._deferral.since is None
        assert server.do_read() is None  # nothing pending: the socket would not have called it


def test_a_worker_learns_its_connections_lifetimes_from_the_ones_it_closes(server):
    worker = server._worker
    for _ in range(30):  # clients that open a connection per request
        with socket.create_connection(server.address):
            accepted = server.do_read()
            server.do_close(*accepted)
    worker.shares.opened(worker.slot)  # now over its share
    with socket.create_connection(server.address):
        accepted = server.do_read()  # taken at once: no wait for such connections
        assert accepted is not None
        server.do_close(*accepted)


class Gunicorn:
    """gunicorn with two workers of ``worker_class`` serving tests/core/gunicorn_worker_app.py; idle connections
    are kept for a minute (gunicorn closes them after 2 s by default, and a closed one no longer counts)."""

    def __init__(self, worker_class: str, directory: Path):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.ready = directory / "ready"
        self.held = directory / "held"
        self.ready.mkdir(parents=True)
        self.connections = []
        self.log = directory / "gunicorn.log"
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "gunicorn", "--workers", "2", "--keep-alive", "60",
                 "--worker-class", f"tests.core.gunicorn_worker_app.{worker_class}", "--bind", f"127.0.0.1:{self.port}",
                 "tests.core.gunicorn_worker_app:app"],
                cwd=ROOT, env=os.environ | {"READY_DIR": str(self.ready), "HOLD_MARKER": str(self.held)},
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        self.wait_for_workers(2)

    def wait_for_workers(self, count: int, *, gone: tuple[int, ...] = ()) -> set[int]:
        """The pids of the workers that accept (or did), once there are ``count`` and ``gone`` have ended."""
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gunicorn exited: {self.log.read_text()}")
            pids = {int(path.name) for path in self.ready.iterdir()}
            if len(pids) >= count and not any(map(running, gone)):
                return pids
            time.sleep(0.05)  # waiting for processes to start or end, not for an outcome
        raise RuntimeError(f"gunicorn's workers did not start or end: {self.log.read_text()}")

    def wait_until_held(self) -> None:
        """Wait until a worker has begun a /hold request (and so accepts nothing until it ends)."""
        deadline = time.monotonic() + STARTUP_SECONDS
        while not self.held.exists():
            assert time.monotonic() < deadline, "no worker began the /hold request"
            time.sleep(0.01)  # waiting for the server to reach a state, not for an outcome

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


def running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


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
    opened = [server.connect() for _ in range(10)]
    first = opened[0][1]
    mine = [connection for connection, pid in opened if pid == first]
    for connection in mine[1:]:
        ask(connection, close=True)
    # The worker counts a connection out right after closing it, with no switch to another request between:
    # once it answered on its last connection, the four closed ones no longer count.
    assert ask(mine[0]) == first
    again = [server.connect() for _ in range(4)]
    assert [pid for _, pid in again] == [first] * 4  # its sibling still holds 5, it now 1


def test_a_worker_over_its_share_still_accepts_when_its_sibling_is_held(gunicorn):
    server = gunicorn("HastyWorker")  # leaves a connection to the sibling for at most 0.5 s
    held, held_pid = server.connect()
    _, free_pid = server.connect()
    assert held_pid != free_pid
    held.sendall(b"GET /hold?3 HTTP/1.1\r\nHost: test\r\n\r\n")  # its worker's one thread is held for 3 s
    server.wait_until_held()
    started = time.monotonic()
    taken = [server.connect() for _ in range(6)]
    elapsed = time.monotonic() - started
    assert [pid for _, pid in taken] == [free_pid] * 6  # over its share from the second on
    # Only the first over its share waited the 0.5 s: then the free worker saw its sibling accept nothing and
    # took the rest at once (6 waits would be 2.5 s). All before the held worker was let go.
    assert 0.5 <= elapsed < 1.5
    assert answered_pid(held) == held_pid  # the held worker answers once let go

    # The free worker holds 7, the other 1. The free one waits for nobody until the other accepts a connection
    # again (which of the two takes the next ones is a race meanwhile); from then on it leaves the new ones to
    # the other until they are even.
    later = []
    while held_pid not in {pid for _, pid in later}:
        later.append(server.connect())
    split = Counter(pid for _, pid in [*taken, *later]) + Counter({held_pid: 1, free_pid: 1})
    rest = [server.connect() for _ in range(split[free_pid] - split[held_pid])]
    assert [pid for _, pid in rest] == [held_pid] * len(rest)


def test_after_a_reload_and_a_killed_worker_connections_still_alternate(gunicorn):
    server = gunicorn()
    first = server.wait_for_workers(2)
    server.process.send_signal(signal.SIGHUP)  # two new workers; the old ones stop (and give their slots back)
    second = server.wait_for_workers(4, gone=tuple(first)) - first
    killed = min(second)
    os.kill(killed, signal.SIGKILL)  # as gunicorn's timeout does: no chance to give its slot back
    third = server.wait_for_workers(5, gone=(killed,)) - first - {killed}
    assert len(third) == 2
    opened = [server.connect() for _ in range(8)]
    assert {pid for _, pid in opened} == third
    for count in range(1, 9):  # the dead and the reloaded workers count for nothing: no worker waits in vain
        split = Counter(pid for _, pid in opened[:count]).most_common()
        assert split[0][1] - (split[1][1] if len(split) > 1 else 0) <= 1, (count, split)
