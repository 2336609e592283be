"""gunicorn's gevent worker, with new connections shared evenly between the workers of a server.

Why. gunicorn's workers all accept from one listening socket, and whichever runs first takes the connection.
When several connections open at once (a load balancer's or nginx's keep-alive pool filling up, a burst of
GHL deliveries), one worker may take most of them. With keep-alive connections that split lasts, and a
group-committing server feels it: a worker's batch of webhooks holds at most its own connections
(ghl.message_ingest), so the worker with 3 of 16 writes batches of at most 3 and waits on most of them, while
the other carries 13. Measured with bench/webhook_bench.py on two workers: Rebill served 8/8 at 4,286/s and
1/15 at 3,417/s in one run, which is most of the spread between its rounds (bench/README.md, fifth and sixth
passes).

How. Each worker publishes how many connections it holds in a small table in shared memory, set up by the
gunicorn master before it forks (``ConnectionShares``). Before accepting, a worker that would then hold more
than its share (the connections of all accepting workers plus this one, divided among them, rounded up) leaves
the pending connection to a sibling: it stops watching the listening socket and looks again every ``recheck``
seconds (1 ms). The siblings are woken by the same socket, and one below its share takes the connection at
once. After ``max_deferral`` of the same wait a worker accepts regardless, so a sibling that is busy (one long
request holds a gevent worker's only thread) or gone delays a new connection by at most that much; it never
refuses one. After such a wait it takes every connection at once until a sibling accepts one again, and it
does not wait at all while more than ten of its connections a second close within a second (``Deferral``). A
worker stops counting as soon as it stops accepting (a graceful stop or reload), and the master takes back the
slot of one that died. Nothing here is needed for correctness: a worker the master could not give a slot (more
workers than the table holds) accepts as gunicorn's own does.
"""

from __future__ import annotations

import math
import mmap
import os
import select
import struct
import time
from functools import partial

from gevent.monkey import get_original
from gevent.server import StreamServer
from gunicorn.workers.ggevent import GeventWorker

# The listening socket's readiness, asked without waiting (gevent's patched poll would yield to its hub).
_poll = get_original("select", "poll")


class ConnectionShares:
    """Connections held per worker, one slot per worker, in memory shared by the master and its workers.

    Only the master reserves slots (``reserve``, before each fork, so reservations never race), and it takes
    back the slots of workers that died without giving theirs back (SIGKILL after gunicorn's timeout, a crash)
    each time it spawns one, which it does right after reaping a dead worker. Only a slot's worker writes in
    it afterwards: it counts as a sibling from when it starts accepting (``accepting``: not while it boots,
    which takes a while at every start, reload and respawn) until it stops (its server closes: a graceful
    stop, a reload, max-requests); then it gives the slot back, before it finishes the requests it still
    holds, so that siblings never wait for a worker that does not accept.
    """

    def __init__(self, slots: int):
        # Anonymous shared mappings: the workers inherit them at the fork, and they see each other's writes.
        # Native int views, summed in C: the share is read before every accept.
        self.reserved = _shared_array("i", slots)  # 1 from the master's reservation until given back
        self.accepting = _shared_array("i", slots)  # 1 while the slot's worker accepts: a sibling to wait for
        self.connections = _shared_array("i", slots)  # 0 for a slot given back
        self.accepted = _shared_array("q", slots)  # ever, per slot: a sign of life
        self._workers = {}  # master only: slot -> the gunicorn worker object it was reserved for

    def reserve(self, worker) -> int | None:
        """A free slot for ``worker`` (master side, before the fork), or None when every slot is reserved."""
        for slot, owner in list(self._workers.items()):
            if self.reserved[slot] and not _is_running(owner.pid):
                self.release(slot)  # died holding it: its connections died with it
        for slot in range(len(self.reserved)):
            if not self.reserved[slot]:
                self._workers[slot] = worker
                self.connections[slot] = 0
                self.reserved[slot] = 1
                return slot
        return None

    def started(self, slot: int) -> None:
        """The worker of ``slot`` accepts from now on."""
        self.accepting[slot] = 1

    def release(self, slot: int) -> None:
        """The worker of ``slot`` no longer accepts: it is no sibling to wait for, and its count is no share."""
        self.accepting[slot] = 0
        self.connections[slot] = 0
        self.reserved[slot] = 0

    def opened(self, slot: int) -> None:
        self.connections[slot] += 1
        self.accepted[slot] += 1

    def closed(self, slot: int) -> None:
        self.connections[slot] -= 1

    def accepted_by_others(self, slot: int) -> int:
        """Connections the other slots' workers have accepted, ever: it grows while a sibling accepts."""
        return sum(self.accepted) - self.accepted[slot]

    def over_share(self, slot: int) -> bool:
        """Whether the worker of ``slot`` would hold more than its share after accepting one more connection."""
        workers = sum(self.accepting)
        if workers <= 1:
            return False
        total = sum(self.connections)  # a given-back slot counts 0, a booting one holds none
        share = -(-(total + 1) // workers)  # the connections after this one, shared out, rounded up
        return self.connections[slot] + 1 > share


def _shared_array(typecode: str, length: int) -> memoryview:
    """Zeroed integers in memory shared with the processes this one forks (mmap's anonymous map is MAP_SHARED)."""
    return memoryview(mmap.mmap(-1, length * struct.calcsize(typecode))).cast(typecode)


def _is_running(pid: int | str) -> bool:
    """Whether the worker ``pid`` still runs (master side: the master reaps its dead workers before it spawns)."""
    if not isinstance(pid, int):
        return True  # gunicorn's "[booting]" until it sets the pid after the fork
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):  # gone, or the pid now belongs to another user's process
        return False
    return True


