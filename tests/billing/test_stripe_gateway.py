"""The Stripe gateway, driven through the real stripe-python client against the fake Stripe (and recorded shapes)."""

from __future__ import annotations

import datetime as dt
import json
import re
import threading
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import pytest
from werkzeug.serving import make_server

from billing.errors import BillingError, StripeKeyInvalid
from billing.stripe_gateway import (
    MeterUnknown,
    StripeGateway,
    StripeKeyRejected,
    StripeRequestRejected,
    StripeUnavailable,
)
from billing.stripe_target import StripeTarget
from tests.billing.stripe_support import by_id, new_key, now_ts, send

FIXTURES = Path(__file__).parents[1] / "fixtures" / "stripe"


# ---- keys -------------------------------------------------------------------------------------------------


def test_validate_key_returns_account_mode_and_name(gateway):
    account = gateway.validate_key()
    assert (account.account_id, account.mode, account.display_name) == ("acct_agency", "test", "Agency One")


def test_live_keys_are_live(stripe_server):
    live = new_key("sk_live_")
    stripe_server.state.add_account(live, account_id="acct_live")
    assert StripeGateway(live, stripe_server.url).validate_key().mode == "live"


@pytest.mark.parametrize(
    "bad", ["pk_test_51abcdefghij", "whsec_abcdefghijkl", "sk_test_", "", "rk_prod_abcdefghijk", "sk_test_abc def"]
)
def test_only_secret_and_restricted_keys_are_accepted_before_any_call(stripe_server, bad):
    with pytest.raises(StripeKeyInvalid, match="secret key"):
        StripeGateway(bad, stripe_server.url).validate_key()
    assert stripe_server.state.calls == []


def test_an_unknown_key_is_invalid_with_stripe_s_401(stripe_server):
    with pytest.raises(StripeKeyInvalid, match="401") as raised:
        StripeGateway(new_key(), stripe_server.url).validate_key()
    assert isinstance(raised.value, BillingError)


def test_a_restricted_key_missing_meter_read_names_the_permission(stripe_server):
    restricted = new_key("rk_test_")
    stripe_server.state.add_account(restricted, denied_permissions=["billing_meter_read"])
    with pytest.raises(StripeKeyInvalid, match="'rak_billing_meter_read' permission"):
        StripeGateway(restricted, stripe_server.url).validate_key()


def test_a_restricted_key_without_account_read_still_validates(stripe_server):
    restricted = new_key("rk_test_")
    stripe_server.state.add_account(restricted, account_id="acct_rk", denied_permissions=["account_read"])
    account = StripeGateway(restricted, stripe_server.url).validate_key()
    assert (account.account_id, account.mode) == ("acct_rk", "test")  # read from Stripe's 403 message


def test_validation_when_stripe_is_down_is_unavailable_not_invalid(stripe_server, key):
    stripe_server.state.inject("/v1/billing/meters", "server_error")
    with pytest.raises(StripeUnavailable):
        StripeGateway(key, stripe_server.url, max_network_retries=0).validate_key()


def test_the_key_never_appears_in_the_gateway_repr(gateway, key):
    assert key not in repr(gateway) and key[-4:] in repr(gateway)


# ---- prices -----------------------------------------------------------------------------------------------


def test_listing_reads_every_page(stripe_server, key, gateway):
    product = stripe_server.state.create_product(key, "Many")
    created = {stripe_server.state.create_price(key, product, n + 1, metered=False)["id"] for n in range(130)}
    assert set(by_id(gateway.list_products_with_prices())) == created
    assert gateway.calls == 4  # products: 1 page, prices: 2 pages, meters: 1 page
    assert len([c for c in stripe_server.state.calls if c.path == "/v1/prices"]) == 2


def test_describe_unknown_price_is_a_rejected_request(gateway):
    with pytest.raises(StripeRequestRejected, match="No such price") as raised:
        gateway.describe_price("price_nope")
    assert raised.value.code == "resource_missing"


# ---- customers and subscriptions -------------------------------------------------------------------------------


