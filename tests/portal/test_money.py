"""The money view: each client's period, units and estimated charge, billing state, and the agency summary."""

from __future__ import annotations

import csv
import datetime as dt
import io
import itertools

import pytest
from sqlalchemy import func, select

from billing.ledger import UsageRecord, record_usage
from billing.models import Agency, ClientPeriod, RebillClient, UnitReport
from billing.periods import refresh_stale_periods
from billing.units import aggregate_pending_usage
from core.database import db, utcnow
from tests.portal.conftest import client_fields, install_tenant, sign_in
from tests.portal.test_api import add_client, connect

_identifiers = itertools.count(1)


def add_report(
    app,
    client_id: int,
    units: int,
    *,
    at: dt.datetime | None = None,
    status: str = "sent",
    error: str | None = None,
    attempts: int = 1,
) -> None:
    """Put a unit report in the outbox as reporting would have left it."""
    with app.app_context():
        client = db.session.get(RebillClient, client_id)
        db.session.add(
            UnitReport(
                agency_id=client.agency_id,
                client_id=client_id,
                identifier=f"rebill_test_{client_id}_{next(_identifiers)}",
                units=units,
                usage_timestamp=at or utcnow(),
                status=status,
                last_error=error,
                attempts=attempts,
                # reporting counts failures in a row too: each of these attempts was one (billing.reporting)
                failed_attempts=attempts if status == "pending" and error else 0,
            )
        )
        db.session.commit()


def subscription_period(fake_stripe, tenant, customer_id) -> tuple[int, int]:
    """Read the customer's subscription item period straight from the fake."""
    client = fake_stripe.client(tenant.stripe_key)
    subscription = client.v1.subscriptions.list({"customer": customer_id}).data[0]
    item = subscription["items"].data[0]
    return item.current_period_start, item.current_period_end


@pytest.fixture
def admin(portal_client, tenant_a):
    headers = sign_in(portal_client, "company-a")
    connect(portal_client, headers, tenant_a)
    return headers


def test_a_client_carries_its_stripe_period_units_and_estimated_charge(
    portal_app, portal_client, admin, tenant_a, fake_stripe
):
    created = add_client(portal_client, admin, tenant_a)
    start, end = subscription_period(fake_stripe, tenant_a, tenant_a.customer_id)
    add_report(portal_app, created["id"], 30)
    add_report(portal_app, created["id"], 7, status="pending")  # waiting to be sent: billed this period too
    add_report(portal_app, created["id"], 500, at=dt.datetime.fromtimestamp(start, dt.UTC) - dt.timedelta(seconds=1))

    shown = portal_client.get(f"/api/portal/clients/{created['id']}", headers=admin).get_json()

    assert shown["period"] == {
        "start": dt.datetime.fromtimestamp(start, dt.UTC).isoformat(),
        "end": dt.datetime.fromtimestamp(end, dt.UTC).isoformat(),
        "units": 37,
        "estimate": {"amount": "3.70", "currency": "usd"},  # $0.10 a unit
    }
    assert (shown["billing_state"], shown["billing_problem"]) == ("ok", None)
    assert shown["product_name"] == "AI usage"
    assert shown["customer_name"] == "Acme Chat Co"
    listed = portal_client.get("/api/portal/clients", headers=admin).get_json()["clients"]
    assert listed[0]["period"] == shown["period"]


def test_summary_totals_this_periods_charges_per_currency(portal_app, portal_client, admin, tenant_a, fake_stripe):
    first = add_client(portal_client, admin, tenant_a)
    customers = fake_stripe.client(tenant_a.stripe_key).v1.customers.list().data
    other_customer = next(c.id for c in customers if c.id != tenant_a.customer_id)
    second = add_client(
        portal_client, admin, tenant_a, nickname="Other", channel_id="chan-2", stripe_customer_id=other_customer
    )
    add_report(portal_app, first["id"], 12)
    add_report(portal_app, second["id"], 3)

    summary = portal_client.get("/api/portal/summary", headers=admin).get_json()

    assert summary["totals"] == [{"currency": "usd", "amount": "1.50", "units": 15}]
    assert (summary["clients"], summary["clients_failing"]) == (2, 0)
    assert summary["stripe_disconnected"] is False


