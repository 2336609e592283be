"""Benchmark: aggregate 1,000,000 usage events of 10,000 clients, then one reporting tick to a fake Stripe.

Runs on PostgreSQL in a throwaway database it creates, migrates and drops. Loading the data (COPY) is not
timed; aggregation and the reporting tick are. The fake Stripe (stripe_fake's app and state) runs in a child
process behind a keep-alive server, as Stripe would be elsewhere. Prints events/s, wall times, Stripe calls
made (must equal the clients with new units: one call per client per tick), the peak RSS of each process,
and where the CPU went (Rebill's processes, the fake Stripe's process, the load average) — the fake shares
the cores.

    .venv/bin/python bench/billing_bench.py [--events 1000000] [--clients 10000] [--agencies 100] [--schedulers K]
        [--stripe-latency-ms MS]

Aggregation and reporting each run in fresh processes of their own, as a scheduler would (spawned,
connected, then released at once; their start-up is not timed): their peak RSS is Rebill's alone, not the
bench's bookkeeping (the rows it generated for COPY, the fake's accounts), which stays in this process.
--schedulers K reports with K such processes started together, each running report_pending_units until
nothing is due: the claims (SKIP LOCKED, leases) keep them apart, and the checks below prove every unit went
once. --stripe-latency-ms makes the fake answer each call that much later (without using CPU meanwhile), as
a real Stripe round trip (~100-300 ms) would: with no latency the tick is CPU-bound.

REBILL_BENCH_POSTGRES_URL picks the server (default postgresql://postgres@127.0.0.1:5432/postgres).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import io
import json
import multiprocessing
import os
import queue
import random
import resource
import secrets
import socket
import sys
import time
import uuid
from dataclasses import fields
from pathlib import Path

import psycopg
import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography.fernet import Fernet
from flask_migrate import upgrade
from sqlalchemy import func, select, text

from app import create_app
from billing.models import UnitReport
from billing.reporting import ReportingResult, report_pending_units
from billing.units import CLIENTS_PER_ROUND, aggregate_pending_usage
from core.database import db
from core.encryption import secret_box
from stripe_fake import FakeStripeApp, FakeStripeState

ADMIN_URL = os.environ.get("REBILL_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
BILLING_UNIT = 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--clients", type=int, default=10_000)
    parser.add_argument("--agencies", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=4, help="STRIPE_CONCURRENCY for the tick")
    parser.add_argument(
        "--schedulers", type=int, default=1,
        help="report with this many scheduler processes at once (each runs report_pending_units until nothing "
             "is due; claims keep them apart)",
    )  # fmt: skip
    parser.add_argument(
        "--clients-per-round", type=int, default=CLIENTS_PER_ROUND,
        help="clients an aggregation round holds at once (billing.units.CLIENTS_PER_ROUND by default)",
    )  # fmt: skip
    parser.add_argument(
        "--aggregation-only", action="store_true",
        help="stop after aggregation (memory runs at many clients: the tick's figures need another run)",
    )  # fmt: skip
    parser.add_argument(
        "--stripe-latency-ms", type=float, default=0.0,
        help="the fake Stripe answers each call this much later, as a real round trip would (default: at once)",
    )  # fmt: skip
    parser.add_argument(
        "--fake-server", choices=("asyncio", "gunicorn"), default="asyncio",
        help="what serves the fake Stripe: a minimal asyncio HTTP/1.1 keep-alive server, or gunicorn gthread",
    )  # fmt: skip
    args = parser.parse_args()

    # The fake Stripe runs in its own process, as Stripe would: its request handling must not compete with
    # the tick for this process's GIL (it would measure the fake, not Rebill).
    context = multiprocessing.get_context("spawn")
    conn, child_conn = context.Pipe()
    fake = context.Process(
        target=serve_fake_stripe,
        args=(child_conn, args.agencies, args.clients // args.agencies, args.fake_server, args.stripe_latency_ms / 1e3),
    )
    fake.start()
    stripe_url, accounts = conn.recv()
    wait_until_serving(stripe_url)

    name = f"rebill_bench_{uuid.uuid4().hex[:10]}"
    admin = psycopg.connect(ADMIN_URL, autocommit=True)
    admin.execute(f'CREATE DATABASE "{name}"')
    url = ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + f"/{name}"
    try:
        config = {
            "REBILL_ENV": "test", "DATABASE_URL": url, "SECRET_KEY": secrets.token_urlsafe(32),
            "REBILL_ENCRYPTION_KEYS": Fernet.generate_key().decode(), "STRIPE_API_BASE": stripe_url,
            "STRIPE_NETWORK_ATTEMPTS": 1, "STRIPE_CONCURRENCY": args.concurrency, "REBILL_LOG_LEVEL": "WARNING",
        }  # fmt: skip
        app = create_app(config)
        with app.app_context():
            upgrade()
            print(f"loading {args.events:,} events for {args.clients:,} clients of {args.agencies} agencies...")
            load(url, accounts, args)
            ok = run(stripe_url, args, config)
            db.session.remove()
            db.engine.dispose()
    finally:
        fake.terminate()  # SIGTERM: gunicorn shuts down gracefully
        fake.join(30)
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()
    if not ok:
        sys.exit(1)


def serve_fake_stripe(conn, agencies: int, clients_per_agency: int, server: str, latency: float = 0.0) -> None:
    """Child process: build each agency's Stripe account (meter, price, customers), then serve it.

    Not FakeStripeServer's werkzeug server: it closes the connection after every request, while Stripe (and
    Rebill's connection pool) keep connections alive, so a werkzeug-served fake would charge the tick a TCP
    handshake per call that production never pays. The fake shares the machine's cores with Rebill and
    PostgreSQL, so its host's own cost shows in the tick's wall time: ``serve_keep_alive`` (below) costs the
    fake's process about half of what gunicorn's gthread worker does per call (figures: bench/README.md).
    """
    state = FakeStripeState()
    accounts = []
    for a in range(1, agencies + 1):
        key = f"sk_test_bench{a:04d}{secrets.token_hex(8)}"
        state.add_account(key)
        meter = state.create_meter(key, "ai_units")
        product = state.create_product(key, "AI units")
        price = state.create_price(key, product, 10, meter=meter)
        customers = [state.create_customer(key)["id"] for _ in range(clients_per_agency)]
        accounts.append({"key": key, "meter": meter["id"], "product": product["id"], "price": price["id"],
                         "customers": customers})
    fake = FakeStripeApp(state)

    def app(environ, start_response):
        if environ["PATH_INFO"] == "/_bench/cpu":  # the fake's own CPU seconds (all its threads)
            body = json.dumps({"cpu": time.process_time()}).encode()
            start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]
        if environ["PATH_INFO"] != "/_bench/ledger":
            if latency and server == "gunicorn":
                time.sleep(latency)  # one of gunicorn's threads waits; the asyncio host waits in its loop
            return fake(environ, start_response)
        events = [event for account in accounts for event in state.meter_events(account["key"])]
        body = json.dumps({
            "posts": sum(1 for call in state.calls if call.method == "POST"), "events": len(events),
            "units": sum(int(event["payload"]["value"]) for event in events),
        }).encode()  # fmt: skip
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    conn.send((f"http://127.0.0.1:{port}", accounts))
    if server == "asyncio":
        serve_keep_alive(app, "127.0.0.1", port, latency)
        return

    from gunicorn.app.base import BaseApplication

    class Server(BaseApplication):
        def load_config(self):
            for name, value in {"bind": f"127.0.0.1:{port}", "workers": 1, "worker_class": "gthread",
                                "threads": 8, "keepalive": 60, "loglevel": "warning", "accesslog": None}.items():
                self.cfg.set(name, value)

        def load(self):
            return app

    Server().run()


def serve_keep_alive(app, host: str, port: int, latency: float = 0.0) -> None:
    """Serve a WSGI app over HTTP/1.1 with keep-alive on one asyncio thread (the bench's fake Stripe host).

    Just what the bench's clients send: requests with a Content-Length body (or none), one at a time per
    connection; each is answered with a Content-Length body, and the connection is kept unless the client
    says "Connection: close". The app runs on the event loop: fine for the in-memory fake, whose fault
    injection (hangs) the bench does not use. ``latency`` (seconds) delays each answer but the bench's own
    (``/_bench/...``) on the event loop, so other connections are served meanwhile.
    """

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                method, target, protocol = head[0].split(" ", 2)
                headers = {}
                for line in head[1:]:
                    if line:
                        name, _, value = line.partition(":")
                        headers[name.strip().lower()] = value.strip()
                length = int(headers.get("content-length") or 0)
                body = await reader.readexactly(length) if length else b""
                path, _, query = target.partition("?")
                environ = {
                    "REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": query, "SERVER_NAME": host,
                    "SERVER_PORT": str(port), "SERVER_PROTOCOL": protocol, "CONTENT_LENGTH": str(length),
                    "CONTENT_TYPE": headers.get("content-type", ""), "wsgi.input": io.BytesIO(body),
                    "wsgi.errors": sys.stderr, "wsgi.url_scheme": "http", "wsgi.version": (1, 0),
                    "wsgi.multithread": False, "wsgi.multiprocess": False, "wsgi.run_once": False,
                    **{f"HTTP_{name.upper().replace('-', '_')}": value for name, value in headers.items()
                       if name not in ("content-length", "content-type")},
                }  # fmt: skip
                answer: dict = {}

                def start_response(status, response_headers, exc_info=None, answer=answer):
                    answer["status"], answer["headers"] = status, response_headers

                if latency and not path.startswith("/_bench/"):
                    await asyncio.sleep(latency)
                chunks = app(environ, start_response)
                try:
                    payload = b"".join(chunks)
                finally:
                    getattr(chunks, "close", lambda: None)()
                close = headers.get("connection", "").lower() == "close"
                lines = [f"HTTP/1.1 {answer['status']}"]
                lines += [f"{name}: {value}" for name, value in answer["headers"]
                          if name.lower() not in ("content-length", "connection")]  # fmt: skip
                lines += [f"Content-Length: {len(payload)}", f"Connection: {'close' if close else 'keep-alive'}"]
                writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload)
                await writer.drain()
                if close:
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            return  # the client closed its connection
        finally:
            writer.close()

    async def serve() -> None:
        async with await asyncio.start_server(handle, host, port) as listener:
            await listener.serve_forever()

    asyncio.run(serve())


def wait_until_serving(url: str) -> None:
    """Block until the fake answers (gunicorn binds after the child sent its address)."""
    for _ in range(600):
        try:
            requests.get(f"{url}/_bench/ledger", timeout=1)
            return
        except requests.ConnectionError:
            time.sleep(0.05)
    raise SystemExit("the fake Stripe did not start")


def load(url: str, accounts: list[dict], args) -> None:
    """COPY agencies, clients and usage events (not timed)."""
    box = secret_box()
    now = dt.datetime.now(dt.UTC)
    rng = random.Random(7)
    agencies, clients = [], []
    for a, account in enumerate(accounts, start=1):
        key = account["key"]
        agencies.append((a, f"company-{a}", box.encrypt(key), key[-4:], "test", "ok", now, now))
        for customer in account["customers"]:
            client_id = len(clients) + 1
            clients.append((
                client_id, a, f"client {client_id}", "capri_api", f"chan-{client_id}", f"chan-{client_id}",
                account["product"], account["price"], customer, "tokens", BILLING_UNIT, "active", "meter",
                account["meter"], "ai_units", "stripe_customer_id", "value", "sum", secrets.token_hex(8), now, now,
                now,  # term_started_at: the clients exist when their usage arrives (rule 11)
            ))  # fmt: skip

    def usage_events():
        for n in range(args.events):
            client = clients[n % len(clients)]
            tokens = rng.randrange(0, 2000)
            yield (
                client[1], "capri", f"ev-{n}", client[4], tokens // 2, tokens - tokens // 2, 1,
                now - dt.timedelta(seconds=n % 3600), now, "pending", 0,
            )  # fmt: skip

    raw = url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(raw) as conn:
        copy_rows(
            conn,
            "agency (id, company_id, stripe_key_ciphertext, stripe_key_last4, stripe_mode, stripe_key_status, "
            "created_at, updated_at)",
            agencies,
        )
        copy_rows(
            conn,
            "rebill_client (id, agency_id, nickname, provider, channel_id, source_key, stripe_product_id, "
            "stripe_price_id, stripe_customer_id, charge_by, billing_unit, status, report_mode, meter_id, "
            "meter_event_name, meter_customer_key, meter_value_key, meter_formula, report_prefix, created_at, "
            "updated_at, term_started_at)",
            clients,
        )
        copy_rows(
            conn,
            "usage_event (agency_id, source, source_event_id, channel_id, input_tokens, output_tokens, "
            "messages, occurred_at, received_at, state, counted)",
            usage_events(),
        )
        for table in ("agency", "rebill_client"):
            conn.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}))")
        conn.execute("ANALYZE")


def copy_rows(conn, target: str, rows) -> None:
    """COPY ``rows`` into ``target``, a table with its column list, streaming them."""
    with conn.cursor().copy(f"COPY {target} FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)


def in_child(job: str, config: dict, ready, go, results, clients_per_round: int = CLIENTS_PER_ROUND) -> None:
    """One of Rebill's processes: connect, wait for the common start, run ``job``, send back what it did.

    "aggregate": one aggregation pass and its commit (what a scheduler tick does first). "report":
    report_pending_units until nothing is due (a budget of an hour: the figure is throughput).
    """
    app = create_app(config)
    with app.app_context():
        # Connected before the clock starts; the backend's pid, to read the CPU PostgreSQL spends on this job.
        backend = db.session.scalar(text("SELECT pg_backend_pid()"))
        db.session.commit()
        ready.put(os.getpid())
        go.wait()
        started, cpu, backend_cpu = time.perf_counter(), time.process_time(), process_cpu(backend)
        if job == "aggregate":
            result = aggregate_pending_usage(clients_per_round=clients_per_round)
            db.session.commit()
        else:
            result = report_pending_units(budget=dt.timedelta(hours=1))
        results.put({**vars(result), "seconds": time.perf_counter() - started, "cpu": time.process_time() - cpu,
                     "backend_cpu": process_cpu(backend) - backend_cpu, "rss_mb": peak_rss_mb()})  # fmt: skip


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) a process on this machine has used: here, a PostgreSQL backend.

    CPU, unlike wall time, is barely blurred by other work on a shared machine (bench/README.md).
    """
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb() -> float:
    """This process's peak RSS since it started its program (VmHWM).

    Not getrusage's ru_maxrss: Linux carries it over fork and exec, so a spawned child reports at least the
    bench's own peak at the time it was started.
    """
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_in_processes(job: str, config: dict, processes: int, *extra) -> tuple[float, list[dict]]:
    """Run ``job`` in ``processes`` fresh processes released together; return the wall time and each one's result."""
    context = multiprocessing.get_context("spawn")
    ready, results, go = context.Queue(), context.Queue(), context.Event()
    arguments = (job, config, ready, go, results, *extra)
    children = [context.Process(target=in_child, args=arguments) for _ in range(processes)]
    for child in children:
        child.start()
    for _ in children:
        ready.get(timeout=120)
    started = time.perf_counter()
    go.set()
    each: list[dict] = []
    while len(each) < len(children):
        try:
            each.append(results.get(timeout=5))
        except queue.Empty:  # a process that died never answers: stop instead of waiting for it
            if failed := [child.exitcode for child in children if child.exitcode not in (None, 0)]:
                raise SystemExit(f"a Rebill process ({job}) exited with {failed[0]}; see its traceback above") from None
    wall = time.perf_counter() - started
    for child in children:
        child.join(60)
    return wall, each


def run(stripe_url: str, args, config: dict) -> bool:
    """Time aggregation and one reporting tick; print the figures; tell whether the call count is exact."""
    load_before = os.getloadavg()[0]
    wal_start = db.session.scalar(text("SELECT pg_current_wal_lsn()"))
    db.session.commit()
    aggregation_s, (aggregation,) = run_in_processes("aggregate", config, 1, args.clients_per_round)
    wal_mb = db.session.scalar(text("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), :start)"), {"start": wal_start})
    clients_with_units = db.session.scalar(
        select(func.count(func.distinct(UnitReport.client_id))).where(UnitReport.status == "pending")
    )
    db.session.commit()
    if args.aggregation_only:
        print(f"aggregation: {aggregation['events']:,} events -> {aggregation['units']:,} units in "
              f"{aggregation_s:.2f} s ({aggregation['events'] / aggregation_s:,.0f} events/s), "
              f"{aggregation['reports']:,} outbox rows for {clients_with_units:,} clients (rounds of at most "
              f"{args.clients_per_round:,}); CPU of its process "
              f"{aggregation['cpu']:.1f} s, of its PostgreSQL backend {aggregation['backend_cpu']:.1f} s, peak RSS "
              f"{aggregation['rss_mb']:.0f} MB; WAL written (whole server) "
              f"{float(wal_mb) / 2**20:,.0f} MB; load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}")
        return aggregation["events"] == args.events and aggregation["reports"] == clients_with_units
    fake_cpu_start = requests.get(f"{stripe_url}/_bench/cpu", timeout=60).json()["cpu"]
    # The whole backlog in one tick per process: the figure is throughput (the scheduler's budget would split it).
    reporting_s, each = run_in_processes("report", config, args.schedulers)
    reporting = ReportingResult()
    for field in fields(ReportingResult):
        setattr(reporting, field.name, sum(result[field.name] for result in each))
    fake_cpu = requests.get(f"{stripe_url}/_bench/cpu", timeout=60).json()["cpu"] - fake_cpu_start
    ledger = requests.get(f"{stripe_url}/_bench/ledger", timeout=60).json()
    bench_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    print(f"aggregation: {aggregation['events']:,} events -> {aggregation['units']:,} units in {aggregation_s:.2f} s "
          f"({aggregation['events'] / aggregation_s:,.0f} events/s), {aggregation['reports']:,} outbox rows; "
          f"CPU of its process {aggregation['cpu']:.1f} s, of its PostgreSQL backend "
          f"{aggregation['backend_cpu']:.1f} s, peak RSS {aggregation['rss_mb']:.0f} MB; WAL written (whole server) "
          f"{float(wal_mb) / 2**20:,.0f} MB")
    print(f"reporting tick: {reporting.reports_sent:,} reports sent ({reporting.units_sent:,} units) in "
          f"{reporting_s:.2f} s ({reporting.reports_sent / reporting_s:,.0f} reports/s), "
          f"failed {reporting.reports_failed}, retrying {reporting.reports_retrying}; CPU of Rebill's "
          f"process(es) {sum(r['cpu'] for r in each):.1f} s, of the fake Stripe ({args.fake_server}, "
          f"{args.stripe_latency_ms:g} ms a call) {fake_cpu:.1f} s")
    print(f"  by {args.schedulers} scheduler process(es), each: " + "; ".join(
        f"{r['reports_sent']:,} reports in {r['seconds']:.2f} s, CPU {r['cpu']:.1f} s, peak RSS {r['rss_mb']:.0f} MB"
        for r in each
    ))  # fmt: skip
    print(f"stripe calls: {reporting.stripe_calls:,} (the fake saw {ledger['posts']:,} POSTs, holds "
          f"{ledger['units']:,} units); clients with new units: {clients_with_units:,}")
    print(f"wall time (aggregation + tick): {aggregation_s + reporting_s:.2f} s; peak RSS of Rebill's processes: "
          f"aggregation {aggregation['rss_mb']:.0f} MB, reporting {max(r['rss_mb'] for r in each):.0f} MB (the bench's "
          f"own process, with the generated rows: {bench_mb:.0f} MB); load average {load_before:.1f} -> "
          f"{os.getloadavg()[0]:.1f}")
    ok = (reporting.stripe_calls == clients_with_units == ledger["posts"] and reporting.reports_failed == 0
          and ledger["units"] == aggregation["units"])
    print("one Stripe call per client with new units, every unit in Stripe:", "yes" if ok else "NO")
    return ok


if __name__ == "__main__":
    main()