def test_customer_exists_and_deleted_or_unknown_customers_do_not(stripe_server, key, gateway):
    alive = stripe_server.state.create_customer(key)["id"]
    gone = stripe_server.state.create_customer(key)["id"]
    stripe_server.state.delete_customer(key, gone)
    assert gateway.customer_exists(alive) is True
    assert gateway.customer_exists(gone) is False
    assert gateway.customer_exists("cus_never") is False


def test_customers_of_another_account_are_unknown(stripe_server, gateway):
    other = new_key()
    stripe_server.state.add_account(other)
    assert gateway.customer_exists(stripe_server.state.create_customer(other)["id"]) is False


def test_find_subscription_item_for_customer_and_price(stripe_server, key, gateway, catalog):
    state = stripe_server.state
    customer = state.create_customer(key)["id"]
    legacy = catalog["prices"]["legacy"]["id"]
    assert gateway.find_subscription_item(customer, legacy) is None
    state.create_subscription(key, customer, catalog["prices"]["licensed"])
    state.create_subscription(key, customer, legacy, status="canceled")
    assert gateway.find_subscription_item(customer, legacy) is None
    subscription = state.create_subscription(key, customer, legacy)
    assert gateway.find_subscription_item(customer, legacy) == subscription["items"]["data"][0]["id"]
    period = gateway.subscription_period(customer, legacy)
    assert period.subscription_item_id == subscription["items"]["data"][0]["id"]
    assert period.start == dt.datetime.fromtimestamp(subscription["start_date"], dt.UTC) and period.end > period.start


def test_subscription_period_reads_items_beyond_those_a_subscription_embeds(stripe_server, key, gateway, catalog):
    state = stripe_server.state
    customer = state.create_customer(key)["id"]
    seats = [state.create_price(key, catalog["other"], 100 + n, metered=False) for n in range(11)]
    subscription = state.create_subscription(key, customer, [*seats, catalog["prices"]["sum"]])
    assert subscription["items"]["has_more"] and len(subscription["items"]["data"]) == 10

    period = gateway.subscription_period(customer, catalog["prices"]["sum"]["id"])

    assert period is not None and period.subscription_item_id not in {i["id"] for i in subscription["items"]["data"]}


def test_subscription_period_is_the_current_one_after_a_rollover(stripe_server, stripe_clock, key, gateway, catalog):
    state = stripe_server.state
    customer = state.create_customer(key)["id"]
    start = int(stripe_clock()) - 40 * 86400  # started more than a month ago
    state.create_subscription(key, customer, catalog["prices"]["sum"], start_date=start)

    period = gateway.subscription_period(customer, catalog["prices"]["sum"]["id"])

    assert period.start > dt.datetime.fromtimestamp(start, dt.UTC) and period.start <= stripe_clock.now() < period.end


def test_meter_subscription_period_is_the_live_item_on_any_price_of_the_meter(
    stripe_server, stripe_clock, key, gateway, catalog
):
    """After a plan change to another price of the same meter, the meter's events bill on the new item: its
    period is found by meter. Canceled items and items on other meters are not; with two live items on the
    meter, the one whose period started last (a time in it is in the current period of both)."""
    state = stripe_server.state
    meter = catalog["meters"]["sum"]["id"]
    customer = state.create_customer(key)["id"]
    assert gateway.meter_subscription_period(customer, meter) is None
    old = state.create_subscription(key, customer, catalog["prices"]["sum"], start_date=int(stripe_clock()) - 86400)
    state.cancel_subscription(key, old["id"])
    state.create_subscription(key, customer, catalog["prices"]["count"])  # another meter
    assert gateway.meter_subscription_period(customer, meter) is None

    new_price = state.create_price(key, catalog["product"], 20, meter=catalog["meters"]["sum"])
    seats = [state.create_price(key, catalog["other"], 100 + n, metered=False) for n in range(11)]
    earlier = state.create_subscription(key, customer, new_price, start_date=int(stripe_clock()) - 10 * 86400)
    later = state.create_subscription(key, customer, [*seats, new_price], start_date=int(stripe_clock()) - 3 * 86400)
    assert later["items"]["has_more"]  # the meter's item is beyond the ones the subscription embeds

    period = gateway.meter_subscription_period(customer, meter)

    listed = stripe_server.client(key).v1.subscription_items.list({"subscription": later["id"], "limit": 100})
    (on_the_meter,) = [item.id for item in listed.data if item.price.id == new_price["id"]]
    assert period.subscription_item_id == on_the_meter
    assert period.subscription_item_id not in {i["id"] for i in earlier["items"]["data"]}
    assert period.start == dt.datetime.fromtimestamp(later["start_date"], dt.UTC) <= stripe_clock.now() < period.end


