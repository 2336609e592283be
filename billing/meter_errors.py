"""Stripe's asynchronous meter errors: flag the unit reports Stripe rejected after answering 2xx.

Stripe validates meter events partly after accepting them (an unknown customer, a timestamp out of range) and
reports the invalid ones in a ``v1.billing.meter.error_report_triggered`` thin event, naming at most a few
``sample_errors`` per error type by the meter event's ``identifier`` (docs/stripe.md §1.4). Rebill's
identifiers are deterministic (``rebill_<prefix>_<client>_<seq>``, and ``-<n>`` per event on a count meter;
billing.units, billing.reporting), so each sample leads back to its unit report.

A report Rebill had marked ``sent`` that Stripe names is set ``failed`` with Stripe's reason, so the client
shows ``failing`` with it (billing.periods.billing_state). Flagging never sends anything
(docs/billing-rules.md#meter-errors-stripe-reports-later):

- a sum-meter report is one meter event: Stripe rejected it, so none of its units are in Stripe. Its units
  count as unconfirmed again and it gets a fresh identifier (Stripe's 24 h identifier dedupe must not
  swallow the re-offer as "already exists"); once the agency fixes the client (customer, price) the
  existing retry path (billing.reporting.retry_failed_reports) offers it again;
- a count-meter report is many events and a sample names one of them: the others may be in Stripe, so it is
  ``failed`` "needs reconcile", released only by a person who compared it with Stripe (never re-offered
  automatically);
- a report in any other state, or an identifier that is not this agency's, is left as it is (noted).

Stripe counts more errors than it samples: reports it does not name are caught by the daily
reconciliation (billing.reconcile), which compares what the ledger marked sent with Stripe's meter totals.
Services flush; the caller (the Stripe event log) commits.
"""

from __future__ import annotations

import logging
import re

from sqlalchemy import select

from billing.models import Agency, UnitReport
from billing.periods import REJECTED_LATER
from billing.reporting import NEEDS_RECONCILE
from billing.states import ReportStatus
from billing.stripe_gateway import MeterErrorReport
from billing.units import take_write_lock
from core.database import db

log = logging.getLogger("billing.meter_errors")
_COUNT_EVENT = re.compile(r"^(?P<report>.+)-(?P<number>\d+)$")
_REOFFER = re.compile(r"^(?P<base>.+)_r(?P<number>\d+)$")


def flag_rejected_reports(agency: Agency, report: MeterErrorReport) -> str | None:
    """Mark the agency's sent unit reports named by Stripe's error samples as failed; return a note when
    none could be flagged (the event is then recorded as ignored, with the note)."""
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
        samples = wanted[row.identifier]
        named.update(sample.identifier for sample in samples)
        if row.status != ReportStatus.SENT or row.target_mode != "meter":
            notes.append(f"report {row.identifier} is {row.status}, left as it is")
            continue
        sample = samples[0]
        reason = f"{sample.message} ({sample.code})"
        if row.target_formula == "count" or sample.identifier != row.identifier:
            # One event of many: the others may be recorded, so only a person comparing with Stripe may resend.
            row.last_error = (
                f"{NEEDS_RECONCILE}: {REJECTED_LATER} (event {sample.identifier}): {reason}; other events of this "
                "report may be in Stripe: compare with Stripe's totals before releasing it"
            )
        else:
            # The report's one meter event was rejected: none of its units are in Stripe.
            row.last_error = f"{REJECTED_LATER}: {reason}"
            row.units_confirmed = 0
            row.in_doubt_since = None
            row.identifier = _reoffer_identifier(row.identifier)
        row.status = ReportStatus.FAILED
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


def _reoffer_identifier(identifier: str) -> str:
    """The identifier a re-offer goes under: ``<id>_r1``, then ``_r2``... (at most 100 characters at Stripe)."""
    match = _REOFFER.match(identifier)
    if match:
        return f"{match['base']}_r{int(match['number']) + 1}"
    return f"{identifier}_r1"
