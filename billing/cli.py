"""The ``flask --app app rebill …`` commands: the scheduler process and its jobs, runnable by hand."""

from __future__ import annotations

import logging
from collections.abc import Callable

import click
from flask import current_app
from flask.cli import AppGroup

from billing.jobs import run_tick
from billing.periods import refresh_stale_periods
from billing.reconcile import RECONCILE_EVERY_SECONDS, reconcile_clients, record_reconcile_gaps
from billing.stripe_events import DESTINATION_RETRY_SECONDS, register_missing_destinations
from core.database import db
from core.leader_lock import LeaderLock
from core.metrics import SCHEDULED_JOB_RUNS, serve_process_metrics

log = logging.getLogger("billing.scheduler")

rebill_cli = AppGroup("rebill", help="Rebill billing jobs.")


@rebill_cli.command("tick")
def tick_command():
    """Run one aggregation + Stripe reporting cycle now."""
    summary = run_tick()
    click.echo(" ".join(f"{name}={value}" for name, value in vars(summary).items()))
    if summary.aggregation_failed:
        raise SystemExit(1)  # reporting still ran; the log has the aggregation error


# Cached billing periods are re-read hourly (billing.periods.REFRESH_EVERY); a minute's interval picks up new
# clients and renewals soon after they happen.
PERIODS_JOB_SECONDS = 60


@rebill_cli.command("refresh-periods")
def refresh_periods_command():
    """Re-read from Stripe the clients' billing periods, prices and names that are missing or stale."""
    click.echo(f"refreshed={refresh_stale_periods()}")


# Other packages' periodic jobs, composed by the factory (billing imports no provider):
# app.extensions[SCHEDULED_JOBS] = [(job_id, function, interval_seconds), ...]
SCHEDULED_JOBS = "rebill.scheduled_jobs"


@rebill_cli.command("scheduler")
def scheduler_command():
    """Run a long-lived scheduler: the tick, plus the registered housekeeping jobs while this process leads.

    Any number may run against one PostgreSQL database: ticks share aggregation and reporting through row
    claims, and only the process holding the housekeeping lock runs the other jobs (core.leader_lock).
    """
    from apscheduler.schedulers.blocking import BlockingScheduler

    app = current_app._get_current_object()
    seconds = app.config["REBILL_TICK_SECONDS"]
    housekeeping = LeaderLock(db.engine)
    jobs = [("rebill-tick", run_tick, seconds, None)]
    jobs += [(job_id, function, interval, housekeeping) for job_id, function, interval in housekeeping_jobs(app)]

    scheduler = BlockingScheduler(timezone="UTC")
    for job_id, function, interval, leader in jobs:
        # coalesce + max_instances=1: a slow run never overlaps the next, missed runs collapse into one;
        # the grace time lets a run delayed by a slow one still happen instead of being dropped.
        scheduler.add_job(
            scheduled_job(app, job_id, function, leader),
            "interval",
            seconds=interval,
            coalesce=True,
            max_instances=1,
            misfire_grace_time=interval,
            id=job_id,
        )
    click.echo("scheduler: " + ", ".join(f"{job_id} every {interval}s" for job_id, _, interval, _ in jobs))
    if port := app.config["REBILL_SCHEDULER_METRICS_PORT"]:
        serve_process_metrics(port)
        click.echo(f"scheduler: metrics on port {port}")
    scheduled_job(app, "rebill-tick", run_tick)()
    try:
        scheduler.start()
    finally:
        housekeeping.release()


def housekeeping_jobs(app) -> list[tuple[str, Callable[[], object], int]]:
    """Billing's periodic upkeep and the jobs other packages registered (app.extensions[SCHEDULED_JOBS])."""
    return [
        ("rebill-periods", refresh_stale_periods, PERIODS_JOB_SECONDS),
        # Daily: units Stripe rejected after accepting them and did not name (billing.reconcile).
        ("rebill-reconcile", record_reconcile_gaps, RECONCILE_EVERY_SECONDS),
        # Meter-error destinations for endpoints registered without one (billing.stripe_events).
        ("stripe-meter-error-destinations", register_missing_destinations, DESTINATION_RETRY_SECONDS),
        *app.extensions.get(SCHEDULED_JOBS, []),
    ]


def scheduled_job(app, job_id: str, function: Callable[[], object], leader: LeaderLock | None = None):
    """Wrap a job for the scheduler: own app context, counted, logged; with a ``leader``, run only while leading."""

    def run() -> str:
        with app.app_context():
            if leader is not None and not leader.held():
                outcome = "skipped"  # another scheduler runs the housekeeping jobs
            else:
                try:
                    function()
                    outcome = "ok"
                except Exception:
                    # Jobs select work by database state: what failed now is picked up by a later run.
                    log.exception("scheduled job failed", extra={"fields": {"job": job_id}})
                    outcome = "failed"
        SCHEDULED_JOB_RUNS.labels(job_id, outcome).inc()
        return outcome

    return run


@rebill_cli.command("reconcile")
@click.option("--company", "company_id", default=None, help="Only this agency (GHL companyId).")
def reconcile_command(company_id: str | None):
    """Compare units the ledger marked sent with Stripe's totals for the current period; resend nothing."""
    lines = reconcile_clients(company_id)
    if not lines:
        click.echo("no clients to reconcile")
        return
    drifted = 0
    for line in lines:
        period = (
            f"{line.period_start:%Y-%m-%d %H:%M}..{line.period_end:%Y-%m-%d %H:%M}" if line.period_start else "-"
        )
        head = (
            f"company={line.company_id} clients={','.join(map(str, line.client_ids))} "
            f"customer={line.customer_id} target={line.target} period={period}"
        )
        if line.problem:
            click.echo(f"{head} problem={line.problem!r}")
            drifted += 1
            continue
        drift = line.drift
        status = "ok" if drift == 0 else "DRIFT"
        drifted += status != "ok"
        click.echo(
            f"{head} sent={line.units_sent} unconfirmed={line.units_unconfirmed} waiting={line.units_waiting} "
            f"stripe={_number(line.stripe_total)} drift={_number(drift)} {status}"
        )
    click.echo(
        f"{len(lines)} checked, {drifted} with drift or problems. drift = Stripe's total - units marked sent; "
        "Stripe summaries lag recent events. Nothing was resent."
    )
    if drifted:
        raise SystemExit(1)


def _number(value) -> str:
    return "-" if value is None else (str(int(value)) if value == int(value) else str(value))
