"""The fake Stripe, driven by the real stripe-python client over loopback HTTP."""

from __future__ import annotations

import re
import threading
import time
from urllib.parse import parse_qsl, urlencode

import pytest
import stripe
from hypothesis import given
from hypothesis import strategies as st
from stripe._encode import _api_encode
from werkzeug.test import Client

from stripe_fake import FakeStripeServer, FakeStripeState, create_app, unflatten
from tests.stripe_fake.conftest import NOON, new_key


def send(sc, setup, identifier: str | None = "u-1", value: str = "1", timestamp: int | None = NOON, **options):
    """Send one meter event for the setup's customer."""
    params = {"event_name": "ai_units", "payload": {"stripe_customer_id": setup.customer["id"], "value": value}}
    if identifier is not None:
        params["identifier"] = identifier
    if timestamp is not None:
        params["timestamp"] = timestamp
    return sc.v1.billing.meter_events.create(params, options)


# ---- form decoding -------------------------------------------------------------------------------------

def test_unflatten_handles_stripe_bracket_forms():
    pairs = parse_qsl("payload[value]=3&items[1][price]=p2&items[0][price]=p1&expand[]=a&expand[]=b&x=",
                      keep_blank_values=True)
    assert unflatten(pairs) == {"payload": {"value": "3"}, "items": [{"price": "p1"}, {"price": "p2"}],
                                "expand": ["a", "b"], "x": ""}


_name = st.from_regex(r"[a-z_]{1,8}", fullmatch=True)
_tree = st.recursive(st.text(max_size=5), lambda inner: st.one_of(
    st.lists(inner, min_size=1, max_size=3), st.dictionaries(_name, inner, min_size=1, max_size=3)), max_leaves=8)


@given(st.dictionaries(_name, _tree, max_size=4))
def test_unflatten_inverts_the_sdk_encoder(params):
    assert unflatten(parse_qsl(urlencode(list(_api_encode(params))), keep_blank_values=True)) == params


# ---- keys, accounts, tenants ---------------------------------------------------------------------------

def test_unknown_key_is_401_with_masked_key(fake):
    with pytest.raises(stripe.AuthenticationError) as caught:
        fake.client("sk_test_nobodyhas1234").v1.billing.meters.list({"limit": 1})
    assert caught.value.http_status == 401
    assert caught.value.user_message == "Invalid API Key provided: sk_test_****1234"


def test_restricted_key_without_permission_is_403_naming_it(fake, sk):
    rk = new_key("rk_test_")
    fake.state.add_account(rk, account_id="acct_alpha", denied_permissions=["billing_meter_read"])
    client = fake.client(rk)
    with pytest.raises(stripe.PermissionError) as caught:
        client.v1.billing.meters.list({"limit": 1})
    assert caught.value.http_status == 403
    assert caught.value.error.code == "more_permissions_required"
    assert re.search(r"rak_billing_meter_read", caught.value.user_message)
    fake.state.create_customer(sk, name="shared")  # same account: the rk key sees the sk key's data
    assert [c.name for c in client.v1.customers.list().data] == ["shared"]


def test_account_and_livemode_follow_the_key(fake, sc):
    live = new_key("sk_live_")
    fake.state.add_account(live, account_id="acct_alpha")
    account = sc.v1.accounts.retrieve_current()
    assert (account.id, account.settings.dashboard.display_name) == ("acct_alpha", "Alpha Agency")
    assert sc.v1.customers.create({"name": "t"}).livemode is False
    live_client = fake.client(live)
    assert live_client.v1.customers.create({"name": "l"}).livemode is True
    assert [c.name for c in live_client.v1.customers.list().data] == ["l"]  # test and live data are apart


def test_tenants_are_isolated_by_key(fake, sk, sc, setup):
    other = new_key()
    fake.state.add_account(other, account_id="acct_beta")
    beta = fake.client(other)
    with pytest.raises(stripe.InvalidRequestError) as caught:
        beta.v1.customers.retrieve(setup.customer["id"])
    assert (caught.value.http_status, caught.value.code) == (404, "resource_missing")
    assert beta.v1.prices.list().data == [] and beta.v1.billing.meters.list().data == []
    fake.state.create_meter(other, "ai_units")
    with pytest.raises(stripe.InvalidRequestError, match="No such customer"):
        send(beta, setup)
    send(sc, setup, identifier="shared-id")
    assert fake.state.meter_events(other) == [] and len(fake.state.meter_events(sk)) == 1