def test_summary_and_periods_are_the_agencys_own(portal_app, portal_client, admin, tenant_a, tenant_b):
    created = add_client(portal_client, admin, tenant_a)
    add_report(portal_app, created["id"], 50)
    headers_b = sign_in(portal_client, "company-b")

    summary_b = portal_client.get("/api/portal/summary", headers=headers_b).get_json()

    assert summary_b == {
        "totals": [],
        "clients": 0,
        "clients_failing": 0,
        "problems": [],
        "stripe_disconnected": True,
        "billing_problem": summary_b["billing_problem"],
    }
    assert portal_client.get(f"/api/portal/clients/{created['id']}", headers=headers_b).status_code == 404


def test_a_subaccount_user_sums_only_their_subaccount(portal_app, portal_client, admin, tenant_a):
    add_report(portal_app, add_client(portal_client, admin, tenant_a)["id"], 50)
    ghl = add_client(
        portal_client,
        admin,
        tenant_a,
        nickname="Sub",
        provider="ghl",
        channel_id=None,
        location_id=tenant_a.location_id,
        charge_by="messages",
        billing_unit=5,
    )
    add_report(portal_app, ghl["id"], 4)
    headers = sign_in(portal_client, "company-a", user_type="location", role="user", location=tenant_a.location_id)

    summary = portal_client.get("/api/portal/summary", headers=headers).get_json()

    assert summary["totals"] == [{"currency": "usd", "amount": "0.40", "units": 4}]
    assert summary["clients"] == 1


def test_refused_units_mark_the_client_failing_in_plain_words(portal_app, portal_client, admin, tenant_a):
    created = add_client(portal_client, admin, tenant_a)
    add_report(portal_app, created["id"], 4, status="failed", error="No such customer: 'cus_gone123'")
    add_report(portal_app, created["id"], 2, status="failed", error="No such customer: 'cus_gone123'")

    shown = portal_client.get(f"/api/portal/clients/{created['id']}", headers=admin).get_json()
    summary = portal_client.get("/api/portal/summary", headers=admin).get_json()

    assert shown["billing_state"] == "failing"
    assert shown["billing_problem"].startswith("Stripe has no customer cus_gone123: pick the right customer")
    assert "6 units" in shown["billing_problem"]
    assert summary["clients_failing"] == 1
    assert summary["problems"] == [
        {"client_id": created["id"], "nickname": "Acme", "problem": shown["billing_problem"]}
    ]


def test_units_that_keep_failing_to_reach_stripe_mark_the_client_failing(portal_app, portal_client, admin, tenant_a):
    created = add_client(portal_client, admin, tenant_a)
    add_report(portal_app, created["id"], 3, status="pending", attempts=2, error="Stripe could not be reached: x")
    assert portal_client.get(f"/api/portal/clients/{created['id']}", headers=admin).get_json()["billing_state"] == "ok"

    add_report(portal_app, created["id"], 3, status="pending", attempts=3, error="Stripe could not be reached: x")

    shown = portal_client.get(f"/api/portal/clients/{created['id']}", headers=admin).get_json()
    assert shown["billing_state"] == "failing"
    assert "keeps retrying" in shown["billing_problem"]


def test_a_quarantined_client_is_failing_with_the_reason(portal_app, portal_client, admin, tenant_a):
    # Rule 12: aggregation quarantined the client (its total would pass the lifetime limit).
    created = add_client(portal_client, admin, tenant_a)
    with portal_app.app_context():
        client = db.session.get(RebillClient, created["id"])
        client.quarantine_reason = "its usage stopped counting at 4,000,000,000,000,000,000 tokens: ..."
        db.session.commit()

    shown = portal_client.get(f"/api/portal/clients/{created['id']}", headers=admin).get_json()
    assert shown["billing_state"] == "failing"
    assert shown["billing_problem"].startswith("usage is no longer counted: its usage stopped counting at 4,000")


