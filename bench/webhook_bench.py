"""Benchmark POST /webhooks/ghl against a bare Flask endpoint, both under the same gunicorn settings.

    .venv/bin/python bench/webhook_bench.py [--duration 10] [--rounds 3] [--connections 16] [--gunicorn-options "..."]
    .venv/bin/python bench/webhook_bench.py --compare a36eeb2~1    # before/after: that revision's Rebill too

What it does, in one run:
1. creates a throwaway PostgreSQL database per Rebill (this tree's, and one per --compare revision, each migrated
   by that tree's migrations), seeds one agency with one installed subaccount in each;
2. pre-signs (Ed25519, a key generated for the run and injected through GHL_WEBHOOK_ED25519_KEY) one
   OutboundMessage body per request, each with its own webhookId and messageId, into files that a wrk
   Lua script loads and cycles through (every wrk thread takes its own share);
3. starts gunicorn with the Procfile's web options (or --gunicorn-options) on Rebill, and the same on a
   bare Flask app whose endpoint only parses the JSON and answers 200, and on a reference app that also
   verifies the signature with Rebill's verifier but stores nothing (what verification alone costs);
4. drives the three at full speed with wrk in --rounds alternating rounds (all servers stay up; round 1 runs
   bare, verify, Rebill, round 2 the reverse, ...), so other load on the machine hits both apps alike; then
   Rebill at half its median full-speed rate; with --compare REVISION (repeatable), Rebill as of that git
   revision runs too, from an exported tree on a database migrated by its own migrations, in the same
   rounds; and reports requests/s, the ratio Rebill/bare per round and their median, p50/p99 latency, the
   load averages after every round, the CPU per 2xx of each run (the server's gunicorn processes: "app µs";
   the PostgreSQL backends of that Rebill's own database: "db µs"; both much steadier than rates on a shared
   machine), how wrk's connections were shared between the server's workers in each run ("split", e.g. 8/8
   or 3/13: drawn anew by every run, see connection_split), and whether anything was lost: delivery rows
   stored == 2xx, for every Rebill run.

wrk2 (constant-rate) is not available: the half-rate run paces requests with wrk's per-request delay()
hook, each thread handing out send slots at rate/threads (an open schedule, like wrk2, but latency is
measured from the actual send, so a stall is not charged to the requests queued behind it).

Exact loss accounting: wrk stops mid-flight, and a request in flight at the cut-off may be stored but
never counted. So every run ends with a one-second tail that sends only requests to /bench-sentinel
(404, stores nothing): when wrk stops, no signed request is in flight, and rows must equal 2xx exactly.
The tail's fast 404s are in wrk's latency histogram (about a tenth of the samples), which can only
lower p50, not p99.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
from cryptography.fernet import Fernet
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from flask import Flask, jsonify, request

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CLIENT_ID = "6650aaaabbbbccccdddd0001-benchmark"
APP_ID = CLIENT_ID.split("-")[0]
COMPANY_ID = "benchCompany00000001"
LOCATION_ID = "benchLocation0000001"
TAIL_SECONDS = 1
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SPLIT_AFTER = 3  # seconds into a run when the connections' split between workers is read
MAX_RATE_GUESS = 6000  # bodies signed per second of run; more than this machine can take

LUA = r"""
local ffi = require("ffi")
ffi.cdef[[ typedef struct { long tv_sec; long tv_nsec; } rb_timespec; int clock_gettime(int, rb_timespec *); ]]
local clock = ffi.new("rb_timespec")
local function now() ffi.C.clock_gettime(1, clock); return tonumber(clock.tv_sec) + tonumber(clock.tv_nsec) / 1e9 end

local threads, created = {}, 0
function setup(thread)
  thread:set("id", created)
  created = created + 1
  table.insert(threads, thread)
end

local requests, index, sentinel, valid_until, interval, next_slot = {}, 0, nil, 0, 0, 0
ok, notfound, other, wrapped = 0, 0, 0, 0

