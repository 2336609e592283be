"""Logs are JSON lines and never carry credentials."""

import io
import json
import logging

from core.logs import SECRET_PATTERNS, TIME_FORMAT, JsonFormatter, redact


def test_redact_hides_stripe_keys_bearer_tokens_and_api_keys():
    text = "key sk_live_51HabcDEF and rk_test_xyz, header Bearer eyJhbGci.eyJzdWIi.sig, rbk_live_abc123"
    cleaned = redact(text)
    for secret in ("sk_live_51HabcDEF", "rk_test_xyz", "eyJhbGci", "rbk_live_abc123"):
        assert secret not in cleaned


def test_formatter_writes_one_json_object_with_fields():
    record = logging.LogRecord("rebill", logging.INFO, __file__, 1, "stored %s", ("sk_test_123",), None)
    record.fields = {"agency": 7, "token": "sk_test_999"}
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "stored [redacted]"
    assert entry["agency"] == 7
    assert "sk_test_999" not in json.dumps(entry)


def test_redact_hides_an_oauth_code_in_a_logged_url():
    line = '"GET /oauth/callback?code=4f1b9c2e&state=s HTTP/1.1" 303 - /x?a=1&code=zz9'
    assert redact(line) == '"GET /oauth/callback?code=[redacted]&state=s HTTP/1.1" 303 - /x?a=1&code=[redacted]'


def test_redact_gives_what_every_pattern_gives_with_or_without_its_quick_check():
    # redact skips the substitutions for text without any of the markers its patterns need (core.logs).
    lines = [
        "key sk_live_51HabcDEF and rk_test_xyz, header Bearer eyJhbGci.eyJzdWIi.sig, rbk_live_abc123",
        "authorization: BEARER abc.def", "pk_test_Q", "rbk_x", "eyJa.b.", "/cb?code=x&state=y", "/cb&code=x",
        '127.0.0.1 - - [04/Dec/2026:22:10:00 +0000] "POST /webhooks/ghl HTTP/1.1" 200 21 "-" "-" 3ms',
        "sk_live", "bearer", "code", "eyj.a.b", "RBK_x",
    ]  # fmt: skip
    for line in lines:
        substituted = line
        for pattern in SECRET_PATTERNS:
            substituted = pattern.sub(lambda m: (m.group(1) if m.lastindex == 1 else "") + "[redacted]", substituted)
        assert redact(line) == substituted, line


def _json_lines(text: str) -> list[dict]:
    lines = [line for line in text.splitlines() if line.strip()]
    return [json.loads(line) for line in lines]  # a plain-text line fails here


def test_an_unhandled_error_is_logged_as_one_redacted_json_line_with_its_traceback(make_app, capfd):
    app = make_app(TESTING=False)  # TESTING re-raises errors instead of logging them

    def fail():
        raise RuntimeError("boom with sk_live_51Secret")

    app.add_url_rule("/fail", view_func=fail)
    capfd.readouterr()
    answer = app.test_client().get("/fail")

    assert answer.status_code == 500 and answer.is_json
    (entry,) = _json_lines(capfd.readouterr().err)
    assert entry["logger"] == "app" and entry["level"] == "ERROR"
    assert "RuntimeError" in entry["exception"] and "sk_live_51Secret" not in entry["exception"]


def test_werkzeug_and_library_loggers_write_json_lines(make_app, capfd):
    make_app()
    capfd.readouterr()
    logging.getLogger("werkzeug").warning("127.0.0.1 - GET /app?token=x Bearer abc.def")
    logging.getLogger("some.library").error("failed with rk_test_123")
    entries = _json_lines(capfd.readouterr().err)
    assert [entry["logger"] for entry in entries] == ["werkzeug", "some.library"]
    assert "abc.def" not in entries[0]["message"] and "rk_test_123" not in entries[1]["message"]


def test_gunicorn_handlers_keep_their_stream_and_write_json(make_app):
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))  # what gunicorn sets before loading the app
    access = logging.getLogger("gunicorn.access")
    access.addHandler(handler)
    try:
        make_app()
        access.warning('203.0.113.9 "GET /api/portal/me HTTP/1.1" 200 Bearer eyJh.eyJz.sig')
    finally:
        access.removeHandler(handler)
    (entry,) = _json_lines(stream.getvalue())
    assert entry["logger"] == "gunicorn.access" and "eyJh" not in entry["message"]


def test_the_formatter_writes_what_json_dumps_and_format_time_write_for_each_record():
    # The time text is cached per second and one encoder is reused: the lines must be those of the plain way.
    formatter = JsonFormatter()
    created = [1764900000.0, 1764900000.999, 1764900001.0, 1764899999.5, 1764900001.25]
    for moment in created:
        record = logging.LogRecord("rebill", logging.INFO, __file__, 1, "at %s", (moment,), None)
        record.created = moment
        record.fields = {"count": 3, "when": moment, "note": "sk_live_abc"}
        expected = json.dumps(
            {
                "time": logging.Formatter().formatTime(record, TIME_FORMAT),
                "level": "INFO",
                "logger": "rebill",
                "message": redact(record.getMessage()),
                "count": 3,
                "when": moment,
                "note": redact("sk_live_abc"),
            },
            default=str,
        )
        assert formatter.format(record) == expected