# ---- sending ----------------------------------------------------------------------------------------------------


def test_a_sum_meter_gets_one_event_of_value_k(stripe_server, key, gateway, metered):
    delivery = send(gateway, metered, units=42)
    (event,) = stripe_server.state.meter_events(key)
    assert (delivery.events_accepted, delivery.events_already_there) == (1, 0)
    assert event["identifier"] == "rep-1" and event["payload"]["value"] == "42"
    (call,) = [c for c in stripe_server.state.calls if c.method == "POST"]
    assert call.idempotency_key == "rep-1:a1"


def test_a_count_meter_gets_k_events(stripe_server, key, gateway):
    stripe_server.state.create_meter(key, "ai_units", formula="count")
    customer = stripe_server.state.create_customer(key)["id"]
    send(gateway, {"customer": customer}, units=4, formula="count")
    assert stripe_server.state.total_units(key, customer, "ai_units") == 4
    assert [e["identifier"] for e in stripe_server.state.meter_events(key)] == [f"rep-1-{n}" for n in range(1, 5)]


def test_a_resent_identifier_is_already_delivered_not_an_error(stripe_server, key, gateway, metered):
    send(gateway, metered)
    delivery = send(gateway, metered, attempt=2)
    assert (delivery.events_accepted, delivery.events_already_there) == (0, 1)
    assert stripe_server.state.total_units(key, metered["customer"], "ai_units") == 3


def test_a_partly_delivered_count_report_completes_without_doubling(stripe_server, key, gateway):
    stripe_server.state.create_meter(key, "ai_units", formula="count")
    customer = stripe_server.state.create_customer(key)["id"]
    stripe_server.client(key).v1.billing.meter_events.create(  # an earlier attempt got one event through
        {"event_name": "ai_units", "identifier": "rep-1-1", "payload": {"stripe_customer_id": customer, "value": "1"}}
    )
    delivery = send(gateway, {"customer": customer}, units=3, formula="count", attempt=2)
    assert (delivery.events_accepted, delivery.events_already_there) == (2, 1)
    assert stripe_server.state.total_units(key, customer, "ai_units") == 3


@pytest.mark.parametrize("formula", ["last", "max"])
def test_other_formulas_are_refused_before_calling(gateway, metered, stripe_server, formula):
    with pytest.raises(StripeRequestRejected):
        send(gateway, metered, formula=formula)
    assert not [c for c in stripe_server.state.calls if c.method == "POST"]


def test_legacy_usage_records_use_a_pre_basil_version_and_the_idempotency_key(stripe_server, key, gateway):
    state = stripe_server.state
    price = state.create_price(key, state.create_product(key, "Legacy"), 10)
    customer = state.create_customer(key)["id"]
    item = state.create_subscription(key, customer, price, start_date=now_ts() - 3600)["items"]["data"][0]["id"]
    timestamp = now_ts()
    gateway.send_usage_record(item, 5, timestamp, idempotency_key="rep-9")
    gateway.send_usage_record(item, 5, timestamp, idempotency_key="rep-9")  # replay: same key, same answer
    assert state.usage_record_total(key, item) == 5
    total = gateway.usage_record_total(item, dt.datetime.now(dt.UTC))
    assert total.total == 5 and total.start <= dt.datetime.now(dt.UTC) < total.end
    with pytest.raises(StripeRequestRejected, match="legacy"):
        meter_price = state.create_price(key, state.create_product(key, "M"), 1, meter=state.create_meter(key, "m"))
        meter_item = state.create_subscription(key, customer, meter_price)["items"]["data"][0]["id"]
        gateway.send_usage_record(meter_item, 1, now_ts(), idempotency_key="rep-10")


