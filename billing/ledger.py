"""The usage ledger: append-only, idempotent recording of usage facts from every provider.

Recording is the ingest hot path: one INSERT … ON CONFLICT DO NOTHING per batch, no reads, no counting.
Counting happens later in aggregation (billing.units), so a burst of webhooks never waits on billing.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Select, bindparam, literal
from sqlalchemy.dialects import postgresql, sqlite

from billing.models import UsageEvent
from billing.states import UsageSource, UsageState
from core.database import db, utcnow

_USAGE = UsageEvent.__table__
KEY_COLUMNS = ("agency_id", "source", "source_event_id")
# What a caller supplies per usage row; the ledger sets the rest (_INITIAL_STATE, and id).
FACT_COLUMNS = (
    *KEY_COLUMNS,
    "channel_id",
    "location_id",
    "input_tokens",
    "output_tokens",
    "messages",
    "direction",
    "model",
    "occurred_at",
    "received_at",
)
_INITIAL_STATE = {"state": UsageState.PENDING.value, "counted": 0}

# docs/billing-rules.md rule 12: the most one usage event may carry. The largest context windows offered
# today hold about 10^7 tokens, so 10^8 input and 10^8 output tokens leave ten times that; one AI call sends
# a handful of messages, 10^4 is far beyond any. Adapters refuse larger counts at ingest with a clear reason
# (capri.validation); an event stored before these bounds existed is quarantined by aggregation, not counted.
MAX_TOKENS_PER_EVENT = 10**8  # each of input_tokens and output_tokens
MAX_MESSAGES_PER_EVENT = 10**4


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """One usage fact as a provider adapter hands it to the billing core."""

    source: UsageSource  # how the event reached Rebill (its stored word, billing.states)
    source_event_id: str  # GHL messageId, or the usage API event id (scoped per agency)
    occurred_at: dt.datetime
    channel_id: str | None = None
    location_id: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    messages: int = 0
    direction: str | None = None  # "inbound" | "outbound" for GHL message events
    model: str | None = None

    def __post_init__(self):
        if (self.channel_id is None) == (self.location_id is None):
            raise ValueError("a usage record names exactly one of channel_id or location_id")
        if min(self.input_tokens, self.output_tokens, self.messages) < 0:
            raise ValueError("usage counts are non-negative integers")
        if not is_possible_usage(self.input_tokens, self.output_tokens, self.messages):
            raise ValueError("usage counts beyond what one AI call produces (rule 12)")
        if self.occurred_at.tzinfo is None:
            raise ValueError("occurred_at must be timezone-aware")


def is_possible_usage(input_tokens: int, output_tokens: int, messages: int) -> bool:
    """Tell whether one event's counts are within what a real AI call can produce (rule 12)."""
    return input_tokens <= MAX_TOKENS_PER_EVENT and output_tokens <= MAX_TOKENS_PER_EVENT and (
        messages <= MAX_MESSAGES_PER_EVENT
    )


def record_usage(
    agency_id: int, records: Sequence[UsageRecord], *, received_at: dt.datetime | None = None
) -> list[bool]:
    """Insert usage records once each; return, per record, True if new and False if a duplicate.

    Duplicates are detected by the (agency, source, source_event_id) unique constraint, so concurrent
    identical deliveries count once, and the first copy's received time stays. ``received_at``: when Rebill
    first received the records (a replayed delivery's original receipt, rule 11); now if not given.
    Flushes only; the caller's request or job commits.
    """
    if not records:
        return []
    received_at = received_at or utcnow()
    rows = [
        {
            "agency_id": agency_id,
            "source": record.source,
            "source_event_id": record.source_event_id,
            "channel_id": record.channel_id,
            "location_id": record.location_id,
            "input_tokens": record.input_tokens,
            "output_tokens": record.output_tokens,
            "messages": record.messages,
            "direction": record.direction,
            "model": record.model,
            "occurred_at": record.occurred_at,
            "received_at": received_at,
        }
        # Insert in key order: concurrent overlapping batches then take row locks in the same order and
        # cannot deadlock on PostgreSQL's unique index.
        for record in sorted(records, key=lambda record: (record.source, record.source_event_id))
    ]
    db.session.flush()  # pending ORM writes go first, as they did when this was an ORM statement
    connection = db.session.connection()
    # One statement compiled once per dialect and reused: several rows are sent as one multi-VALUES INSERT
    # per 1,000 rows (SQLAlchemy's insertmanyvalues), in the order given, in the caller's transaction.
    inserted = {
        (row.source, row.source_event_id)
        for row in connection.execute(_RECORD_STATEMENTS[connection.dialect.name], rows)
    }
    accepted = []
    for record in records:
        key = (record.source, record.source_event_id)
        accepted.append(key in inserted)
        inserted.discard(key)  # a second copy inside the same batch is a duplicate
    return accepted


def insert_usage_from(facts: Select) -> postgresql.Insert:
    """Build an INSERT … SELECT that records the usage facts ``facts`` selects once each, like record_usage.

    For a caller that records usage inside its own single SQL statement (PostgreSQL: the GHL webhook hot
    path stores its delivery and the message's usage in one statement). ``facts`` selects the columns of
    FACT_COLUMNS in that order; the rows start pending, and duplicates are skipped on the same unique key.
    """
    return (
        postgresql.insert(_USAGE)
        .from_select([*FACT_COLUMNS, *_INITIAL_STATE], facts.add_columns(*map(literal, _INITIAL_STATE.values())))
        .on_conflict_do_nothing(index_elements=KEY_COLUMNS)
    )


def _record_statement(dialect):
    """INSERT … ON CONFLICT DO NOTHING RETURNING the key, with bound parameters: compiled once, reused."""
    return (
        dialect.insert(_USAGE)
        .values({column: bindparam(column) for column in FACT_COLUMNS} | _INITIAL_STATE)
        .on_conflict_do_nothing(index_elements=KEY_COLUMNS)
        .returning(_USAGE.c.source, _USAGE.c.source_event_id)
    )


_RECORD_STATEMENTS = {"postgresql": _record_statement(postgresql), "sqlite": _record_statement(sqlite)}
