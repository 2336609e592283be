"""Black box, adversarial: how long a CPU-bound request stalls the message webhooks of its gevent worker.

gunicorn.conf.py: a greenlet is never preempted, so Python CPU between two waits stalls every request of its
worker; it claimed ~0.25-0.3 s of parsing in one slice for the worst ``POST /api/v1/usage`` (a valid key, at
most 4 MiB). A webhook answered too late is lost (GHL retries only a 429). Here one agency's key sends a few
worst-case bodies at once (4 MiB of small nested arrays: json.loads would build ~2 million lists, each a GC
allocation, before the 1000-event limit could refuse the batch; since the fix the body is refused before it
is parsed) while webhooks keep arriving; each webhook must still be answered within STALL_BOUND. The load
ends when the heavy requests are answered, not on a timer.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import requests

from billing.agencies import ensure_agency
from capri.api_keys import create_api_key
from capri.validation import MAX_BODY_BYTES
from core.database import db
from tests.ghl.fake_ghl import COMPANY_ID, encode, load_payload
from tests.ghl.test_webhooks_under_gunicorn import (  # noqa: F401 (procfile_web is the fixture used)
    LOCATION_ID,
    procfile_web,
)

HEAVY_REQUESTS = 4  # at once, from one key: a client's retry loop, or a bug in its batching
# Refused before parsing, each heavy request costs a count over its 4 MiB (~4 ms, gunicorn.conf.py); a webhook
# may wait for the heavy requests of its own worker.
STALL_BOUND = 1.0
UNIT = b"[" * 20 + b"]" * 20 + b","


def worst_usage_body() -> bytes:
    return b'{"events":[' + UNIT * ((MAX_BODY_BYTES - 20) // len(UNIT) - 1) + b"0]}"


def test_a_few_worst_case_usage_bodies_stall_the_webhooks_of_their_worker_no_longer_than_claimed(
    postgres_only,
    procfile_web,  # noqa: F811 (the imported fixture)
    make_app,
    signer,
):
    url, _log = procfile_web
    with make_app(**signer.config()).app_context():
        _, key = create_api_key(ensure_agency(COMPANY_ID).id, "heavy")
        db.session.commit()
    heavy = worst_usage_body()
    assert len(heavy) <= MAX_BODY_BYTES
    heavy_done = threading.Event()
    latencies: list[tuple[float, int]] = []

    def webhooks() -> None:
        number = 0
        session = requests.Session()
        while not heavy_done.is_set():
            payload = load_payload("outbound_message") | {"messageId": f"msg-stall-{number}", "locationId": LOCATION_ID}
            body = encode(payload, webhook_id=f"wh-stall-{number}")
            started = time.monotonic()
            answer = session.post(f"{url}/webhooks/ghl", data=body, headers=signer.headers(body), timeout=60)
            latencies.append((time.monotonic() - started, answer.status_code))
            number += 1

    def usage() -> int:
        answer = requests.post(
            f"{url}/api/v1/usage", data=heavy, timeout=120,
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )  # fmt: skip
        return answer.status_code

    # Two webhook senders, so that each worker is likely to hold one in flight during the stall.
    senders = [threading.Thread(target=webhooks) for _ in range(2)]
    for sender in senders:
        sender.start()
    try:
        with ThreadPoolExecutor(max_workers=HEAVY_REQUESTS) as pool:
            codes = list(pool.map(lambda _: usage(), range(HEAVY_REQUESTS)))
    finally:
        heavy_done.set()
        for sender in senders:
            sender.join()
    assert codes == [413] * HEAVY_REQUESTS  # too many events (since the fix: refused before it is parsed)
    assert all(code == 200 for _, code in latencies)
    slowest = max(latency for latency, _ in latencies)
    assert slowest < STALL_BOUND, f"a webhook waited {slowest:.2f} s behind {HEAVY_REQUESTS} usage requests"
