"""Database-backed fixed windows: each starts at its key's first hit, so no burst straddles two windows."""

from sqlalchemy import func, select

from core.database import db
from core.rate_limits import RateLimitWindow, count_hit


def test_a_window_starts_at_the_first_hit_and_counts_until_it_ends(app_context):
    assert count_hit("a", window_seconds=60, now=1_000_059) == (1, 60)
    assert count_hit("a", window_seconds=60, now=1_000_060) == (2, 59)  # a clock minute passed: same window
    assert count_hit("b", window_seconds=60, now=1_000_100) == (1, 60)
    assert count_hit("a", window_seconds=60, now=1_000_118) == (3, 1)
    assert count_hit("a", window_seconds=60, now=1_000_119) == (1, 60)  # its window ended: a new one


def test_ended_windows_are_deleted_as_hits_are_counted(app_context):
    for index in range(5):
        count_hit(f"old-{index}", window_seconds=60, now=1_000_000)
    count_hit("new", window_seconds=60, now=1_000_060)
    db.session.commit()
    assert db.session.scalars(select(RateLimitWindow.key)).all() == ["new"]
    assert db.session.scalar(select(func.count()).select_from(RateLimitWindow)) == 1