def test_paused_and_disconnected_clients_say_so(portal_app, portal_client, admin, tenant_a):
    created = add_client(portal_client, admin, tenant_a)
    portal_client.patch(f"/api/portal/clients/{created['id']}", json={"status": "paused"}, headers=admin)
    shown = portal_client.get(f"/api/portal/clients/{created['id']}", headers=admin).get_json()
    assert shown["billing_state"] == "paused" and "not billed" in shown["billing_problem"]

    portal_client.delete("/api/portal/stripe-key", headers=admin)

    shown = portal_client.get(f"/api/portal/clients/{created['id']}", headers=admin).get_json()
    summary = portal_client.get("/api/portal/summary", headers=admin).get_json()
    assert shown["billing_state"] == "stripe_disconnected"
    assert "billing has stopped" in shown["billing_problem"]
    assert summary["stripe_disconnected"] is True and "billing has stopped" in summary["billing_problem"]


def test_a_refused_key_stops_billing_visibly(portal_app, portal_client, admin, tenant_a):
    created = add_client(portal_client, admin, tenant_a)
    with portal_app.app_context():
        agency = db.session.get(Agency, tenant_a.agency_id)
        agency.stripe_key_status, agency.stripe_key_problem = "needs_attention", "Stripe rejected the API key (401)"
        db.session.commit()

    shown = portal_client.get(f"/api/portal/clients/{created['id']}", headers=admin).get_json()

    assert shown["billing_state"] == "stripe_disconnected"
    assert "Stripe rejected the API key (401)" in shown["billing_problem"]


def test_a_customer_without_a_subscription_is_failing_on_the_calendar_month(
    portal_app, portal_client, admin, tenant_a, fake_stripe
):
    lonely = fake_stripe.state.create_customer(tenant_a.stripe_key, name="No Plan Ltd")
    created = add_client(portal_client, admin, tenant_a, stripe_customer_id=lonely["id"])
    add_report(portal_app, created["id"], 5)

    shown = portal_client.get(f"/api/portal/clients/{created['id']}", headers=admin).get_json()

    now = utcnow()
    assert shown["period"]["start"] == now.replace(day=1, hour=0, minute=0, second=0, microsecond=0).isoformat()
    assert shown["period"]["units"] == 5
    assert shown["period"]["estimate"] == {"amount": "0.50", "currency": "usd"}
    assert shown["billing_state"] == "failing"
    assert "no active subscription" in shown["billing_problem"]


@pytest.mark.parametrize(
    ("refused", "problem"),
    [
        # The save reads the customer once (customer_exists); the period read that follows is refused.
        ({"path": "/v1/customers/", "after": 1}, "Stripe refused to read the customer"),
        ({"path": "/v1/subscriptions"}, "Stripe refused to read the customer's subscriptions"),
    ],
)
def test_a_saved_client_is_answered_saved_when_stripe_refuses_the_period_read(
    portal_app, portal_client, admin, tenant_a, fake_stripe, refused, problem
):
    fake_stripe.state.inject(refused["path"], "bad_request", method="GET", after=refused.get("after", 0))

    answer = portal_client.post("/api/portal/clients", json=client_fields(tenant_a), headers=admin)

    assert answer.status_code == 201, answer.get_json()
    created = answer.get_json()
    assert created["billing_state"] == "failing"
    assert problem in created["billing_problem"] and "parameter_unknown" not in created["billing_problem"]
    with portal_app.app_context():
        assert db.session.scalar(select(func.count()).select_from(RebillClient)) == 1
    # Edits that re-read the period are answered as saved too.
    fake_stripe.state.inject(refused["path"], "bad_request", method="GET", after=refused.get("after", 0))
    other = fake_stripe.state.create_customer(tenant_a.stripe_key, name="Other Co")
    fake_stripe.state.create_subscription(tenant_a.stripe_key, other["id"], [tenant_a.price_id])
    edited = portal_client.patch(
        f"/api/portal/clients/{created['id']}", json={"stripe_customer_id": other["id"]}, headers=admin
    )
    assert edited.status_code == 200, edited.get_json()
    assert edited.get_json()["stripe_customer_id"] == other["id"] and problem in edited.get_json()["billing_problem"]


