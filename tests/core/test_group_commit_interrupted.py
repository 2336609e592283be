"""core.group_commit under gevent when a caller's greenlet is interrupted (killed, or a gevent.Timeout) while
it waits: the other callers must still be answered, and the group commit must still write later batches.

Under gevent a wait is a point where a greenlet can receive an exception (GreenletExit from Greenlet.kill, as
gunicorn's gevent worker sends its handlers when their graceful timeout ends, or a gevent.Timeout around the
call). A leader or a caller handed the lead that leaves without giving it back would keep ``_leaders`` at
MAX_WRITERS (1 in the worker): every later caller of that process queues and is never answered. Same fresh
gevent-patched interpreter as tests/core/test_group_commit.py; no sleeping: greenlets are stepped until
a condition holds, and the late caller gets a bounded wait.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).parents[2]

SCRIPT = textwrap.dedent(
    """
    from gevent import monkey
    monkey.patch_all()

    import json, sys
    import gevent
    from gevent.event import Event
    from core.group_commit import GroupCommit

    CASE = sys.argv[1]
    released, batches = Event(), []

    def write(items):
        batches.append(list(items))
        if len(batches) == 1:
            released.wait()
        return [f"stored {item}" for item in items]

    group = GroupCommit(write, max_rows=64, max_wait=60 if CASE == "leader" else 0.002, max_writers=1)
    outcomes = {}

    def caller(number):
        outcomes[number] = group.submit(number)

    def step_until(condition):
        for _ in range(10000):
            if condition():
                return
            gevent.sleep(0)
        raise AssertionError("condition never held")

    if CASE == "queued":
        # A caller waiting in the queue behind a batch in flight is interrupted; the batch then ends.
        first = gevent.spawn(caller, 0)
        step_until(lambda: group.pending == 1)  # 0 leads and waits inside its write
        victim = gevent.spawn(caller, 1)
        step_until(lambda: len(group._queue) == 1)
        victim.kill()
        released.set()
        first.join()
    else:
        # A leader waiting for an announced caller (a request still verifying its signature) is interrupted.
        released.set()
        with group.arrival():
            victim = gevent.spawn(caller, 0)
            step_until(lambda: group.pending == 1)  # 0 leads and waits for the announced one
            victim.kill()
    late = gevent.spawn(caller, 2)
    late.join(timeout=2)
    print(json.dumps({"late_answered": late.ready(), "outcomes": outcomes, "leaders": group._leaders,
                      "pending": group.pending}))
    """
)


def run_under_gevent(case: str) -> dict:
    finished = subprocess.run(
        [sys.executable, "-c", SCRIPT, case], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert finished.returncode == 0, finished.stderr
    return json.loads(finished.stdout)


def test_a_queued_caller_interrupted_under_gevent_does_not_stop_later_batches():
    result = run_under_gevent("queued")

    assert result["outcomes"]["0"] == "stored 0"
    assert result["late_answered"], result  # the lead was handed to the interrupted caller and never came back
    assert result["outcomes"]["2"] == "stored 2"
    assert result["leaders"] == 0 and result["pending"] == 0


def test_a_leader_interrupted_while_it_waits_for_announced_callers_does_not_stop_later_batches():
    result = run_under_gevent("leader")

    assert result["late_answered"], result  # the interrupted leader left _leaders counted
    assert result["outcomes"]["2"] == "stored 2"
    assert result["leaders"] == 0 and result["pending"] == 0
