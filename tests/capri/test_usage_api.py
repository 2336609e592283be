"""POST /api/v1/usage: authentication, body shape, per-event checks, idempotency and tenancy."""

from __future__ import annotations

import datetime as dt
import io
import json

import pytest

from capri.api_keys import revoke_api_key
from capri.models import ApiKey
from capri.validation import (
    CHANNEL_MAX_LENGTH,
    ID_MAX_LENGTH,
    MAX_BODY_BYTES,
    MAX_EVENTS,
    MAX_STRUCTURE_BYTES,
    MODEL_MAX_LENGTH,
    OCCURRED_AT_MAX_LENGTH,
)
from core.database import db, utcnow
from tests.capri.conftest import event, iso, ledger_count, ledger_rows, make_keyed_agency, post_usage, without


def statuses(response) -> list[str]:
    return [result["status"] for result in response.get_json()["results"]]


# --- authentication -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        "Basic dXNlcjpwYXNz",
        "Token {key}",
        "{key}",
        "Bearer {key}x",
        "Bearer {key} extra",
        "Bearer rbk_aaaaaaaaaaaa_bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb",
        "Bearer " + "x" * 10_000,
    ],
)
def test_requests_without_a_valid_key_are_401_and_write_nothing(client, agency, authorization):
    headers = {} if authorization is None else {"Authorization": authorization.format(key=agency.key)}
    response = client.post("/api/v1/usage", json={"events": [event()]}, headers=headers)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert "error" in response.get_json()
    assert ledger_count() == 0


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_the_bearer_scheme_is_case_insensitive(client, agency, scheme):
    response = client.post(
        "/api/v1/usage", json={"events": [event()]}, headers={"Authorization": f"{scheme}  {agency.key} "}
    )
    assert response.status_code == 200


def test_a_revoked_key_is_401(client, agency):
    revoke_api_key(agency.id, agency.key_id)
    db.session.commit()
    assert post_usage(client, agency.key, {"events": [event()]}).status_code == 401
    assert ledger_count() == 0


def test_the_key_decides_the_agency(client, agency, other_agency):
    shared = event(id="same-id")
    assert statuses(post_usage(client, agency.key, {"events": [shared]})) == ["accepted"]
    # The same id is a different event for agency B: ids are scoped per agency.
    assert statuses(post_usage(client, other_agency.key, {"events": [shared]})) == ["accepted"]
    # There is no way to name another agency in the body.
    smuggled = event(agency_id=agency.id, company_id=agency.company_id)
    response = post_usage(client, other_agency.key, {"events": [smuggled]})
    assert statuses(response) == ["rejected"]
    assert [row.agency_id for row in ledger_rows()] == [agency.id, other_agency.id]


def test_a_key_authenticates_before_the_body_is_looked_at(client):
    assert post_usage(client, None, b"not json").status_code == 401
    assert post_usage(client, None, {"events": [event()] * 1001}).status_code == 401


# --- body shape -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"{",
        b"\xff\xfe{}",
        "\ufeff{\"events\": []}".encode(),
        b"[]",
        b'"events"',
        b"null",
        b"{}",
        b'{"events": {}}',
        b'{"events": null}',
        b'{"events": "x"}',
        b'{"events": [], "extra": 1}',
        b'{"events": [], "events": []}',
        b'{"events": [{"id": "a", "id": "b"}]}',
        b'{"events": [NaN]}',
        b'{"events": [Infinity]}',
        b"[" * 100_000 + b"]" * 100_000,
        b'{"events": [' * 50_000 + b"]}" * 50_000,
    ],
)
def test_a_body_of_the_wrong_shape_is_400_and_writes_nothing(client, agency, body):
    response = post_usage(client, agency.key, body)
    assert response.status_code == 400
    assert isinstance(response.get_json()["error"], str)
    assert ledger_count() == 0


def test_more_than_1000_events_is_413(client, agency):
    response = post_usage(client, agency.key, {"events": [event() for _ in range(1001)]})
    assert response.status_code == 413
    assert "1000" in response.get_json()["error"]
    assert ledger_count() == 0


