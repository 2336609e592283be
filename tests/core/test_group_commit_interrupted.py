"""core.group_commit under gevent when a caller's greenlet is interrupted (killed, or a gevent.Timeout) while
it waits, as the lead reaches it, or while it writes its batch: the other callers must still be answered (a
batch's other callers with BatchInterrupted), and the group commit must still write later batches.

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
    released, batches, after_first_write = Event(), [], []

    def write(items):
        batches.append(list(items))
        if len(batches) == 1:
            released.wait()
            for hook in after_first_write:
                hook()
        elif CASE == "writing" and len(batches) == 2:
            Event().wait()  # the second batch's writer hangs until it is killed
        return [f"stored {item}" for item in items]

    group = GroupCommit(write, max_rows=64, max_wait=60 if CASE == "leader" else 0.002, max_writers=1)
    outcomes = {}

    def caller(number):
        try:
            outcomes[number] = group.submit(number)
        except Exception as error:
            outcomes[number] = type(error).__name__

    def step_until(condition):
        for _ in range(10000):
            if condition():
                return
            gevent.sleep(0)
        raise AssertionError("condition never held")

    if CASE == "queued":
        # A caller waiting in the queue behind a batch in flight is interrupted; the batch then ends.
        first = gevent.spawn(caller, 0)
        step_until(lambda: batches)  # 0 leads and waits inside its write
        victim = gevent.spawn(caller, 1)
        step_until(lambda: len(group._queue) == 1)
        victim.kill()
        released.set()
        first.join()
    elif CASE == "handed":
        # The lead is handed to a queued caller whose kill was already on its way: it must hand the lead on.
        first = gevent.spawn(caller, 0)
        step_until(lambda: batches)  # 0 leads and waits inside its write
        victim = gevent.spawn(caller, 1)
        step_until(lambda: len(group._queue) == 1)
        after_first_write.append(lambda: victim.kill(block=False))  # queued before the lead reaches 1
        released.set()
        first.join()
        victim.join()
    elif CASE == "writing":
        # The leader of a batch of three is killed while its write runs.
        first = gevent.spawn(caller, 0)
        step_until(lambda: batches)  # 0 leads and waits inside its write
        others = {number: gevent.spawn(caller, number) for number in (1, 2, 3)}
        step_until(lambda: len(group._queue) == 3)
        released.set()
        step_until(lambda: len(batches) == 2)  # 1 leads [1, 2, 3] and hangs in the write
        others[1].kill()
        gevent.joinall([first, *others.values()])
    else:
        # A leader waiting for an announced caller (a request still verifying its signature) is interrupted.
        released.set()
        with group.arrival():
            victim = gevent.spawn(caller, 0)
            step_until(lambda: group.pending == 1)  # 0 leads and waits for the announced one
            victim.kill()
    late = gevent.spawn(caller, 4 if CASE == "writing" else 2)
    late.join(timeout=2)
    print(json.dumps({"late_answered": late.ready(), "outcomes": outcomes, "leaders": group._leaders,
                      "pending": group.pending, "batches": batches}))
    """
)


def run_script_under_gevent(script: str, case: str) -> dict:
    """Run ``script`` (it monkey-patches first) in a fresh interpreter with ``case``; the JSON it prints."""
    finished = subprocess.run(
        [sys.executable, "-c", script, case], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert finished.returncode == 0, finished.stderr
    return json.loads(finished.stdout)


def run_under_gevent(case: str) -> dict:
    return run_script_under_gevent(SCRIPT, case)


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


def test_a_caller_killed_as_the_lead_reaches_it_hands_the_lead_on_under_gevent():
    result = run_under_gevent("handed")

    assert result["batches"] == [[0], [2]], result  # 1 never wrote: its kill came before it could take the lead
    assert result["late_answered"], result  # the lead handed to the killed caller stayed taken
    assert result["outcomes"] == {"0": "stored 0", "2": "stored 2"}
    assert result["leaders"] == 0 and result["pending"] == 0


def test_a_leader_killed_while_writing_answers_the_rest_of_its_batch_with_batch_interrupted_under_gevent():
    result = run_under_gevent("writing")

    assert result["batches"] == [[0], [1, 2, 3], [4]], result
    # 2 and 3 get an error of their batch (the ingest answers it 429), not the leader's GreenletExit
    assert result["outcomes"] == {"0": "stored 0", "2": "BatchInterrupted", "3": "BatchInterrupted", "4": "stored 4"}
    assert result["late_answered"], result  # the killed writer kept the lead
    assert result["leaders"] == 0 and result["pending"] == 0