function init(args)
  local path, nthreads, valid, rate = args[1], tonumber(args[2]), tonumber(args[3]), tonumber(args[4])
  local id, line_number = tonumber(wrk.thread:get("id")), 0
  for line in io.lines(path) do
    if line_number % nthreads == id then
      local signature, body = line:match("^([^\t]+)\t(.*)$")
      requests[#requests + 1] = wrk.format("POST", "/webhooks/ghl",
        {["Content-Type"] = "application/json", ["X-GHL-Signature"] = signature}, body)
    end
    line_number = line_number + 1
  end
  sentinel = wrk.format("POST", "/bench-sentinel", {["Content-Type"] = "application/json"}, "{}")
  valid_until = now() + valid
  if rate > 0 then interval = 1 / rate end
  next_slot = now()
end

function request()
  if now() >= valid_until then return sentinel end
  index = index + 1
  if index > #requests then index, wrapped = 1, wrapped + 1 end
  return requests[index]
end

function response(status, headers, body)
  if status >= 200 and status < 300 then ok = ok + 1
  elseif status == 404 then notfound = notfound + 1
  else other = other + 1 end
end

%DELAY%

function done(summary, latency, requests)
  local totals = {ok = 0, notfound = 0, other = 0, wrapped = 0}
  for _, thread in ipairs(threads) do
    for name, _ in pairs(totals) do totals[name] = totals[name] + tonumber(thread:get(name)) end
  end
  local errors = summary.errors
  io.write(string.format(
    'BENCH {"requests":%d,"ok":%d,"sentinel":%d,"other":%d,"wrapped":%d,"socket_errors":%d,' ..
    '"duration_us":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d}\n',
    summary.requests, totals.ok, totals.notfound, totals.other, totals.wrapped,
    errors.connect + errors.read + errors.write + errors.timeout, summary.duration,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""

PACED_DELAY = r"""
function delay()
  local t = now()
  if next_slot < t then next_slot = t end
  local wait = next_slot - t
  next_slot = next_slot + interval
  return math.floor(wait * 1000 + 0.5)
end
"""


def create_bare_app(verify: bool = False) -> Flask:
    """The baseline: an endpoint that only parses the JSON body and answers 200.

    With ``verify``, the reference: it first checks the signature with Rebill's own verifier (the key in
    GHL_WEBHOOK_ED25519_KEY) and stores nothing, so its rate is the ceiling for any Rebill that verifies.
    """
    app = Flask("bare")
    verifier = None
    if verify:
        from ghl.signatures import WebhookVerifier

        verifier = WebhookVerifier(os.environ["GHL_WEBHOOK_ED25519_KEY"], None)

    @app.post("/webhooks/ghl")
    def receive():
        body = request.get_data()
        if verifier is not None and verifier.verify(body, request.headers) is None:
            return jsonify(error="missing or invalid webhook signature"), 401
        json.loads(body)
        return jsonify(status="ok"), 200

    @app.get("/healthz")
    def healthz():
        return jsonify(status="ok")

    return app


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds of signed requests per run")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--port", type=int, default=18431)
    parser.add_argument(
        "--rebill-target", default="app:create_app()", help="gunicorn target for Rebill (for what-if experiments)"
    )
    parser.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="REVISION",
        help="also run Rebill as of this git revision (e.g. a36eeb2~1), alternated in the same rounds; repeatable",
    )
    parser.add_argument(
        "--gunicorn-options",
        help="gunicorn options for every app (default: the Procfile's web line, without bind and target; a --compare "
        "revision's Rebill then runs with that revision's Procfile)",
    )
    parser.add_argument("--no-verify-reference", action="store_true", help="skip the verify-only reference app")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of bare, verify and Rebill")
    args = parser.parse_args()
    args.compare_options = {}  # each --compare revision's own gunicorn options, unless given for every app
    args.own_procfiles = args.gunicorn_options is None
    if args.own_procfiles:
        args.gunicorn_options = procfile_gunicorn_options()

    workdir = Path(tempfile.mkdtemp(prefix="rebill-webhook-bench-"))
    admin = psycopg.connect(args.postgres, autocommit=True)
    databases: list[str] = []

    def new_database() -> str:
        """A throwaway database (dropped at the end): one for this tree, one per --compare revision."""
        database = f"rebill_bench_{uuid.uuid4().hex[:10]}"
        admin.execute(f'CREATE DATABASE "{database}"')
        databases.append(database)
        return args.postgres.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + f"/{database}"

    database_url = new_database()
    key = ed25519.Ed25519PrivateKey.generate()
    env = server_env(database_url, key)
    try:
        prepare_database(env)
        results = run_all(args, env, key, workdir, new_database)
    finally:
        try:
            drop_databases(args.postgres, databases)
        finally:
            admin.close()
            shutil.rmtree(workdir, ignore_errors=True)  # the signed bodies: tens of MB per run
    report(args, results)
    return 0 if results["lost"] == 0 else 1


