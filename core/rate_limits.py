"""Fixed-window rate limits kept in the database, so every gunicorn worker and host counts together.

One row per (window, key) counts the hits in that window with an atomic upsert. A per-process counter would
let each of N workers allow the limit again; a database row costs one statement per hit, which is fine for
the rare requests limited this way (portal sign-ins), not for hot paths.
"""

from __future__ import annotations

import time

from sqlalchemy import BigInteger, Integer, String, delete, select, tuple_
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Mapped, mapped_column

from core.database import db, is_postgresql

KEY_MAX_CHARS = 160
PRUNE_BATCH = 100


class RateLimitWindow(db.Model):
    """Hits of one key within one fixed window (``window_start`` in Unix seconds)."""

    __tablename__ = "rate_limit_window"

    window_start: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    key: Mapped[str] = mapped_column(String(KEY_MAX_CHARS), primary_key=True)
    hits: Mapped[int] = mapped_column(Integer)


def count_hit(key: str, *, window_seconds: int, now: float | None = None) -> int:
    """Count one hit of ``key`` in the current window and return the window's hits so far. Flushes only.

    Also deletes a bounded batch of rows of past windows, skipping rows another transaction holds, so the
    table stays small without a job and concurrent callers never wait on each other.
    """
    now = time.time() if now is None else now
    window_start = int(now // window_seconds) * window_seconds
    key = key[:KEY_MAX_CHARS]
    table = RateLimitWindow.__table__
    dialect = postgresql if is_postgresql() else sqlite
    hits = db.session.execute(
        dialect.insert(table)
        .values(window_start=window_start, key=key, hits=1)
        .on_conflict_do_update(index_elements=["window_start", "key"], set_={"hits": table.c.hits + 1})
        .returning(table.c.hits)
    ).scalar_one()
    stale = (
        select(table.c.window_start, table.c.key)
        .where(table.c.window_start < window_start)
        .limit(PRUNE_BATCH)
        .with_for_update(skip_locked=True)
    )
    db.session.execute(delete(table).where(tuple_(table.c.window_start, table.c.key).in_(stale)))
    return hits