# ---- catalogue -----------------------------------------------------------------------------------------

def test_prices_filter_expand_and_paginate(sc, fake, sk, setup):
    legacy = fake.state.create_price(sk, setup.product, 5, metered=True)
    licensed = fake.state.create_price(sk, setup.product, 900, metered=False)
    by_meter = sc.v1.prices.list({"recurring": {"meter": setup.meter["id"]}, "expand": ["data.product"]})
    assert [p.id for p in by_meter.data] == [setup.price["id"]]
    assert by_meter.data[0].product.name == "AI units" and by_meter.url == "/v1/prices"
    metered = sc.v1.prices.list({"recurring": {"usage_type": "metered"}})
    assert {p.id for p in metered.data} == {setup.price["id"], legacy["id"]}
    first = sc.v1.prices.list({"limit": 2})
    assert len(first.data) == 2 and first.has_more
    assert [p.id for p in sc.v1.prices.list({"limit": 2}).auto_paging_iter()] == [
        licensed["id"], legacy["id"], setup.price["id"]]
    price = sc.v1.prices.retrieve(setup.price["id"])
    assert (price.recurring.usage_type, price.recurring.meter) == ("metered", setup.meter["id"])
    with pytest.raises(stripe.InvalidRequestError) as caught:
        sc.v1.prices.retrieve("price_missing")
    assert (caught.value.http_status, caught.value.code) == (404, "resource_missing")


def test_price_create_over_http_refuses_new_legacy_metered_prices(sc, setup):
    params = {"currency": "usd", "unit_amount": 3, "product": setup.product["id"],
              "recurring": {"interval": "month", "usage_type": "metered"}}
    with pytest.raises(stripe.InvalidRequestError, match="backed by a billing meter"):
        sc.v1.prices.create(params)
    assert sc.v1.prices.create(params, {"stripe_version": "2024-06-20"}).recurring.meter is None
    made = sc.v1.prices.create({**params, "recurring": {**params["recurring"], "meter": setup.meter["id"]},
                                "transform_quantity": {"divide_by": 1000, "round": "up"}})
    assert made.transform_quantity.divide_by == 1000


def test_customers_subscriptions_and_items(sc, fake, sk, setup):
    sub = sc.v1.subscriptions.create({"customer": setup.customer["id"], "items": [{"price": setup.price["id"]}]})
    assert sub.status == "active" and sub["items"].data[0].price.id == setup.price["id"]
    other = fake.state.create_customer(sk)
    fake.state.create_subscription(sk, other, setup.price, status="canceled")
    listed = sc.v1.subscriptions.list({"customer": setup.customer["id"], "price": setup.price["id"]})
    assert {s.id for s in listed.data} == {sub.id, setup.subscription["id"]}
    assert sc.v1.subscriptions.list({"customer": other["id"]}).data == []
    assert len(sc.v1.subscriptions.list({"status": "canceled"}).data) == 1
    items = sc.v1.subscription_items.list({"subscription": sub.id})
    assert items.data[0].id.startswith("si_") and items.data[0].quantity is None
    with pytest.raises(stripe.InvalidRequestError, match="You cannot set the quantity for metered plans"):
        sc.v1.subscriptions.create({"customer": other["id"], "items": [{"price": setup.price["id"], "quantity": 2}]})
    sc.v1.customers.delete(other["id"])
    gone = sc.v1.customers.retrieve(other["id"])
    assert gone.deleted is True and gone.id == other["id"]
    assert [c.id for c in sc.v1.customers.list().data] == [setup.customer["id"]]


# ---- meter events --------------------------------------------------------------------------------------

