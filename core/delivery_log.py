"""A delivery log: webhooks kept as received, processed after they are stored, failures kept, replayable.

The shape of dj-stripe's ``WebhookEventTrigger``: a verified delivery is stored first (that is what a 2xx
acknowledges), then processed in its own transaction; the outcome is recorded on the row, an error stays
on it, and a replay processes the row again. GHL's webhook deliveries (ghl.deliveries) and the agencies'
Stripe events (billing.stripe_events) are two such logs; each brings its table (a model with the columns
below) and its handler, this module does the rest.

Columns of a log's table: ``id``, ``event_type``, ``body`` (the raw JSON text), ``received_at``, ``status``
(received → processed | ignored | failed), ``error`` (the failure, or why it was ignored), ``attempts``,
``processed_at`` (stays empty for a failure, which is therefore replayable).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import click
from sqlalchemy import Row, or_, select, update

from core.database import db, utcnow

ERROR_MAX_LENGTH = 2000
# A "received" delivery older than this was abandoned by a dead worker; replay picks it up.
STALE_AFTER = dt.timedelta(minutes=5)

# Apply one stored delivery (a row of the log's replay columns); return None when it did its work, or a
# short reason why there was nothing to do ("ignored"); raise to mark the delivery failed.
Handler = Callable[[Row], str | None]


@dataclass
class ReplaySummary:
    """What a replay run did."""

    replayed: int = 0
    processed: int = 0
    ignored: int = 0
    failed: int = 0


def failure_message(error: BaseException) -> str:
    """The error kept on a failed delivery: its type and reason, NULs dropped (PostgreSQL refuses them), cut."""
    text = f"{type(error).__name__}: {getattr(error, 'reason', error)}".replace("\x00", "")
    return text[:ERROR_MAX_LENGTH]


class DeliveryLog:
    """Process, replay and record the failures of the deliveries stored in ``model``'s table.

    ``columns``: the model's attributes ``handler`` reads from a stored delivery (besides ``id``).
    ``name``: what a delivery is called in log lines ("GHL webhook", "stripe event").
    """

    def __init__(self, model: Any, handler: Handler, *, columns: tuple, name: str, log: logging.Logger):
        self.model = model
        self.handler = handler
        self.columns = (model.id, model.event_type, *columns)
        self.name = name
        self.log = log

    def process(self, delivery_id: int, *, force: bool = False) -> str:
        """Run a stored delivery's handler in its own transaction and record the outcome; commits.

        Returns processed, ignored, failed (error kept, replayable), duplicate (no such row, or another run
        recorded it first) or received (not even the failure could be written; a replay will retry it).
        ``force``: process it again even if it was processed or ignored already (a replay by id).
        """
        delivery = db.session.execute(select(*self.columns).where(self.model.id == delivery_id)).one_or_none()
        if delivery is None:
            db.session.rollback()
            return "duplicate"
        return self._process(delivery, force=force)

    def replay(
        self, *, failed_only: bool = False, delivery_id: int | None = None, max_attempts: int | None = None
    ) -> ReplaySummary:
        """Process stored deliveries again: one by id (whatever its status), the failed ones, or every one not
        processed (failed, or received and abandoned for longer than STALE_AFTER). Commits per delivery."""
        model = self.model
        query = select(*self.columns).order_by(model.id)
        if delivery_id is not None:
            query = query.where(model.id == delivery_id)
        elif failed_only:
            query = query.where(model.status == "failed")
        else:
            stale = utcnow() - STALE_AFTER
            query = query.where(
                or_(model.status == "failed", (model.status == "received") & (model.received_at < stale))
            )
        if max_attempts is not None:
            query = query.where(model.attempts < max_attempts)
        deliveries = db.session.execute(query).all()
        db.session.rollback()
        summary = ReplaySummary()
        for delivery in deliveries:
            status = self._process(delivery, force=delivery_id is not None)
            summary.replayed += 1
            if status in ("processed", "ignored", "failed"):
                setattr(summary, status, getattr(summary, status) + 1)
        return summary

    def record_failure(self, delivery_id: int, event_type: str | None, error: BaseException) -> str:
        """Mark a stored delivery failed with ``error`` (unless processed meanwhile); commits, never raises.

        Returns failed, or received when the failure could not be written (the database is down).
        """
        message = failure_message(error)
        self.log_failure(delivery_id, event_type, message)
        model = self.model
        try:
            db.session.execute(
                update(model)
                .where(model.id == delivery_id, model.status != "processed")
                .values(status="failed", error=message, attempts=model.attempts + 1)
            )
            db.session.commit()
        except Exception:
            db.session.rollback()
            self.log.error(f"cannot record a {self.name} failure", extra={"fields": {"delivery_id": delivery_id}})
            return "received"
        return "failed"

    def log_failure(self, delivery_id: int | None, event_type: str | None, message: str) -> None:
        """The log line of a failed delivery (ids and the error, never the body)."""
        self.log.warning(
            f"{self.name} processing failed",
            extra={"fields": {"delivery_id": delivery_id, "type": str(event_type)[:64], "error": message}},
        )

    def _process(self, delivery: Row, *, force: bool) -> str:
        model = self.model
        try:
            note = self.handler(delivery)
            status = "processed" if note is None else "ignored"
            pending = ["received", "failed"] + (["processed", "ignored"] if force else [])
            recorded = db.session.execute(
                update(model)
                .where(model.id == delivery.id, model.status.in_(pending))
                .values(status=status, error=note, attempts=model.attempts + 1, processed_at=utcnow())
            ).rowcount
            if not recorded:
                db.session.rollback()
                return "duplicate"
            db.session.commit()
            return status
        except Exception as error:  # any failure is recorded on the delivery, which stays replayable
            db.session.rollback()
            return self.record_failure(delivery.id, delivery.event_type, error)


def replay_command(replay: Callable[..., ReplaySummary], *, noun: str, help: str) -> click.Command:
    """A ``replay`` CLI command for a delivery log's ``replay`` (``noun``: what one stored delivery is called).

    Prints the summary; exits 1 when a delivery failed again, and refuses an ``--id`` that names nothing.
    """

    @click.command("replay", help=help)
    @click.option("--failed", "failed_only", is_flag=True, help="Only those whose processing failed.")
    @click.option("--id", "delivery_id", type=int, help=f"Only this {noun} (whatever its status).")
    def command(failed_only: bool, delivery_id: int | None):
        summary = replay(failed_only=failed_only, delivery_id=delivery_id)
        if delivery_id is not None and summary.replayed == 0:
            raise click.ClickException(f"no {noun} with id {delivery_id}")
        click.echo(" ".join(f"{name}={value}" for name, value in vars(summary).items()))
        if summary.failed:
            raise SystemExit(1)

    return command
