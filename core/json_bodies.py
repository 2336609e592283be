"""Strict JSON for request bodies: a repeated key or a body nested too deeply is invalid JSON (400).

Flask's ``request.get_json`` goes through the app's JSON provider. Python's parser keeps the last of two
equal keys (``{"status": "paused", "status": "active"}`` silently means active) and raises RecursionError,
not ValueError, on a body such as ``[[[[…]]]]`` a few thousand levels deep, which Flask does not catch: a
500 with a traceback. Both become a ValueError here, which ``get_json`` turns into a 400 (or ``None`` when
called with ``silent=True``).
"""

from __future__ import annotations

import json
from typing import Any

from flask.json.provider import DefaultJSONProvider


class DuplicateKey(ValueError):
    """A JSON object names the same key twice."""


class StrictJsonProvider(DefaultJSONProvider):
    """Flask's JSON provider, but reading refuses repeated keys and absurd nesting."""

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        """Parse JSON; ValueError for invalid JSON, a repeated key or nesting beyond the recursion limit."""
        return loads_strictly(s, **kwargs)


def loads_strictly(s: str | bytes, **kwargs: Any) -> Any:
    """Parse JSON as ``json.loads`` does, refusing repeated keys; nesting too deep is a ValueError."""
    try:
        return json.loads(s, object_pairs_hook=_unique_keys, **kwargs)
    except RecursionError:
        raise ValueError("the JSON is nested too deeply") from None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        repeated = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise DuplicateKey(f"the key {repeated!r} appears twice in one object")
    return result
