"""What a client edit does to counting: its N, its status, its terms and its source's earlier usage.

Every function here runs in the caller's transaction, under the client's row lock, after the client's
pending usage was counted under the old settings (``billing.units.flush_client_usage``), so a change never
applies to usage received before it: rule 4 (a new N applies to the carried remainder), rule 5 (pausing and
resuming), rule 11 (terms: usage is judged by the settings in force when Rebill received it) and rule 3 (a
new client's source's earlier usage stays unmapped unless the agency chooses to bill it), docs/billing-rules.md.

Rule 11: pausing, resuming and moving close the client's term (``start_new_term``) after counting its pending
events and under its row lock, so an ingest that stamped its event before the change but committed after it,
or a replayed delivery that keeps its first receipt, is judged by the settings in force when it arrived. The
order of commits does not matter (PostgreSQL READ COMMITTED, the one-statement webhook path that stamps its
delivery and usage with one time, SQLite ingest waiting for the write lock after stamping): only the
received time does. Both times come from Rebill's processes' clocks, so hosts must keep NTP time.
"""

from __future__ import annotations

from sqlalchemy import func, select, update

from billing.aggregation_store import source_filter
from billing.models import RebillClient, RebillClientTerm, UnitReport, UsageEvent
from billing.states import ReportStatus, UsageState
from billing.units import SINCE_THE_START, flush_client_usage, report_identifier
from core.database import db, utcnow

_EVENT = UsageEvent.__table__.c


def set_billing_unit(client: RebillClient, billing_unit: int) -> int:
    """Apply a new N to the client's carried remainder and return the units that yields now.

    Call after ``flush_client_usage`` under the client's row lock. Rule 4: the remainder already counted
    carries into the new N. Decision: if the carried remainder reaches the new N (N was lowered), its
    units are logged at the change, in this transaction, with their own outbox row — so ``remainder < N``
    always holds and those units reach Stripe at the next tick without waiting for new usage.
    """
    units, remainder = divmod(client.remainder, billing_unit)
    client.billing_unit = billing_unit
    client.remainder = remainder
    if units:
        client.units_logged += units
        client.report_sequence += 1
        now = utcnow()
        db.session.add(
            UnitReport(
                agency_id=client.agency_id,
                client_id=client.id,
                identifier=report_identifier(client.report_prefix, client.id, client.report_sequence),
                units=units,
                usage_timestamp=now,
                status=ReportStatus.PENDING,
                attempts=0,
                next_attempt_at=now,
            )
        )
    return units


def start_counting(client: RebillClient, *, earlier_usage: bool) -> None:
    """Start a new client's first term now (rule 11), after its source's pending usage was settled.

    ``earlier_usage``: the agency chose to bill the source's earlier unmapped usage, so the term reaches
    back to the start; otherwise usage received before this moment was never this client's.
    """
    client.term_started_at = SINCE_THE_START if earlier_usage else utcnow()


def start_new_term(client: RebillClient) -> None:
    """Close the client's current term now, before its status or source changes (rule 11).

    Call under the client's row lock, after ``flush_client_usage``: usage received until now counts under
    the settings that were in force, usage received from now on under the ones the caller sets next.
    """
    now = utcnow()
    db.session.add(
        RebillClientTerm(
            client_id=client.id,
            starts_at=client.term_started_at,
            ends_at=now,
            status=client.status,
            provider=client.provider,
            source_key=client.source_key,
        )
    )
    client.term_started_at = now


def set_client_status(client: RebillClient, status: str) -> None:
    """Pause, resume, start or end the dry run of a client the caller holds locked (rules 5, 11 and 13).

    Its pending usage counts under the old status first, and usage received until now keeps the old status
    even if it commits later; usage received from now on gets the new one.
    """
    flush_client_usage(client)
    start_new_term(client)
    client.status = status


def settle_source_before_mapping(agency_id: int, provider: str, source_key: str, *, bill_unmapped: bool) -> int:
    """Prepare a source's earlier usage for a client about to map it; return the events it will bill.

    Rule 3. Default: events of the source still pending were received before any client mapped it, so
    they become ``unmapped`` now and are never billed. With ``bill_unmapped=True`` (the agency's explicit
    choice) the source's unmapped events, and its pending ones, are left / put back to ``pending`` and the
    next aggregation counts them under the new client; the count of those events is returned.
    """
    where = source_filter(agency_id, provider, source_key)
    if not bill_unmapped:
        # Waits for events a running pass claimed; that pass marks them unmapped too (it cannot see the
        # client this transaction is creating), and they no longer match "pending" when we get them.
        db.session.execute(
            update(UsageEvent.__table__)
            .where(_EVENT.state == UsageState.PENDING, *where)
            .values(state=UsageState.UNMAPPED)
        )
        return 0
    # Lock (waiting) the source's pending and unmapped events first: events a running pass claimed come
    # back here as "unmapped" once it commits, and are then put back to pending with the others.
    db.session.execute(
        select(_EVENT.id).where(_EVENT.state.in_((UsageState.PENDING, UsageState.UNMAPPED)), *where).with_for_update()
    ).all()
    db.session.execute(
        update(UsageEvent.__table__).where(_EVENT.state == UsageState.UNMAPPED, *where).values(state=UsageState.PENDING)
    )
    return db.session.scalar(select(func.count()).where(_EVENT.state == UsageState.PENDING, *where))