def test_meter_event_total_sums_summaries_over_whole_minutes(stripe_server, key, gateway, metered):
    base = now_ts() - 600
    send(gateway, metered, units=2, identifier="a", timestamp=base)
    send(gateway, metered, units=5, identifier="b", timestamp=base + 1)
    send(gateway, metered, units=7, identifier="c", timestamp=base - 3600)
    moment = dt.datetime.fromtimestamp(base, dt.UTC)
    window = gateway.meter_event_total(metered["meter"]["id"], metered["customer"], moment, moment)
    assert window.total == Decimal(7) and window.end - window.start >= dt.timedelta(minutes=1)
    assert window.start.second == 0 and window.end.second == 0


# ---- errors -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "error", "text"),
    [
        ("rate_limit", StripeUnavailable, "429"),
        ("server_error", StripeUnavailable, "500"),
        ("accept_then_drop", StripeUnavailable, "reached"),
        ("accept_then_500", StripeUnavailable, "500"),
    ],
)
def test_transient_faults_are_unavailable(stripe_server, gateway, metered, fault, error, text):
    stripe_server.state.inject("/v1/billing/meter_events", fault)
    with pytest.raises(error, match=text):
        send(gateway, metered)


def test_a_revoked_key_is_rejected(stripe_server, metered):
    with pytest.raises(StripeKeyRejected, match="401"):
        send(StripeGateway(new_key(), stripe_server.url), metered)


def test_a_missing_write_permission_is_rejected_naming_it(stripe_server, key, metered):
    restricted = new_key("rk_test_")
    stripe_server.state.add_account(
        restricted, account_id="acct_agency", denied_permissions=["billing_meter_event_write"]
    )
    with pytest.raises(StripeKeyRejected, match="'rak_billing_meter_event_write'"):
        send(StripeGateway(restricted, stripe_server.url), metered)


def test_other_refusals_carry_stripe_s_message(gateway, metered):
    with pytest.raises(StripeRequestRejected, match="No such customer"):
        send(gateway, {**metered, "customer": "cus_nobody"})
    with pytest.raises(StripeRequestRejected, match="35 calendar days"):
        send(gateway, metered, timestamp=now_ts() - 40 * 86400, identifier="old")


# ---- contract: the same checks against the fake and against recorded Stripe shapes ----------------------------


class RecordedAnswers:
    """A loopback HTTP server answering recorded Stripe shapes: the gateway's real transport reaches it.

    Like `responses`: answers match on method and path; of several matching answers the first one not yet
    used is given (the last one repeats), and ``unused()`` lists answers no request reached.
    """

    def __init__(self):
        self.answers: list[dict] = []
        self._server = make_server("127.0.0.1", 0, self, threaded=True)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._server.server_port}"

    def add(self, method: str, path: str, body: dict, status: int = 200, headers: dict | None = None) -> None:
        self.answers.append(
            {"method": method, "path": re.compile(path), "body": body, "status": status, "headers": headers or {},
             "used": 0}
        )  # fmt: skip

    def unused(self) -> list[str]:
        return [f"{answer['method']} {answer['path'].pattern}" for answer in self.answers if not answer["used"]]

    def stop(self) -> None:
        self._server.shutdown()
        self._thread.join(timeout=5)

    def __call__(self, environ, start_response):
        method, path = environ["REQUEST_METHOD"], environ["PATH_INFO"]
        environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        matches = [a for a in self.answers if a["method"] == method and a["path"].fullmatch(path)]
        if not matches:
            start_response("404 Not Found", [("Content-Type", "application/json")])
            return [json.dumps({"error": {"message": f"nothing recorded for {method} {path}"}}).encode()]
        answer = next((a for a in matches if not a["used"]), matches[-1])
        answer["used"] += 1
        body = json.dumps(answer["body"]).encode()
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                   *answer["headers"].items()]  # fmt: skip
        start_response(f"{answer['status']} Recorded", headers)
        return [body]