def test_a_restricted_key_without_subscription_read_shows_the_missing_permission(
    portal_app, portal_client, tenant_a, fake_stripe
):
    restricted = "rk_test_companya_nosubscriptions"
    fake_stripe.state.add_account(restricted, account_id="acct_companya", denied_permissions=["subscription_read"])
    headers = sign_in(portal_client, "company-a")
    assert portal_client.put("/api/portal/stripe-key", json={"api_key": restricted}, headers=headers).status_code == 200

    answer = portal_client.post("/api/portal/clients", json=client_fields(tenant_a), headers=headers)

    assert answer.status_code == 201, answer.get_json()
    created = answer.get_json()
    assert created["billing_state"] == "failing"
    assert "'rak_subscription_read' permission" in created["billing_problem"]
    assert created["customer_name"] == "Acme Chat Co"  # the reads the key may do still fill the cache


def test_a_tiered_price_is_estimated_as_stripe_would(portal_app, portal_client, admin, tenant_a, fake_stripe):
    state = fake_stripe.state
    meter = state.create_meter(tenant_a.stripe_key, "tiered_units")
    price = state.create_price(
        tenant_a.stripe_key,
        tenant_a.product_id,
        None,
        meter=meter,
        nickname="Graduated",
        tiers_mode="graduated",
        tiers=[{"up_to": 10, "unit_amount": 100, "flat_amount": 500}, {"up_to": "inf", "unit_amount_decimal": "50.5"}],
    )
    customer = state.create_customer(tenant_a.stripe_key, name="Tiered Inc")
    state.create_subscription(tenant_a.stripe_key, customer, price)
    created = add_client(portal_client, admin, tenant_a, stripe_customer_id=customer["id"], stripe_price_id=price["id"])
    add_report(portal_app, created["id"], 13)

    shown = portal_client.get(f"/api/portal/clients/{created['id']}", headers=admin).get_json()

    # $5 flat + 10 x $1 + 3 x $0.505 = $16.515 -> $16.52 (rounded once, half up)
    assert shown["period"]["estimate"] == {"amount": "16.52", "currency": "usd"}
    assert shown["price_name"] == "Graduated"


def test_changing_the_customer_rereads_the_period(portal_app, portal_client, admin, tenant_a, fake_stripe):
    created = add_client(portal_client, admin, tenant_a)
    lonely = fake_stripe.state.create_customer(tenant_a.stripe_key, name="No Plan Ltd")

    edited = portal_client.patch(
        f"/api/portal/clients/{created['id']}", json={"stripe_customer_id": lonely["id"]}, headers=admin
    ).get_json()

    assert edited["customer_name"] == "No Plan Ltd"
    assert edited["billing_state"] == "failing"


def test_the_scheduled_refresh_fills_missing_and_stale_periods(portal_app, portal_client, admin, tenant_a, tenant_b):
    created = add_client(portal_client, admin, tenant_a)
    with portal_app.app_context():
        db.session.delete(db.session.get(ClientPeriod, created["id"]))
        db.session.commit()
        shown = portal_client.get(f"/api/portal/clients/{created['id']}", headers=admin).get_json()
        assert shown["period"]["estimate"] is None  # not read yet: no guess
        assert shown["customer_name"] is None

        assert refresh_stale_periods() == 1
        assert refresh_stale_periods() == 0  # fresh now
        assert refresh_stale_periods(now=utcnow() + dt.timedelta(hours=2)) == 1  # an hour old: read again
        row = db.session.scalars(select(ClientPeriod)).one()
        assert row.customer_name == "Acme Chat Co" and row.period_end > utcnow()

    shown = portal_client.get(f"/api/portal/clients/{created['id']}", headers=admin).get_json()
    assert shown["period"]["estimate"] == {"amount": "0.00", "currency": "usd"}


def test_one_agencys_unreachable_stripe_does_not_stop_anothers_refresh(
    portal_app, portal_client, admin, tenant_a, tenant_b, fake_stripe
):
    headers_b = sign_in(portal_client, "company-b")
    connect(portal_client, headers_b, tenant_b)
    add_client(portal_client, admin, tenant_a)
    add_client(portal_client, headers_b, tenant_b)
    with portal_app.app_context():
        for row in db.session.scalars(select(ClientPeriod)):
            db.session.delete(row)
        db.session.commit()
        fake_stripe.state.inject("/v1/customers", "server_error", times=50, api_key=tenant_a.stripe_key)

        assert refresh_stale_periods() == 1

        assert [row.client_id for row in db.session.scalars(select(ClientPeriod))] == [
            db.session.scalars(select(RebillClient.id).where(RebillClient.agency_id == tenant_b.agency_id)).one()
        ]