class Deferral:
    """When a worker over its share leaves a pending connection to its siblings, and when it takes it anyway.

    A wait lasts at most ``max_deferral``. One that runs out usually means no sibling is accepting (one long
    request holds a gevent worker's only thread): the worker then takes every connection without waiting
    until a sibling has accepted one, or every new connection would pay the whole wait and this worker's
    accepts would fall to one per ``max_deferral``. (A wait may also run out while siblings do accept, when
    connections keep arriving; their accepts then end the no-waiting at once.)
    """

    SHORT_LIFETIME = 1.0  # seconds: a connection closed sooner is one of many that come and go
    CHURN = 10.0  # short-lived connections closed a second (lately) above which a worker waits no more

    def __init__(self, max_deferral: float):
        self.max_deferral = max_deferral
        self.since = None  # when the current wait began
        self.stalled_at = None  # what the siblings had accepted, ever, when a wait last ran out
        self.short_closes = 0.0  # short-lived connections closed, decaying by e every second since
        self.last_short_close = 0.0

    def closed(self, lifetime: float, now: float) -> None:
        """A connection this worker accepted closed after ``lifetime`` seconds."""
        if lifetime < self.SHORT_LIFETIME:
            self.short_closes = self._short_closes(now) + 1
            self.last_short_close = now

    def _short_closes(self, now: float) -> float:
        """Short-lived connections closed lately: at a steady rate, about that rate per second."""
        return self.short_closes * math.exp(self.last_short_close - now)

    def leave_to_sibling(self, siblings_accepted: int, now: float) -> bool:
        """Whether to leave the pending connection to a sibling for now (asked while over the share)."""
        if self._short_closes(now) > self.CHURN:
            # Clients open a connection per request (no keep-alive): an uneven split evens out as they close,
            # and waiting would only leave this worker idle (-10 % at 16 such clients). Balancing is for
            # connections that stay; an occasional short one (a health check) does not stop it.
            self.since = None
            return False
        if self.stalled_at is not None:
            if siblings_accepted == self.stalled_at:
                return False
            self.stalled_at = None  # a sibling accepts again
        if self.since is None:
            self.since = now
        elif now - self.since >= self.max_deferral:
            self.since = None
            self.stalled_at = siblings_accepted
            return False
        return True

    def end(self) -> None:
        """The wait is over: a sibling took the pending connection, or this worker is no longer over its share."""
        self.since = None