def test_meter_event_is_stored_and_duplicate_identifier_refused(sc, fake, sk, setup):
    event = send(sc, setup, identifier="agency1:client1:2026-09:1", value="3")
    assert (event.object, event.identifier, event.payload.value) == ("billing.meter_event",
                                                                       "agency1:client1:2026-09:1", "3")
    with pytest.raises(stripe.InvalidRequestError) as caught:
        send(sc, setup, identifier="agency1:client1:2026-09:1", value="3")
    assert caught.value.user_message == "An event already exists with identifier agency1:client1:2026-09:1."
    assert caught.value.headers["Stripe-Should-Retry"] == "false"
    assert fake.state.total_units(sk, setup.customer, "ai_units") == 3
    generated = send(sc, setup, identifier=None)
    assert len(generated.identifier) == 36 and len(fake.state.meter_events(sk)) == 2


@pytest.mark.parametrize(("offset", "accepted"), [(-35 * 86_400, True), (-35 * 86_400 - 1, False),
                                                  (300, True), (301, False)])
def test_meter_event_timestamp_window(sc, setup, offset, accepted):
    if accepted:
        assert send(sc, setup, timestamp=NOON + offset).timestamp == NOON + offset
    else:
        with pytest.raises(stripe.InvalidRequestError) as caught:
            send(sc, setup, timestamp=NOON + offset)
        assert caught.value.param == "timestamp"


def test_meter_event_timestamp_defaults_to_now(sc, setup):
    assert send(sc, setup, timestamp=None).timestamp == NOON


def test_meter_event_validation(sc, fake, sk, setup):
    with pytest.raises(stripe.InvalidRequestError, match="No such customer") as caught:
        sc.v1.billing.meter_events.create({"event_name": "ai_units",
                                           "payload": {"stripe_customer_id": "cus_nope", "value": "1"}})
    assert caught.value.http_status == 400
    with pytest.raises(stripe.InvalidRequestError, match="No active meter found for event_name nope") as caught:
        sc.v1.billing.meter_events.create({"event_name": "nope", "payload": {"stripe_customer_id": "c", "value": "1"}})
    assert caught.value.code == "resource_missing"
    for payload, code in [({"stripe_customer_id": setup.customer["id"]}, "meter_event_value_not_found"),
                          ({"value": "1"}, "meter_event_no_customer_defined"),
                          ({"stripe_customer_id": setup.customer["id"], "value": "1e3"}, "meter_event_invalid_value")]:
        with pytest.raises(stripe.InvalidRequestError) as caught:
            sc.v1.billing.meter_events.create({"event_name": "ai_units", "payload": payload})
        assert caught.value.code == code
    sc.v1.billing.meters.deactivate(setup.meter["id"])
    with pytest.raises(stripe.InvalidRequestError, match="No active meter found"):
        send(sc, setup)
    assert fake.state.meter_events(sk) == []


def test_custom_payload_keys(sc, fake, sk):
    fake.state.create_meter(sk, "tokens", customer_key="customer", value_key="tokens")
    customer = fake.state.create_customer(sk)
    sc.v1.billing.meter_events.create({"event_name": "tokens", "payload": {"customer": customer["id"],
                                                                           "tokens": "2.5"}})
    assert fake.state.total_units(sk, customer["id"], "tokens") == 2.5


@pytest.mark.parametrize(("formula", "expected"), [("sum", 6.0), ("count", 2.0), ("last", 4.0)])
def test_event_summaries_apply_the_formula_over_start_inclusive_end_exclusive(fake, sk, sc, formula, expected):
    meter = fake.state.create_meter(sk, "ev", formula=formula)
    customer = fake.state.create_customer(sk)
    for ident, ts, value in [("a", NOON - 3600, "2"), ("b", NOON - 60, "4"), ("c", NOON, "100"),
                             ("d", NOON - 7200, "7")]:
        sc.v1.billing.meter_events.create({"event_name": "ev", "identifier": ident, "timestamp": ts,
                                           "payload": {"stripe_customer_id": customer["id"], "value": value}})
    summaries = sc.v1.billing.meters.event_summaries.list(
        meter["id"], {"customer": customer["id"], "start_time": NOON - 3600, "end_time": NOON})
    assert [(s.object, s.aggregated_value, s.start_time, s.end_time) for s in summaries.data] == [
        ("billing.meter_event_summary", expected, NOON - 3600, NOON)]


