"""The ghl CLI: replay stored deliveries (failed, abandoned, or one by id), the token job, subaccount sync."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import select, update

from billing.agencies import ensure_agency
from billing.models import UsageEvent
from billing.units import aggregate_pending_usage
from core.database import db, utcnow
from ghl.jobs import retry_failed_deliveries
from ghl.locations import list_subaccounts, upsert_location
from ghl.models import GhlWebhookDelivery
from tests.billing.factories import make_client
from tests.ghl.fake_ghl import COMPANY_ID, INSTALLED_LOCATIONS_URL, TOKEN_URL, deliveries, load_payload, store_token

LOCATION_ID = "ezgb5h8dePEYGiwg0WSu"


def install_location() -> None:
    upsert_location(ensure_agency(COMPANY_ID).id, LOCATION_ID, installed=True)
    db.session.commit()


def usage_count() -> int:
    return db.session.query(UsageEvent).count()


def test_replay_failed_processes_deliveries_that_failed_before_their_subaccount_was_known(
    app_context, webhooks, runner
):
    assert webhooks.send(load_payload("outbound_message")).json == {"status": "failed"}
    assert "does not know" in deliveries()[0].error
    install_location()
    result = runner.invoke(args=["ghl", "replay", "--failed"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "replayed=1 processed=1 ignored=0 failed=0"
    [delivery] = deliveries()
    assert (delivery.status, delivery.attempts, delivery.error) == ("processed", 2, None)
    assert usage_count() == 1
    again = runner.invoke(args=["ghl", "replay", "--failed"])
    assert again.output.strip() == "replayed=0 processed=0 ignored=0 failed=0"


def test_replay_without_flags_picks_up_abandoned_deliveries_too(app_context, webhooks, runner):
    install_location()
    webhooks.send(load_payload("outbound_message"))
    # Simulate a worker that died after storing: the delivery stayed "received" and nothing was recorded.
    db.session.execute(
        update(GhlWebhookDelivery).values(status="received", attempts=0, received_at=utcnow() - dt.timedelta(hours=1))
    )
    db.session.execute(UsageEvent.__table__.delete())
    db.session.commit()
    assert runner.invoke(args=["ghl", "replay", "--failed"]).output.startswith("replayed=0")
    result = runner.invoke(args=["ghl", "replay"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("replayed=1 processed=1")
    assert usage_count() == 1


def test_a_fresh_received_delivery_is_not_replayed_under_a_live_worker(app_context, webhooks, runner):
    install_location()
    webhooks.send(load_payload("outbound_message"))
    db.session.execute(update(GhlWebhookDelivery).values(status="received"))
    db.session.commit()
    assert runner.invoke(args=["ghl", "replay"]).output.startswith("replayed=0")


def test_replay_by_id_reruns_even_a_processed_delivery_idempotently(app_context, webhooks, runner):
    install_location()
    webhooks.send(load_payload("outbound_message"))
    delivery_id = deliveries()[0].id
    result = runner.invoke(args=["ghl", "replay", "--id", str(delivery_id)])
    assert result.exit_code == 0, result.output
    assert "replayed=1" in result.output and "ignored=1" in result.output  # already recorded: counted once
    assert usage_count() == 1
    missing = runner.invoke(args=["ghl", "replay", "--id", "999999"])
    assert missing.exit_code != 0 and "no webhook delivery" in missing.output


def test_replay_exits_non_zero_when_deliveries_still_fail(app_context, webhooks, runner):
    webhooks.send(load_payload("outbound_message"))
    result = runner.invoke(args=["ghl", "replay", "--failed"])
    assert result.exit_code == 1
    assert "failed=1" in result.output
    assert deliveries()[0].attempts == 2


def test_the_retry_job_stops_after_max_attempts(app_context, webhooks):
    webhooks.send(load_payload("outbound_message"))
    for _ in range(6):
        retry_failed_deliveries()
    assert deliveries()[0].attempts == 5


def test_refresh_tokens_command_reports_its_work(app_context, runner, ghl_api):
    store_token(COMPANY_ID, expires_at=utcnow() + dt.timedelta(minutes=10))
    ghl_api.post(TOKEN_URL, json={"access_token": "a2", "refresh_token": "r2", "expires_in": 86399})
    result = runner.invoke(args=["ghl", "refresh-tokens"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "refreshed=1 needs_reauth=0 unavailable=0 minted=0"


def test_sync_locations_command_reads_installed_subaccounts(app_context, runner, ghl_api):
    agency = ensure_agency(COMPANY_ID)
    db.session.commit()
    store_token(COMPANY_ID)
    ghl_api.get(INSTALLED_LOCATIONS_URL, json=load_payload("installed_locations"))
    result = runner.invoke(args=["ghl", "sync-locations", "--company", COMPANY_ID])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "subaccounts=1"
    assert [(loc.location_id, loc.name) for loc in list_subaccounts(agency.id)] == [
        ("l1C08ntBrFjLS0elLIYU", "Downtown Dental")
    ]
    unknown = runner.invoke(args=["ghl", "sync-locations", "--company", "nobody"])
    assert unknown.exit_code != 0 and "no agency" in unknown.output
    assert db.session.scalars(select(GhlWebhookDelivery)).all() == []


def test_scenario6_a_replayed_message_keeps_its_first_receipt_and_is_not_billed_to_a_later_client(
    app_context, webhooks, runner
):
    # Rule 11: the message arrived before its subaccount was known (failed), then the agency added a client
    # for the subaccount without billing earlier usage. The replay records the message as received when
    # Rebill first received it, so the new client does not bill it.
    assert webhooks.send(load_payload("outbound_message")).json == {"status": "failed"}
    first_receipt = deliveries()[0].received_at
    install_location()
    agency = ensure_agency(COMPANY_ID)
    client = make_client(agency, provider="ghl", source_key=LOCATION_ID, charge_by="messages", billing_unit=1)
    db.session.commit()

    assert runner.invoke(args=["ghl", "replay", "--failed"]).exit_code == 0
    [event] = db.session.scalars(select(UsageEvent)).all()
    assert event.received_at == first_receipt
    aggregate_pending_usage()
    db.session.commit()
    db.session.refresh(event)
    db.session.refresh(client)
    assert (event.state, client.counted_usage, client.units_logged) == ("unmapped", 0, 0)


def test_a_replay_of_a_message_received_while_its_client_counted_bills_it(app_context, webhooks, runner):
    install_location()
    agency = ensure_agency(COMPANY_ID)
    client = make_client(agency, provider="ghl", source_key=LOCATION_ID, charge_by="messages", billing_unit=1)
    db.session.commit()
    webhooks.send(load_payload("outbound_message"))
    [delivery] = deliveries()
    db.session.execute(UsageEvent.__table__.delete())  # as if the first attempt's usage was rolled back
    db.session.commit()

    assert runner.invoke(args=["ghl", "replay", "--id", str(delivery.id)]).exit_code == 0
    [event] = db.session.scalars(select(UsageEvent)).all()
    assert event.received_at == delivery.received_at
    aggregate_pending_usage()
    db.session.commit()
    db.session.refresh(client)
    assert client.counted_usage == 1
