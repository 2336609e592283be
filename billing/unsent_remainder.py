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

A report with nothing confirmed needs no fresh row: it forgets its doubt and its timestamp and is offered
afresh under a fresh identifier. Either way the units of the client's reports sum to the same (none lost or
doubled).

Fresh identifiers (docs/billing-rules.md#fresh-identifiers). Units that provably are not in Stripe may still
have an identifier Stripe remembers: an offer Stripe accepted and then rejected asynchronously (its meter error
unheard, or heard) holds its identifier for at least 24 h (docs/stripe.md §1.3), and a resend under it is
answered "already exists" and taken for delivered. So units moved or re-opened here never reuse an identifier
that went to Stripe: ``fresh_identifier`` is the one naming rule (here and in billing.meter_errors). It is
deterministic (a crash before the commit recomputes the same name) and never repeats along a report's chain.
The caller's transaction commits (billing.reporting records outcomes and commits once).
"""

from __future__ import annotations

import datetime as dt
import re

from sqlalchemy import insert, select, update

from billing.models import UnitReport
from billing.states import ReportStatus
from core.database import db

_REPORT = UnitReport.__table__


# <root>[.<offset>][_r<offer>]: the units of report <root> from <offset> + 1 on, offered the <offer>-th time afresh.
_NAME = re.compile(r"^(?P<root>.+?)(?:\.(?P<offset>\d+))?(?:_r(?P<offer>\d+))?$")


def fresh_identifier(identifier: str, confirmed: int = 0) -> str:
    """Return the identifier for ``identifier``'s units after its first ``confirmed``, never offered to Stripe.

    ``<root>.<offset>`` names the units of the original report ``root`` from ``offset + 1`` on (a split:
    ``confirmed`` > 0); ``_r<n>`` counts re-offers of the same units (``confirmed`` == 0: the report is
    re-opened). Along a report's chain (offset, re-offer) only grows, so a name never repeats; neither meter
    event identifiers (``root.3-1``...) can be one of another report's (``root-1``...). Root identifiers
    (``rebill_<prefix>_<client>_<seq>``, billing.units) end in digits after ``_``, so they parse as roots.
    """
    if confirmed < 0:
        raise ValueError(f"confirmed units cannot be negative, not {confirmed}")
    name = _NAME.match(identifier)
    root, offset, offer = name["root"], int(name["offset"] or 0), int(name["offer"] or 0)
    if confirmed:
        return f"{root}.{offset + confirmed}"
    return f"{root}.{offset}_r{offer + 1}" if offset else f"{root}_r{offer + 1}"


def remainder_identifier(identifier: str, confirmed: int) -> str:
    """Return the identifier of the report carrying ``identifier``'s units after its first ``confirmed``."""
    if confirmed < 1:
        raise ValueError(f"a remainder starts after at least one confirmed unit, not {confirmed}")
    return fresh_identifier(identifier, confirmed)


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
    identifier, or None when nothing was confirmed and the report itself was re-opened under a fresh identifier
    (``fresh_identifier``). Flushes only.
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
                identifier=fresh_identifier(row.identifier),
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