def test_event_summaries_grouping_and_alignment(fake, sk, sc, setup):
    send(sc, setup, identifier="x", value="5", timestamp=NOON - 1800)
    hourly = sc.v1.billing.meters.event_summaries.list(setup.meter["id"], {
        "customer": setup.customer["id"], "start_time": NOON - 7200, "end_time": NOON,
        "value_grouping_window": "hour"})
    assert [(s.start_time, s.aggregated_value) for s in hourly.data] == [(NOON - 7200, 0.0), (NOON - 3600, 5.0)]
    with pytest.raises(stripe.InvalidRequestError) as caught:
        sc.v1.billing.meters.event_summaries.list(setup.meter["id"], {
            "customer": setup.customer["id"], "start_time": NOON - 59, "end_time": NOON})
    assert (caught.value.http_status, caught.value.param) == (400, "start_time")


# ---- legacy usage records ------------------------------------------------------------------------------

def test_legacy_usage_records_need_a_pre_basil_version_and_a_meterless_price(sc, fake, sk, setup):
    legacy_price = fake.state.create_price(sk, setup.product, 7, metered=True)
    sub = fake.state.create_subscription(sk, setup.customer, legacy_price, start_date=NOON - 86_400)
    item = sub["items"]["data"][0]["id"]
    path = f"/v1/subscription_items/{item}/usage_records"
    old = {"stripe_version": "2024-06-20"}
    record = sc.deserialize(sc.raw_request("post", path, quantity=2, timestamp=NOON, **old), api_mode="V1")
    assert (record.object, record.quantity, record.subscription_item) == ("usage_record", 2, item)
    sc.raw_request("post", path, quantity=3, timestamp=NOON, action="increment", **old)
    sc.raw_request("post", path, quantity=1, timestamp=NOON - 10, action="set", **old)
    sc.raw_request("post", path, quantity=4, timestamp=NOON - 10, action="set", **old)
    assert fake.state.usage_record_total(sk, item) == 9
    summaries = sc.deserialize(sc.raw_request("get", f"/v1/subscription_items/{item}/usage_record_summaries",
                                              **old), api_mode="V1")
    assert summaries.data[0].total_usage == 9
    with pytest.raises(stripe.InvalidRequestError, match=r"removed in API version 2025-03-31\.basil"):
        sc.raw_request("post", path, quantity=1)
    with pytest.raises(stripe.InvalidRequestError, match="not on the legacy metered billing system"):
        sc.raw_request("post", f"/v1/subscription_items/{setup.item['id']}/usage_records", quantity=1, **old)
    with pytest.raises(stripe.InvalidRequestError, match="current period start"):
        sc.raw_request("post", path, quantity=1, timestamp=NOON - 86_401, **old)


# ---- idempotency ---------------------------------------------------------------------------------------

def test_idempotent_replay_and_mismatch(sc, fake, sk, setup):
    first = send(sc, setup, identifier="i-1", idempotency_key="key-1")
    again = send(sc, setup, identifier="i-1", idempotency_key="key-1")
    assert again.to_dict() == first.to_dict()
    assert again.last_response.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.last_response.headers
    assert len(fake.state.meter_events(sk)) == 1
    with pytest.raises(stripe.IdempotencyError):
        send(sc, setup, identifier="i-2", idempotency_key="key-1")
    customer_a = sc.v1.customers.create({"name": "a"}, {"idempotency_key": "cus-key"})
    assert sc.v1.customers.create({"name": "a"}, {"idempotency_key": "cus-key"}).id == customer_a.id


def test_failed_validation_is_not_saved_under_the_idempotency_key(sc, setup):
    with pytest.raises(stripe.InvalidRequestError):
        send(sc, setup, identifier="late", timestamp=NOON + 3600, idempotency_key="k")
    with pytest.raises(stripe.InvalidRequestError):  # same params: validated again, not replayed as saved
        send(sc, setup, identifier="late", timestamp=NOON + 3600, idempotency_key="k")


# ---- faults and the call log ---------------------------------------------------------------------------

def test_rate_limit_and_server_error_faults(sc, fake, sk, setup):
    fake.state.inject("/v1/billing/meter_events", "rate_limit")
    fake.state.inject("/v1/billing/meter_events", "server_error", times=2)
    with pytest.raises(stripe.RateLimitError) as caught:
        send(sc, setup)
    assert caught.value.http_status == 429 and caught.value.error.code == "rate_limit"
    for _ in range(2):
        with pytest.raises(stripe.APIError) as caught:
            send(sc, setup)
        assert caught.value.http_status == 500 and type(caught.value) is stripe.APIError
    send(sc, setup)  # faults used up, FIFO
    assert [c.status for c in fake.state.calls] == [429, 500, 500, 200]
    assert fake.state.meter_events(sk)[0]["identifier"] == "u-1"


