"""Black box: GHL message webhooks sent all at once to gunicorn started exactly as the Procfile's web line
(gevent workers, gunicorn.conf.py) are each answered 200 and stored exactly once.

On PostgreSQL they go through each worker's group commit (ghl.message_ingest), whose waits are greenlet
switches under gevent; on SQLite through the Flask route. Copies of some deliveries race their originals, and
more copies come after: one of each pair is processed, every other copy is a duplicate that records nothing.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from sqlalchemy import select

from billing.agencies import ensure_agency
from billing.models import UsageEvent
from core.database import db
from ghl.locations import upsert_location
from tests.conftest import TEST_ENCRYPTION_KEY, TEST_SECRET_KEY
from tests.ghl.fake_ghl import CLIENT_ID, COMPANY_ID, deliveries, encode, load_payload

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "deploy"))
from local_topology import wait_for  # noqa: E402

LOCATION_ID = "ezgb5h8dePEYGiwg0WSu"  # the recorded OutboundMessage delivery's subaccount
MESSAGES = 64
RACING_COPIES = 16  # the first 16 deliveries are sent twice in the same burst
LATE_COPIES = 16  # and once more afterwards


@pytest.fixture
def procfile_web(database_url, make_app, signer, tmp_path):
    """Seed an agency with its installed subaccount; start the Procfile's web line; yield its URL and log."""
    app = make_app(**signer.config())
    with app.app_context():
        upsert_location(ensure_agency(COMPANY_ID).id, LOCATION_ID, name="Installed", installed=True)
        db.session.commit()
        db.session.remove()
        db.engine.dispose()  # gunicorn's workers are the only clients while they run
    port = free_port()
    web = next(line for line in (REPO / "Procfile").read_text().splitlines() if line.startswith("web:"))
    command = web.removeprefix("web:").strip().replace("${PORT:-8000}", str(port)).replace("0.0.0.0", "127.0.0.1")
    environ = {
        "PATH": f"{sys.prefix}/bin:{os.environ['PATH']}",
        "REBILL_ENV": "production",
        "DATABASE_URL": database_url,
        "SECRET_KEY": TEST_SECRET_KEY,
        "REBILL_ENCRYPTION_KEYS": TEST_ENCRYPTION_KEY,
        "GHL_CLIENT_ID": CLIENT_ID,
        "GHL_CLIENT_SECRET": "test-ghl-client-secret",
        **signer.config(),  # the test key instead of GHL's published one
    }
    log = tmp_path / "gunicorn.log"
    with log.open("wb") as out:
        server = subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=REPO, env=environ, stdout=out,
                                  stderr=subprocess.STDOUT)  # fmt: skip
    try:
        wait_for(f"http://127.0.0.1:{port}/healthz", server, "gunicorn")
        yield f"http://127.0.0.1:{port}", log
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def post_together(url: str, bodies: list[bytes], signer) -> list[tuple[int, dict]]:
    """POST every body at once (one thread and connection each, released together); return the answers in order."""
    barrier = threading.Barrier(len(bodies))

    def deliver(body: bytes) -> tuple[int, dict]:
        barrier.wait()
        answer = requests.post(f"{url}/webhooks/ghl", data=body, headers=signer.headers(body), timeout=30)
        return answer.status_code, answer.json()

    with ThreadPoolExecutor(max_workers=len(bodies)) as pool:
        return list(pool.map(deliver, bodies))


def message(number: int) -> bytes:
    payload = load_payload("outbound_message") | {"messageId": f"msg-burst-{number:03d}", "locationId": LOCATION_ID}
    return encode(payload, webhook_id=f"wh-burst-{number:03d}")


def test_a_burst_of_message_webhooks_is_stored_exactly_once_under_the_procfiles_gunicorn(
    procfile_web, make_app, signer
):
    url, log = procfile_web
    bodies = [message(number) for number in range(MESSAGES)]
    burst = post_together(url, bodies + bodies[:RACING_COPIES], signer)
    late = post_together(url, bodies[:LATE_COPIES], signer)

    assert all(code == 200 for code, _ in burst + late), Counter(code for code, _ in burst + late)
    raced = [Counter((burst[n][1]["status"], burst[MESSAGES + n][1]["status"])) for n in range(RACING_COPIES)]
    assert all(outcome == Counter(("processed", "duplicate")) for outcome in raced), raced  # one wins each race
    assert [answer for _, answer in burst[RACING_COPIES:MESSAGES]] == [{"status": "processed"}] * (
        MESSAGES - RACING_COPIES
    )
    assert [answer for _, answer in late] == [{"status": "duplicate"}] * LATE_COPIES

    with make_app(**signer.config()).app_context():
        stored = Counter(delivery.webhook_id for delivery in deliveries())
        counted = Counter(db.session.scalars(select(UsageEvent.source_event_id)))
    assert stored == Counter(f"wh-burst-{number:03d}" for number in range(MESSAGES))  # each exactly once
    assert counted == Counter(f"msg-burst-{number:03d}" for number in range(MESSAGES))  # one usage event each

    output = log.read_text()
    assert "Using worker: core.gunicorn_worker.BalancedGeventWorker" in output
    # gevent's MonkeyPatchWarning (a module patched after it was imported), or any other warning or crash.
    assert not re.search(r"\w+Warning: |Traceback", output), output
