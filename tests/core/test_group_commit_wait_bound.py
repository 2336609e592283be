"""core.group_commit: a leader's whole wait before collecting its batch is bounded by max_wait.

ghl.message_ingest (MAX_WAIT) promises that a leader "waits at most MAX_WAIT seconds" for its worker's requests
and that this "adds at most that to a delivery's answer"; the module docstring of core.group_commit gives the
settle (under gevent) and the wait for announced callers each "at most max_wait". Run in this process on a
fake clock: the settle is replaced by one that uses its whole limit (a worker whose loop never goes idle), and
the condition's wait by one that advances the clock by its timeout (an announced caller that never submits
within it). Nothing sleeps.
"""

from __future__ import annotations

from unittest import mock

from core.group_commit import GroupCommit

MAX_WAIT = 0.005


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_a_leader_that_settles_and_then_waits_for_an_announced_caller_waits_at_most_max_wait_in_all():
    clock = FakeClock()
    collected_at = []

    def write(items):
        collected_at.append(clock.monotonic())
        return list(items)

    group = GroupCommit(write, max_rows=64, max_wait=MAX_WAIT, max_writers=1)
    group._settle = clock.advance  # as under gevent, with a loop busy for the whole limit

    real_wait = group._queued.wait

    def wait(timeout=None):  # the announced caller does not submit within the timeout
        clock.advance(timeout)
        return real_wait(0)

    group._queued.wait = wait
    with mock.patch("core.group_commit.time.monotonic", clock.monotonic):
        started = clock.monotonic()
        with group.arrival():  # a request still being read or verified, never submitted here
            assert group.submit("lone") == "lone"

    assert collected_at[0] - started <= MAX_WAIT


def test_an_arrival_never_entered_announces_nothing_and_submitting_with_it_changes_no_count():
    group = GroupCommit(list, max_rows=64, max_wait=MAX_WAIT, max_writers=1)
    arrival = group.arrival()  # not entered: a caller that forgot the ``with``

    assert group.submit("lone", arrival) == "lone"

    assert group._announced == 0  # a negative count would turn the wait for announced callers off
    with group.arrival() as entered:
        assert group._announced == 1
        group.submit("announced", entered)
        assert group._announced == 0
    assert group._announced == 0
