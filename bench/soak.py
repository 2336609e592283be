"""Soak test with faults, run by hand: the production topology under steady load while processes are killed.

    .venv/bin/python bench/soak.py [--seconds 60] [--rate 1000] [--usage-batches 10] [--port 18480]

1. Starts deploy/'s topology on this machine (deploy/local_topology.py: nginx -> two gunicorn, two
   schedulers, a throwaway PostgreSQL database), with a tick every 5 s and a fake Stripe in a child process.
2. Seeds agencies with installed subaccounts and API channels, each mapped by a client on a metered price.
3. Through nginx, for --seconds: signed GHL OutboundMessage webhooks at --rate per second (an open schedule:
   requests are due at fixed times, whatever the answers), plus --usage-batches usage-API batches per second
   of 50 events. A request that gets no 2xx is sent again after a second (GHL redelivers 429s), up to 5 times.
4. Faults: SIGKILL web-1 (gunicorn master and workers) at 25 % of the run, restart it at 35 %; SIGKILL
   scheduler-1 at 50 %, restart it at 60 %.
5. Waits until every usage event is aggregated and every unit reported (rows the killed scheduler had
   leased wait out their 5-minute lease), then checks: every 2xx-acknowledged webhook and usage event is in
   the ledger exactly once; per client, units in the fake Stripe == floor(counted usage / N) == units
   logged; no meter-event identifier was accepted twice; no delivery failed.
Prints the achieved rates, p50/p99 latency, errors by kind, the load average, and the checks; exit 1 if a
check fails. Needs PostgreSQL at 127.0.0.1:5432 (REBILL_BENCH_POSTGRES_URL) and Debian's nginx.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime as dt
import json
import multiprocessing
import os
import random
import secrets
import socket
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import psycopg
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "deploy")]

from billing_bench import serve_keep_alive, wait_until_serving  # noqa: E402
from local_topology import Topology  # noqa: E402

ADMIN_URL = os.environ.get("REBILL_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
CLIENT_ID = "6650aaaabbbbccccdddd0001-soak"
APP_ID = CLIENT_ID.split("-")[0]
AGENCIES = 10
LOCATIONS_PER_AGENCY = 5
CHANNELS_PER_AGENCY = 3
MESSAGE_UNIT = 7  # N for message clients
TOKEN_UNIT = 1000  # N for token clients
USAGE_BATCH = 50
ATTEMPTS = 5
CONNECTIONS = 48
GRACE_SECONDS = 60  # after the schedule ends, for answers and retries still due
DRAIN_SECONDS = 420  # a killed scheduler's leased rows wait out the 5-minute lease (billing.report_claims.LEASE)


# ---- the fake Stripe, in a child process (its request handling must not share the load generator's GIL) ----


def serve_fake_stripe(conn) -> None:
    from stripe_fake import FakeStripeApp, FakeStripeState

    state = FakeStripeState()
    accounts = []
    for number in range(AGENCIES):
        key = f"sk_test_soak{number:03d}{secrets.token_hex(8)}"
        state.add_account(key)
        meter = state.create_meter(key, "ai_units")
        product = state.create_product(key, "AI units")
        price = state.create_price(key, product, 10, meter=meter)
        customers = [state.create_customer(key)["id"] for _ in range(LOCATIONS_PER_AGENCY + CHANNELS_PER_AGENCY)]
        accounts.append({"key": key, "meter": meter, "product": product["id"], "price": price["id"],
                         "customers": customers})  # fmt: skip
    fake = FakeStripeApp(state)

    def app(environ, start_response):
        if environ["PATH_INFO"] != "/_soak/ledger":
            return fake(environ, start_response)
        accepted = Counter(
            call.params.get("identifier") for call in state.calls
            if call.method == "POST" and call.path == "/v1/billing/meter_events" and call.status == 200
        )  # fmt: skip
        totals = {
            customer: state.total_units(account["key"], customer, "ai_units")
            for account in accounts
            for customer in account["customers"]
        }
        body = json.dumps({"accepted": accepted, "totals": totals}).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    conn.send((f"http://127.0.0.1:{port}", accounts))
    serve_keep_alive(app, "127.0.0.1", port)


# ---- seeding ------------------------------------------------------------------------------------------------


def seed(env: dict[str, str], accounts: list[dict]) -> dict:
    """Agencies with their Stripe key, subaccounts, API keys and one client per subaccount / channel."""
    from app import create_app
    from billing.agencies import ensure_agency
    from billing.models import RebillClient
    from capri.api_keys import create_api_key
    from core.config import ENVIRONMENT_VARIABLES
    from core.database import db
    from core.encryption import secret_box
    from ghl.locations import upsert_location

    app = create_app({name: env[name] for name in ENVIRONMENT_VARIABLES if name in env})
    world = {"locations": [], "channels": [], "api_keys": {}, "clients": []}
    with app.app_context():
        for number, account in enumerate(accounts):
            agency = ensure_agency(f"soakCompany{number:03d}", f"Soak agency {number}")
            agency.stripe_key_ciphertext = secret_box().encrypt(account["key"])
            agency.stripe_key_last4 = account["key"][-4:]
            agency.stripe_mode = "test"
            agency.stripe_key_status = "ok"
            db.session.flush()
            customers = iter(account["customers"])
            sources = [("ghl", f"soakLoc{number:03d}x{n}", "messages", MESSAGE_UNIT)
                       for n in range(LOCATIONS_PER_AGENCY)]  # fmt: skip
            sources += [("capri_api", f"soak-chan-{number}-{n}", "tokens", TOKEN_UNIT)
                        for n in range(CHANNELS_PER_AGENCY)]  # fmt: skip
            for provider, source, charge_by, unit in sources:
                if provider == "ghl":
                    upsert_location(agency.id, source, name=f"Subaccount {source}", installed=True)
                    world["locations"].append(source)
                else:
                    world["channels"].append((agency.company_id, source))
                meter = account["meter"]
                db.session.add(RebillClient(
                    agency_id=agency.id, nickname=source, provider=provider, source_key=source,
                    channel_id=source if provider == "capri_api" else None,
                    location_id=source if provider == "ghl" else None,
                    stripe_product_id=account["product"], stripe_price_id=account["price"],
                    stripe_customer_id=next(customers), charge_by=charge_by, billing_unit=unit,
                    message_source="ghl_outbound" if provider == "ghl" else None, report_mode="meter",
                    meter_id=meter["id"], meter_event_name=meter["event_name"],
                    meter_customer_key=meter["customer_mapping"]["event_payload_key"],
                    meter_value_key=meter["value_settings"]["event_payload_key"],
                    meter_formula=meter["default_aggregation"]["formula"],
                ))  # fmt: skip
            world["api_keys"][agency.company_id] = create_api_key(agency.id, "soak")[1]
        db.session.commit()
        db.session.remove()
        db.engine.dispose()
    return world


def sign_webhooks(key: ed25519.Ed25519PrivateKey, locations: list[str], count: int) -> list[tuple[str, bytes, bytes]]:
    """``count`` signed OutboundMessage deliveries: (messageId, headers, body)."""
    rng = random.Random(13)
    now = dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")
    run = uuid.uuid4().hex[:8]
    signed = []
    for number in range(count):
        message_id = f"soak-{run}-{number:07d}"
        body = json.dumps({
            "type": "OutboundMessage", "appId": APP_ID, "locationId": rng.choice(locations),
            "messageId": message_id, "webhookId": f"wh-{message_id}", "contactId": "soakContact",
            "conversationId": "soakConversation", "dateAdded": now, "timestamp": now, "direction": "outbound",
            "messageType": "SMS", "body": "soak", "status": "delivered",
        }, separators=(",", ":")).encode()  # fmt: skip
        signature = base64.b64encode(key.sign(body)).decode()
        headers = f"Content-Type: application/json\r\nX-GHL-Signature: {signature}\r\n".encode()
        signed.append((message_id, headers, body))
    return signed


# ---- the load generator ---------------------------------------------------------------------------------------


class HttpConnection:
    """One keep-alive HTTP/1.1 connection to nginx (what the generator needs: Content-Length or chunked answers)."""

    def __init__(self, port: int):
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, path: str, headers: bytes, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            head = f"POST {path} HTTP/1.1\r\nHost: soak.test\r\nContent-Length: {len(body)}\r\n".encode()
            self.writer.write(head + headers + b"\r\n" + body)
            await self.writer.drain()
            status = int((await self.reader.readline()).split(b" ", 2)[1])
            fields = {}
            while (line := await self.reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                fields[name.strip().lower()] = value.strip()
            if fields.get("transfer-encoding") == "chunked":
                chunks = []
                while size := int((await self.reader.readline()).strip(), 16):
                    chunks.append(await self.reader.readexactly(size + 2))
                await self.reader.readline()
                answer = b"".join(chunk[:-2] for chunk in chunks)
            else:
                answer = await self.reader.readexactly(int(fields.get("content-length", 0)))
            if fields.get("connection", "").lower() == "close":
                self.close()
            return status, answer
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


class Load:
    """Sends due requests, retries failures, and records acknowledgements, latencies and errors."""

    def __init__(self, port: int):
        self.port = port
        self.queue: asyncio.Queue = asyncio.Queue()
        self.acked_webhooks: set[str] = set()
        self.acked_usage: set[tuple[str, str]] = set()
        self.latency: dict[str, list[float]] = {"webhook": [], "usage": []}
        self.errors: Counter = Counter()
        self.given_up: Counter = Counter()
        self.unsent: Counter = Counter()
        self.in_flight = 0
        self.last_ack: float | None = None

    async def worker(self) -> None:
        connection = HttpConnection(self.port)
        while True:
            kind, item, attempt = await self.queue.get()
            self.in_flight += 1
            try:
                await self.send(connection, kind, item, attempt)
            finally:
                self.in_flight -= 1
                self.queue.task_done()

    async def send(self, connection: HttpConnection, kind: str, item, attempt: int) -> None:
        _, path, headers, body = item
        started = time.perf_counter()
        try:
            status, answer = await asyncio.wait_for(connection.request(path, headers, body), 30)
        except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError, IndexError) as error:
            self.errors[f"{kind} {type(error).__name__}"] += 1
            status = None
        if status is not None and 200 <= status < 300:
            self.last_ack = time.perf_counter()
            self.latency[kind].append(self.last_ack - started)
            if kind == "webhook":
                self.acked_webhooks.add(item[0])
            else:
                for result in json.loads(answer)["results"]:
                    if result["status"] in ("accepted", "duplicate"):
                        self.acked_usage.add((item[0], result["id"]))
                    else:
                        self.errors[f"usage event {result['status']}"] += 1
            return
        if status is not None:
            self.errors[f"{kind} HTTP {status}"] += 1
        if attempt + 1 >= ATTEMPTS:
            self.given_up[kind] += 1
            return
        asyncio.get_running_loop().call_later(1.0, self.queue.put_nowait, (kind, item, attempt + 1))

    async def pace(self, kind: str, items: list, rate: float, started: float) -> None:
        """Put each item on the queue at its due time (an open schedule)."""
        for number, item in enumerate(items):
            due = started + number / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            self.queue.put_nowait((kind, item, 0))


def usage_batches(world: dict, count: int) -> list:
    """``count`` usage-API batches: (company, path, headers, body) with USAGE_BATCH events each."""
    rng = random.Random(17)
    now = dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")
    run = uuid.uuid4().hex[:8]
    by_company: dict[str, list[str]] = {}
    for company, channel in world["channels"]:
        by_company.setdefault(company, []).append(channel)
    companies = sorted(by_company)
    batches = []
    for number in range(count):
        company = companies[number % len(companies)]
        events = [
            {"id": f"u-{run}-{number}-{n}", "channel": rng.choice(by_company[company]),
             "input_tokens": rng.randrange(0, 900), "output_tokens": rng.randrange(1, 400), "occurred_at": now}
            for n in range(USAGE_BATCH)
        ]  # fmt: skip
        headers = f"Content-Type: application/json\r\nAuthorization: Bearer {world['api_keys'][company]}\r\n".encode()
        batches.append((company, "/api/v1/usage", headers, json.dumps({"events": events}).encode()))
    return batches


async def run_load(topology: Topology, webhooks: list, batches: list, args) -> tuple[Load, float, float, list[str]]:
    load = Load(topology.port)
    workers = [asyncio.create_task(load.worker()) for _ in range(CONNECTIONS)]
    loop = asyncio.get_running_loop()
    timeline: list[str] = []
    started = time.perf_counter()

    async def at(fraction: float, what: str, action) -> None:
        await asyncio.sleep(max(0.0, started + fraction * args.seconds - time.perf_counter()))
        moment = time.perf_counter() - started
        await loop.run_in_executor(None, action)
        timeline.append(f"{moment:5.1f} s {what} (took {time.perf_counter() - started - moment:.1f} s)")

    faults = [
        at(0.25, "SIGKILL web-1", lambda: topology.kill("web-1")),
        at(0.35, "restart web-1", lambda: topology.restart("web-1")),
        at(0.50, "SIGKILL scheduler-1", lambda: topology.kill("scheduler-1")),
        at(0.60, "restart scheduler-1", lambda: topology.restart("scheduler-1")),
    ]
    async def progress() -> None:
        while True:
            await asyncio.sleep(10)
            print(f"  {time.perf_counter() - started:5.0f} s: {len(load.acked_webhooks):,} webhooks and "
                  f"{len(load.acked_usage):,} usage events acknowledged, {load.queue.qsize():,} queued", flush=True)

    reporter = asyncio.create_task(progress())
    await asyncio.gather(
        load.pace("webhook", [(m, "/webhooks/ghl", h, b) for m, h, b in webhooks], args.rate, started),
        load.pace("usage", batches, args.usage_batches, started),
        *faults,
    )
    sent_for = time.perf_counter() - started
    reporter.cancel()
    try:  # answers still due, and retries; what the servers cannot take by then is dropped (counted)
        await asyncio.wait_for(load.queue.join(), GRACE_SECONDS)
    except TimeoutError:
        while not load.queue.empty():
            kind, _, _ = load.queue.get_nowait()
            load.unsent[kind] += 1
            load.queue.task_done()
    for worker in workers:
        worker.cancel()
    await asyncio.gather(*workers, return_exceptions=True)  # cancelled in flight: not acknowledged
    ended = (load.last_ack or time.perf_counter()) - started
    return load, sent_for, ended, timeline


# ---- checks ------------------------------------------------------------------------------------------------


def wait_for_drain(database_url: str) -> float:
    """Wait until nothing is pending (usage aggregated, outbox sent); return the seconds it took."""
    started = time.monotonic()
    with psycopg.connect(database_url, autocommit=True) as conn:
        while True:
            pending_usage = conn.execute("SELECT count(*) FROM usage_event WHERE state = 'pending'").fetchone()[0]
            pending_reports = conn.execute("SELECT count(*) FROM unit_report WHERE status = 'pending'").fetchone()[0]
            waited = time.monotonic() - started
            if not pending_usage and not pending_reports:
                return waited
            if waited > DRAIN_SECONDS:
                print(f"  not drained after {waited:.0f} s: {pending_usage} usage events, {pending_reports} reports")
                return waited
            time.sleep(2)


def check(database_url: str, stripe_url: str, load: Load) -> list[tuple[str, bool, str]]:
    import urllib.request

    with urllib.request.urlopen(f"{stripe_url}/_soak/ledger", timeout=60) as answer:
        ledger = json.load(answer)
    results = []
    with psycopg.connect(database_url) as conn:
        ghl = {row[0] for row in conn.execute("SELECT source_event_id FROM usage_event WHERE source = 'ghl'")}
        capri = {
            (row[0], row[1])
            for row in conn.execute(
                "SELECT a.company_id, e.source_event_id FROM usage_event e JOIN agency a ON a.id = e.agency_id "
                "WHERE e.source = 'capri'"
            )
        }
        missing_webhooks = load.acked_webhooks - ghl
        results.append(("every acknowledged webhook is in the ledger (once: unique index)", not missing_webhooks,
                        f"{len(load.acked_webhooks):,} acknowledged, {len(ghl):,} in the ledger, "
                        f"{len(missing_webhooks)} missing"))  # fmt: skip
        missing_usage = load.acked_usage - capri
        results.append(("every acknowledged usage event is in the ledger", not missing_usage,
                        f"{len(load.acked_usage):,} acknowledged, {len(capri):,} in the ledger, "
                        f"{len(missing_usage)} missing"))  # fmt: skip
        not_counted = conn.execute(
            "SELECT state, count(*) FROM usage_event WHERE state <> 'counted' GROUP BY state"
        ).fetchall()
        results.append(("every usage event was counted for its client", not not_counted, f"others: {not_counted}"))
        wrong = []
        clients = conn.execute(
            "SELECT c.id, c.stripe_customer_id, c.billing_unit, c.units_logged, c.counted_usage, "
            "COALESCE((SELECT sum(e.counted) FROM usage_event e WHERE e.client_id = c.id AND e.state = 'counted'), 0) "
            "FROM rebill_client c"
        ).fetchall()
        for client_id, customer, unit, logged, counted_usage, usage in clients:
            in_stripe = ledger["totals"][customer]
            if not (in_stripe == usage // unit == logged and counted_usage == usage):
                wrong.append((client_id, usage, unit, logged, in_stripe))
        total_units = sum(ledger["totals"].values())
        results.append(("units in Stripe == floor(usage / N) == units logged, per client", not wrong,
                        f"{len(clients)} clients, {int(total_units):,} units in Stripe; "
                        f"wrong: {wrong[:5]}"))  # fmt: skip
        twice = {identifier: n for identifier, n in ledger["accepted"].items() if n > 1}
        sent = conn.execute(
            "SELECT count(*), COALESCE(sum(units), 0) FROM unit_report WHERE status = 'sent'"
        ).fetchone()
        results.append(("no identifier accepted twice; Stripe holds exactly the units sent",
                        not twice and sent[1] == total_units,
                        f"{sent[0]:,} reports sent, {len(ledger['accepted']):,} identifiers accepted, "
                        f"twice: {len(twice)}"))  # fmt: skip
        failed = conn.execute("SELECT count(*) FROM ghl_webhook_delivery WHERE status <> 'processed'").fetchone()[0]
        results.append(("every stored delivery processed", not failed, f"{failed} not processed"))
    return results


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] * 1000 if ordered else float("nan")


def metrics_summary(topology: Topology) -> list[str]:
    """A few lines of /metrics through nginx: the counters of every process, the killed ones included."""
    import urllib.request

    request = urllib.request.Request(
        f"{topology.url}/metrics", headers={"Authorization": f"Bearer {topology.env['REBILL_METRICS_TOKEN']}"}
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        text = answer.read().decode()
    wanted = ("rebill_ghl_webhooks_received_total", "rebill_usage_events_received_total", "rebill_units_sent_total",
              "rebill_stripe_calls_total", "rebill_outbox_oldest_pending_age_seconds")  # fmt: skip
    return [line for line in text.splitlines() if line.startswith(wanted) and not line.rstrip().endswith(" 0.0")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--rate", type=float, default=1000, help="signed GHL webhooks per second")
    parser.add_argument("--usage-batches", type=float, default=10, help=f"{USAGE_BATCH}-event usage batches a second")
    parser.add_argument("--port", type=int, default=18480, help="nginx; gunicorn on the next two ports")
    parser.add_argument("--keep", action="store_true", help="keep the database and run directory")
    args = parser.parse_args()

    context = multiprocessing.get_context("spawn")
    conn, child = context.Pipe()
    fake = context.Process(target=serve_fake_stripe, args=(child,), daemon=True)
    fake.start()
    stripe_url, accounts = conn.recv()
    wait_until_serving(stripe_url)

    name = f"rebill_soak_{uuid.uuid4().hex[:8]}"
    base = ADMIN_URL.rsplit("/", 1)[0]
    database_url = f"{base}/{name}"
    run_dir = Path(tempfile.mkdtemp(prefix="rebill-soak-"))
    key = ed25519.Ed25519PrivateKey.generate()
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    topology = Topology(run_dir=run_dir, database_url=database_url, port=args.port, extra_env={
        "STRIPE_API_BASE": stripe_url, "GHL_CLIENT_ID": CLIENT_ID, "GHL_CLIENT_SECRET": "soak",
        "GHL_WEBHOOK_ED25519_KEY": public_pem, "REBILL_TICK_SECONDS": "5", "REBILL_LOG_LEVEL": "WARNING",
    })  # fmt: skip
    ok = False
    try:
        print(f"starting nginx, 2 gunicorn, 2 schedulers on {name} (run directory {run_dir})...")
        topology.start()
        world = seed(topology.env, accounts)
        print(f"signing {int(args.rate * args.seconds):,} webhooks...")
        webhooks = sign_webhooks(key, world["locations"], int(args.rate * args.seconds))
        batches = usage_batches(world, int(args.usage_batches * args.seconds))
        load_before = os.getloadavg()
        print(f"load for {args.seconds} s: {args.rate:.0f} webhooks/s + {args.usage_batches:.0f} usage batches/s "
              f"of {USAGE_BATCH} events, through nginx on {CONNECTIONS} connections")  # fmt: skip
        load, sent_for, ended, timeline = asyncio.run(run_load(topology, webhooks, batches, args))
        load_after = os.getloadavg()
        print("waiting for aggregation and reporting to finish...")
        drained = wait_for_drain(database_url)
        results = check(database_url, stripe_url, load)
        report(args, load, sent_for, ended, timeline, drained, results, load_before, load_after)
        print("\n/metrics through nginx afterwards (non-zero samples):")
        for line in metrics_summary(topology):
            print(f"  {line}")
        ok = all(passed for _, passed, _ in results)
    finally:
        topology.stop()
        fake.terminate()
        if not args.keep:
            with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    return 0 if ok else 1


def report(args, load: Load, sent_for, ended, timeline, drained, results, load_before, load_after) -> None:
    webhooks, usage = load.latency["webhook"], load.latency["usage"]
    print(f"\nsoak: {args.seconds} s at {args.rate:.0f} webhooks/s target, {os.cpu_count()} CPUs, "
          f"load average before {load_before[0]:.1f} {load_before[1]:.1f} {load_before[2]:.1f}, "
          f"after {load_after[0]:.1f} {load_after[1]:.1f} {load_after[2]:.1f}")  # fmt: skip
    print(f"requests due within {args.seconds} s were queued by {sent_for:.1f} s; the last answer came at "
          f"{ended:.1f} s; not sent when the {GRACE_SECONDS} s grace ended (over capacity): {dict(load.unsent) or 0}")
    print(f"webhooks: {len(load.acked_webhooks):,} acknowledged = {len(load.acked_webhooks) / ended:,.0f}/s; "
          f"p50 {percentile(webhooks, 0.5):.1f} ms, p99 {percentile(webhooks, 0.99):.1f} ms (send to answer); "
          f"given up after {ATTEMPTS} attempts: {load.given_up['webhook']}")  # fmt: skip
    print(f"usage API: {len(load.acked_usage):,} events acknowledged = {len(load.acked_usage) / ended:,.0f}/s in "
          f"{len(usage):,} batches; p50 {percentile(usage, 0.5):.1f} ms, p99 {percentile(usage, 0.99):.1f} ms; "
          f"given up: {load.given_up['usage']}")  # fmt: skip
    print(f"errors by kind (each attempt): {dict(load.errors) or 'none'}")
    print("faults: " + "; ".join(timeline))
    print(f"drained {drained:.0f} s after the load ended")
    for name, passed, detail in results:
        print(f"  {'PASS' if passed else 'FAIL'}  {name}: {detail}")


if __name__ == "__main__":
    sys.exit(main())