def test_an_agency_without_a_key_is_skipped_by_the_refresh(portal_app, portal_client, fake_stripe):
    install_tenant(portal_app, fake_stripe, "company-c")
    with portal_app.app_context():
        assert refresh_stale_periods() == 0


def test_refresh_periods_command(portal_app, portal_client, admin, tenant_a):
    created = add_client(portal_client, admin, tenant_a)
    with portal_app.app_context():
        db.session.delete(db.session.get(ClientPeriod, created["id"]))
        db.session.commit()

    result = portal_app.test_cli_runner().invoke(args=["rebill", "refresh-periods"])

    assert result.exit_code == 0 and result.output.strip() == "refreshed=1"


# ---- the customer picker -------------------------------------------------------------------------------


def test_customer_search_finds_the_agencys_customers_by_name_email_or_id(portal_client, admin, tenant_a, tenant_b):
    def search(query):
        answer = portal_client.get("/api/portal/customers", query_string={"q": query}, headers=admin)
        assert answer.status_code == 200, answer.get_json()
        return answer.get_json()["customers"]

    everyone = search("")
    assert len(everyone) == 3 and set(everyone[0]) == {"id", "name", "email"}
    assert [c["name"] for c in search("smiles")] == ["Bright Smiles Dental"]
    assert [c["name"] for c in search("billing@sunny")] == ["Sunny Side Realty"]
    assert [c["name"] for c in search("Ac")] == ["Acme Chat Co"]  # too short for Stripe search: newest page
    assert search(tenant_a.customer_id) == [
        {"id": tenant_a.customer_id, "name": "Acme Chat Co", "email": "billing@acme.example"}
    ]
    assert search(tenant_b.customer_id) == []  # another agency's customer is not in this Stripe account
    assert search('x" OR name~"') == []  # quotes cannot widen the query


def test_customer_search_is_for_agency_users_with_a_connected_stripe(portal_client, tenant_a):
    headers = sign_in(portal_client, "company-a")
    assert portal_client.get("/api/portal/customers?q=acme", headers=headers).status_code == 422  # no key yet
    connect(portal_client, headers, tenant_a)
    sub_user = sign_in(portal_client, "company-a", user_type="location", role="user", location=tenant_a.location_id)
    assert portal_client.get("/api/portal/customers?q=acme", headers=sub_user).status_code == 403
    reader = sign_in(portal_client, "company-a", role="user", location=tenant_a.location_id)  # item 8: inside one
    assert portal_client.get("/api/portal/customers?q=acme", headers=reader).status_code == 403  # sees it as sub_user
    too_long = portal_client.get("/api/portal/customers", query_string={"q": "x" * 201}, headers=headers)
    assert too_long.status_code == 400 and too_long.get_json()["error"]


def test_stripe_down_during_customer_search_answers_503(portal_client, admin, fake_stripe, tenant_a):
    fake_stripe.state.inject("/v1/customers", "server_error", times=10)
    assert portal_client.get("/api/portal/customers?q=acme", headers=admin).status_code == 503


@pytest.mark.parametrize("billing_unit", [0, -1, 10**12 + 1, 1.5, "10", True, None])
def test_every_bad_billing_unit_gets_the_one_message_the_page_hint_shows(
    portal_app, portal_client, admin, tenant_a, billing_unit
):
    answer = portal_client.post(
        "/api/portal/clients", json=client_fields(tenant_a, billing_unit=billing_unit), headers=admin
    )

    assert answer.status_code == 422
    assert "a whole number from 1 to 1,000,000,000,000" in answer.get_json()["fields"]["billing_unit"]
    page = portal_client.get("/app").get_data(as_text=True)
    assert 'data-rule="a whole number from 1 to 1,000,000,000,000"' in page
    with portal_app.app_context():
        assert db.session.scalar(select(func.count()).select_from(RebillClient)) == 0


