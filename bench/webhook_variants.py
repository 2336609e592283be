"""Alternate several gunicorn targets under wrk, each on a database of its own: what-if runs of the webhook path.

    .venv/bin/python bench/webhook_variants.py [--rounds 3] [--duration 10] NAME=TARGET[#SQL] ...

    .venv/bin/python bench/webhook_variants.py base=what_if:rebill() nowrite=what_if:without_database() \\
        bare=webhook_bench:create_bare_app()
    .venv/bin/python bench/webhook_variants.py base=what_if:rebill() \\
        "nokey=what_if:rebill()#ALTER TABLE usage_event DROP CONSTRAINT fk_usage_event_agency_id_agency"

Each NAME runs TARGET (a gunicorn target; bench/ is on its path, so what_if's factories and webhook_bench's
bare app resolve) under the Procfile's gunicorn options, on its own throwaway database migrated and seeded as
webhook_bench.py seeds its own; SQL, if given, runs on that database afterwards (a schema or server-setting
what-if). The variants then take turns at full speed, one wrk run each per round, the order reversed every
other round, with webhook_bench.py's signed bodies and wrk script. Per run it prints what webhook_bench.py
does not: how much of the two CPUs sat idle (/proc/stat, the whole machine), deliveries per commit (the
variant database's xact_commit; approximate, as PostgreSQL publishes its statistics within about a
second), and the workers' context switches per request, next to the rate, CPU per request ("app µs",
"db µs") and the connection split. It ends with each variant's median rate and its ratio to the first
variant's. There is no loss check (what_if's writers that skip the database store nothing); the bench
proper is webhook_bench.py. bench/README.md (fifth pass of issue 15) has what these runs found.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import psycopg
from cryptography.hazmat.primitives.asymmetric import ed25519

sys.path.insert(0, str(Path(__file__).resolve().parent))

import webhook_bench

FIRST_PORT = 18600


@dataclass
class Variant:
    name: str
    target: str
    sql: str | None
    url: str = ""
    port: int = 0
    server: object = None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="+", metavar="NAME=TARGET[#SQL]")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=10, help="seconds of signed requests per run")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/postgres")
    args = parser.parse_args()
    variants = []
    for spec in args.variants:
        name, equals, rest = spec.partition("=")
        if not equals or not name or not rest:
            parser.error(f"not NAME=TARGET[#SQL]: {spec}")
        target, _, sql = rest.partition("#")
        variants.append(Variant(name, target, sql or None))
    workdir = Path(tempfile.mkdtemp(prefix="rebill-webhook-variants-"))
    key = ed25519.Ed25519PrivateKey.generate()
    databases: list[str] = []
    try:
        start(args, variants, key, workdir, databases)
        results = {variant.name: [] for variant in variants}
        for number in range(args.rounds):
            for variant in variants if number % 2 == 0 else reversed(variants):
                figures = run(args, variant, webhook_bench.sign_bodies(key, workdir, f"{variant.name}{number}",
                                                                       args.duration))  # fmt: skip
                results[variant.name].append(figures)
                print(line(f"round {number + 1}: {variant.name}", figures), flush=True)
        summary(results)
    finally:
        for variant in variants:
            if variant.server is not None:
                webhook_bench.stop(variant.server)
        try:
            webhook_bench.drop_databases(args.postgres, databases)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


def start(args, variants: list[Variant], key, workdir: Path, databases: list[str]) -> None:
    """A migrated, seeded database and a warmed-up gunicorn for every variant."""
    options = webhook_bench.procfile_gunicorn_options()
    with psycopg.connect(args.postgres, autocommit=True) as admin:
        for number, variant in enumerate(variants):
            database = f"rebill_bench_{uuid.uuid4().hex[:10]}"
            admin.execute(f'CREATE DATABASE "{database}"')
            databases.append(database)
            variant.url = args.postgres.rsplit("/", 1)[0] + f"/{database}"
            env = webhook_bench.server_env(variant.url.replace("postgresql://", "postgresql+psycopg://"), key)
            webhook_bench.prepare_database(env)
            if variant.sql:
                with psycopg.connect(variant.url, autocommit=True) as connection:
                    connection.execute(variant.sql)
            variant.port = FIRST_PORT + number
            bench = str(webhook_bench.ROOT / "bench")
            variant.server = webhook_bench.start_gunicorn(
                variant.target, variant.port, env, options, extra=["--pythonpath", bench]
            )
            webhook_bench.wrk(args, webhook_bench.sign_bodies(key, workdir, f"warm{number}", 2), 2, 0, variant.port)


def run(args, variant: Variant, bodies: Path) -> dict:
    """One full-speed wrk run against ``variant``; its figures."""
    commits, switches, idle = _commits(variant.url), _switches(variant.server.pid), _idle()
    with (
        webhook_bench.cpu_per_answer(variant.server, variant.url) as figures,
        webhook_bench.connection_split(variant.server, variant.port, args.duration, figures),
    ):
        figures |= webhook_bench.wrk(args, bodies, args.duration, 0, variant.port)
    answers = max(figures["ok"], 1)
    idle_after, switches_after = _idle(), _switches(variant.server.pid)
    figures["idle"] = 100 * (idle_after[0] - idle[0]) / max(idle_after[1] - idle[1], 1)
    written = _commits(variant.url) - commits - 1  # the first read is a transaction too
    # "-": next to nothing was written (a what-if without the database; a late-published commit or two)
    figures["per_commit"] = f"{answers / written:.2f}" if written >= 10 else "-"
    figures["voluntary"] = (switches_after[0] - switches[0]) / answers
    figures["involuntary"] = (switches_after[1] - switches[1]) / answers
    return figures


def _idle() -> tuple[int, int]:
    """(idle + iowait, all) jiffies of the whole machine so far."""
    values = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return values[3] + values[4], sum(values)


def _commits(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as connection:
        return connection.execute(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()[0]


def _switches(server_pid: int) -> tuple[int, int]:
    """(voluntary, involuntary) context switches of the server's workers so far."""
    voluntary = involuntary = 0
    for pid, parent, _cpu, _command in webhook_bench._processes():
        if parent != server_pid:
            continue
        try:
            status = Path(f"/proc/{pid}/status").read_text().splitlines()
        except OSError:
            continue
        for field in status:
            if field.startswith("voluntary_ctxt_switches:"):
                voluntary += int(field.split()[1])
            elif field.startswith("nonvoluntary_ctxt_switches:"):
                involuntary += int(field.split()[1])
    return voluntary, involuntary


def line(label: str, figures: dict) -> str:
    return (
        f"{label:<28} {figures['rate']:7.0f}/s  idle {figures['idle']:4.1f} %  app {figures['server_us']:4.0f} µs"
        f"  db {figures['database_us']:4.0f} µs  {figures['per_commit']:>6} per commit  split "
        f"{figures['split']:<6} switches/request {figures['voluntary']:.2f} + {figures['involuntary']:.2f}"
    )


def summary(results: dict[str, list[dict]]) -> None:
    medians = {name: sorted(run["rate"] for run in runs)[len(runs) // 2] for name, runs in results.items()}
    first = next(iter(medians.values()))
    for name, median in medians.items():
        rates = ", ".join(f"{run['rate']:.0f}" for run in results[name])
        print(f"{name}: median {median:.0f}/s ({median / first:.2f} of the first variant); rates {rates}")


if __name__ == "__main__":
    sys.exit(main())
