"""A unit report's remainder that provably never reached Stripe moves to a fresh report (billing rules 9-10).

A report keeps the Stripe target of its first offer while any of its units may be in Stripe
(docs/billing-rules.md rule 9). Its unsent rest cannot always go there: Stripe refused it for good (a deleted
customer the agency then replaced), or the >24 h check shows Stripe has none of it, or its recorded timestamp
lies in a period whose invoice may be final (rule 10). When the rest is provably not in Stripe (every offer
of it answered, or Stripe's totals show none of it), the report is split in one transaction:

- the report keeps its recorded target, identifiers and timestamp and is closed as ``sent`` with the units
  Stripe confirmed (``units == units_confirmed``);
- the rest becomes a fresh report: a new identifier (so new event identifiers and idempotency keys), no
  recorded target and no timestamp, so at its first offer it takes the client's current Stripe settings and a
  timestamp in the customer's current open period, like any report never offered.

A report with nothing confirmed needs no fresh one: it forgets its doubt and its timestamp and is offered
afresh as it is. Either way the units of the client's reports sum to the same (none lost or doubled). The
caller's transaction commits (billing.reporting records outcomes and commits once).
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import insert, select, update

from billing.models import UnitReport
from billing.states import ReportStatus
from core.database import db

_REPORT = UnitReport.__table__


def remainder_identifier(identifier: str, confirmed: int) -> str:
    """Return the identifier of the report carrying ``identifier``'s units after its first ``confirmed``.

    ``<root>.<offset>`` names the units of the original report ``root`` from ``offset + 1`` on, so a fresh
    report that is split again stays short and unique (``root.3`` then ``root.5``), and none of its meter
    event identifiers (``root.3-1``...) can be one of the original's (``root-1``...).
    """
    if confirmed < 1:
        raise ValueError(f"a remainder starts after at least one confirmed unit, not {confirmed}")
    root, dot, offset = identifier.rpartition(".")
    if not dot or not offset.isdigit():
        root, offset = identifier, "0"
    return f"{root}.{int(offset) + confirmed}"


def move_unsent_remainder(
    report_id: int,
    confirmed: int,
    now: dt.datetime,
    *,
    due_at: dt.datetime,
    status: ReportStatus = ReportStatus.PENDING,
    reason: str | None = None,
) -> str | None:
    """Close a report at its ``confirmed`` units and move the rest, provably not in Stripe, to a fresh report.

    The caller must know that none of units ``confirmed + 1 ..`` is in Stripe. The rest goes with ``status``
    (``failed`` while it waits for the agency's fix), ``reason`` and ``due_at``. Returns the fresh report's
    identifier, or None when nothing was confirmed and the report itself was re-opened. Flushes only.
    """
    row = db.session.execute(
        select(
            _REPORT.c.agency_id, _REPORT.c.client_id, _REPORT.c.identifier, _REPORT.c.units, _REPORT.c.usage_timestamp
        ).where(_REPORT.c.id == report_id)
    ).one()
    if not 0 <= confirmed < row.units:
        raise ValueError(f"report {report_id} has {row.units} units; {confirmed} confirmed leaves no remainder")
    if confirmed == 0:
        db.session.execute(
            update(_REPORT)
            .where(_REPORT.c.id == report_id)
            .values(
                status=status,
                last_error=reason,
                next_attempt_at=due_at,
                units_confirmed=0,
                in_doubt_since=None,
                stripe_timestamp=None,
                timestamp_shift=None,
            )
        )
        return None
    fresh = remainder_identifier(row.identifier, confirmed)
    db.session.execute(
        insert(_REPORT).values(
            agency_id=row.agency_id,
            client_id=row.client_id,
            identifier=fresh,
            units=row.units - confirmed,
            usage_timestamp=row.usage_timestamp,
            status=status,
            attempts=0,
            next_attempt_at=due_at,
            last_error=reason,
            units_confirmed=0,
        )
    )
    db.session.execute(
        update(_REPORT)
        .where(_REPORT.c.id == report_id)
        .values(
            status=ReportStatus.SENT,
            sent_at=now,
            units=confirmed,
            units_confirmed=confirmed,
            in_doubt_since=None,
            last_error=f"{row.units - confirmed} units that never reached Stripe moved to report {fresh}",
        )
    )
    return fresh
