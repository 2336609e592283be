"""The ``flask --app app rebill …`` commands: the scheduler process and its jobs, runnable by hand."""

from __future__ import annotations

import logging

import click
from flask import current_app
from flask.cli import AppGroup

from billing.jobs import run_tick

log = logging.getLogger("billing.scheduler")

rebill_cli = AppGroup("rebill", help="Rebill billing jobs.")


@rebill_cli.command("tick")
def tick_command():
    """Run one aggregation + Stripe reporting cycle now."""
    summary = run_tick()
    click.echo(" ".join(f"{name}={value}" for name, value in vars(summary).items()))


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
                # A failed tick leaves its rows unclaimed or pending; the next tick picks them up.
                log.exception("tick failed")

    scheduler = BlockingScheduler(timezone="UTC")
    # coalesce + max_instances=1: a slow tick never overlaps the next, missed runs collapse into one.
    scheduler.add_job(
        tick_in_app_context, "interval", seconds=seconds, coalesce=True, max_instances=1, id="rebill-tick"
    )
    click.echo(f"scheduler: one tick every {seconds}s")
    tick_in_app_context()
    scheduler.start()
