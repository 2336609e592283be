"""Attacks on the gevent leader's settle (core.group_commit._settle_greenlets): each test fails if it succeeds.

A leader under gevent first lets the ready greenlets run, at most ``max_wait``. It must not wait far longer
(a worker whose loop never goes idle), must not swallow a Timeout that is not its own, and must give the lead
back when it is interrupted while it settles. Same fresh gevent-patched interpreter as the other gevent
cases of core.group_commit; no sleeping in the test itself.
"""

from __future__ import annotations

import textwrap

from tests.core.test_group_commit_interrupted import run_script_under_gevent

SCRIPT = textwrap.dedent(
    """
    from gevent import monkey
    monkey.patch_all()

    import json, sys, time
    import gevent
    from core.group_commit import GroupCommit

    CASE = sys.argv[1]
    batches, outcomes, spinning = [], {}, [True]

    def write(items):
        batches.append(list(items))
        return [f"stored {item}" for item in items]

    group = GroupCommit(write, max_rows=64, max_wait=0.005, max_writers=1)

    def spin():  # a request loop that is always ready: the hub never goes idle
        while spinning[0]:
            gevent.sleep(0)

    def caller(number):
        try:
            outcomes[number] = group.submit(number)
        except BaseException as error:
            outcomes[number] = type(error).__name__
            raise

    result = {}
    if CASE == "busy":
        spinners = [gevent.spawn(spin) for _ in range(4)]
        gevent.sleep(0)
        started = time.monotonic()
        first = gevent.spawn(caller, 0)
        first.join(timeout=5)
        result["waited"] = time.monotonic() - started
        spinning[0] = False
        gevent.joinall(spinners)
    elif CASE == "killed":
        spinners = [gevent.spawn(spin)]  # keeps the leader settling for its whole max_wait
        victim = gevent.spawn(caller, 0)
        while group._leaders == 0:
            gevent.sleep(0)
        victim.kill()  # while it settles: nothing written yet
        spinning[0] = False
        gevent.joinall(spinners)
    elif CASE == "foreign timeout":
        spinners = [gevent.spawn(spin)]

        def timed_caller():
            try:
                with gevent.Timeout(0.001, False):  # the request's own, silent, shorter than the settle
                    outcomes[0] = group.submit(0)
                    return
                outcomes[0] = "request timeout"
            except BaseException as error:
                outcomes[0] = type(error).__name__

        victim = gevent.spawn(timed_caller)
        victim.join(timeout=5)
        spinning[0] = False
        gevent.joinall(spinners)
    late = gevent.spawn(caller, 9)
    late.join(timeout=2)
    result |= {"late_answered": late.ready(), "outcomes": outcomes, "leaders": group._leaders,
               "pending": group.pending, "batches": batches}
    print(json.dumps(result))
    """
)


def run_under_gevent(case: str) -> dict:
    return run_script_under_gevent(SCRIPT, case)


def test_a_leader_whose_loop_never_goes_idle_settles_no_longer_than_about_max_wait():
    result = run_under_gevent("busy")

    assert result["outcomes"]["0"] == "stored 0"
    assert result["waited"] < 0.5, result  # max_wait is 5 ms: a loop kept busy must not hold the batch back


def test_a_leader_killed_while_it_settles_gives_the_lead_back_and_writes_nothing():
    result = run_under_gevent("killed")

    assert result["batches"] == [[9]], result
    assert result["late_answered"], result
    assert result["leaders"] == 0 and result["pending"] == 0


def test_the_request_s_own_timeout_during_the_settle_is_not_swallowed_and_the_lead_goes_back():
    result = run_under_gevent("foreign timeout")

    # The request's silent Timeout fired inside the leader's settle: it must end the request (its with block
    # swallows it), not be taken for the settle's own and let the submit go on.
    assert result["outcomes"]["0"] == "request timeout", result
    assert result["late_answered"], result
    assert result["leaders"] == 0 and result["pending"] == 0
