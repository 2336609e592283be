"""Group commit inside one process: concurrent callers' rows written by one statement and one commit.

Each caller submits its item and blocks. Up to ``max_writers`` callers lead: a leader takes the queued
items (at most ``max_rows``), calls ``write(items)`` — which must store them all in one transaction and
return one result per item, in order — and hands every caller of the batch its result, or the batch's
exception. A caller therefore returns only after the write holding its item returned, i.e. after the
commit: nothing is acknowledged that is not committed, and when the write fails every caller of that batch
gets the error. Then, if items queued meanwhile, the lead passes to the oldest waiting caller (no extra
thread: leaders are requests (threads, or greenlets under gevent), and each leader's own request waits only
for its own batch).

Batches form naturally: while a batch's commit is in flight, the callers arriving meanwhile queue up, so
batches grow with the load and a lone caller waits for nobody. With OS threads, two writers let one batch
collect and execute while the other waits for its WAL flush (PostgreSQL then often flushes both at once);
with one, the flush time alone bounds a worker's rate. Under gevent the locks below are gevent's (the worker
monkey-patches threading), a wait is a greenlet switch, and one writer suffices: the worker keeps serving
its other requests while the batch's statement runs (ghl.message_ingest.MAX_WRITERS). Callers may also
announce themselves before they are ready (``arrival()``: a request still verifying its signature); the
leader then waits up to ``max_wait`` for the announced ones, so that a burst lands in one batch, and never
waits when nobody announced (one caller at a time, as in a sync worker, costs no delay).

Under gevent a leader first lets every greenlet that can run do so (at most ``max_wait``): requests whose
bodies are already readable get read, verified and queued, so they join this batch rather than the next.
Without it a worker's requests split into two cohorts taking turns (one in the database while the other
is being answered and read), and each batch held about half of them: bench/README.md ("Fourth pass")
measured fewer, larger batches, less CPU per delivery in the worker and in PostgreSQL.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")

_PENDING = object()


class _Caller:
    """One submitted item and where its result goes. A caller that queues gets ``wake``, held until it may run
    again; one that leads at once never waits, so it gets none (a lock per delivery less: under gevent each is
    a Python object, see bench/README.md)."""

    __slots__ = ("error", "item", "lead", "result", "wake")

    def __init__(self, item: Any):
        self.item = item
        self.result: Any = _PENDING
        self.error: BaseException | None = None
        self.lead = False
        self.wake: Any = None

    def outcome(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.result


class BatchInterrupted(Exception):
    """The leader writing a caller's batch was interrupted (e.g. its greenlet killed): the batch may or may
    not have been written, and the caller is answered as for a failed batch."""


class Arrival:
    """A caller announced to a GroupCommit while inside ``with group.arrival()``; ``announced`` until its item
    is queued or it leaves the block. A context manager of its own, not a generator-based one: it is entered
    once per delivery. One never entered announces nothing, and submitting with it changes no count."""

    __slots__ = ("_group", "announced")

    def __init__(self, group: GroupCommit):
        self._group = group
        self.announced = False

    def __enter__(self) -> Arrival:
        self._group._announce()
        self.announced = True
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.announced:
            self.announced = False
            self._group._withdraw()


class GroupCommit(Generic[Item, Result]):
    """Write concurrent callers' items in shared batches (see the module's docstring)."""

    def __init__(
        self,
        write: Callable[[list[Item]], list[Result]],
        *,
        max_rows: int = 64,
        max_wait: float = 0.002,
        max_writers: int = 2,
    ):
        self._write = write
        self.max_rows = max_rows
        self.max_wait = max_wait
        self.max_writers = max_writers
        self._lock = threading.Lock()
        self._queued = threading.Condition(self._lock)
        self._queue: deque[_Caller] = deque()
        self._leaders = 0
        self._announced = 0
        self._collecting = 0  # leaders waiting on _queued for announced callers: the only ones notify can wake
        self._writing = 0
        self._settle = _settle_greenlets if _greenlets_patched() else None
        self.batches = 0  # written batches and items, for the benchmark's and the tests' reading
        self.items = 0

    @property
    def pending(self) -> int:
        """Submitted items not answered yet: waiting in the queue, or carried by a leader into its batch."""
        with self._lock:
            return len(self._queue) + self._writing

    def arrival(self) -> Arrival:
        """Announce a caller that may submit soon: ``with group.arrival() as arrival:``, passing ``arrival`` to
        submit; the announcement ends on leaving the block (or once submitted)."""
        return Arrival(self)

    def _announce(self) -> None:
        with self._lock:
            self._announced += 1

    def _withdraw(self) -> None:
        """An announced caller left without submitting: a leader waiting for it stops waiting."""
        with self._lock:
            self._announced -= 1
            self._notify_collecting()

    def _notify_collecting(self) -> None:
        """(Under the lock.) Wake a leader waiting for announced callers, if one is: notify() with nobody waiting
        does nothing, and costs a deque and two lock operations (Python's Condition; gevent's lock under gevent)."""
        if self._collecting:
            self._queued.notify()

    def submit(self, item: Item, arrival: Arrival | None = None) -> Result:
        """Write ``item`` in the next batch; return its result once that batch is written (or raise its error)."""
        caller = _Caller(item)
        with self._lock:
            if arrival is not None and arrival.announced:
                arrival.announced = False
                self._announced -= 1
            lead = self._leaders < self.max_writers
            if lead:
                self._leaders += 1
                self._writing += 1
            else:
                caller.wake = threading.Lock()
                caller.wake.acquire()
                self._queue.append(caller)  # the queue holds waiting callers only; a leader carries its own
                self._notify_collecting()
        if not lead:
            try:
                caller.wake.acquire()  # released with the result, or to take the lead (then it left the queue)
            except BaseException:  # interrupted while waiting (gevent: a kill, a Timeout)
                self._abandon(caller)
                raise
            if not caller.lead:
                return caller.outcome()
        self._lead(caller)
        return caller.outcome()

    def _abandon(self, caller: _Caller) -> None:
        """A waiting caller leaves: out of the queue, or handing on a lead it was given and never took.

        Without this, under gevent, the lead handed to a greenlet that was killed meanwhile would stay taken,
        and every later caller of the process would wait forever. A caller already taken into a batch is
        written with it (its answer is simply not awaited).
        """
        with self._lock:
            if caller in self._queue:
                self._queue.remove(caller)
            elif caller.lead:
                self._writing -= 1  # counted when the lead was handed to it
                self._pass_lead()

    def _lead(self, own: _Caller) -> None:
        """Write own's item with whatever queued behind it, then hand the lead to the oldest waiting caller."""
        try:
            started = None  # the settle and the wait for announced callers share one max_wait
            if self._settle is not None and len(self._queue) + 1 < self.max_rows:
                started = time.monotonic()
                self._settle(self.max_wait)
            with self._lock:
                if self._announced > 0:  # nobody announced (one caller at a time): no clock, no wait
                    deadline = (time.monotonic() if started is None else started) + self.max_wait
                    while self._announced > 0 and len(self._queue) + 1 < self.max_rows:  # a burst: wait for the rest
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            break
                        self._collecting += 1
                        try:
                            self._queued.wait(remaining)  # returns (or raises) with the lock held again
                        finally:
                            self._collecting -= 1
                batch = [own]
                if self._queue:
                    batch += [self._queue.popleft() for _ in range(min(len(self._queue), self.max_rows - 1))]
                self._writing += len(batch) - 1  # own was counted when it took the lead
        except BaseException:  # interrupted before writing anything: the lead goes on, own is not written
            with self._lock:
                self._writing -= 1
                self._pass_lead()
            raise
        self._write_batch(batch)
        with self._lock:
            self._pass_lead()

    def _pass_lead(self) -> None:
        """(Under the lock.) Hand the lead to the oldest waiting caller, or give it up when none waits."""
        if self._queue:
            successor = self._queue.popleft()
            self._writing += 1
            successor.lead = True
            successor.wake.release()
        else:
            self._leaders -= 1

    def _write_batch(self, batch: list[_Caller]) -> None:
        try:
            results = self._write([caller.item for caller in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"a batch of {len(batch)} items was written with {len(results)} results")
        except Exception as error:  # every caller of the batch gets the failure; none is acknowledged
            for caller in batch:
                caller.error = error
        except BaseException as error:  # the leader itself was interrupted (gevent: killed) while writing
            batch[0].error = error
            for caller in batch[1:]:  # an error for the others to answer, not the leader's interruption
                caller.error = BatchInterrupted(f"the batch's writer was interrupted ({type(error).__name__})")
        else:
            for caller, result in zip(batch, results, strict=True):
                caller.result = result
        with self._lock:
            self._writing -= len(batch)
            self.batches += 1
            self.items += len(batch)
        for caller in batch[1:]:  # batch[0] is the leader's own caller: running, not waiting
            caller.wake.release()


def _greenlets_patched() -> bool:
    """True in a gevent worker: threading is gevent's, and callers are greenlets of one thread."""
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and monkey.is_module_patched("threading")


def _settle_greenlets(limit: float) -> None:
    """Wait until the gevent loop has nothing else to run (every greenlet that could run has run and is
    waiting), or ``limit`` seconds, whichever comes first; alone in the worker, it costs one loop turn.

    https://www.gevent.org/api/gevent.html#gevent.idle
    """
    import gevent

    with gevent.Timeout(limit, False):  # False: the timeout ends the wait silently
        gevent.idle()
