"""capri.validation: the cyclic garbage collector is paused for the parse of a body, and only for it; unknown
fields are named without sorting them all."""

from __future__ import annotations

import contextlib
import gc

import pytest

import capri.validation
from capri.validation import BatchTooLarge, BodyInvalid, check_event, parse_usage_body
from core.database import utcnow

BODIES = [
    b'{"events": [{"id": "a", "input_tokens": 1}]}',  # parsed
    b'{"events": [1, 2}',  # not JSON
    b"[" * 100_000 + b"]" * 100_000,  # nested too deeply
    b'{"events": [' + b"0," * 1000 + b"0]}",  # too many events
]


@pytest.fixture
def gc_seen_while_parsing(monkeypatch) -> list[bool]:
    """Record, for every number parsed, whether the collector was enabled."""
    seen: list[bool] = []
    parse_int = capri.validation._parse_int

    def recording(digits: str):
        seen.append(gc.isenabled())
        return parse_int(digits)

    monkeypatch.setattr(capri.validation, "_parse_int", recording)
    return seen


def test_the_collector_is_paused_while_parsing(gc_seen_while_parsing):
    assert gc.isenabled()
    parse_usage_body(BODIES[0])
    assert gc_seen_while_parsing == [False]


@pytest.mark.parametrize("body", BODIES)
def test_the_collector_is_enabled_again_whatever_the_outcome(body, gc_seen_while_parsing):
    assert gc.isenabled()
    with contextlib.suppress(BodyInvalid, BatchTooLarge):
        parse_usage_body(body)
    assert gc.isenabled()
    assert True not in gc_seen_while_parsing


def test_a_collector_the_caller_disabled_stays_disabled(gc_seen_while_parsing):
    gc.disable()
    try:
        parse_usage_body(BODIES[0])
        assert not gc.isenabled()
    finally:
        gc.enable()
    assert gc_seen_while_parsing == [False]


def test_unknown_fields_are_named_five_in_sorted_order_and_the_rest_counted():
    fields = {name: 1 for name in ["z", "y", "x", "w", "v", "u", "t"]}
    checked = check_event({"id": "a", "channel": "c", "messages": 1, **fields}, utcnow())
    assert checked.reason == "unknown field(s): 't', 'u', 'v', 'w', 'x' and 2 more"
