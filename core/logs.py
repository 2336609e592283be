"""Structured (JSON line) logging that never prints secrets."""

from __future__ import annotations

import json
import logging
import re

# Stripe keys, bearer tokens, Rebill API keys, JWT-looking strings and OAuth codes in URLs.
SECRET_PATTERNS = [
    re.compile(r"\b(sk|rk|pk)_(live|test)_[A-Za-z0-9]+"),
    re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+"),
    re.compile(r"\brbk_[A-Za-z0-9_-]+"),
    re.compile(r"\beyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"),
    re.compile(r"([?&]code=)[^&\s\"']+"),  # GHL's single-use OAuth code in a logged URL
]
# Text every match of a pattern above contains ("_live_"/"_test_", "bearer" in any case, "rbk_", "eyJ",
# "code="): a line without any (most lines, e.g. every access log line of a webhook) skips the five
# substitutions, ~10 µs of each request's ~20 µs of JSON logging (bench/README.md). Keep it in step.
_MAYBE_SECRET = re.compile(r"_live_|_test_|(?i:bearer)|rbk_|eyJ|code=")


def redact(text: str) -> str:
    """Replace anything that looks like a credential with a marker."""
    if _MAYBE_SECRET.search(text) is None:
        return text
    for pattern in SECRET_PATTERNS:
        text = pattern.sub(lambda match: (match.group(1) if match.lastindex == 1 else "") + "[redacted]", text)
    return text


# json.dumps builds a new encoder on every call that passes an option (default=str); this one, made once,
# encodes the same (every request's access line goes through it).
_ENCODER = json.JSONEncoder(default=str)
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S"


class JsonFormatter(logging.Formatter):
    """Format records as one JSON object per line, redacted."""

    _second: tuple[int, str] = (-1, "")  # the last whole second formatted and its text, one tuple for threads

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self._time(record),
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        for key, value in getattr(record, "fields", {}).items():
            entry[key] = redact(str(value)) if isinstance(value, str) else value
        if record.exc_info:
            entry["exception"] = redact(self.formatException(record.exc_info))
        return _ENCODER.encode(entry)

    def _time(self, record: logging.LogRecord) -> str:
        """formatTime(record, TIME_FORMAT), formatted once per second: the format has no fraction."""
        second = int(record.created)
        cached_second, text = self._second
        if second != cached_second:
            text = self.formatTime(record, TIME_FORMAT)
            self._second = (second, text)
        return text


REBILL_LOGGERS = ("rebill", "billing", "ghl", "capri", "portal", "core")
# Loggers of the servers we run under that format their own records: gunicorn sets handlers on these two
# before it loads the app in a worker (https://docs.gunicorn.org/en/stable/settings.html#logging).
SERVER_LOGGERS = ("gunicorn.error", "gunicorn.access")


class JsonHandler(logging.StreamHandler):
    """A stderr handler writing redacted JSON lines (its own class, so configuring again replaces it)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(JsonFormatter())


def configure_logging(level: str) -> None:
    """Send every log record as a redacted JSON line: Rebill's, Flask's, werkzeug's and gunicorn's.

    Rebill's loggers get the handler directly. Everything else propagates to the root logger, which gets it
    too: Flask's app logger (once its plain default handler is removed, see app.py), werkzeug's (it adds a
    plain handler of its own only when the root has none) and any library's. Handlers others put on the
    root (pytest's log capture) are kept. Gunicorn's handlers write to the files gunicorn was told to
    use; only their format changes.
    """
    handler = JsonHandler()
    for name in REBILL_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level)
        logger.propagate = False
    root = logging.getLogger()
    root.handlers[:] = [existing for existing in root.handlers if not isinstance(existing, JsonHandler)] + [handler]
    werkzeug = logging.getLogger("werkzeug")
    werkzeug.handlers[:] = [existing for existing in werkzeug.handlers if isinstance(existing, JsonHandler)]
    for name in SERVER_LOGGERS:
        for server_handler in logging.getLogger(name).handlers:
            server_handler.setFormatter(JsonFormatter())
