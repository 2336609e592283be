"""Reporting's claim alone: lease a backlog of due outbox rows, claim after claim, until none is due (issue 13).

    .venv/bin/python bench/claim_bench.py [--rows 100000] [--agencies 100] [--big-share 0.5] [--batch 1000]

Creates a throwaway PostgreSQL database (REBILL_BENCH_POSTGRES_URL, default
postgresql://postgres@127.0.0.1:5432/postgres), migrates it, inserts ``--agencies`` agencies with a working
key, one client per row and ``--rows`` due outbox rows (``--big-share`` of them in the first agency, the rest
spread evenly), then times ``claim_batch`` (choice, locking read, leases, commit) until it returns nothing.
Stripe is not called: the figure is what the claim costs as the backlog drains. Prints the total, the claims,
and the time of the first and the last tenth of the claims (a claim whose cost grows with the backlog shows as
a first tenth slower than the last).
"""

from __future__ import annotations

import argparse
import datetime as dt
import inspect
import os
import secrets
import sys
import time
import uuid
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography.fernet import Fernet
from flask_migrate import upgrade
from sqlalchemy import text

from app import create_app
from billing import report_claims
from billing.report_claims import ReportingResult, TickClock, claim_batch
from core.database import db

ADMIN_URL = os.environ.get("REBILL_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def load(rows: int, agencies: int, big_share: float) -> None:
    """Agencies, one metered client per row, and the due rows: set-based SQL (not timed)."""
    db.session.execute(text(
        "INSERT INTO agency (company_id, stripe_key_status, created_at, updated_at) "
        "SELECT 'bench-' || n, 'ok', now(), now() FROM generate_series(1, :agencies) n"
    ), {"agencies": agencies})  # fmt: skip
    big = int(rows * big_share)
    # Row n belongs to agency 1 while n <= big, else to the others in turn.
    agency_of = "CASE WHEN n <= :big THEN 1 ELSE 2 + (n % GREATEST(:agencies - 1, 1)) END"
    db.session.execute(text(
        "INSERT INTO rebill_client (agency_id, nickname, provider, channel_id, source_key, stripe_product_id, "
        "stripe_price_id, stripe_customer_id, charge_by, billing_unit, report_mode, meter_id, meter_event_name, "
        "meter_customer_key, meter_value_key, meter_formula, report_sequence, units_logged, status, created_at, "
        "updated_at, report_prefix, term_started_at) "
        f"SELECT {agency_of}, 'c' || n, 'capri_api', 'ch' || n, 'ch' || n, 'prod_b', 'price_b', 'cus_' || n, "
        "'tokens', 1000, 'meter', 'mtr_b', 'ai_units', 'stripe_customer_id', 'value', 'sum', 1, 5, 'active', now(), "
        "now(), left(md5(n::text), 16), now() FROM generate_series(1, :rows) n"
    ), {"rows": rows, "big": big, "agencies": agencies})  # fmt: skip
    db.session.execute(text(
        "INSERT INTO unit_report (agency_id, client_id, identifier, units, usage_timestamp, status, attempts, "
        "next_attempt_at, failed_attempts, units_confirmed, created_at, updated_at) "
        "SELECT agency_id, id, 'bench_' || id, 5, now() - interval '1 minute', 'pending', 0, "
        "now() - interval '1 minute' + id * interval '1 microsecond', 0, 0, now(), now() FROM rebill_client"
    ))  # fmt: skip
    db.session.commit()
    db.session.execute(text("ANALYZE"))
    db.session.commit()


# The choice as it was before the rounds (every due row ranked on each claim), for comparison.
RANK_EVERY_DUE_ROW = """
SELECT id FROM (
    SELECT r.id, row_number() OVER (PARTITION BY r.agency_id ORDER BY r.id) AS turn FROM unit_report r
    WHERE r.status = 'pending' AND r.next_attempt_at <= now()
        AND r.agency_id IN (SELECT id FROM agency WHERE stripe_key_status = 'ok')
) ranked ORDER BY turn, id LIMIT :batch
"""


def choice_ms(batch: int) -> tuple[float, float]:
    """Server time (ms, EXPLAIN ANALYZE) of one choice: ranking every due row, and the rounds' first read."""
    def execution_ms(sql: str, params: dict) -> float:
        plan = db.session.execute(text(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}"), params).scalar()
        return plan[0]["Execution Time"]

    agencies = db.session.scalars(text("SELECT id FROM agency WHERE stripe_key_status = 'ok'")).all()
    first_due = getattr(report_claims, "_FIRST_DUE_ROWS", None)
    rounds = execution_ms(first_due.text.replace(":start", "now()").replace(":now", "now()"), {
        "agency_ids": list(agencies), "after_times": [dt.datetime(1, 1, 1, tzinfo=dt.UTC)] * len(agencies),
        "after_ids": [0] * len(agencies), "per_agency": -(-batch // len(agencies)),
        **({"sender": "bench"} if ":sender" in first_due.text else {}),  # clients held by other schedulers
    }) if first_due is not None else float("nan")  # fmt: skip
    ranked = execution_ms(RANK_EVERY_DUE_ROW, {"batch": batch})
    db.session.rollback()
    return ranked, rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--agencies", type=int, default=100)
    parser.add_argument("--big-share", type=float, default=0.5, help="share of the rows in one agency")
    parser.add_argument("--batch", type=int, help="rows per claim (billing.report_claims.CLAIM_BATCH by default)")
    args = parser.parse_args()
    if args.batch:
        report_claims.CLAIM_BATCH = args.batch
    name = f"rebill_claims_{uuid.uuid4().hex[:10]}"
    admin = psycopg.connect(ADMIN_URL, autocommit=True)
    admin.execute(f'CREATE DATABASE "{name}"')
    url = ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + f"/{name}"
    try:
        app = create_app({
            "REBILL_ENV": "test", "DATABASE_URL": url, "SECRET_KEY": secrets.token_urlsafe(32),
            "REBILL_ENCRYPTION_KEYS": Fernet.generate_key().decode(), "REBILL_LOG_LEVEL": "WARNING",
        })  # fmt: skip
        with app.app_context():
            upgrade()
            load(args.rows, args.agencies, args.big_share)
            ranked, rounds = choice_ms(report_claims.CLAIM_BATCH)
            print(f"one choice with {args.rows:,} rows due: ranking every due row {ranked:.1f} ms, the rounds' first "
                  f"read (an index range per agency) {rounds:.1f} ms (server time, EXPLAIN ANALYZE)")
            load_before = os.getloadavg()[0]
            clock = TickClock(None, dt.timedelta(hours=1))
            # A tick passes its claims where the last one left each agency (code before that took no such dict).
            resume: tuple = ({},) if "resume" in inspect.signature(claim_batch).parameters else ()
            times, leased = [], 0
            started = time.perf_counter()
            while True:
                claim_started = time.perf_counter()
                claims = claim_batch(clock, ReportingResult(), *resume)
                if not claims:
                    break
                times.append(time.perf_counter() - claim_started)
                leased += len(claims)
            wall = time.perf_counter() - started
            tenth = max(len(times) // 10, 1)
            first_ms, last_ms = sum(times[:tenth]) / tenth * 1e3, sum(times[-tenth:]) / tenth * 1e3
            print(f"{leased:,} rows of {args.agencies} agencies ({args.big_share:.0%} in one) leased in {len(times)} "
                  f"claims of {report_claims.CLAIM_BATCH:,} in {wall:.2f} s; a claim took {first_ms:.0f} ms in the "
                  f"first tenth, {last_ms:.0f} ms in the last; load average {load_before:.1f} -> "
                  f"{os.getloadavg()[0]:.1f}")  # fmt: skip
            db.session.remove()
            db.engine.dispose()
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


if __name__ == "__main__":
    main()
