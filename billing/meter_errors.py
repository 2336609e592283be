"""Stripe's asynchronous meter errors: flag the unit reports Stripe rejected after answering 2xx.

Stripe validates meter events partly after accepting them (an unknown customer, a timestamp out of range) and
reports the invalid ones in a ``v1.billing.meter.error_report_triggered`` thin event, naming at most a few
``sample_errors`` per error type by the meter event's ``identifier`` (docs/stripe.md §1.4). Rebill's
identifiers are deterministic (``rebill_<prefix>_<client>_<seq>``, and ``-<n>`` per event on a count meter;
billing.units, billing.reporting), so each sample leads back to its unit report.

A report Stripe names is flagged whatever state Rebill has it in: ``sent``, or still ``pending`` (the answer
to its offer was lost, or a count report is part-way through its events, possibly in a scheduler's hands
right now), or ``failed`` for another reason. It becomes ``failed`` with Stripe's reason, so the client shows
``failing`` with it (billing.periods.billing_state). Flagging never sends anything
(docs/billing-rules.md#meter-errors-stripe-reports-later):

- a sum-meter report is one meter event: Stripe rejected it, so none of its units are in Stripe. The
  rejection is recorded: its units count as unconfirmed again, its doubt and timestamp are forgotten, and it
  gets a fresh identifier (billing.unsent_remainder.fresh_identifier): Stripe keeps the rejected identifier
  for 24 h, and a resend under it would be answered "already exists" and taken for delivered. Once the agency
  fixes the client (customer, price) the existing retry path (billing.reporting.retry_failed_reports) offers
  it again;
- a count-meter report is many events and a sample names one of them: the others may be in Stripe, so it is
  ``failed`` "needs reconcile", released only by a person who compared it with Stripe (never re-offered
  automatically);
- a report already "needs reconcile", a report not sent to a meter, an identifier that is not this
  agency's, or a count event past the report's units (the report was closed at its confirmed events and the
  rest moved to a fresh report under its own identifier), is left as it is (noted).

A scheduler holding the report's lease while it is flagged records nothing of its offer over the flag
(billing.reporting records an outcome only on a row its claim still holds: report_claims.STILL_CLAIMED).

Stripe counts more errors than it samples: reports it does not name are caught by the daily
reconciliation (billing.reconcile), which compares what the ledger marked sent with Stripe's meter totals.
Services flush; the caller (the Stripe event log) commits.
"""

from __future__ import annotations

import logging
import re

from sqlalchemy import select

from billing.aggregation_store import take_write_lock
from billing.models import Agency, UnitReport
from billing.periods import REJECTED_LATER
from billing.report_claims import NEEDS_RECONCILE
from billing.states import ReportMode, ReportStatus
from billing.stripe_gateway import MeterErrorReport
from billing.unsent_remainder import move_unsent_remainder
from core.database import db, utcnow

log = logging.getLogger("billing.meter_errors")
_COUNT_EVENT = re.compile(r"^(?P<report>.+)-(?P<number>\d+)$")


def _is_event_of(identifier: str, row: UnitReport) -> bool:
    """Tell whether a meter event identifier is one of ``row``'s: its own, or ``<row>-<n>`` with n <= its units.

    A count report closed at its confirmed events gave the rest to a fresh report (billing.unsent_remainder),
    which offers them under its own identifier; a late error naming a later event of the closed report is
    about an offer whose units are no longer the closed report's, and must not flag it.
    """
    if identifier == row.identifier:
        return True
    match = _COUNT_EVENT.match(identifier)
    return match is not None and match["report"] == row.identifier and 1 <= int(match["number"]) <= row.units


def flag_rejected_reports(agency: Agency, report: MeterErrorReport) -> str | None:
    """Mark the agency's unit reports named by Stripe's error samples as failed, whatever their state; return
    a note when none could be flagged (the event is then recorded as ignored, with the note)."""
    wanted: dict[str, list] = {}
    for sample in report.samples:
        wanted.setdefault(sample.identifier, []).append(sample)
        match = _COUNT_EVENT.match(sample.identifier)
        if match:
            wanted.setdefault(match["report"], []).append(sample)
    if not wanted:
        return f"Stripe named no meter events ({report.error_count} errors): the daily reconciliation compares totals"
    take_write_lock()
    rows = db.session.scalars(
        select(UnitReport)
        .where(UnitReport.agency_id == agency.id, UnitReport.identifier.in_(list(wanted)))
        .order_by(UnitReport.id)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).all()
    notes, named, flagged = [], set(), 0
    for row in rows:
        samples = [sample for sample in wanted[row.identifier] if _is_event_of(sample.identifier, row)]
        named.update(sample.identifier for sample in samples)
        if not samples:  # an event past the row's units: the row was closed at fewer, the event moved on
            continue
        if row.target_mode != ReportMode.METER or (row.last_error or "").startswith(NEEDS_RECONCILE):
            notes.append(f"report {row.identifier} is {row.status} ({row.last_error or 'no error'}), left as it is")
            continue
        sample = samples[0]
        reason = f"{sample.message} ({sample.code})"
        if row.target_formula == "count" or sample.identifier != row.identifier:
            # One event of many: the others may be recorded, so only a person comparing with Stripe may resend.
            row.last_error = (
                f"{NEEDS_RECONCILE}: {REJECTED_LATER} (event {sample.identifier}, named while the report was "
                f"{row.status} with {row.units_confirmed} of {row.units} events confirmed): {reason}; other "
                "events of this report may be in Stripe: compare with Stripe's totals before releasing it"
            )
            row.status = ReportStatus.FAILED
        else:
            # The report's one meter event was rejected: none of its units are in Stripe, and its identifier
            # must not go to Stripe again.
            db.session.flush()
            move_unsent_remainder(
                row.id, 0, utcnow(), due_at=utcnow(), status=ReportStatus.FAILED, reason=f"{REJECTED_LATER}: {reason}"
            )
        flagged += 1
    unknown = sorted(set(sample.identifier for sample in report.samples) - named)
    if unknown:
        notes.append(f"no sent report of this agency has identifier {', '.join(unknown)}")
    if report.error_count > len(report.samples):
        notes.append(
            f"Stripe counted {report.error_count} invalid meter events and named {len(report.samples)}: "
            "the daily reconciliation catches the others"
        )
    db.session.flush()
    note = "; ".join(notes) or None
    if flagged and note:
        # The event did its work (it is "processed"); what it could not place is logged.
        log.info("meter error report partly placed", extra={"fields": {"agency_id": agency.id, "note": note}})
        return None
    return note
