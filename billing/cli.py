"""The ``flask --app app rebill …`` commands: the scheduler process and its jobs, runnable by hand."""

from __future__ import annotations

import logging

import click
from flask import current_app
from flask.cli import AppGroup

from billing.jobs import run_tick
from billing.reconcile import reconcile_clients

log = logging.getLogger("billing.scheduler")

rebill_cli = AppGroup("rebill", help="Rebill billing jobs.")


@rebill_cli.command("tick")
def tick_command():
    """Run one aggregation + Stripe reporting cycle now."""
    summary = run_tick()
    click.echo(" ".join(f"{name}={value}" for name, value in vars(summary).items()))
    if summary.aggregation_failed:
        raise SystemExit(1)  # reporting still ran; the log has the aggregation error


@rebill_cli.command("scheduler")
def scheduler_command():
    """Run the long-lived scheduler (exactly one per deployment)."""
    from apscheduler.schedulers.blocking import BlockingScheduler

    app = current_app._get_current_object()
    seconds = app.config["REBILL_TICK_SECONDS"]

    def tick_in_app_context():
        with app.app_context():
            try:
                run_tick()
            except Exception:
                # A failed tick leaves its rows pending or leased; a later tick picks them up.
                log.exception("tick failed")

    scheduler = BlockingScheduler(timezone="UTC")
    # coalesce + max_instances=1: a slow tick never overlaps the next, missed runs collapse into one; the
    # grace time lets a run that was delayed by a slow tick still happen instead of being dropped.
    scheduler.add_job(
        tick_in_app_context,
        "interval",
        seconds=seconds,
        coalesce=True,
        max_instances=1,
        misfire_grace_time=seconds,
        id="rebill-tick",
    )
    click.echo(f"scheduler: one tick every {seconds}s")
    tick_in_app_context()
    scheduler.start()


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
