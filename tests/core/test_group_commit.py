"""core.group_commit under gevent, as the Procfile's gunicorn worker runs it (monkey-patched threading).

The message webhook tests (tests/ghl/test_message_group_commit.py) drive the group commit with OS threads
in this process; production runs it in gevent workers, where its locks are gevent's and a wait is a greenlet
switch. gevent cannot be undone in a process, so each case runs in a fresh interpreter that patches first,
then imports the module. The write function blocks its first batch on a gevent Event until every other
caller has queued: batches are then deterministic without sleeping.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]

SCRIPT = textwrap.dedent(
    """
    from gevent import monkey
    monkey.patch_all()

    import json, sys
    import gevent
    from gevent.event import Event
    from core.group_commit import GroupCommit

    CALLERS, FAIL_SECOND = int(sys.argv[1]), sys.argv[2] == "fail"
    writing, released, batches = Event(), Event(), []

    def write(items):
        batches.append(list(items))
        if len(batches) == 1:
            writing.set()
            released.wait()  # the first batch's "commit" waits until every other caller queued
        if FAIL_SECOND and len(batches) == 2:
            raise RuntimeError("the batch failed")
        return [f"stored {item}" for item in items]

    group = GroupCommit(write, max_rows=64, max_wait=0.002, max_writers=1)
    outcomes = {}

    def caller(number):
        try:
            outcomes[number] = group.submit(number)
        except RuntimeError as error:
            outcomes[number] = f"error: {error}"

    first = gevent.spawn(caller, 0)
    writing.wait()  # caller 0 leads and blocks inside its write
    others = [gevent.spawn(caller, number) for number in range(1, CALLERS)]
    while len(group._queue) < CALLERS - 1:  # every other caller waits in the queue (a greenlet switch each)
        gevent.sleep(0)
    queued_while_writing = len(group._queue)
    released.set()
    gevent.joinall([first, *others], raise_error=True)
    print(json.dumps({"batches": batches, "outcomes": outcomes, "queued": queued_while_writing,
                      "pending": group.pending}))
    """
)


def run_under_gevent(callers: int, mode: str) -> dict:
    finished = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(callers), mode], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert finished.returncode == 0, finished.stderr
    return json.loads(finished.stdout)


def test_one_writer_under_gevent_carries_every_caller_queued_during_its_write_in_the_next_batch():
    result = run_under_gevent(20, "ok")

    assert result["queued"] == 19
    assert result["batches"] == [[0], list(range(1, 20))]
    assert result["outcomes"] == {str(number): f"stored {number}" for number in range(20)}
    assert result["pending"] == 0


def test_a_failed_batch_under_gevent_answers_each_of_its_callers_with_the_error_and_no_one_else():
    result = run_under_gevent(5, "fail")

    assert result["batches"] == [[0], [1, 2, 3, 4]]
    assert result["outcomes"]["0"] == "stored 0"
    assert all(result["outcomes"][str(number)] == "error: the batch failed" for number in range(1, 5))
    assert result["pending"] == 0


# A leader waits up to max_wait (here 60 s, far beyond the test's timeout) for callers announced with
# ``arrival()``; it is woken only by notify, which the group commit sends only while a leader waits. Each
# way an announced caller ends must wake it: by submitting (its item joins the batch), or by leaving
# without submitting (a refused delivery; the batch goes without it).
ARRIVAL_SCRIPT = textwrap.dedent(
    """
    from gevent import monkey
    monkey.patch_all()

    import json, sys
    import gevent
    from core.group_commit import GroupCommit

    batches, outcomes = [], {}
    group = GroupCommit(lambda items: batches.append(list(items)) or list(items), max_wait=60, max_writers=1)

    def caller(number):
        outcomes[number] = group.submit(number)

    def step_until(condition):
        for _ in range(10000):
            if condition():
                return
            gevent.idle()  # not sleep(0): a leader lets every ready greenlet run first, until the loop idles
        raise AssertionError("condition never held")

    with group.arrival() as arrival:
        leader = gevent.spawn(caller, 0)
        step_until(lambda: group._collecting == 1)  # 0 leads and waits for the announced caller
        if sys.argv[1] == "submits":
            outcomes["announced"] = group.submit("announced", arrival)
    leader.join(timeout=5)
    print(json.dumps({"answered": leader.ready(), "batches": batches, "outcomes": outcomes,
                      "announced": group._announced, "collecting": group._collecting, "pending": group.pending}))
    """
)


@pytest.mark.parametrize(("ending", "batch"), [("submits", [0, "announced"]), ("leaves", [0])])
def test_a_leader_waiting_for_an_announced_caller_is_woken_when_that_caller_submits_or_leaves(ending, batch):
    finished = subprocess.run(
        [sys.executable, "-c", ARRIVAL_SCRIPT, ending], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert finished.returncode == 0, finished.stderr
    result = json.loads(finished.stdout)

    assert result["answered"] is True
    assert result["batches"] == [batch]
    assert result["outcomes"]["0"] == 0
    assert result["announced"] == result["collecting"] == result["pending"] == 0


COHORTS = textwrap.dedent(
    """
    from gevent import monkey
    monkey.patch_all()

    import json, socket
    import gevent
    from gevent.event import Event
    from core.group_commit import GroupCommit

    writing, released, batches = Event(), Event(), []

    def write(items):
        batches.append(list(items))
        if len(batches) == 1:
            writing.set()
            released.wait()  # batch 1's "commit" waits until callers 4-6 queued behind it
        return [None] * len(items)

    group = GroupCommit(write, max_rows=64, max_wait=1.0, max_writers=1)
    connections = {number: socket.socketpair() for number in range(1, 4)}

    def connection(number):
        # A keep-alive connection: its request, then, once answered, the next one, which arrives through the
        # socket (readable on a later turn of the loop), as a client's next request does.
        group.submit(number)
        client, server = connections[number]
        client.sendall(b"next request")
        server.recv(64)
        group.submit(number * 10)

    first = [gevent.spawn(connection, number) for number in range(1, 4)]
    writing.wait()
    later = [gevent.spawn(group.submit, number) for number in range(4, 7)]
    while len(group._queue) < 3:
        gevent.sleep(0)
    released.set()
    gevent.joinall([*first, *later], raise_error=True)
    print(json.dumps({"batches": batches}))
    """
)


def test_a_leader_under_gevent_waits_for_ready_requests_so_answered_connections_join_the_next_batch():
    # Callers 1-3 are answered by batch 1; their next requests (10, 20, 30) arrive on their sockets while
    # callers 4-6 wait for batch 2. Without the leader letting the ready greenlets run first, batch 2 would
    # be [4, 5, 6] and the answered connections would form a batch of their own: two cohorts taking turns.
    finished = subprocess.run(
        [sys.executable, "-c", COHORTS], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert finished.returncode == 0, finished.stderr

    batches = json.loads(finished.stdout)["batches"]

    assert batches == [[1, 2, 3], [4, 5, 6, 10, 20, 30]]