def server_env(database_url: str, key: ed25519.Ed25519PrivateKey) -> dict[str, str]:
    """The environment a benchmarked Rebill runs with: production settings on ``database_url`` (SQLAlchemy's
    postgresql+psycopg:// form), verifying webhooks with ``key``'s public half."""
    return os.environ | {
        "REBILL_ENV": "production",
        "DATABASE_URL": database_url,
        "SECRET_KEY": secrets.token_urlsafe(32),
        "REBILL_ENCRYPTION_KEYS": Fernet.generate_key().decode(),
        "GHL_CLIENT_ID": CLIENT_ID,
        "GHL_CLIENT_SECRET": "bench-client-secret",
        "GHL_WEBHOOK_ED25519_KEY": key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode(),
        "REBILL_LOG_LEVEL": "WARNING",
    }


def drop_databases(postgres_url: str, databases: list[str]) -> None:
    """Drop the bench's databases, each on its own (one that cannot be dropped is named, the rest still go), on
    a fresh connection: the one that created them sat idle through the whole bench."""
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        for database in databases:
            try:
                admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
            except psycopg.Error as error:
                print(f"WARNING: could not drop the bench database {database}: {error}", file=sys.stderr)


def prepare_database(env: dict[str, str], tree: Path = ROOT) -> None:
    """Migrate the throwaway database with ``tree``'s migrations and seed one agency with one installed
    subaccount (with this seed code, run in ``tree``: a --compare revision must have the same two functions)."""
    code = (
        "from flask_migrate import upgrade\n"
        "from app import create_app\n"
        "from core.database import db\n"
        "from billing.agencies import ensure_agency\n"
        "from ghl.locations import upsert_location\n"
        "app = create_app()\n"
        "with app.app_context():\n"
        "    upgrade()\n"
        f"    upsert_location(ensure_agency({COMPANY_ID!r}).id, {LOCATION_ID!r}, name='Bench', installed=True)\n"
        "    db.session.commit()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tree, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"migrating and seeding the bench database in {tree} failed:\n{done.stderr[-3000:]}")


def run_all(args, env, key, workdir: Path, new_database: Callable[[], str]) -> dict:
    """``--rounds`` alternating rounds of the references and each Rebill at full speed, then each Rebill at half
    its rate.

    Every server runs for the whole bench (an idle one costs nothing), so the rounds alternate without
    restarts: round 1 bare, verify, Rebill (then each --compare revision); round 2 in the reverse order; and
    so on. What other processes do to the machine then lands on every app alike. Bodies are signed before any
    server starts; each Rebill gets its own webhookId prefix, so its stored rows are counted apart. Each
    --compare revision runs on a database of its own, migrated by that revision's migrations, so a change
    of schema is measured with its code (env's DATABASE_URL is this tree's, prepared by main()).
    """
    urls = {"rebill": env["DATABASE_URL"]}
    results: dict = {"load": [load_average()], "rounds": [], "half": {}}
    reference_files = sign_bodies(key, workdir, "reference", args.duration + 2)
    rebills = [("rebill", args.rebill_target, ROOT)]
    for number, revision in enumerate(args.compare):
        tree = export_revision(revision, workdir / f"tree{number}")
        rebills.append((f"rebill@{revision}", "app:create_app()", tree))
        urls[f"rebill@{revision}"] = new_database()
        prepare_database(env | {"DATABASE_URL": urls[f"rebill@{revision}"]}, tree)
        if args.own_procfiles:
            args.compare_options[f"rebill@{revision}"] = procfile_gunicorn_options(tree)
    prefixes = {name: "" if number == 0 else f"c{number}" for number, (name, _, _) in enumerate(rebills)}
    rebill_files = {
        (name, run): sign_bodies(key, workdir, f"{prefixes[name]}{run}", args.duration)
        for name in prefixes
        for run in [*(f"full{n}" for n in range(args.rounds)), "half"]
    }
    warm = sign_bodies(key, workdir, "warm", 2)
    apps = [("bare", "webhook_bench:create_bare_app()", args.port)]
    if not args.no_verify_reference:
        apps.append(("verify", "webhook_bench:create_bare_app(verify=True)", args.port + 2))
    ports = {name: port for name, _, port in apps}
    servers = {}
    try:
        for name, target, port in apps:
            bench_path = ["--pythonpath", str(ROOT / "bench")]
            servers[name] = start_gunicorn(target, port, env, args.gunicorn_options, extra=bench_path)
            wrk(args, reference_files, 2, 0, port)  # warm-up
        for number, (name, target, tree) in enumerate(rebills):
            ports[name] = args.port + 1 if number == 0 else args.port + 2 + number
            options = args.compare_options.get(name, args.gunicorn_options)
            servers[name] = start_gunicorn(target, ports[name], env | {"DATABASE_URL": urls[name]}, options, cwd=tree)
            wrk(args, warm, 2, 0, ports[name])
        runs = list(ports)
        for number in range(args.rounds):
            figures = {}
            for name in runs if number % 2 == 0 else reversed(runs):
                bodies, url = reference_files, urls["rebill"]  # a reference app: no database of its own
                if name in prefixes:
                    bodies, url = rebill_files[name, f"full{number}"], urls[name]
                with (
                    cpu_per_answer(servers[name], url) as figures[name],
                    connection_split(servers[name], ports[name], args.duration, figures[name]),
                ):
                    figures[name] |= wrk(args, bodies, args.duration, 0, ports[name])
                if name in prefixes:
                    figures[name]["stored"] = stored_rows(urls[name], f"{prefixes[name]}full{number}-")
            results["rounds"].append(figures)
            results["load"].append(load_average())
        for name in prefixes:
            rates = sorted(figures[name]["rate"] for figures in results["rounds"])
            half_rate = rates[len(rates) // 2] / 2
            with (
                cpu_per_answer(servers[name], urls[name]) as half,
                connection_split(servers[name], ports[name], args.duration, half),
            ):
                half |= wrk(args, rebill_files[name, "half"], args.duration, half_rate, ports[name])
            half["stored"] = stored_rows(urls[name], f"{prefixes[name]}half-")
            half["target_rate"] = half_rate
            results["half"][name] = half
            results["load"].append(load_average())
        results["usage_events"] = sum(usage_rows(url) for url in urls.values())
    finally:
        for server in servers.values():
            stop(server)
    results["rebills"] = list(prefixes)
    rebill_runs = [figures[name] for figures in results["rounds"] for name in prefixes] + list(results["half"].values())
    results["lost"] = sum(max(0, run["ok"] - run["stored"]) for run in rebill_runs)
    results["acknowledged"] = sum(run["ok"] for run in rebill_runs)
    results["stored"] = sum(run["stored"] for run in rebill_runs)
    return results


def export_revision(revision: str, tree: Path) -> Path:
    """Write the files of git ``revision`` (e.g. a36eeb2~1) into ``tree``, to run that Rebill next to this one.

    It runs in the same virtualenv, on a database migrated by its own migrations (run_all).
    """
    tree.mkdir()
    archive = subprocess.run(["git", "archive", revision], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


@contextmanager
def cpu_per_answer(server: subprocess.Popen, database_url: str) -> Iterator[dict]:
    """Yield a dict for a run's figures; add the CPU the server's processes (gunicorn master and workers) and
    the bench database's PostgreSQL backends used during it, per 2xx, in microseconds.

    CPU per answer moves much less with the machine's other load than requests per second do (a loaded
    machine slows both apps, but each request still costs about what it costs), so it separates before
    from after where the rates cannot.
    """
    database = database_url.rsplit("/", 1)[1]
    figures: dict = {}
    server_before, database_before = process_cpu(server.pid), backends_cpu(database)
    yield figures
    answers = max(figures["ok"], 1)
    figures["server_us"] = (process_cpu(server.pid) - server_before) / answers * 1e6
    figures["database_us"] = (backends_cpu(database) - database_before) / answers * 1e6


@contextmanager
def connection_split(server: subprocess.Popen, port: int, seconds: int, figures: dict) -> Iterator[None]:
    """Record in ``figures["split"]`` how wrk's connections were shared between the server's workers, read once
    SPLIT_AFTER seconds into the run (e.g. "3/13"; "+2" after it: two connections not accepted yet).

    gunicorn's workers race to accept them, and wrk opens all of them at once, so each run draws its own split.
    A batching server feels a strongly uneven one: a worker with 3 connections writes batches of at most 3
    while the other is saturated (bench/README.md, fifth pass: 1/15 and 3/13 cost Rebill up to 15-20 %).
    Read halfway through runs shorter than 2 x SPLIT_AFTER.
    """
    found: list[str] = []
    delay = min(SPLIT_AFTER, seconds / 2)
    timer = threading.Timer(delay, lambda: found.append(_split(server.pid, port)))
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        timer.join()
        figures["split"] = found[0] if found else "-"


def _split(server_pid: int, port: int) -> str:
    """Established connections on ``port`` per worker of the server (/proc/net/tcp and the workers' fds), "-"
    when no worker was found."""
    established = []  # socket inodes; "0" for each connection not accepted yet
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":  # 01: ESTABLISHED
                established.append(fields[9])  # the socket's inode
    queued = established.count("0")  # in the accept queue: no process holds it yet
    counts = []
    for pid, parent, _cpu, _command in _processes():
        if parent != server_pid:
            continue
        try:
            descriptors = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:  # the worker ended meanwhile
            continue
        count = 0
        for descriptor in descriptors:
            try:
                target = os.readlink(descriptor)
            except OSError:  # closed meanwhile
                continue
            if target.startswith("socket:[") and target[8:-1] in established:
                count += 1
        counts.append(count)
    if not counts:
        return "-"
    return "/".join(str(count) for count in sorted(counts)) + (f"+{queued}" if queued else "")


def _processes() -> Iterator[tuple[int, int, float, bytes]]:
    """(pid, parent pid, CPU seconds used, command line) of every process that can be read."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            command = (entry / "cmdline").read_bytes()
        except OSError:  # it ended meanwhile
            continue
        yield int(entry.name), int(stat[1]), (int(stat[11]) + int(stat[12])) / CLOCK_TICKS, command


def process_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` and its children (a gunicorn master and its workers; workers live through a run)."""
    return sum(cpu for child, parent, cpu, _ in _processes() if pid in (child, parent))


def backends_cpu(database: str) -> float:
    """CPU seconds of the PostgreSQL backends connected to ``database`` (their title names it)."""
    return sum(cpu for _, _, cpu, command in _processes() if command.startswith(b"postgres: ") and
               f" {database} ".encode() in command)  # fmt: skip


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def outbound_message() -> dict:
    """Return a real OutboundMessage delivery (GHL's highlevel-api-docs#260) dated now, without its ids."""
    return {
        "type": "OutboundMessage",
        "locationId": LOCATION_ID,
        "versionId": APP_ID,
        "appId": APP_ID,
        "attachments": [],
        "body": "Hi there",
        "contactId": "M96zrsDWGhHNvlX7XagM",
        "contentType": "text/plain",
        "conversationId": "h0VYhyhDhebobpHpjP9w",
        "dateAdded": "2026-02-26T15:40:14.307Z",
        "direction": "outbound",
        "messageType": "SMS",
        "messageTypeId": 2,
        "messageTypeString": "TYPE_SMS",
        "userId": "hN1nLpe3EmzSU5ybqosH",
        "status": "delivered",
        "source": "app",
        # Signed just before the run: Rebill refuses deliveries dated more than 2 h ago (ghl.webhooks).
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
    }


def signed_delivery(key: ed25519.Ed25519PrivateKey, message: dict, ids: str) -> tuple[str, bytes]:
    """Return the base64 signature and compact JSON body of ``message`` with ``ids`` as its ids."""
    body = json.dumps(message | {"messageId": ids, "webhookId": ids}, separators=(",", ":")).encode()
    return base64.b64encode(key.sign(body)).decode(), body


def sign_bodies(key: ed25519.Ed25519PrivateKey, workdir: Path, run: str, seconds: int) -> Path:
    """Write one signed OutboundMessage per line: base64 signature, a tab, the compact JSON body."""
    path = workdir / f"{run}.tsv"
    message = outbound_message()
    with path.open("w") as out:
        for number in range(seconds * MAX_RATE_GUESS):
            signature, body = signed_delivery(key, message, f"{run}-{number:08d}")
            out.write(f"{signature}\t{body.decode()}\n")
    return path


def wrk(args, bodies: Path, seconds: int, rate: float, port: int) -> dict:
    """Run wrk for ``seconds`` of signed requests plus the sentinel tail; return its figures."""
    script = bodies.with_suffix(".lua")
    script.write_text(LUA.replace("%DELAY%", PACED_DELAY if rate else ""))
    command = [
        "wrk",
        f"-t{args.threads}",
        f"-c{args.connections}",
        f"-d{seconds + TAIL_SECONDS}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        f"http://127.0.0.1:{port}",
        "--",
        str(bodies),
        str(args.threads),
        str(seconds),
        str(rate / args.threads if rate else 0),
    ]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    match = re.search(r"^BENCH (\{.*\})$", output, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"wrk printed no figures:\n{output}")
    figures = json.loads(match.group(1))
    figures["seconds"] = seconds
    figures["rate"] = figures["ok"] / seconds
    return figures


def procfile_gunicorn_options(root: Path = ROOT) -> str:
    """The gunicorn options of the Procfile's web line (workers, worker class, threads, logs), minus bind and target.

    The benchmark then measures what production runs; the access log it may ask for goes to /dev/null here.
    """
    line = next(line for line in (root / "Procfile").read_text().splitlines() if line.startswith("web:"))
    words = shlex.split(line.removeprefix("web:"))
    if words[0] != "gunicorn":
        raise RuntimeError(f"the Procfile's web line does not run gunicorn: {line}")
    options, skip = [], False
    for word in words[1:-1]:  # the last word is the app target
        if skip:
            skip = False
        elif word in ("--bind", "-b"):
            skip = True
        else:
            options.append(word)
    return shlex.join(options)


def start_gunicorn(
    target: str, port: int, env: dict[str, str], options: str, extra: list[str] | None = None, cwd: Path = ROOT
):
    """Start gunicorn with ``options`` (the same for every app of a run) and wait until it answers."""
    with socket.socket() as probe:  # another run's server on this port would answer our health check
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gunicorn: TIME_WAIT is no owner
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            raise RuntimeError(f"port {port} is in use (another benchmark running?); pass --port") from None
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            *shlex.split(options),
            "--bind",
            f"127.0.0.1:{port}",
            "--log-level",
            "warning",
            *(extra or []),
            target,
        ],
        cwd=cwd,  # python -m puts it first on sys.path: --compare runs another revision's tree
        env=env,
        stdout=subprocess.DEVNULL,  # an access log, if the options ask for one
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as answer:
                if answer.status == 200:
                    return process
        except OSError:
            time.sleep(0.2)
    stop(process)
    raise RuntimeError(f"gunicorn on port {port} did not start")


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()


def stored_rows(database_url: str, prefix: str) -> int:
    """Processed deliveries whose webhookId starts with ``prefix`` (the schema of this tree and of every revision
    compared so far: ghl_webhook_delivery.webhook_id and status)."""
    with psycopg.connect(database_url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        return conn.execute(
            "SELECT count(*) FROM ghl_webhook_delivery WHERE webhook_id LIKE %s AND status = 'processed'",
            (prefix + "%",),
        ).fetchone()[0]


def usage_rows(database_url: str) -> int:
    with psycopg.connect(database_url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        return conn.execute("SELECT count(*) FROM usage_event WHERE source = 'ghl'").fetchone()[0]


def report(args, results: dict) -> None:
    ms = 1000.0
    print(
        f"\nwebhook bench: gunicorn {args.gunicorn_options}, wrk -t{args.threads} -c{args.connections}, "
        f"{args.rounds} alternating rounds of {args.duration}s per app (+{TAIL_SECONDS}s sentinel tail), "
        f"PostgreSQL, {os.cpu_count()} CPUs"
    )
    for name, options in args.compare_options.items():
        print(f"Rebill {name.removeprefix('rebill')}: gunicorn {options} (that revision's Procfile)")
    print(f"load averages (1/5/15 min): start {results['load'][0]}; after each round and each half-rate run: "
          + "; ".join(results["load"][1:]))
    print(
        f"{'run':<34}{'2xx/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'2xx':>9}{'stored':>9}"
        f"{'other':>7}{'errors':>7}{'app µs':>8}{'db µs':>7}  split"
    )
    names = {"bare": "bare Flask", "verify": "verify only"} | {
        name: "Rebill" if name == "rebill" else f"Rebill {name.removeprefix('rebill')}" for name in results["rebills"]
    }

    def line(name: str, figures: dict) -> None:
        print(
            f"{name:<34}{figures['rate']:>9.0f}{figures['p50_us'] / ms:>9.2f}{figures['p99_us'] / ms:>9.2f}"
            f"{figures['max_us'] / ms:>9.1f}{figures['ok']:>9}{figures.get('stored', '-')!s:>9}"
            f"{figures['other']:>7}{figures['socket_errors']:>7}"
            f"{figures['server_us']:>8.0f}{figures['database_us']:>7.0f}  {figures.get('split', '-')}"
        )

    for number, figures in enumerate(results["rounds"], 1):
        for key, name in names.items():
            if key in figures:
                line(f"round {number}: {name}, max", figures[key])
    for name in results["rebills"]:
        line(f"{names[name]}, half of max", results["half"][name])
    rounds = results["rounds"]
    for name in results["rebills"]:
        ratios = [figures[name]["rate"] / figures["bare"]["rate"] for figures in rounds]
        half = results["half"][name]
        print(
            f"{names[name]}: ratio to bare per round {', '.join(f'{r:.2f}' for r in ratios)}; "
            f"median {sorted(ratios)[len(ratios) // 2]:.2f} (goal >= 0.6); half-rate target "
            f"{half['target_rate']:.0f}/s, achieved {half['rate']:.0f}/s, p50 {half['p50_us'] / ms:.2f} ms, "
            f"p99 {half['p99_us'] / ms:.2f} ms (goal < 20 ms)"
        )
    if "verify" in rounds[0]:
        verify_ratios = [figures["verify"]["rate"] / figures["bare"]["rate"] for figures in rounds]
        print(
            f"ratio verify-only/bare per round: {', '.join(f'{r:.2f}' for r in verify_ratios)} "
            "(the ceiling for any Rebill that checks signatures)"
        )
    print(
        f"{results['lost']} lost (2xx without a stored row) of {results['acknowledged']} acknowledged "
        f"({results['stored']} stored); usage events recorded: {results['usage_events']}"
    )
    every = [run for figures in results["rounds"] for run in figures.values()] + list(results["half"].values())
    if any(run["wrapped"] for run in every):
        print("WARNING: wrk ran out of pre-signed bodies and reused some (raise MAX_RATE_GUESS)")


if __name__ == "__main__":
    sys.exit(main())
