"""POST /api/v1/usage counts events by outcome and times each batch."""

from __future__ import annotations

from tests.capri.conftest import event, post_usage
from tests.metrics_support import Deltas


def test_usage_events_are_counted_by_outcome_and_batches_timed(client, agency):
    deltas = Deltas(
        ("rebill_usage_events_received_total", {"outcome": "accepted"}),
        ("rebill_usage_events_received_total", {"outcome": "duplicate"}),
        ("rebill_usage_events_received_total", {"outcome": "rejected"}),
        ("rebill_ingest_request_duration_seconds_count", {"endpoint": "usage_api", "code": "200"}),
        ("rebill_ingest_request_duration_seconds_count", {"endpoint": "usage_api", "code": "401"}),
    )
    first, second = event(), event()
    assert post_usage(client, agency.key, {"events": [first, second, event(messages=-1)]}).status_code == 200
    assert post_usage(client, agency.key, {"events": [first]}).status_code == 200
    assert post_usage(client, "rbk_wrong", {"events": [event()]}).status_code == 401
    assert deltas() == [2, 1, 1, 2, 1]