class RecordedStripe:
    """Stripe answered over HTTP with the recorded shapes of docs/stripe.md §5.5."""

    def __init__(self, recorded: RecordedAnswers):
        self.recorded = recorded
        self.errors = json.loads((FIXTURES / "errors.json").read_text())
        meter = json.loads((FIXTURES / "meter.json").read_text())
        price = json.loads((FIXTURES / "price.json").read_text())
        summary = json.loads((FIXTURES / "meter_event_summary.json").read_text())
        self.price_id, self.meter_id, self.customer_id = price["id"], meter["id"], "cus_123"
        self.event_name, self.customer_key = meter["event_name"], "customer"
        recorded.add("GET", f"/v1/prices/{price['id']}", price)
        recorded.add("GET", f"/v1/billing/meters/{meter['id']}", meter)
        recorded.add(
            "GET",
            f"/v1/billing/meters/{meter['id']}/event_summaries",
            {"object": "list", "data": [summary], "has_more": False, "url": "/v1/billing/meters"},
        )
        base = recorded.url
        self.gateway = StripeGateway("sk_test_recorded1234", base, max_network_retries=0)
        self.revoked = StripeGateway("sk_test_revoked12345", base, max_network_retries=0)
        self.restricted = StripeGateway("rk_test_restricted123", base, max_network_retries=0)
        self.now = 1234567890

    def arrange(self, answer: str) -> None:
        path = "/v1/billing/meter_events"
        if answer == "accept":
            self.recorded.add("POST", path, json.loads((FIXTURES / "meter_event.json").read_text()))
        elif answer == "duplicate":
            self.recorded.add("POST", path, self.errors["duplicate_identifier"], status=400,
                              headers={"Stripe-Should-Retry": "false"})  # fmt: skip
        elif answer == "rate_limit":
            self.recorded.add("POST", path, self.errors["rate_limit"], status=429)
        elif answer == "revoked":
            self.recorded.add("GET", "/v1/billing/meters", self.errors["invalid_api_key"], status=401)
        elif answer == "forbidden":
            self.recorded.add("POST", path, self.errors["more_permissions_required"], status=403)


class FakeStripe:
    """The same scenario built in the fake Stripe."""

    def __init__(self, server):
        state = server.state
        key, restricted = new_key(), new_key("rk_test_")
        state.add_account(key, account_id="acct_contract")
        state.add_account(restricted, account_id="acct_contract", denied_permissions=["billing_meter_event_write"])
        meter = state.create_meter(key, "test-meter-event-name", customer_key="customer")
        self.price_id = state.create_price(key, state.create_product(key, "P"), 2000, meter=meter)["id"]
        self.meter_id, self.customer_id = meter["id"], state.create_customer(key)["id"]
        self.event_name, self.customer_key = meter["event_name"], "customer"
        self.server = server
        self.gateway = StripeGateway(key, server.url, max_network_retries=0)
        self.revoked = StripeGateway(new_key(), server.url, max_network_retries=0)
        self.restricted = StripeGateway(restricted, server.url, max_network_retries=0)
        self.now = now_ts()

    def arrange(self, answer: str) -> None:
        if answer == "rate_limit":
            self.server.state.inject("/v1/billing/meter_events", "rate_limit")


@pytest.fixture(params=["fake", "recorded"])
def contract(request):
    if request.param == "fake":
        yield FakeStripe(request.getfixturevalue("stripe_server"))
        return
    recorded = RecordedAnswers()
    try:
        yield RecordedStripe(recorded)
    finally:
        recorded.stop()
    assert recorded.unused() == []


