"""Clients: every field validated, Stripe checked through the gateway against the fake Stripe, one live
client per source, edits exact for billing, and rule 3 (unmapped usage is billed only if the agency chooses)."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import func, select

from billing.agencies import ensure_agency
from billing.clients import (
    create_client,
    delete_client,
    get_client,
    list_clients,
    pause_clients_for_location,
    update_client,
)
from billing.models import RebillClient, UsageEvent
from billing.stripe_connection import connect_stripe_key
from billing.stripe_gateway import StripeUnavailable
from billing.units import aggregate_pending_usage
from core.database import db, utcnow
from core.encryption import secret_box
from core.errors import ClientInvalid, NotFound
from stripe_fake import FakeStripeServer
from tests.billing.factories import event_states, fresh, ghl_message, record, reports_of, tokens


@pytest.fixture
def stripe_context(make_app, fake_stripe):
    app = make_app(STRIPE_API_BASE=fake_stripe.url, STRIPE_NETWORK_ATTEMPTS=1)
    with app.app_context():
        yield app


class Stripe:
    """One agency connected (for real, through connect_stripe_key) to an account in the fake Stripe."""

    def __init__(self, server: FakeStripeServer, company_id: str = "company-clients"):
        self.state = server.state
        self.key = f"sk_test_{uuid.uuid4().hex}"
        self.state.add_account(self.key)
        self.meter = self.state.create_meter(self.key, "ai_units", formula="sum")
        self.product = self.state.create_product(self.key, "AI units")
        self.price = self.state.create_price(self.key, self.product, 10, meter=self.meter)
        self.customer = self.state.create_customer(self.key, name="Acme")["id"]
        self.agency = connect_stripe_key(ensure_agency(company_id), self.key)

    def fields(self, **overrides) -> dict:
        """Valid fields of an API channel client billed per 1000 tokens."""
        return {
            "nickname": "Acme bot",
            "provider": "capri_api",
            "channel_id": "chan-1",
            "stripe_product_id": self.product["id"],
            "stripe_price_id": self.price["id"],
            "stripe_customer_id": self.customer,
            "charge_by": "tokens",
            "billing_unit": 1000,
        } | overrides

    def ghl_fields(self, **overrides) -> dict:
        fields = self.fields(provider="ghl", location_id="loc-1", charge_by="messages", billing_unit=10)
        del fields["channel_id"]
        return fields | overrides


@pytest.fixture
def stripe(stripe_context, fake_stripe) -> Stripe:
    return Stripe(fake_stripe)


def client_count() -> int:
    return db.session.scalar(select(func.count()).select_from(RebillClient))


# ---- creation and the Stripe checks -------------------------------------------------------------------


def test_create_client_checks_stripe_and_caches_how_to_report(stripe):
    client = create_client(stripe.agency, stripe.fields())
    db.session.commit()
    client = fresh(client)
    assert (client.provider, client.source_key, client.channel_id, client.location_id) == (
        "capri_api",
        "chan-1",
        "chan-1",
        None,
    )
    assert (client.status, client.message_source, client.counted_usage, client.units_logged) == (
        "active",
        None,
        0,
        0,
    )
    assert (client.report_mode, client.meter_id, client.meter_event_name, client.meter_formula) == (
        "meter",
        stripe.meter["id"],
        "ai_units",
        "sum",
    )
    assert (client.meter_customer_key, client.meter_value_key) == ("stripe_customer_id", "value")
    assert len(client.report_prefix) == 16


def test_a_ghl_messages_client_defaults_to_outbound_messages(stripe):
    client = create_client(stripe.agency, stripe.ghl_fields(), known_location_ids=["loc-1", "loc-2"])
    assert (client.source_key, client.location_id, client.message_source) == ("loc-1", "loc-1", "ghl_outbound")


def test_a_legacy_metered_price_needs_and_caches_the_customers_subscription_item(stripe):
    legacy_price = stripe.state.create_price(stripe.key, stripe.product, 10)  # metered, no meter
    fields = stripe.fields(stripe_price_id=legacy_price["id"])
    with pytest.raises(ClientInvalid) as refused:
        create_client(stripe.agency, fields)
    assert "no active subscription" in refused.value.errors["stripe_customer_id"]

    subscription = stripe.state.create_subscription(stripe.key, stripe.customer, legacy_price)
    client = create_client(stripe.agency, fields)
    assert client.report_mode == "legacy"
    assert client.subscription_item_id == subscription["items"]["data"][0]["id"]
    assert client.meter_id is None


def test_an_unknown_stripe_customer_is_refused_with_the_reason(stripe):
    with pytest.raises(ClientInvalid) as refused:
        create_client(stripe.agency, stripe.fields(stripe_customer_id="cus_nobody"))
    assert refused.value.errors == {"stripe_customer_id": "the agency's Stripe account has no customer cus_nobody"}
    assert client_count() == 0


def test_a_price_that_cannot_carry_units_is_refused_with_stripes_reason(stripe):
    licensed = stripe.state.create_price(stripe.key, stripe.product, 10, metered=False)
    with pytest.raises(ClientInvalid) as refused:
        create_client(stripe.agency, stripe.fields(stripe_price_id=licensed["id"]))
    assert "licensed" in refused.value.errors["stripe_price_id"]

    last_meter = stripe.state.create_meter(stripe.key, "ai_last", formula="last")
    last_price = stripe.state.create_price(stripe.key, stripe.product, 10, meter=last_meter)
    with pytest.raises(ClientInvalid) as refused:
        create_client(stripe.agency, stripe.fields(stripe_price_id=last_price["id"]))
    assert "last" in refused.value.errors["stripe_price_id"]

    with pytest.raises(ClientInvalid) as refused:
        create_client(stripe.agency, stripe.fields(stripe_price_id="price_missing"))
    assert "price_missing" in refused.value.errors["stripe_price_id"]
    assert client_count() == 0


def test_a_price_of_another_product_is_refused(stripe):
    other = stripe.state.create_product(stripe.key, "Other")
    with pytest.raises(ClientInvalid) as refused:
        create_client(stripe.agency, stripe.fields(stripe_product_id=other["id"]))
    assert set(refused.value.errors) == {"stripe_product_id"}


def test_an_agency_without_a_stripe_key_cannot_add_clients(stripe):
    bare = ensure_agency("company-without-stripe")
    with pytest.raises(ClientInvalid) as refused:
        create_client(bare, stripe.fields())
    assert set(refused.value.errors) == {"stripe_product_id", "stripe_price_id", "stripe_customer_id"}
    assert "connect" in refused.value.errors["stripe_price_id"]


def test_a_key_stripe_no_longer_accepts_is_reported_on_the_stripe_fields(stripe):
    stripe.agency.stripe_key_ciphertext = secret_box().encrypt(f"sk_test_{uuid.uuid4().hex}")  # revoked in Stripe
    with pytest.raises(ClientInvalid) as refused:
        create_client(stripe.agency, stripe.fields())
    assert set(refused.value.errors) == {"stripe_product_id", "stripe_price_id", "stripe_customer_id"}
    assert "401" in refused.value.errors["stripe_customer_id"]


def test_stripe_being_unreachable_is_an_error_to_retry_and_writes_nothing(stripe, fake_stripe):
    fake_stripe.state.inject("/v1/prices", "server_error")
    with pytest.raises(StripeUnavailable):
        create_client(stripe.agency, stripe.fields())
    assert client_count() == 0


# ---- field validation (before any Stripe call) ----------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "field", "message"),
    [
        ({"nickname": ""}, "nickname", "must not be empty"),
        ({"nickname": "   "}, "nickname", "must not be empty"),
        ({"nickname": "x" * 121}, "nickname", "at most 120"),
        ({"nickname": 5}, "nickname", "must be text"),
        ({"nickname": None}, "nickname", "is required"),
        ({"provider": "zapier"}, "provider", "must be one of capri_api, ghl"),
        ({"channel_id": ""}, "channel_id", "must not be empty"),
        ({"channel_id": None}, "channel_id", "is required"),
        ({"channel_id": "c" * 256}, "channel_id", "at most 255"),
        ({"location_id": "loc-1"}, "location_id", "only GHL clients"),
        ({"charge_by": "minutes"}, "charge_by", "must be one of tokens, messages"),
        ({"billing_unit": 0}, "billing_unit", "whole number from 1 to 1,000,000,000,000"),
        ({"billing_unit": -5}, "billing_unit", "whole number from 1 to 1,000,000,000,000"),
        ({"billing_unit": 10**12 + 1}, "billing_unit", "whole number from 1 to 1,000,000,000,000"),
        ({"billing_unit": True}, "billing_unit", "whole number from 1 to 1,000,000,000,000"),
        ({"billing_unit": 1.5}, "billing_unit", "whole number from 1 to 1,000,000,000,000"),
        ({"billing_unit": "1000"}, "billing_unit", "whole number from 1 to 1,000,000,000,000"),
        ({"billing_unit": None}, "billing_unit", "is required"),
        ({"message_source": "ghl_all"}, "message_source", "only GHL clients charged by messages"),
        ({"status": "archived"}, "status", "must be one of active, paused"),
        ({"stripe_customer_id": "cus 1"}, "stripe_customer_id", "must not contain spaces"),
        ({"stripe_price_id": ""}, "stripe_price_id", "must not be empty"),
        ({"stripe_product_id": ["prod_1"]}, "stripe_product_id", "must be text"),
        ({"colour": "red"}, "colour", "unknown field"),
    ],
)
def test_every_field_is_validated_with_a_clear_message(stripe, overrides, field, message):
    with pytest.raises(ClientInvalid) as refused:
        create_client(stripe.agency, stripe.fields(**overrides))
    assert message in refused.value.errors[field]
    assert field in str(refused.value)
    assert client_count() == 0


@pytest.mark.parametrize(
    ("overrides", "field", "message"),
    [
        ({"location_id": None}, "location_id", "is required"),
        ({"location_id": "l" * 65}, "location_id", "at most 64"),
        ({"channel_id": "chan-1"}, "channel_id", "only API channel clients"),
        ({"message_source": "sms"}, "message_source", "must be one of ghl_outbound"),
        ({"location_id": "loc-of-someone-else"}, "location_id", "not one of the agency's installed GHL subaccounts"),
    ],
)
def test_ghl_fields_are_validated(stripe, overrides, field, message):
    with pytest.raises(ClientInvalid) as refused:
        create_client(stripe.agency, stripe.ghl_fields(**overrides), known_location_ids=lambda: ["loc-1"])
    assert message in refused.value.errors[field]


def test_a_nickname_and_channel_are_trimmed_and_the_nickname_may_be_120_characters(stripe):
    client = create_client(stripe.agency, stripe.fields(nickname=" " + "n" * 120 + " ", channel_id=" chan-1 "))
    assert (client.nickname, client.channel_id) == ("n" * 120, "chan-1")


def test_message_source_is_only_for_ghl_clients_charged_by_messages(stripe):
    with pytest.raises(ClientInvalid) as refused:
        create_client(stripe.agency, stripe.ghl_fields(charge_by="tokens", message_source="ghl_all"))
    assert set(refused.value.errors) == {"message_source"}
    client = create_client(stripe.agency, stripe.ghl_fields(message_source="platform"))
    assert client.message_source == "platform"


# ---- one live client per source, soft delete ---------------------------------------------------------


def test_one_live_client_per_channel_and_a_deleted_clients_channel_can_be_mapped_again(stripe):
    first = create_client(stripe.agency, stripe.fields())
    with pytest.raises(ClientInvalid) as refused:
        create_client(stripe.agency, stripe.fields(nickname="Second"))
    assert "already billed by client 'Acme bot'" in refused.value.errors["channel_id"]

    delete_client(stripe.agency, first.id)
    second = create_client(stripe.agency, stripe.fields(nickname="Second"))
    assert second.id != first.id
    assert [client.id for client in list_clients(stripe.agency)] == [second.id]
    with pytest.raises(NotFound):
        get_client(stripe.agency, first.id)
    assert db.session.get(RebillClient, first.id).deleted_at is not None  # history kept


def test_other_agencies_clients_are_not_found(stripe, fake_stripe):
    mine = create_client(stripe.agency, stripe.fields())
    other = Stripe(fake_stripe, "company-other")
    for attempt in (
        lambda: get_client(other.agency, mine.id),
        lambda: update_client(other.agency, mine.id, {"billing_unit": 5}),
        lambda: delete_client(other.agency, mine.id),
        lambda: update_client(stripe.agency, 10_000, {"billing_unit": 5}),
    ):
        with pytest.raises(NotFound):
            attempt()
    assert list_clients(other.agency) == []
    assert fresh(mine).billing_unit == 1000


# ---- rule 3 ---------------------------------------------------------------------------------------------


def test_rule3_usage_before_the_client_is_unmapped_and_not_billed_unless_the_agency_chooses(stripe):
    record(stripe.agency, tokens("aggregated-early", 4000))
    aggregate_pending_usage()  # no client yet: unmapped
    record(stripe.agency, tokens("pending-early", 3000))  # still pending when the client is created
    client = create_client(stripe.agency, stripe.fields())
    record(stripe.agency, tokens("after", 1500))
    aggregate_pending_usage()
    db.session.commit()

    assert event_states(stripe.agency) == {
        "aggregated-early": "unmapped",
        "pending-early": "unmapped",
        "after": "counted",
    }
    client = fresh(client)
    assert (client.counted_usage, client.units_logged, client.remainder) == (1500, 1, 500)


def test_rule3_an_agency_choosing_to_bill_unmapped_usage_bills_the_sources_earlier_usage_once(stripe):
    record(stripe.agency, tokens("aggregated-early", 4000), tokens("other-channel", 9000, channel="chan-9"))
    aggregate_pending_usage()
    record(stripe.agency, tokens("pending-early", 3000))
    client = create_client(stripe.agency, stripe.fields(), bill_unmapped_usage=True)
    record(stripe.agency, tokens("after", 1500))
    aggregate_pending_usage()
    aggregate_pending_usage()
    db.session.commit()

    states = event_states(stripe.agency)
    assert states == {
        "aggregated-early": "counted",
        "pending-early": "counted",
        "after": "counted",
        "other-channel": "unmapped",  # another channel's usage is not this client's
    }
    client = fresh(client)
    assert (client.counted_usage, client.units_logged, client.remainder) == (8500, 8, 500)
    assert [report.units for report in reports_of(client)] == [8]


@pytest.mark.parametrize("bill_unmapped_usage", [False, True])
def test_rule11_usage_received_before_creation_but_committed_after_is_billed_only_by_choice(
    stripe, bill_unmapped_usage
):
    # An ingest that stamped its event before the client was created and committed after the creation.
    received = utcnow()
    client = create_client(stripe.agency, stripe.fields(), bill_unmapped_usage=bill_unmapped_usage)
    db.session.commit()
    db.session.add(
        UsageEvent(
            agency_id=stripe.agency.id, source="capri", source_event_id="in-flight", channel_id=client.channel_id,
            occurred_at=received, input_tokens=2500, received_at=received,
        )
    )
    db.session.commit()
    aggregate_pending_usage()
    db.session.commit()
    assert event_states(stripe.agency) == {"in-flight": "counted" if bill_unmapped_usage else "unmapped"}
    assert fresh(client).counted_usage == (2500 if bill_unmapped_usage else 0)


def test_rule3_billing_unmapped_usage_is_refused_for_a_client_added_paused(stripe):
    record(stripe.agency, tokens("early", 4000))
    aggregate_pending_usage()
    with pytest.raises(ClientInvalid) as refused:
        create_client(stripe.agency, stripe.fields(status="paused"), bill_unmapped_usage=True)
    assert "paused" in refused.value.errors["bill_unmapped_usage"]
    assert client_count() == 0
    assert event_states(stripe.agency) == {"early": "unmapped"}  # still billable by a client added active


def test_rule3_usage_counted_by_a_deleted_client_is_never_billed_again_by_its_successor(stripe):
    first = create_client(stripe.agency, stripe.fields())
    record(stripe.agency, tokens("first", 2000))
    delete_client(stripe.agency, first.id)  # counts "first" under the first client
    record(stripe.agency, tokens("between", 1000))
    aggregate_pending_usage()
    second = create_client(stripe.agency, stripe.fields(nickname="Second"), bill_unmapped_usage=True)
    aggregate_pending_usage()
    assert (fresh(first).counted_usage, fresh(second).counted_usage) == (2000, 1000)
    assert event_states(stripe.agency) == {"first": "counted", "between": "counted"}


# ---- edits ----------------------------------------------------------------------------------------------


def test_changing_stripe_fields_rechecks_stripe_and_refuses_without_changing_anything(stripe):
    client = create_client(stripe.agency, stripe.fields())
    db.session.commit()
    with pytest.raises(ClientInvalid) as refused:
        update_client(stripe.agency, client.id, {"stripe_customer_id": "cus_nobody", "billing_unit": 7})
    db.session.rollback()
    assert "cus_nobody" in refused.value.errors["stripe_customer_id"]
    assert (fresh(client).stripe_customer_id, client.billing_unit) == (stripe.customer, 1000)

    other_customer = stripe.state.create_customer(stripe.key, name="Other")["id"]
    count_meter = stripe.state.create_meter(stripe.key, "ai_count", formula="count")
    count_price = stripe.state.create_price(stripe.key, stripe.product, 10, meter=count_meter)
    update_client(
        stripe.agency, client.id, {"stripe_customer_id": other_customer, "stripe_price_id": count_price["id"]}
    )
    client = fresh(client)
    assert (client.stripe_customer_id, client.meter_id, client.meter_formula) == (
        other_customer,
        count_meter["id"],
        "count",
    )


def test_an_update_without_changes_writes_nothing_and_validation_covers_updates(stripe):
    client = create_client(stripe.agency, stripe.fields())
    db.session.commit()
    before = fresh(client).updated_at
    update_client(stripe.agency, client.id, {"billing_unit": 1000, "nickname": "Acme bot"})
    assert fresh(client).updated_at == before
    with pytest.raises(ClientInvalid) as refused:
        update_client(stripe.agency, client.id, {"billing_unit": 0, "status": None})
    assert set(refused.value.errors) == {"billing_unit", "status"}


def test_moving_a_client_to_another_channel_counts_the_old_channels_pending_usage_first(stripe):
    client = create_client(stripe.agency, stripe.fields(billing_unit=100))
    record(stripe.agency, tokens("old", 250), tokens("new-early", 700, channel="chan-2"))
    update_client(stripe.agency, client.id, {"channel_id": "chan-2"})
    record(stripe.agency, tokens("new-later", 120, channel="chan-2"), tokens("old-later", 50))
    aggregate_pending_usage()
    db.session.commit()

    assert event_states(stripe.agency) == {
        "old": "counted",
        "new-early": "unmapped",  # arrived before this client mapped chan-2
        "new-later": "counted",
        "old-later": "unmapped",  # chan-1 has no client any more
    }
    client = fresh(client)
    assert (client.source_key, client.counted_usage, client.units_logged, client.remainder) == ("chan-2", 370, 3, 70)


def test_moving_a_client_onto_a_channel_another_client_bills_is_refused(stripe):
    create_client(stripe.agency, stripe.fields())
    second = create_client(stripe.agency, stripe.fields(channel_id="chan-2", nickname="Second"))
    with pytest.raises(ClientInvalid) as refused:
        update_client(stripe.agency, second.id, {"channel_id": "chan-1"})
    assert "already billed" in refused.value.errors["channel_id"]


def test_charge_by_cannot_change_so_a_token_remainder_never_becomes_message_units(stripe):
    client = create_client(stripe.agency, stripe.ghl_fields(charge_by="tokens", billing_unit=1000))
    record(stripe.agency, tokens("t1", 1300, location="loc-1"))
    aggregate_pending_usage()
    with pytest.raises(ClientInvalid) as refused:
        update_client(stripe.agency, client.id, {"charge_by": "messages", "billing_unit": 10})
    assert "add a new client" in refused.value.errors["charge_by"]
    client = fresh(client)
    # Carrying the 300 tokens into N=10 messages would have logged 30 units nobody used.
    assert (client.charge_by, client.billing_unit, client.units_logged, client.remainder) == ("tokens", 1000, 1, 300)


def test_pause_clients_for_location_pauses_its_live_clients_after_counting_their_pending_usage(stripe):
    on_location = create_client(stripe.agency, stripe.ghl_fields(billing_unit=1))
    elsewhere = create_client(stripe.agency, stripe.ghl_fields(location_id="loc-2", billing_unit=1))
    record(stripe.agency, ghl_message("before", "loc-1", "outbound"))
    assert pause_clients_for_location(stripe.agency.id, "loc-1") == 1
    assert pause_clients_for_location(stripe.agency.id, "loc-1") == 0  # already paused
    record(stripe.agency, ghl_message("after", "loc-1", "outbound"))
    aggregate_pending_usage()
    db.session.commit()

    assert (fresh(on_location).status, fresh(elsewhere).status) == ("paused", "active")
    assert event_states(stripe.agency) == {"before": "counted", "after": "paused"}
    assert fresh(on_location).units_logged == 1


def test_ids_that_are_not_integers_are_not_found(stripe):
    for bad in ("1", None, True):
        with pytest.raises(NotFound):
            get_client(stripe.agency, bad)
        with pytest.raises(NotFound):
            delete_client(stripe.agency, bad)


def test_fixing_a_clients_stripe_customer_makes_its_failed_reports_due_again(stripe):
    from billing.models import UnitReport
    from billing.reporting import report_pending_units

    client = create_client(stripe.agency, stripe.fields(billing_unit=10))
    db.session.commit()
    record(stripe.agency, tokens("e1", 25))
    aggregate_pending_usage()
    db.session.commit()
    stripe.state.delete_customer(stripe.key, stripe.customer)  # Stripe now refuses the units
    report_pending_units()
    (report,) = reports_of(client)
    assert (report.status, report.units) == ("failed", 2)

    replacement = stripe.state.create_customer(stripe.key, name="Acme again")["id"]
    update_client(stripe.agency, client.id, {"stripe_customer_id": replacement})
    db.session.commit()
    assert db.session.get(UnitReport, report.id).status == "pending"
    report_pending_units()
    assert stripe.state.total_units(stripe.key, replacement, "ai_units") == 2