def test_a_failed_payment_marks_the_client_failing_or_paused(portal_app, portal_client, admin, tenant_a):
    created = add_client(portal_client, admin, tenant_a)
    with portal_app.app_context():
        client = db.session.get(RebillClient, created["id"])
        client.payment_failed_at, client.payment_problem = utcnow(), "the invoice payment failed: card declined"
        db.session.commit()

    shown = portal_client.get(f"/api/portal/clients/{created['id']}", headers=admin).get_json()
    assert shown["billing_state"] == "failing" and "card declined" in shown["billing_problem"]

    with portal_app.app_context():
        client = db.session.get(RebillClient, created["id"])
        client.status, client.paused_for_payment = "paused", True
        db.session.commit()
    shown = portal_client.get(f"/api/portal/clients/{created['id']}", headers=admin).get_json()
    assert shown["billing_state"] == "paused" and "until the customer pays" in shown["billing_problem"]


# ---- a client's statement and its CSV export -----------------------------------------------------------


def record_counted_usage(app, client_id: int, rows: list[tuple[str, int, str, str | None]]) -> None:
    """Record usage for a Capri client and aggregate it: (event id, tokens, ISO time, model)."""
    with app.app_context():
        client = db.session.get(RebillClient, client_id)
        record_usage(
            client.agency_id,
            [
                UsageRecord(
                    source="capri",
                    source_event_id=event_id,
                    channel_id=client.channel_id,
                    input_tokens=tokens,
                    occurred_at=dt.datetime.fromisoformat(at),
                    model=model,
                )
                for event_id, tokens, at, model in rows
            ],
        )
        aggregate_pending_usage()
        db.session.commit()


def test_a_subaccount_user_reads_their_statement_without_stripe_ids(
    portal_app, portal_client, admin, tenant_a, fake_stripe
):
    add_client(portal_client, admin, tenant_a)  # another client of the agency: not in their statement
    theirs = add_client(
        portal_client,
        admin,
        tenant_a,
        nickname="Their client",
        provider="ghl",
        channel_id=None,
        location_id=tenant_a.location_id,
        charge_by="messages",
        message_source="ghl_outbound",
        billing_unit=5,
    )
    start, _end = subscription_period(fake_stripe, tenant_a, tenant_a.customer_id)
    period_start = dt.datetime.fromtimestamp(start, dt.UTC)
    add_report(portal_app, theirs["id"], 9)
    with portal_app.app_context():  # pretend the client existed a month earlier, with 20 units then
        db.session.get(RebillClient, theirs["id"]).created_at = period_start - dt.timedelta(days=40)
        db.session.commit()
    add_report(portal_app, theirs["id"], 20, at=period_start - dt.timedelta(days=3))
    headers = sign_in(portal_client, "company-a", user_type="location", role="user", location=tenant_a.location_id)

    answer = portal_client.get("/api/portal/statement", headers=headers)

    assert answer.status_code == 200
    [statement] = answer.get_json()["statements"]
    assert statement["nickname"] == "Their client"
    assert statement["measure"] == "GHL outbound messages"
    assert statement["state"] == "Billing normally"
    assert statement["period"]["units"] == 9
    assert statement["period"]["estimate"] == {"amount": "0.90", "currency": "usd"}
    assert statement["product_name"] == "AI usage"
    assert len(statement["daily"]) == 30
    previous = statement["previous_periods"]
    assert [row["units"] for row in previous] == [20, 0]  # the client did not exist before that
    assert previous[0]["end"] == period_start.isoformat()
    assert previous[0]["estimate"] == {"amount": "2.00", "currency": "usd"}
    text = answer.get_data(as_text=True)
    for stripe_id in (tenant_a.customer_id, tenant_a.price_id, tenant_a.product_id, "rebill_test_"):
        assert stripe_id not in text


