"""Review of 88b062a (the >24 h check and reconcile count every agency's reports to the customer): attacks.

H1: a neighbour that the agency lookup of ``report_claims.offered_to_customer`` cannot see (its agency has since
    moved to another Stripe account and re-pointed its client) still holds units in the customer's total: a
    missing report is marked delivered (lost).
H2: the lookup's ``agency_id IN (...) OR ...`` is not served by an index: every agency's >24 h check reads the
    whole unit_report table (all agencies' history), where it read only its own agency's rows before.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import replace

from sqlalchemy import event, insert

from billing.agencies import ensure_agency
from billing.models import UnitReport
from core.database import db
from core.encryption import secret_box
from tests.billing.stripe_support import tick


def _second_agency_on_the_same_account(world, setup, name):
    """Another GHL company connecting the same Stripe account (as test G3 builds it), account ids recorded."""
    first = world.agency_row(setup)
    first.stripe_account_id = setup.account_id
    shared = ensure_agency(name)
    shared.stripe_key_ciphertext = secret_box().encrypt(setup.agency_key)
    shared.stripe_key_last4, shared.stripe_mode, shared.stripe_key_status = setup.agency_key[-4:], "test", "ok"
    shared.stripe_account_id = setup.account_id
    db.session.flush()
    return shared


def missing_report_beside_another_agency_s_confirmed_one(world, setup):
    """D (6, agency 1) offered and not applied, answer lost; N (6, agency 2, same customer, meter and minute)
    confirmed. Returns (client, other client). Test G3 (test_review_attacks_rollover) builds on it too."""
    shared = _second_agency_on_the_same_account(world, setup, "company-moving-away")
    client = world.client(setup)
    other = world.client(replace(setup, agency=shared), customer_id=client.stripe_customer_id)
    usage = world.clock.now() - dt.timedelta(seconds=30)
    world.report(client, 6, at=usage)
    world.state.inject("/v1/billing/meter_events", "timeout", seconds=0.1)  # not applied, answer lost
    tick(world)
    world.report(other, 6, at=usage)
    tick(world, seconds=1)
    (d,), (n,) = world.reports(client), world.reports(other)
    assert d.in_doubt_since is not None and n.status == "sent" and n.target_account == setup.account_id
    return client, other


def test_attack_a_neighbour_of_an_agency_that_moved_away_does_not_make_a_missing_report_look_delivered(world):
    """H1. As G3, but within the day agency 2 moves to another Stripe account (a new key, confirmed) and points
    its client at a customer there. N's 6 units stay in the first account's total for the customer, but
    offered_to_customer looks rows up only through agency 1, the agencies now on the account and those with a
    client now on the customer: agency 2 is none of them, so N is not 'known'. D's check reads 6, knows 0,
    unconfirmed 0: extra == remaining, D is marked delivered 'from Stripe's totals' while it never landed (6 units
    never billed). 88b062a's docstring names this hole ('Not seen'); it is the G3 loss again, reached by an
    ordinary account move. Fix: select the window's rows by customer (and account), not through agencies: an
    index on unit_report (target_customer, stripe_timestamp) serves it directly (and fixes H2)."""
    setup = world.agency()
    client, other = missing_report_beside_another_agency_s_confirmed_one(world, setup)

    # Agency 2 moves: its new account, its client on a customer of it (connect_stripe + update_client's effect).
    moved = world.agency_row(replace(setup, agency=other.agency))
    moved.stripe_account_id = "acct_moved_elsewhere"
    db.session.get(type(other), other.id).stripe_customer_id = "cus_in_the_new_account"
    db.session.flush()

    tick(world, hours=25)

    (d,) = world.reports(client)
    assert d.status != "sent", f"D marked delivered ({d.last_error!r}) but Stripe holds only N's units"
    assert world.stripe_total(setup, client) in (6, 12)


# ---- H2. blast radius ------------------------------------------------------------------------------------------


def _bulk_history(agency_id, client_id, customer, event_name, count, at):
    db.session.execute(
        insert(UnitReport),
        [
            dict(
                agency_id=agency_id, client_id=client_id, identifier=f"hist-{agency_id}-{n}", units=1,
                usage_timestamp=at, status="sent", attempts=1, next_attempt_at=at, target_customer=customer,
                target_event_name=event_name, stripe_timestamp=at, units_confirmed=1,
            )
            for n in range(count)
        ],
    )


def _plan(statement, parameters) -> str:
    connection = db.session.connection()
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql("ANALYZE unit_report")
        connection.exec_driver_sql("ANALYZE agency")
        connection.exec_driver_sql("ANALYZE rebill_client")
        rows = connection.exec_driver_sql("EXPLAIN " + statement, parameters).all()
    else:
        connection.exec_driver_sql("ANALYZE")
        rows = connection.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters).all()
    return "\n".join(str(row[-1]) for row in rows)


def test_attack_one_agency_s_check_does_not_read_every_agency_s_history(world):
    """H2. A big agency (4000 reports, other customers) beside a small one whose report D is in doubt past 24 h.
    Before 88b062a D's check read its agency's rows (ix_unit_report_agency_id); now the condition is
    ``target_customer = ? AND (agency_id = ? OR agency_id IN (clients on it) OR agency_id IN (agencies on the
    account))``: an OR with subqueries, which PostgreSQL cannot turn into index scans, and no index has
    target_customer. The plan of the check's ledger read scans unit_report whole: every >24 h check of every
    agency costs the whole table (one agency's big history slows all). Fix: index (target_customer,
    stripe_timestamp) and select by it (H1's fix)."""
    big = world.agency()
    big_client = world.client(big)
    _bulk_history(big.agency.id, big_client.id, "cus_someone_else", "ai_units", 4000, world.clock.now())
    setup = world.agency()
    world.agency_row(setup).stripe_account_id = setup.account_id  # as connect_stripe records it in production
    client = world.client(setup)
    world.report(client, 6)
    world.state.inject("/v1/billing/meter_events", "timeout", seconds=0.1)  # not applied, answer lost
    tick(world)

    seen = []

    def capture(conn, cursor, statement, parameters, context, executemany):
        if "in_doubt_since IS NOT NULL" in statement and "unit_report" in statement and "sum(" in statement:
            seen.append((statement, parameters))

    engine = db.engine
    event.listen(engine, "before_cursor_execute", capture)
    try:
        tick(world, hours=25)
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    assert seen, "the check's ledger read was not seen"
    plan = _plan(*seen[0])
    full_scans = [
        line for line in plan.splitlines() if "Seq Scan on unit_report" in line or line.strip() == "SCAN unit_report"
    ]
    assert not full_scans, plan


# ---- H3. several live items on the meter (36253d8) -------------------------------------------------------------


def test_attack_the_money_view_tells_the_agency_when_a_second_item_on_the_meter_bills_every_unit_again(world):
    """H3. The customer is on the client's price and, in a second live subscription, on another price of the same
    meter (an upgrade sold as a new subscription while the old one runs to its end). Stripe bills a meter's events
    on every live item of the customer whose price uses the meter (item_for's docstring, docs/stripe.md §1.2): each
    unit Rebill sends once is invoiced twice. _read_period now reads every live item (36253d8) but takes
    item_for's first answer, the item on the price, and says nothing: no problem, the money view and caps count
    each unit once at the client's price. Fix: when more than one live item bills the meter, the client's problem
    names the other prices ('Stripe bills these units on each of ...')."""
    from billing.periods import refresh_client_period

    setup = world.agency()
    client = world.client(setup)
    other_price = world.state.create_price(setup.key, setup.product, 20, meter=setup.meter)
    world.state.create_subscription(
        setup.key, client.stripe_customer_id, other_price, start_date=int(world.clock.now().timestamp()) - 3600
    )
    row = refresh_client_period(world.agency_row(setup), client)
    db.session.commit()

    assert row.problem and other_price["id"] in row.problem, row.problem
