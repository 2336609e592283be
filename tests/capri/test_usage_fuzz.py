"""Fuzz: no body ever makes the usage API answer 5xx or write anything but whole accepted events."""

from __future__ import annotations

import datetime as dt
import itertools
import json

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from billing.models import UsageEvent
from capri.validation import COUNT_MAX
from core.database import db, utcnow
from tests.capri.conftest import iso, ledger_count, post_usage

NOW = utcnow()
EXAMPLES = itertools.count()
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**25), max_value=10**25),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
any_json = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)
texts = st.one_of(st.text(max_size=70), st.text(alphabet="ab\x00\n\u0085\ud800é😀", max_size=5), st.just("x" * 256))
times = st.one_of(
    st.sampled_from(
        [iso(NOW - dt.timedelta(days=days)) for days in (0, 3, 36, 9000)]
        + [iso(NOW + dt.timedelta(minutes=m)) for m in (4, 6)]
        + ["2026-11-26", "2026-11-26T12:00:00", "0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-12:00", "x"]
    ),
    st.datetimes(timezones=st.timezones()).map(lambda moment: moment.isoformat()),
    st.text(max_size=30),
)
counts = st.one_of(
    st.integers(min_value=-3, max_value=1000),
    st.integers(min_value=10**4 - 1, max_value=10**4 + 1),
    st.integers(min_value=10**8 - 1, max_value=10**8 + 1),
    json_scalars,
)
field_values = {
    "id": st.one_of(texts, st.sampled_from(["dup-1", "dup-2"]), json_scalars),
    "channel": st.one_of(texts, json_scalars),
    "location_id": st.one_of(texts, json_scalars),
    "input_tokens": counts,
    "output_tokens": counts,
    "messages": counts,
    "model": st.one_of(texts, json_scalars),
    "occurred_at": st.one_of(times, json_scalars),
    "agency_id": json_scalars,
}


printable = st.text(st.characters(exclude_categories=("Cc", "Cs")), min_size=1, max_size=40)
recent_times = st.integers(min_value=0, max_value=50 * 24 * 3600).map(lambda s: iso(NOW - dt.timedelta(seconds=s)))


@st.composite
def events(draw):
    """A valid event, half of the time with one to three fields replaced by arbitrary values, removed or added."""
    candidate = {
        "id": draw(st.one_of(printable, st.sampled_from(["dup-1", "dup-2"]))),
        draw(st.sampled_from(["channel", "location_id"])): draw(printable),
        "occurred_at": draw(recent_times),
    }
    for name in draw(st.lists(st.sampled_from(["input_tokens", "output_tokens", "messages"]), min_size=1)):
        candidate[name] = draw(st.integers(min_value=0, max_value=COUNT_MAX[name]))
    fields_to_mutate = st.lists(st.sampled_from(sorted(field_values)), unique=True, min_size=1, max_size=3)
    for name in draw(fields_to_mutate) if draw(st.booleans()) else []:
        if draw(st.integers(0, 3)):
            candidate[name] = draw(field_values[name])
        else:
            candidate.pop(name, None)
    return candidate


bodies = st.one_of(
    st.builds(lambda items: {"events": items}, st.lists(st.one_of(events(), any_json), max_size=8)),
    any_json,
)


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(body=bodies)
def test_no_body_yields_a_5xx_or_a_partial_write(client, agency, body):
    # The database outlives the examples: give this example's ids their own namespace, so an id hypothesis
    # reuses is a duplicate only inside its batch (where the test means it to be).
    namespace = f"{next(EXAMPLES)}:"
    sent_events = body.get("events") if isinstance(body, dict) else None
    for item in sent_events if isinstance(sent_events, list) else []:
        if isinstance(item, dict) and isinstance(item.get("id"), str):
            item["id"] = namespace + item["id"]
    before = ledger_count()
    raw = json.dumps(body, allow_nan=False)
    response = post_usage(client, agency.key, raw)
    assert response.status_code in {200, 400, 413}, response.get_data(as_text=True)
    written = ledger_count() - before
    event(f"status: {response.status_code}")
    if response.status_code != 200:
        assert written == 0
        return
    results = response.get_json()["results"]
    assert len(results) == len(body["events"])
    accepted = [(result, sent) for result, sent in zip(results, body["events"], strict=True)
                if result["status"] == "accepted"]
    assert written == len(accepted)
    for result, sent in accepted:
        row = db.session.scalars(
            select(UsageEvent).where(UsageEvent.agency_id == agency.id, UsageEvent.source_event_id == sent["id"])
        ).one()
        assert (row.channel_id, row.location_id, row.model) == (
            sent.get("channel"), sent.get("location_id"), sent.get("model")
        )
        assert (row.input_tokens, row.output_tokens, row.messages) == tuple(
            sent.get(name) or 0 for name in ("input_tokens", "output_tokens", "messages")
        )
        assert row.occurred_at == dt.datetime.fromisoformat(sent["occurred_at"])
        assert result["id"] == sent["id"]
    for result in results:
        event(f"result: {result['status']}")
        assert result["status"] in {"accepted", "duplicate", "rejected"}
        assert (result["status"] == "rejected") == ("reason" in result)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=200))
def test_no_raw_bytes_yield_a_5xx(client, agency, raw):
    before = ledger_count()
    response = post_usage(client, agency.key, raw)
    assert response.status_code in {200, 400}
    if response.status_code == 400:
        assert ledger_count() == before