def test_bad_request_fault_is_a_400_that_is_not_resource_missing(sc, fake, sk, setup):
    fake.state.inject("/v1/customers", "bad_request", method="GET")
    customer = sc.v1.customers.create({"name": "a"})
    with pytest.raises(stripe.InvalidRequestError) as caught:
        sc.v1.customers.retrieve(customer.id)
    assert caught.value.http_status == 400 and caught.value.error.code == "parameter_unknown"
    assert sc.v1.customers.retrieve(customer.id).id == customer.id  # used up


def test_sdk_retries_a_500_with_the_same_idempotency_key(fake, sk, setup):
    fake.state.inject("/v1/billing/meter_events", "server_error")
    retrying = fake.client(sk, max_network_retries=1)
    send(retrying, setup, identifier="r-1")
    keys = [c.idempotency_key for c in fake.state.calls]
    assert [c.status for c in fake.state.calls] == [500, 200] and keys[0] == keys[1] is not None


def test_timeout_fault_makes_the_client_time_out_and_applies_nothing(fake, sk, setup):
    fake.state.inject("/v1/billing/meter_events", "timeout", seconds=30)
    impatient = fake.client(sk, http_client=stripe.RequestsClient(timeout=0.2))
    started = time.monotonic()
    with pytest.raises(stripe.APIConnectionError):
        send(impatient, setup)
    assert time.monotonic() - started < 5
    assert fake.state.meter_events(sk) == [] and fake.state.calls[-1].status == 0
    started = time.monotonic()
    fake.stop()  # releases the held request instead of waiting 30 s
    assert time.monotonic() - started < 2


def test_slow_fault_answers_normally_after_the_delay(fake, sk, sc, setup):
    fake.state.inject("/v1/customers", "slow", seconds=0.3)
    started = time.monotonic()
    listed = sc.v1.customers.list()
    assert time.monotonic() - started >= 0.3 and any(c.id == setup.customer["id"] for c in listed.data)
    assert fake.state.calls[-1].status == 200


def test_short_hang_then_dropped_connection(fake, sk, setup):
    fake.state.inject("/v1/customers", "timeout", seconds=0.05)
    with pytest.raises(stripe.APIConnectionError):
        fake.client(sk).v1.customers.list()


def test_accept_then_drop_stores_the_event_then_retries_dedupe(fake, sk, sc, setup):
    fake.state.inject("/v1/billing/meter_events", "accept_then_drop")
    with pytest.raises(stripe.APIConnectionError):
        send(sc, setup, identifier="lost-answer", idempotency_key="attempt-1")
    assert [e["identifier"] for e in fake.state.meter_events(sk)] == ["lost-answer"]
    replay = send(sc, setup, identifier="lost-answer", idempotency_key="attempt-1")
    assert replay.last_response.headers["Idempotent-Replayed"] == "true"
    with pytest.raises(stripe.InvalidRequestError, match="An event already exists with identifier lost-answer"):
        send(sc, setup, identifier="lost-answer", idempotency_key="attempt-2")
    assert fake.state.total_units(sk, setup.customer, "ai_units") == 1


def test_accept_then_500(fake, sk, sc, setup):
    fake.state.inject("/v1/billing/meter_events", "accept_then_500")
    with pytest.raises(stripe.APIError):
        send(sc, setup)
    assert len(fake.state.meter_events(sk)) == 1


def test_fault_filters_regex_method_and_key(fake, sk, sc, setup):
    other = new_key()
    fake.state.add_account(other, account_id="acct_beta")
    fake.state.inject(re.compile(r"^/v1/customers/cus_"), "rate_limit", api_key=other)
    fake.state.inject("/v1/customers", "server_error", method="POST")
    sc.v1.customers.retrieve(setup.customer["id"])  # the key filter spares alpha
    sc.v1.customers.list()  # GET spared by the POST-only fault
    with pytest.raises(stripe.RateLimitError):
        fake.client(other).v1.customers.retrieve("cus_x")
    with pytest.raises(stripe.APIError):
        sc.v1.customers.create({"name": "n"})
    with pytest.raises(ValueError, match="unknown fault"):
        fake.state.inject("/", "explode")