def test_the_statement_is_the_sessions_own(portal_client, admin, tenant_a, tenant_b):
    add_client(portal_client, admin, tenant_a)
    headers_b = sign_in(portal_client, "company-b")
    assert portal_client.get("/api/portal/statement", headers=headers_b).get_json() == {"statements": []}
    other_location = sign_in(
        portal_client, "company-a", user_type="location", role="user", location=tenant_a.location_id
    )
    assert portal_client.get("/api/portal/statement", headers=other_location).get_json() == {"statements": []}


def test_previous_periods_step_back_whole_months_or_the_period_length():
    from billing.statements import previous_periods

    utc = dt.UTC
    monthly = previous_periods(dt.datetime(2026, 3, 31, tzinfo=utc), dt.datetime(2026, 4, 30, tzinfo=utc), 2)
    assert monthly == [
        (dt.datetime(2026, 2, 28, tzinfo=utc), dt.datetime(2026, 3, 31, tzinfo=utc)),
        (dt.datetime(2026, 1, 28, tzinfo=utc), dt.datetime(2026, 2, 28, tzinfo=utc)),
    ]
    weekly = previous_periods(dt.datetime(2026, 3, 8, tzinfo=utc), dt.datetime(2026, 3, 15, tzinfo=utc), 1)
    assert weekly == [(dt.datetime(2026, 3, 1, tzinfo=utc), dt.datetime(2026, 3, 8, tzinfo=utc))]


def test_export_streams_usage_and_reports_as_quoted_csv(portal_app, portal_client, admin, tenant_a):
    created = add_client(portal_client, admin, tenant_a)
    today = utcnow().date()
    at = f"{today.isoformat()}T08:00:00+00:00"
    record_counted_usage(
        portal_app,
        created["id"],
        [
            ("evt-1", 1500, at, 'gpt "quoted", with comma'),
            ("=HYPERLINK(1)", 700, at, None),
            ("evt-old", 10, "2020-01-01T00:00:00+00:00", None),
        ],
    )
    add_report(portal_app, created["id"], 2, status="failed", error="No such customer: 'cus_x'")

    answer = portal_client.get(
        f"/api/portal/clients/{created['id']}/export.csv",
        query_string={"from": (today - dt.timedelta(days=1)).isoformat(), "to": today.isoformat()},
        headers=admin,
    )

    assert answer.status_code == 200 and answer.is_streamed
    assert answer.mimetype == "text/csv"
    assert "attachment" in answer.headers["Content-Disposition"]
    rows = list(csv.DictReader(io.StringIO(answer.get_data(as_text=True))))
    usage = [row for row in rows if row["record"] == "usage"]
    assert {row["event_id"] for row in usage} == {"evt-1", "'=HYPERLINK(1)"}  # not evt-old; no formula
    assert next(row for row in usage if row["event_id"] == "evt-1")["model"] == 'gpt "quoted", with comma'
    assert sum(int(row["counted"]) for row in usage) == 2200
    reports = [row for row in rows if row["record"] == "unit_report"]
    assert sorted((row["units"], row["report_status"]) for row in reports) == [("2", "failed"), ("2", "pending")]
    report = next(row for row in reports if row["report_status"] == "failed")
    assert report["last_error"] == "No such customer: 'cus_x'"


def test_the_export_names_a_usage_api_events_source_by_its_stored_word(portal_app, portal_client, admin, tenant_a):
    """The CSV's ``source`` is the event's stored word: ``capri`` for the usage API, while the client's provider is
    ``capri_api`` (two words for two facts, docs/billing-rules.md "Providers and sources")."""
    created = add_client(portal_client, admin, tenant_a)
    key = portal_client.post("/api/portal/api-keys", json={"name": "platform"}, headers=admin).get_json()["key"]
    event = {"id": "evt-source", "channel": "chan-acme", "input_tokens": 5, "occurred_at": utcnow().isoformat()}
    sent = portal_client.post("/api/v1/usage", json={"events": [event]}, headers={"Authorization": f"Bearer {key}"})
    assert sent.status_code == 200 and sent.get_json()["results"][0]["status"] == "accepted"
    with portal_app.app_context():
        aggregate_pending_usage()
        db.session.commit()

    answer = portal_client.get(f"/api/portal/clients/{created['id']}/export.csv", headers=admin)

    rows = list(csv.DictReader(io.StringIO(answer.get_data(as_text=True))))
    assert created["provider"] == "capri_api"
    assert [(row["event_id"], row["source"]) for row in rows if row["record"] == "usage"] == [("evt-source", "capri")]