def test_gateway_contract(contract):
    info = contract.gateway.describe_price(contract.price_id)
    assert (info.usable, info.report_mode, info.formula) == (True, "meter", "sum")
    assert (info.meter_id, info.event_name, info.customer_key, info.value_key) == (
        contract.meter_id,
        contract.event_name,
        "customer",
        "value",
    )

    def send_25(gateway, attempt=1):
        return gateway.send_meter_units(
            event_name=contract.event_name, customer_key=contract.customer_key, value_key="value",
            customer_id=contract.customer_id, units=25, identifier="1234-1234", timestamp=contract.now,
            formula="sum", attempt=attempt,
        )  # fmt: skip

    contract.arrange("accept")
    assert send_25(contract.gateway).events_accepted == 1
    contract.arrange("duplicate")
    assert send_25(contract.gateway, attempt=2).events_already_there == 1

    moment = dt.datetime.fromtimestamp(contract.now, dt.UTC)
    assert contract.gateway.meter_event_total(contract.meter_id, contract.customer_id, moment, moment).total == 25

    contract.arrange("rate_limit")
    with pytest.raises(StripeUnavailable, match="429"):
        send_25(contract.gateway, attempt=3)
    contract.arrange("revoked")
    with pytest.raises(StripeKeyInvalid, match="401"):
        contract.revoked.validate_key()
    contract.arrange("forbidden")
    with pytest.raises(StripeKeyRejected, match="rak_billing_meter_event_write"):
        send_25(contract.restricted)


# ---- one target: sending and reading totals without asking meter or legacy ------------------------------------


def meter_target(metered, formula="sum") -> StripeTarget:
    return StripeTarget(
        mode="meter", customer_id=metered["customer"], price_id=None, meter_id=metered["meter"]["id"],
        event_name="ai_units", customer_key="stripe_customer_id", value_key="value", formula=formula,
    )  # fmt: skip


def test_send_units_to_a_count_meter_resumes_after_the_confirmed_events_and_stops_when_asked(
    stripe_server, key, gateway
):
    meter = stripe_server.state.create_meter(key, "ai_units", formula="count")
    target = meter_target({"meter": meter, "customer": stripe_server.state.create_customer(key)["id"]}, "count")
    sending = gateway.send_units(target, "rep-7", 5, now_ts(), attempt=2, confirmed=2)
    assert [next(sending), next(sending)] == [1, 1]
    sending.close()
    assert [e["identifier"] for e in stripe_server.state.meter_events(key)] == ["rep-7-3", "rep-7-4"]
    assert {c.idempotency_key for c in stripe_server.state.calls if c.method == "POST"} == {
        "rep-7-3:a2",
        "rep-7-4:a2",
    }


def test_send_units_to_a_sum_meter_is_one_event_and_window_total_reads_it_back(stripe_server, key, gateway, metered):
    timestamp = now_ts() - 120
    assert list(gateway.send_units(meter_target(metered), "rep-8", 42, timestamp, attempt=1)) == [42]
    moment = dt.datetime.fromtimestamp(timestamp, dt.UTC)
    assert gateway.window_total(meter_target(metered), moment, moment).total == 42
    with pytest.raises(MeterUnknown, match="meter id is unknown"):
        gateway.window_total(replace(meter_target(metered), meter_id=None), moment, moment)


def test_send_units_to_a_legacy_price_is_one_usage_record_keyed_by_its_timestamp_once_restamped(
    stripe_server, key, gateway
):
    state = stripe_server.state
    price = state.create_price(key, state.create_product(key, "Legacy"), 10)
    customer = state.create_customer(key)["id"]
    item = state.create_subscription(key, customer, price, start_date=now_ts() - 3600)["items"]["data"][0]["id"]
    target = StripeTarget(mode="legacy", customer_id=customer, price_id=price["id"], subscription_item_id=item)
    timestamp = now_ts()
    assert list(gateway.send_units(target, "rep-9", 5, timestamp, attempt=1)) == [5]
    assert list(gateway.send_units(target, "rep-9", 5, timestamp, attempt=2, restamped=True)) == [5]
    keys = [c.idempotency_key for c in state.calls if c.method == "POST"]
    assert keys == ["rep-9", f"rep-9@{timestamp}"]
    now = dt.datetime.now(dt.UTC)
    # Without a recorded item the customer's current one on the price is read; without a subscription, None.
    assert gateway.window_total(replace(target, subscription_item_id=None), now, now).total == 10
    stranger = replace(target, customer_id=state.create_customer(key)["id"], subscription_item_id=None)
    assert gateway.window_total(stranger, now, now) is None