def test_call_log_records_every_request(fake, sk, sc, setup):
    sc.v1.customers.list({"limit": 3})
    send(sc, setup, idempotency_key="ik")
    assert fake.state.calls == [
        ("GET", "/v1/customers", sk, {"limit": "3"}, None, 200),
        ("POST", "/v1/billing/meter_events", sk, {
            "event_name": "ai_units", "identifier": "u-1", "timestamp": str(NOON),
            "payload": {"stripe_customer_id": setup.customer["id"], "value": "1"}}, "ik", 200)]


def test_concurrent_events_are_all_counted(fake, sk, setup):
    errors: list[Exception] = []

    def worker(n: int) -> None:
        client = fake.client(sk)
        try:
            for i in range(10):
                send(client, setup, identifier=f"t{n}-{i}", value="2")
        except Exception as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert fake.state.total_units(sk, setup.customer, "ai_units") == 160


def test_wsgi_app_works_without_a_server():
    state = FakeStripeState()
    state.add_account("sk_test_inprocess")
    state.inject("/v1/customers", "accept_then_drop")
    client = Client(create_app(state))
    response = client.post("/v1/customers", data={"name": "n"}, headers={"Authorization": "Bearer sk_test_inprocess"})
    assert response.status_code == 500  # no socket to drop: the lost answer is a 500
    listed = client.get("/v1/customers", headers={"Authorization": "Bearer sk_test_inprocess"}).json
    assert [c["name"] for c in listed["data"]] == ["n"]
    missing = client.get("/v1/nope", headers={"Authorization": "Bearer sk_test_inprocess"})
    assert missing.status_code == 404 and missing.json["error"]["type"] == "invalid_request_error"


# ---- tiered prices and customer search -----------------------------------------------------------------
def test_tiered_price_shows_its_tiers_only_when_expanded(sc, setup):
    params = {"currency": "usd", "product": setup.product["id"], "billing_scheme": "tiered",
              "tiers_mode": "volume", "recurring": {"interval": "month", "usage_type": "metered",
                                                    "meter": setup.meter["id"]},
              "tiers": [{"up_to": 100, "unit_amount": 5, "flat_amount": 200},
                        {"up_to": "inf", "unit_amount_decimal": "2.5"}]}
    made = sc.v1.prices.create(params)
    assert (made.billing_scheme, made.tiers_mode, made.unit_amount) == ("tiered", "volume", None)
    assert "tiers" not in made
    tiers = sc.v1.prices.retrieve(made.id, {"expand": ["tiers"]}).tiers
    assert [(t.up_to, t.unit_amount, t.flat_amount) for t in tiers] == [(100, 5, 200), (None, None, None)]
    assert str(tiers[1].unit_amount_decimal) == "2.5"
    with pytest.raises(stripe.InvalidRequestError, match="last tier"):
        sc.v1.prices.create({**params, "tiers": [{"up_to": 100, "unit_amount": 5}]})
    with pytest.raises(stripe.InvalidRequestError, match="transform_quantity cannot be combined"):
        sc.v1.prices.create({**params, "transform_quantity": {"divide_by": 10, "round": "up"}})


def test_customer_search_matches_name_or_email_substrings(sc, fake, sk, setup):
    fake.state.create_customer(sk, name="Bright Smiles Dental", email="billing@bright.example")
    fake.state.create_customer(sk, name="Sunny Side", email="ops@sunny.example")
    found = sc.v1.customers.search({"query": 'name~"smiles" OR email~"smiles"'})
    assert found.object == "search_result" and [c.name for c in found.data] == ["Bright Smiles Dental"]
    by_email = sc.v1.customers.search({"query": 'name~"sunny.ex" OR email~"sunny.ex"'})
    assert [c.name for c in by_email.data] == ["Sunny Side"]
    assert sc.v1.customers.search({"query": 'email:"ops@sunny.example"'}).data[0].name == "Sunny Side"
    with pytest.raises(stripe.InvalidRequestError, match="at least 3"):
        sc.v1.customers.search({"query": 'name~"su"'})
    with pytest.raises(stripe.InvalidRequestError, match="Invalid search query"):
        sc.v1.customers.search({"query": "sunny"})


