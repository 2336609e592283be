"""Fixed-window rate limits kept in the database, so every gunicorn worker and host counts together.

One row per key counts the hits of its current window, which starts at the key's first hit (not at a
clock boundary, so a burst cannot straddle two windows and get twice the limit). An atomic upsert counts
a hit or starts a new window. A per-process counter would let each of N workers allow the limit again; a
row costs one statement per hit, which is fine for rare requests such as portal sign-ins, not hot paths.
"""

from __future__ import annotations

import time

from sqlalchemy import BigInteger, Integer, String, case, delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Mapped, mapped_column

from core.database import db, is_postgresql

KEY_MAX_CHARS = 160
PRUNE_BATCH = 100


class RateLimitWindow(db.Model):
    """Hits of one key in its current window (``window_start`` in Unix seconds)."""

    __tablename__ = "rate_limit_window"

    key: Mapped[str] = mapped_column(String(KEY_MAX_CHARS), primary_key=True)
    window_start: Mapped[int] = mapped_column(BigInteger, index=True)
    hits: Mapped[int] = mapped_column(Integer)


def count_hit(key: str, *, window_seconds: int, now: float | None = None) -> tuple[int, int]:
    """Count one hit of ``key``; return (hits in its window so far, seconds until the window ends). Flushes only.

    Also deletes a bounded batch of rows whose window has ended, skipping rows another transaction holds,
    so the table stays small without a job and concurrent callers never wait on each other.
    """
    now = int(time.time() if now is None else now)
    expired = now - window_seconds
    table = RateLimitWindow.__table__
    dialect = postgresql if is_postgresql() else sqlite
    statement = dialect.insert(table).values(key=key[:KEY_MAX_CHARS], window_start=now, hits=1)
    ended = table.c.window_start <= expired
    hits, window_start = db.session.execute(
        statement.on_conflict_do_update(
            index_elements=["key"],
            set_={
                "hits": case((ended, 1), else_=table.c.hits + 1),
                "window_start": case((ended, now), else_=table.c.window_start),
            },
        ).returning(table.c.hits, table.c.window_start)
    ).one()
    stale = select(table.c.key).where(table.c.window_start <= expired).limit(PRUNE_BATCH).with_for_update(
        skip_locked=True
    )
    db.session.execute(delete(table).where(table.c.key.in_(stale)))
    return hits, window_start + window_seconds - now