def test_a_subaccount_user_exports_without_stripes_raw_errors(portal_app, portal_client, admin, tenant_a):
    theirs = add_client(
        portal_client,
        admin,
        tenant_a,
        nickname="Theirs",
        provider="ghl",
        channel_id=None,
        location_id=tenant_a.location_id,
        charge_by="messages",
        billing_unit=5,
    )
    add_report(portal_app, theirs["id"], 1, status="failed", error="No such customer: 'cus_x'")
    headers = sign_in(portal_client, "company-a", user_type="location", role="user", location=tenant_a.location_id)

    answer = portal_client.get(f"/api/portal/clients/{theirs['id']}/export.csv", headers=headers)

    assert answer.status_code == 200
    assert "cus_x" not in answer.get_data(as_text=True)


def test_a_subaccount_users_csv_export_has_no_report_identifiers(portal_app, portal_client, admin, tenant_a):
    connect(portal_client, admin, tenant_a)
    created = portal_client.post("/api/portal/clients", headers=admin, json={
        "nickname": "Sub", "provider": "ghl", "location_id": tenant_a.location_id,
        "stripe_product_id": tenant_a.product_id, "stripe_price_id": tenant_a.price_id,
        "stripe_customer_id": tenant_a.customer_id, "charge_by": "messages", "billing_unit": 1})  # fmt: skip
    assert created.status_code == 201, created.get_json()
    client_id = created.get_json()["id"]
    with portal_app.app_context():
        client = db.session.get(RebillClient, client_id)
        now = dt.datetime.now(dt.UTC)
        report = UnitReport(client_id=client.id, agency_id=client.agency_id, units=1,
                            identifier="rebill-secret-ident-1", usage_timestamp=now, status="sent",
                            sent_at=now, created_at=now)  # fmt: skip
        db.session.add(report)
        db.session.commit()
    user = sign_in(portal_client, "company-a", role="user", user_type="location", location=tenant_a.location_id)
    usage = portal_client.get(f"/api/portal/clients/{client_id}/usage", headers=user).get_json()
    assert "rebill-secret-ident-1" not in str(usage)  # /usage hides it (customer_view.usage_for_customer)
    answer = portal_client.get(f"/api/portal/clients/{client_id}/export.csv", headers=user)
    assert answer.status_code == 200
    rows = list(csv.reader(io.StringIO(answer.get_data(as_text=True))))
    assert "rebill-secret-ident-1" not in str(rows), "README: subaccount users never see report identifiers"
    agency_rows = portal_client.get(f"/api/portal/clients/{client_id}/export.csv", headers=admin)
    assert "rebill-secret-ident-1" in agency_rows.get_data(as_text=True)  # the agency admin still sees it


@pytest.mark.parametrize(
    "query",
    [
        {"from": "yesterday"},
        {"to": "2026-13-01"},
        {"from": "2026-02-01", "to": "2026-01-01"},
        {"from": "2024-01-01", "to": "2026-01-01"},
        {"to": "9999-12-31"},
    ],
)
def test_export_refuses_bad_dates(portal_client, admin, tenant_a, query):
    created = add_client(portal_client, admin, tenant_a)
    answer = portal_client.get(f"/api/portal/clients/{created['id']}/export.csv", query_string=query, headers=admin)
    assert answer.status_code == 400 and answer.get_json()["error"]


def test_export_follows_tenancy(portal_client, admin, tenant_a, tenant_b):
    created = add_client(portal_client, admin, tenant_a)
    headers_b = sign_in(portal_client, "company-b")
    assert portal_client.get(f"/api/portal/clients/{created['id']}/export.csv", headers=headers_b).status_code == 404
    sub_user = sign_in(portal_client, "company-a", user_type="location", role="user", location=tenant_a.location_id)
    assert portal_client.get(f"/api/portal/clients/{created['id']}/export.csv", headers=sub_user).status_code == 404
    assert portal_client.get(f"/api/portal/clients/{created['id']}/export.csv").status_code == 401
