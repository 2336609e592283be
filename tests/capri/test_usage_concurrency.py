"""Concurrent identical (and overlapping, differently ordered) batches count every event once."""

from __future__ import annotations

import random
import threading
from collections import Counter

from capri.api_keys import authenticate
from core.database import db
from tests.capri.conftest import event, ledger_rows, make_keyed_agency, post_usage

THREADS = 6


def _post_together(app, key: str, batches: list[dict]) -> list:
    barrier = threading.Barrier(len(batches))
    responses: list = [None] * len(batches)
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            client = app.test_client()
            barrier.wait(timeout=30)
            responses[index] = post_usage(client, key, batches[index])
        except BaseException as error:  # surfaced in the main thread below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(index,)) for index in range(len(batches))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    return responses


def test_concurrent_identical_batches_are_counted_once(app, app_context, postgres_only):
    agency = make_keyed_agency("company-a")
    # Record the key's use now, so the requests race on the ledger insert itself, not on the key's row.
    authenticate(agency.key)
    db.session.commit()
    events = [event(id=f"evt-{n}", input_tokens=n + 1) for n in range(200)]
    responses = _post_together(app, agency.key, [{"events": events}] * THREADS)

    assert [response.status_code for response in responses] == [200] * THREADS
    accepted = Counter()
    for response in responses:
        for result in response.get_json()["results"]:
            assert result["status"] in {"accepted", "duplicate"}
            accepted[result["id"]] += result["status"] == "accepted"
    assert accepted == Counter({item["id"]: 1 for item in events})
    rows = ledger_rows(agency.id)
    assert len(rows) == 200
    assert sum(row.input_tokens for row in rows) == sum(range(1, 201))


def test_concurrent_overlapping_batches_in_different_orders_neither_deadlock_nor_double(
    app, app_context, postgres_only
):
    agency = make_keyed_agency("company-a")
    authenticate(agency.key)
    db.session.commit()
    events = [event(id=f"evt-{n}") for n in range(300)]
    shuffler = random.Random(5)
    batches = []
    for _ in range(THREADS):
        chosen = shuffler.sample(events, 200)
        batches.append({"events": chosen})
    responses = _post_together(app, agency.key, batches)

    assert [response.status_code for response in responses] == [200] * THREADS
    accepted = Counter(
        result["id"]
        for response in responses
        for result in response.get_json()["results"]
        if result["status"] == "accepted"
    )
    sent = {item["id"] for batch in batches for item in batch["events"]}
    assert set(accepted) == sent and set(accepted.values()) == {1}
    assert len(ledger_rows(agency.id)) == len(sent)