def test_the_densest_valid_batch_is_within_the_structure_limit_and_accepted(client, agency):
    # Every string at its longest and made of nothing but "[", "{" and ",", every optional field present:
    # the most of those bytes 1000 acceptable events can hold. The limit is above it only by what occurred_at
    # could hold were it not a date-time, and by the "," after the last event, which never comes.
    def structure(length: int, number: int) -> str:
        digits = []
        for _ in range(length):
            number, digit = divmod(number, 3)
            digits.append("[{,"[digit])
        return "".join(digits)

    events = [
        event(id=structure(ID_MAX_LENGTH, number), channel=structure(CHANNEL_MAX_LENGTH, 0), location_id=None,
              model=structure(MODEL_MAX_LENGTH, 0))
        for number in range(MAX_EVENTS)
    ]  # fmt: skip
    body = json.dumps({"events": events}).encode()
    dense = body.count(b"[") + body.count(b"{") + body.count(b",")
    assert dense == MAX_STRUCTURE_BYTES - MAX_EVENTS * OCCURRED_AT_MAX_LENGTH - 1
    response = post_usage(client, agency.key, body)
    assert response.status_code == 200
    assert statuses(response) == ["accepted"] * MAX_EVENTS


def test_a_body_with_more_structure_than_1000_events_can_hold_is_413_before_parsing(client, agency, monkeypatch):
    parsed = []
    monkeypatch.setattr("capri.validation._loads_without_gc", parsed.append)
    # 4 MiB of tiny nested arrays: ~2 million lists, over a second of parsing if it were parsed.
    body = b'{"events": [' + b"[[[[]]]]," * ((MAX_BODY_BYTES - 20) // 9) + b"0]}"
    response = post_usage(client, agency.key, body)
    assert response.status_code == 413
    assert "split the batch" in response.get_json()["error"]
    assert parsed == []
    assert ledger_count() == 0


def test_a_body_at_the_structure_limit_is_parsed_and_one_above_it_is_413(client, agency):
    at_limit = b'{"events": [[' + b"0," * (MAX_STRUCTURE_BYTES - 3) + b"0]]}"
    assert at_limit.count(b"[") + at_limit.count(b"{") + at_limit.count(b",") == MAX_STRUCTURE_BYTES
    response = post_usage(client, agency.key, at_limit)
    assert response.status_code == 200
    assert statuses(response) == ["rejected"]  # one event, a list of numbers
    above = at_limit.replace(b"[0,", b"[0,0,", 1)
    assert post_usage(client, agency.key, above).status_code == 413
    assert ledger_count() == 0


def test_1000_events_are_accepted(client, agency):
    response = post_usage(client, agency.key, {"events": [event() for _ in range(1000)]})
    assert response.status_code == 200
    assert statuses(response) == ["accepted"] * 1000
    assert ledger_count() == 1000


def test_a_body_above_the_byte_limit_is_413(client, agency):
    padding = "x" * (5 * 1024 * 1024)
    response = post_usage(client, agency.key, '{"events": [], "pad": "' + padding + '"}')
    assert response.status_code == 413
    assert "error" in response.get_json()


def test_a_chunked_body_above_the_byte_limit_is_413_and_below_it_is_read_whole(client, agency):
    headers = {"Authorization": f"Bearer {agency.key}", "Transfer-Encoding": "chunked"}
    # A WSGI server sets wsgi.input_terminated for a chunked body it has de-chunked (PEP 3333 extension).
    environ = {"wsgi.input_terminated": True}
    body = b'{"events": [' + b" " * (4 * 1024 * 1024) + b"]}"
    response = client.post("/api/v1/usage", input_stream=io.BytesIO(body), headers=headers, environ_overrides=environ)
    assert response.status_code == 413
    small = json.dumps({"events": [event(id="chunked")]}).encode()
    response = client.post("/api/v1/usage", input_stream=io.BytesIO(small), headers=headers, environ_overrides=environ)
    assert statuses(response) == ["accepted"]


def test_an_empty_batch_answers_no_results(client, agency):
    response = post_usage(client, agency.key, {"events": []})
    assert response.status_code == 200
    assert response.get_json() == {"results": []}


def test_the_content_type_is_not_required(client, agency):
    response = client.post(
        "/api/v1/usage",
        data='{"events": [{"id": "x", "channel": "c", "messages": 1, "occurred_at": "2026-01-01T00:00:00Z"}]}',
        headers={"Authorization": f"Bearer {agency.key}", "Content-Type": "text/plain"},
    )
    assert response.status_code == 200


def test_other_methods_are_405_json(client):
    response = client.get("/api/v1/usage")
    assert response.status_code == 405
    assert "error" in response.get_json()


# --- what is stored -------------------------------------------------------------------------------------


def test_an_accepted_event_is_stored_as_sent(client, agency):
    plus_two = dt.timezone(dt.timedelta(hours=2))
    occurred = (utcnow() - dt.timedelta(days=1)).astimezone(plus_two).replace(microsecond=123456)
    sent = event(id="évènement-😀-1", channel="canal-ß", input_tokens=10**8, output_tokens=0, messages=7,
                 model="claude-3-5", occurred_at=occurred.isoformat())
    response = post_usage(client, agency.key, {"events": [sent]})
    assert response.get_json() == {"results": [{"id": "évènement-😀-1", "status": "accepted"}]}
    (row,) = ledger_rows()
    assert (row.agency_id, row.source, row.source_event_id) == (agency.id, "capri", "évènement-😀-1")
    assert (row.channel_id, row.location_id, row.model) == ("canal-ß", None, "claude-3-5")
    assert (row.input_tokens, row.output_tokens, row.messages) == (10**8, 0, 7)
    assert row.occurred_at == occurred.astimezone(dt.UTC)
    assert row.state == "pending" and row.client_id is None


def test_usage_for_a_subaccount_and_for_an_unmapped_channel_is_kept(client, agency):
    response = post_usage(
        client,
        agency.key,
        {"events": [event(id="s", channel=None, location_id="loc-unmapped"), event(id="c", channel="nobody-maps")]},
    )
    assert statuses(response) == ["accepted", "accepted"]
    rows = ledger_rows(agency.id)
    assert {(row.source_event_id, row.channel_id, row.location_id, row.state) for row in rows} == {
        ("s", None, "loc-unmapped", "pending"),
        ("c", "nobody-maps", None, "pending"),
    }


def test_optional_fields_may_be_null_or_absent(client, agency):
    events = [
        without(event(id="a"), "model", "output_tokens", "messages"),
        event(id="b", model=None, input_tokens=None, output_tokens=None, messages=3),
        event(id="c", channel=None, location_id="loc-1"),
    ]
    assert statuses(post_usage(client, agency.key, {"events": events})) == ["accepted"] * 3
    rows = ledger_rows()
    assert [(row.input_tokens, row.output_tokens, row.messages, row.model) for row in rows] == [
        (120, 0, 0, None),
        (0, 0, 3, None),
        (120, 30, 1, "gpt-4o-mini"),
    ]


# --- per-event checks -----------------------------------------------------------------------------------

NOW = utcnow()

INVALID_EVENTS = {
    "not an object": [1, "x", None, [], True],
    "id": [
        without(event(), "id"),
        event(id=None),
        event(id=""),
        event(id=5),
        event(id=["a"]),
        event(id="x" * 256),
        event(id="nul\x00byte"),
        event(id="tab\tinside"),
        event(id="lone-\ud800-surrogate"),
        event(id="\x85"),
    ],
    "channel/location_id": [
        without(event(), "channel"),
        event(channel=None),
        event(location_id="loc-1"),
        event(channel=None, location_id=None),
        event(channel=""),
        event(channel=12),
        event(channel="c" * 256),
        event(channel=None, location_id="l" * 65),
        event(channel=None, location_id=""),
        event(channel=None, location_id=7),
        event(channel="a\x00b"),
    ],
    "counts": [
        *(event(**{name: value}) for name in ("input_tokens", "output_tokens", "messages")
          for value in (-1, 1.5, 2.0, True, False, "5", [5], {"n": 5}, 10**12, 10**30, -(10**30))),
        event(input_tokens=0, output_tokens=0, messages=0),
        without(event(), "input_tokens", "output_tokens", "messages"),
        event(input_tokens=None, output_tokens=None, messages=None),
    ],
    "model": [event(model=""), event(model="m" * 129), event(model=1), event(model="a\nb")],
    "occurred_at": [
        without(event(), "occurred_at"),
        event(occurred_at=None),
        event(occurred_at=""),
        event(occurred_at=1764158400),
        event(occurred_at="yesterday"),
        event(occurred_at="2026-11-26"),  # no time, no timezone
        event(occurred_at="2026-11-26T12:00:00"),  # no timezone
        event(occurred_at="2026-13-01T00:00:00Z"),
        event(occurred_at="2026-11-26T23:59:60Z"),
        event(occurred_at="0001-01-01T00:00:00+01:00"),
        event(occurred_at="1999-12-31T23:59:59Z"),
        event(occurred_at="9999-12-31T23:59:59Z"),
        event(occurred_at=iso(NOW + dt.timedelta(hours=6))),
        event(occurred_at="2026-11-26T12:00:00Z" + " " * 60),
    ],
    "unknown fields": [event(agency_id=1), event(input_token=5), event(extra=None)],
}


@pytest.mark.parametrize(
    "bad",
    [pytest.param(bad, id=f"{group}-{index}") for group, items in INVALID_EVENTS.items()
     for index, bad in enumerate(items)],
)
def test_an_invalid_event_is_rejected_with_a_reason_and_not_stored(client, agency, bad):
    good = event()
    response = post_usage(client, agency.key, {"events": [good, bad, good | {"id": good["id"] + "-2"}]})
    assert response.status_code == 200
    results = response.get_json()["results"]
    assert [result["status"] for result in results] == ["accepted", "rejected", "accepted"]
    assert isinstance(results[1]["reason"], str) and results[1]["reason"]
    expected_id = bad.get("id") if isinstance(bad, dict) and isinstance(bad.get("id"), str) else None
    assert results[1]["id"] == expected_id
    assert [row.source_event_id for row in ledger_rows()] == [good["id"], good["id"] + "-2"]


@pytest.mark.parametrize(
    ("bad", "words"),
    [
        (event(channel="c", location_id="l"), "exactly one of channel or location_id"),
        (event(input_tokens=-1), "input_tokens"),
        (event(output_tokens=1.5), "output_tokens"),
        (event(messages=True), "messages"),
        (event(input_tokens=0, output_tokens=0, messages=0), "at least one"),
        (event(occurred_at=iso(NOW + dt.timedelta(hours=6))), "future"),
        (event(occurred_at="2026-11-26T12:00:00"), "timezone"),
        (event(input_token=3), "unknown field"),
        (event(id="x" * 256), "id must be 1 to 255"),
    ],
)
def test_reasons_name_the_problem(client, agency, bad, words):
    (result,) = post_usage(client, agency.key, {"events": [bad]}).get_json()["results"]
    assert result["status"] == "rejected"
    assert words in result["reason"]


@pytest.mark.parametrize("digits", ["1" * 21, "1" * 5000, "-" + "9" * 5000])
def test_a_count_too_long_to_parse_rejects_only_its_event(client, agency, digits):
    raw = (
        '{"events": [{"id": "huge", "channel": "c", "occurred_at": "2026-01-01T00:00:00Z", "input_tokens": '
        + digits
        + '}, {"id": "fine", "channel": "c", "occurred_at": "2026-01-01T00:00:00Z", "messages": 1}]}'
    )
    results = post_usage(client, agency.key, raw).get_json()["results"]
    assert [result["status"] for result in results] == ["rejected", "accepted"]
    assert "input_tokens must be between 0 and 100000000" in results[0]["reason"]


@pytest.mark.parametrize(
    ("name", "value", "bound"),
    [
        ("input_tokens", 10**8 + 1, "100000000"),
        ("output_tokens", 2 * 10**12, "100000000"),
        ("messages", 10**4 + 1, "10000"),
    ],
)
def test_counts_beyond_one_ai_call_reject_only_their_event_with_the_bound(client, agency, name, value, bound):
    """Rule 12: an event carries at most what one AI call produces, so no client total can overflow."""
    body = {"events": [event(id="huge", **{name: value}), event(id="fine")]}
    results = post_usage(client, agency.key, body).get_json()["results"]
    assert results[0] == {
        "id": "huge",
        "status": "rejected",
        "reason": f"{name} must be between 0 and {bound}: one AI call produces far less; "
        "report larger usage as several events",
    }
    assert results[1]["status"] == "accepted"
    assert [row.source_event_id for row in ledger_rows()] == ["fine"]


def test_boundaries_are_accepted(client, agency):
    now = utcnow()
    events = [
        event(id="i" * 255),
        event(id="😀" * 255, channel="c" * 255),
        event(channel=None, location_id="l" * 64, model="m" * 128),
        event(input_tokens=10**8, output_tokens=10**8, messages=10**4),
        event(input_tokens=0, output_tokens=0, messages=1),
        event(occurred_at=iso(now + dt.timedelta(minutes=4))),
        event(occurred_at=(now - dt.timedelta(hours=1)).astimezone(dt.timezone(dt.timedelta(hours=-7))).isoformat()),
        event(occurred_at="2000-01-01T00:00:00Z"),
    ]
    response = post_usage(client, agency.key, {"events": events})
    assert statuses(response) == ["accepted"] * len(events)
    assert len(ledger_rows()) == len(events)


def test_usage_older_than_35_days_is_stored_and_flagged(client, agency):
    old = event(occurred_at=iso(utcnow() - dt.timedelta(days=36)))
    recent = event(occurred_at=iso(utcnow() - dt.timedelta(days=34)))
    results = post_usage(client, agency.key, {"events": [old, recent]}).get_json()["results"]
    assert results == [
        {"id": old["id"], "status": "accepted", "flags": ["older_than_35_days"]},
        {"id": recent["id"], "status": "accepted"},
    ]
    assert len(ledger_rows()) == 2
    again = post_usage(client, agency.key, {"events": [old]}).get_json()["results"]
    assert again == [{"id": old["id"], "status": "duplicate", "flags": ["older_than_35_days"]}]


# --- idempotency ----------------------------------------------------------------------------------------


def test_a_repeated_id_is_a_duplicate_within_a_batch_and_across_batches(client, agency):
    first = event(id="e1", input_tokens=5)
    response = post_usage(client, agency.key, {"events": [first, first, event(id="e2")]})
    assert statuses(response) == ["accepted", "duplicate", "accepted"]
    response = post_usage(client, agency.key, {"events": [event(id="e2"), event(id="e3")]})
    assert statuses(response) == ["duplicate", "accepted"]
    assert [row.source_event_id for row in ledger_rows()] == ["e1", "e2", "e3"]


def test_a_repeated_id_with_different_contents_is_a_duplicate_of_the_first(client, agency):
    post_usage(client, agency.key, {"events": [event(id="e1", input_tokens=5)]})
    response = post_usage(client, agency.key, {"events": [event(id="e1", input_tokens=500, channel="other")]})
    assert statuses(response) == ["duplicate"]
    (row,) = ledger_rows()
    assert (row.input_tokens, row.channel_id) == (5, "chan-1")


def test_a_rejected_id_can_be_resent_corrected(client, agency):
    response = post_usage(client, agency.key, {"events": [event(id="fix-me", input_tokens=-5)]})
    assert statuses(response) == ["rejected"]
    response = post_usage(client, agency.key, {"events": [event(id="fix-me", input_tokens=5)]})
    assert statuses(response) == ["accepted"]
    # Within one batch too: a rejected copy does not take the id from a valid one after it.
    response = post_usage(client, agency.key, {"events": [event(id="twice", messages=-1), event(id="twice")]})
    assert statuses(response) == ["rejected", "accepted"]
    assert [row.input_tokens for row in ledger_rows() if row.source_event_id == "fix-me"] == [5]


def test_a_malformed_repeat_of_an_accepted_id_is_rejected_and_changes_nothing(client, agency):
    post_usage(client, agency.key, {"events": [event(id="e1", input_tokens=5)]})
    response = post_usage(client, agency.key, {"events": [event(id="e1", input_tokens="lots")]})
    assert statuses(response) == ["rejected"]
    assert [row.input_tokens for row in ledger_rows()] == [5]


def test_a_key_of_an_agency_records_its_usage_id_space_only(client, app_context):
    a = make_keyed_agency("company-x")
    b = make_keyed_agency("company-y")
    post_usage(client, a.key, {"events": [event(id="shared", input_tokens=1)]})
    post_usage(client, b.key, {"events": [event(id="shared", input_tokens=2)]})
    assert statuses(post_usage(client, a.key, {"events": [event(id="shared")]})) == ["duplicate"]
    assert {(row.agency_id, row.input_tokens) for row in ledger_rows()} == {(a.id, 1), (b.id, 2)}


def test_a_refused_body_records_no_key_use_and_an_accepted_one_does(client, agency):
    assert post_usage(client, agency.key, b"not json").status_code == 400
    db.session.rollback()
    assert db.session.get(ApiKey, agency.key_id).last_used_at is None
    assert post_usage(client, agency.key, {"events": [event()]}).status_code == 200
    db.session.rollback()
    assert db.session.get(ApiKey, agency.key_id).last_used_at is not None
