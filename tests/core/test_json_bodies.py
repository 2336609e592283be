"""Strict JSON request bodies: repeated keys and absurd nesting are invalid JSON, never a 500."""

import pytest
from flask import request

from core.json_bodies import DuplicateKey, loads_strictly


def test_a_repeated_key_is_refused_at_any_depth():
    with pytest.raises(DuplicateKey, match="'role'"):
        loads_strictly('{"a": [{"role": "user", "role": "admin"}]}')


def test_nesting_beyond_the_recursion_limit_is_a_value_error():
    with pytest.raises(ValueError, match="nested too deeply"):
        loads_strictly("[" * 100_000 + "]" * 100_000)


def test_ordinary_json_reads_as_usual():
    assert loads_strictly('{"a": 1, "b": [true, null, {"a": 2}]}') == {"a": 1, "b": [True, None, {"a": 2}]}


def test_flask_answers_400_for_a_repeated_key_or_deep_nesting(app):
    app.add_url_rule("/echo", "echo", lambda: {"body": request.get_json()}, methods=["POST"])
    client = app.test_client()
    for body in ('{"x": 1, "x": 2}', "[" * 100_000 + "]" * 100_000):
        answer = client.post("/echo", data=body, content_type="application/json")
        assert answer.status_code == 400
        assert answer.is_json and answer.get_json()["error"]
    assert client.post("/echo", json={"x": 1}).get_json() == {"body": {"x": 1}}