class BalancedStreamServer(StreamServer):
    """gevent's StreamServer as gunicorn's gevent worker builds it, deferring accepts while over its share."""

    def __init__(self, listener, *, worker: BalancedGeventWorker, spawn, ssl_context=None, **_pywsgi_options):
        # gunicorn hands a ``server_class`` the arguments of gevent's WSGI server (application, log,
        # handler_class, environ); this server is the plain StreamServer of gunicorn's own gevent worker,
        # which parses HTTP itself in ``worker.handle``, so those go unused.
        self._worker = worker  # before gevent's __init__, whose failure path calls close()
        self._deferral = Deferral(worker.max_deferral)
        self._opened_at = {}  # accepted connection -> when
        self._recheck_timer = None
        ssl = {"ssl_context": ssl_context} if ssl_context is not None else {}
        super().__init__(listener, handle=partial(worker.handle, listener), spawn=spawn, **ssl)
        if worker.cfg.workers > 1:
            self.max_accept = 1  # as in gunicorn's gevent worker: one accept per loop turn, the rest to siblings

    def start(self):
        super().start()
        if self._worker.slot is not None:
            self._worker.shares.started(self._worker.slot)

    def do_read(self):
        slot = self._worker.slot
        if slot is not None and self._defer(slot):
            return None
        accepted = super().do_read()
        if accepted and slot is not None:
            self._worker.shares.opened(slot)
            self._opened_at[accepted[0]] = time.monotonic()
        return accepted

    def do_close(self, sock, *args):
        try:
            super().do_close(sock, *args)
        finally:
            opened_at = self._opened_at.pop(sock, None)
            if opened_at is not None:
                now = time.monotonic()
                self._deferral.closed(now - opened_at, now)
            slot = self._worker.slot  # None once the worker released its slot: the count is no longer its own
            if slot is not None:
                self._worker.shares.closed(slot)

    def _defer(self, slot: int) -> bool:
        """Whether to leave the pending connection to a sibling for now; if so, look again after ``recheck``."""
        shares = self._worker.shares
        if not shares.over_share(slot):
            self._deferral.end()
            return False
        if not self._deferral.leave_to_sibling(shares.accepted_by_others(slot), time.monotonic()):
            return False
        self.stop_accepting()
        if self._recheck_timer is not None:  # accepting restarted early (gevent does so whenever a handler ends)
            self._recheck_timer.close()
        self._recheck_timer = self.loop.timer(self._worker.recheck)
        self._recheck_timer.start(self._look_again)
        return True

    def close(self):
        self._worker.release_slot()  # before the requests still held finish (gunicorn's graceful stop)
        super().close()

    def _look_again(self):
        self._recheck_timer.close()
        self._recheck_timer = None
        if not self.started:  # closed meanwhile (gunicorn's graceful stop)
            return
        try:
            readiness = _poll()
            readiness.register(self.socket, select.POLLIN)
            if not readiness.poll(0):
                self._deferral.end()  # a sibling took the pending connection: the next one waits afresh
        finally:
            self.start_accepting()  # a pending connection calls do_read again at once


class BalancedGeventWorker(GeventWorker):
    """gunicorn's gevent worker (``--worker-class core.gunicorn_worker.BalancedGeventWorker``), sharing
    connections evenly with its siblings (this module's docstring)."""

    max_deferral = 0.01  # seconds a pending connection is left to a sibling at most
    recheck = 0.001  # seconds between looks while leaving it (libev's shortest wait in epoll is 1 ms)

    _shares: ConnectionShares | None = None  # the master's table, created before its first fork

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)  # in the master, before the fork
        if BalancedGeventWorker._shares is None:
            # A reload runs twice the workers for a while (the new ones boot while the old ones finish), and a
            # dead worker's slot comes back only at the next spawn; workers beyond the table (raised with TTIN
            # or a reload to more workers) get no slot and accept as gunicorn's own worker does.
            BalancedGeventWorker._shares = ConnectionShares(slots=max(2 * self.cfg.workers, self.cfg.workers + 8))
        self.shares = BalancedGeventWorker._shares
        self.slot = self.shares.reserve(self)

    @property
    def server_class(self):
        # gunicorn's GeventWorker.run builds each listener's server with ``server_class`` when one is set (its
        # hook for gevent's WSGI server); here it is the same StreamServer, told about this worker.
        return partial(BalancedStreamServer, worker=self)

    def release_slot(self) -> None:
        """Stop counting in the table: this worker accepts no more, and what it still holds is no share."""
        slot, self.slot = self.slot, None
        if slot is not None:
            self.shares.release(slot)
