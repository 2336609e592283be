"""CPU cost of one POST /webhooks/ghl in-process, without HTTP: the figure wrk runs on a shared machine blur.

    .venv/bin/python bench/webhook_cpu.py [--requests 3000] [--app rebill|bare] [--profile]
    .venv/bin/python bench/webhook_cpu.py --instructions      # under valgrind: slow, but repeatable

Sends signed OutboundMessage deliveries (each with its own webhookId and messageId) straight into the WSGI
app (``app.wsgi_app``), one after another, against a throwaway PostgreSQL database seeded like
webhook_bench.py, and prints CPU time per request (``time.process_time``: this process only, so the
database server's share is not in it). ``--app bare`` measures webhook_bench.py's bare endpoint instead.

CPU seconds still depend on what else the cores run. ``--instructions`` counts instructions with
callgrind instead, which do not: it signs the bodies first, then runs itself twice under valgrind (N and
3N requests) and prints the difference per request, so start-up and migrations cancel out.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import re
import secrets
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import psycopg
from cryptography.fernet import Fernet
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from webhook_bench import CLIENT_ID, COMPANY_ID, LOCATION_ID, outbound_message, signed_delivery  # noqa: E402

WARM_UP = 200


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--app", choices=["rebill", "bare"], default="rebill")
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--threads", type=int, default=1, help="send from this many threads at once")
    parser.add_argument("--profile", action="store_true", help="print cProfile's top functions (CPU time)")
    parser.add_argument("--instructions", action="store_true", help="count instructions under callgrind")
    parser.add_argument("--signed", type=Path, help=argparse.SUPPRESS)  # bodies signed by --instructions
    args = parser.parse_args()
    if args.instructions:
        return count_instructions(args)
    public_pem, bodies = read_signed(args.signed) if args.signed else sign_bodies(WARM_UP + args.requests)
    if args.app == "bare":
        from webhook_bench import create_bare_app

        return measure(create_bare_app(), bodies, args)
    admin = psycopg.connect(args.postgres, autocommit=True)
    database = f"rebill_bench_{uuid.uuid4().hex[:10]}"
    admin.execute(f'CREATE DATABASE "{database}"')
    try:
        os.environ.update(
            {
                "REBILL_ENV": "production",
                "DATABASE_URL": args.postgres.rsplit("/", 1)[0] + f"/{database}",
                "SECRET_KEY": secrets.token_urlsafe(32),
                "REBILL_ENCRYPTION_KEYS": Fernet.generate_key().decode(),
                "GHL_CLIENT_ID": CLIENT_ID,
                "GHL_CLIENT_SECRET": "bench-client-secret",
                "GHL_WEBHOOK_ED25519_KEY": public_pem,
                "REBILL_LOG_LEVEL": "WARNING",
            }
        )
        from app import create_app
        from core.database import db

        app = create_app()
        with app.app_context():
            seed()
        try:
            return measure(app, bodies, args)
        finally:
            with app.app_context():
                db.engine.dispose()
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        admin.close()


def seed() -> None:
    """Migrate and seed one agency with one installed subaccount, as webhook_bench.py does."""
    from flask_migrate import upgrade

    from billing.agencies import ensure_agency
    from core.database import db
    from ghl.locations import upsert_location

    upgrade()
    upsert_location(ensure_agency(COMPANY_ID).id, LOCATION_ID, name="Bench", installed=True)
    db.session.commit()


def measure(app, bodies: list[tuple[str, bytes]], args) -> int:
    """Send WARM_UP + ``args.requests`` signed deliveries; print CPU per request of the measured ones."""
    environs = [environ_for(signature, body) for signature, body in bodies[: WARM_UP + args.requests]]
    answers: list[str] = []

    def start_response(status, headers, exc_info=None):
        answers.append(status)

    def send(environ) -> None:
        for _ in app.wsgi_app(environ, start_response):
            pass

    for environ in environs[:WARM_UP]:
        send(environ)
    measured = environs[WARM_UP:]
    if args.profile:
        import cProfile
        import pstats

        profile = cProfile.Profile(time.process_time)
        profile.runcall(lambda: [send(environ) for environ in measured])
        pstats.Stats(profile).sort_stats("cumulative").print_stats(40)
    elif args.threads > 1:
        # Concurrent senders, as a worker's concurrent requests are: the group commit writes shared batches.
        batcher = getattr(app.extensions.get("ghl.message_ingest"), "batches", None)
        before = (batcher.batches, batcher.items) if batcher else (0, 0)
        shares = [measured[n :: args.threads] for n in range(args.threads)]
        threads = [threading.Thread(target=lambda share=share: [send(e) for e in share]) for share in shares]
        started, wall = time.process_time(), time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        cpu, wall = time.process_time() - started, time.perf_counter() - wall
        batches = ""
        if batcher:
            batches = f"; {batcher.items - before[1]} deliveries in {batcher.batches - before[0]} batches"
        print(
            f"{args.app}: {args.requests} requests from {args.threads} threads in {wall:.2f} s "
            f"({args.requests / wall:.0f}/s), {cpu / args.requests * 1e6:.0f} µs CPU per request{batches}"
        )
    else:
        started = time.process_time()
        for environ in measured:
            send(environ)
        cpu = time.process_time() - started
        print(f"{args.app}: {args.requests} requests, {cpu / args.requests * 1e6:.0f} µs CPU per request")
    if set(answers) != {"200 OK"}:
        print(f"unexpected answers: {sorted(set(answers))}", file=sys.stderr)
        return 1
    return 0


def sign_bodies(count: int) -> tuple[str, list[tuple[str, bytes]]]:
    """Make a key; return its public PEM and ``count`` signed OutboundMessages, each with its own ids."""
    key = ed25519.Ed25519PrivateKey.generate()
    message = outbound_message()
    bodies = [signed_delivery(key, message, f"cpu-{number:08d}") for number in range(count)]
    public_pem = (
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    ).decode()
    return public_pem, bodies


def read_signed(path: Path) -> tuple[str, list[tuple[str, bytes]]]:
    """Read what write_signed wrote: the public PEM, then one signature and body per line."""
    lines = path.read_text().splitlines()
    public_pem = base64.b64decode(lines[0]).decode()
    return public_pem, [(signature, body.encode()) for signature, body in (line.split("\t", 1) for line in lines[1:])]


def write_signed(path: Path, public_pem: str, bodies: list[tuple[str, bytes]]) -> None:
    lines = [base64.b64encode(public_pem.encode()).decode()] + [f"{sig}\t{body.decode()}" for sig, body in bodies]
    path.write_text("\n".join(lines) + "\n")


def environ_for(signature: str, body: bytes) -> dict:
    """A WSGI environ for one signed delivery."""
    return {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": "/webhooks/ghl",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8000",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(body),
        "wsgi.errors": sys.stderr,
        "CONTENT_TYPE": "application/json",
        "CONTENT_LENGTH": str(len(body)),
        "HTTP_X_GHL_SIGNATURE": signature,
    }


def count_instructions(args) -> int:
    """Run this script under callgrind for N and 3N requests; print the instructions per request."""

    low = max(args.requests // 10, 100)  # valgrind runs Python ~50x slower
    with tempfile.TemporaryDirectory(prefix="rebill-webhook-cpu-") as workdir:
        signed = Path(workdir) / "signed.tsv"
        write_signed(signed, *sign_bodies(WARM_UP + 3 * low))  # outside valgrind: signing is not measured

        def collected(requests: int) -> int:
            command = [
                "valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, __file__,
                "--app", args.app, "--requests", str(requests), "--postgres", args.postgres, "--signed", str(signed),
            ]  # fmt: skip
            output = subprocess.run(command, capture_output=True, text=True, check=True).stderr
            return int(re.search(r"Collected : ([\d,]+)", output).group(1).replace(",", ""))

        per_request = (collected(3 * low) - collected(low)) / (2 * low)
    print(f"{args.app}: {per_request / 1e3:,.0f} k instructions per request (callgrind, {low} and {3 * low} requests)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