def test_a_saved_state_loads_with_its_events_ids_and_keys(fake, sk, sc, setup, tmp_path, clock):
    sc.v1.billing.meter_events.create({"event_name": "ai_units", "identifier": "evt-a",
                                       "payload": {"stripe_customer_id": setup.customer["id"], "value": "3"}})
    fake.state.save(tmp_path / "state.json", {"note": "kept"})

    restored = FakeStripeState(clock=clock)
    assert restored.load(tmp_path / "state.json") == {"note": "kept"}

    assert restored.total_units(sk, setup.customer, "ai_units") == 3
    with FakeStripeServer(restored) as again:
        client = again.client(sk)
        assert client.v1.customers.retrieve(setup.customer["id"]).name == "Client One"
        with pytest.raises(stripe.InvalidRequestError, match="already exists"):
            client.v1.billing.meter_events.create({"event_name": "ai_units", "identifier": "evt-a",
                                                   "payload": {"stripe_customer_id": setup.customer["id"],
                                                               "value": "1"}})


def test_an_id_seed_makes_ids_repeatable():
    ids = [FakeStripeState(id_seed="s")._next_id("cus") for _ in range(2)]
    assert ids[0] == ids[1] and ids[0].startswith("cus_")
    assert FakeStripeState()._next_id("cus") != FakeStripeState()._next_id("cus")


# ---- event destinations and thin events (API v2) ---------------------------------------------------------

def test_an_event_destination_gets_its_secret_only_when_asked_and_delivers_signed_thin_events(fake, sk, sc, setup):
    base = {"name": "Rebill", "type": "webhook_endpoint", "event_payload": "thin",
            "enabled_events": ["v1.billing.meter.error_report_triggered"],
            "webhook_endpoint": {"url": "https://rebill.example.test/webhooks/stripe/r1/thin"}}
    quiet = sc.v2.core.event_destinations.create(base)
    assert quiet.webhook_endpoint.signing_secret is None
    sc.v2.core.event_destinations.delete(quiet.id)
    destination = sc.v2.core.event_destinations.create({**base, "include": ["webhook_endpoint.signing_secret"]})
    secret = destination.webhook_endpoint.signing_secret
    assert secret.startswith("whsec_") and [d["id"] for d in fake.state.event_destinations(sk)] == [destination.id]
    send(sc, setup, identifier="rebill_a_1_1", value="4")
    send(sc, setup, identifier="rebill_a_1_2", value="3")

    (delivery,) = fake.state.reject_meter_events_later(sk, ["rebill_a_1_1"])

    assert fake.state.total_units(sk, setup.customer, "ai_units") == 3  # the rejected event is not billed
    # The fake's clock is frozen in the past: the tolerance is widened, the signature itself is checked.
    signature, old_enough = delivery.headers["Stripe-Signature"], 10**9
    notification = sc.parse_event_notification(delivery.body, signature, secret, old_enough)
    assert notification.type == "v1.billing.meter.error_report_triggered" and "data" not in delivery.body.decode()
    assert notification.related_object.id == setup.meter["id"]
    event = notification.fetch_event()
    (error_type,) = event.data.reason.error_types
    assert (error_type.code, error_type.error_count) == ("meter_event_customer_not_found", 1)
    assert error_type.sample_errors[0].request.identifier == "rebill_a_1_1"
    with pytest.raises(stripe.SignatureVerificationError):
        sc.parse_event_notification(delivery.body, signature, "whsec_other", old_enough)


def test_a_key_without_the_permission_cannot_create_an_event_destination(fake):
    key = new_key("rk_test_")
    fake.state.add_account(key, denied_permissions=("event_destination_write",))
    with pytest.raises(stripe.PermissionError):
        fake.client(key).v2.core.event_destinations.create(
            {"name": "x", "type": "webhook_endpoint", "event_payload": "thin", "enabled_events": ["*"],
             "webhook_endpoint": {"url": "https://x.test/"}})
