"""The portal in a real browser, inside an iframe of a GHL-like host page on another origin.

Debian's Chromium at /usr/bin/chromium through Playwright (no browser download). The app and the host page
run on two loopback ports; the host answers REQUEST_USER_DATA with a payload encrypted exactly as GHL does.
Screenshots land in tests/artifacts/ (gitignored).
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from werkzeug.serving import make_server
from werkzeug.wrappers import Response

from app import create_app
from billing.jobs import run_tick
from billing.ledger import UsageRecord, record_usage
from billing.models import RebillClient, UnitReport
from billing.units import aggregate_pending_usage
from core.database import db
from portal.demo_agency import DEMO_METER_EVENT
from stripe_fake import FakeStripeServer
from tests.conftest import base_config
from tests.portal.conftest import Tenant, client_fields, install_tenant, sign_in, sso_payload

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
IFRAME_WIDTH = 420  # narrow, as in GHL's side panel: tables turn into cards

HOST_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>GHL (test host)</title></head>
<body style="margin:0;background:#eef">
<iframe id="rebill" src="__APP__/app" style="width:__WIDTH__px;height:1700px;border:0"></iframe>
<script>
  // What GHL's custom-page host does (docs/ghl.md §3.2).
  const payload = __PAYLOAD__;
  window.addEventListener("message", (event) => {
    if (event.data && event.data.message === "REQUEST_USER_DATA") {
      event.source.postMessage({message: "REQUEST_USER_DATA_RESPONSE", payload}, "*");
    }
  });
</script>
</body></html>
"""


class LoopbackServer:
    """A WSGI app on 127.0.0.1 in a thread."""

    def __init__(self, wsgi_app):
        self.server = make_server("127.0.0.1", 0, wsgi_app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def chromium():
    """A headless Debian Chromium driven by Playwright."""
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@dataclass
class EmbeddedPortal:
    """Rebill and a GHL-like host page on two loopback ports, one installed agency, a fake Stripe."""

    chromium: Any
    app: Any
    fake: FakeStripeServer
    tenant: Tenant
    url: str
    host_url: str
    host_html: dict

    def open_in_ghl(self, payload: str):
        """Open the host page, which embeds /app and answers the handshake with ``payload``; return the page."""
        self.host_html["page"] = (
            HOST_PAGE.replace("__APP__", self.url)
            .replace("__WIDTH__", str(IFRAME_WIDTH))
            .replace("__PAYLOAD__", json.dumps(payload))
        )
        page = self.chromium.new_page(viewport={"width": IFRAME_WIDTH + 40, "height": 1750})
        page.goto(self.host_url)
        return page


@pytest.fixture
def embedded(chromium, sqlite_template, tmp_path):
    """An installed agency's Rebill, ready to be opened inside the GHL-like host page."""
    ARTIFACTS.mkdir(exist_ok=True)
    database = tmp_path / "browser.sqlite3"
    shutil.copy(sqlite_template, database)
    host_html = {}
    host = LoopbackServer(
        lambda environ, start: Response(
            host_html["hostile"] if environ["PATH_INFO"] == "/hostile" else host_html["page"], mimetype="text/html"
        )(environ, start)
    )
    with FakeStripeServer() as fake, host:
        app = create_app(
            base_config(f"sqlite:///{database}", STRIPE_API_BASE=fake.url, REBILL_FRAME_ANCESTORS=host.url)
        )
        tenant = install_tenant(app, fake, "company-browser")
        with LoopbackServer(app) as rebill:
            yield EmbeddedPortal(chromium, app, fake, tenant, rebill.url, host.url, host_html)
        with app.app_context():
            db.engine.dispose()


def test_an_agency_admin_connects_stripe_adds_a_client_and_sees_units(embedded):
    from playwright.sync_api import expect

    app, fake, tenant = embedded.app, embedded.fake, embedded.tenant
    page = embedded.chromium.new_page(viewport={"width": IFRAME_WIDTH + 40, "height": 1750})

    # Outside GHL nobody answers the handshake: the page says where to open it.
    page.goto(f"{embedded.url}/app")
    expect(page.locator("#signing-in-text")).to_contain_text("inside GoHighLevel")
    expect(page.locator("#outside-ghl")).to_contain_text("Billing → Rebilling")
    expect(page.locator("#demo-offer")).to_be_hidden()  # not a demo run
    page.screenshot(path=ARTIFACTS / "portal-0-outside-ghl.png", full_page=True)

    page = embedded.open_in_ghl(sso_payload("company-browser"))
    frame = page.frame_locator("#rebill")
    expect(frame.locator("#portal")).to_be_visible()
    expect(frame.locator("#who")).to_have_text("Agency admin")

    # Stripe: paste the key (masked input), see account, mode and last 4.
    frame.get_by_role("link", name="Stripe", exact=True).click()
    key_input = frame.locator("#stripe-key")
    expect(key_input).to_have_attribute("type", "password")
    key_input.fill(tenant.stripe_key)
    frame.get_by_role("button", name="Connect").click()
    facts = frame.locator("#stripe-facts")
    expect(facts).to_contain_text("acct_companybrowser")
    expect(facts).to_contain_text("Test")
    expect(facts).to_contain_text(tenant.stripe_key[-4:])
    page.screenshot(path=ARTIFACTS / "portal-1-stripe-connected.png", full_page=True)

    # Add User, first with a customer Stripe does not know: the API's message shows inline.
    frame.get_by_role("link", name="Clients", exact=True).click()
    frame.get_by_role("button", name="Add User").click()
    dialog = frame.locator("#client-dialog")
    expect(dialog).to_be_visible()
    dialog.locator("#f-nickname").fill("Acme <b>Browser</b>")
    dialog.get_by_label("Capri API").check()
    dialog.get_by_label("API Channel").fill("chan-browser")
    dialog.get_by_label("Product").select_option(tenant.product_id)
    expect(dialog.locator(f'#f-price option[value="{tenant.licensed_price_id}"]')).to_be_disabled()
    expect(dialog.locator(f'#f-price option[value="{tenant.licensed_price_id}"]')).to_contain_text(
        "can't be used"
    )
    dialog.get_by_label("Price", exact=True).select_option(tenant.price_id)
    dialog.get_by_label("Stripe customer", exact=True).fill("cus_doesnotexist")
    dialog.get_by_label("Tokens").check()
    dialog.get_by_label("Billing unit").fill("1000")
    dialog.get_by_role("button", name="Save").click()
    customer_error = dialog.locator('[data-error-for="stripe_customer_id"]')
    expect(customer_error).to_contain_text("cus_doesnotexist")
    page.screenshot(path=ARTIFACTS / "portal-2-add-user-inline-error.png", full_page=True)

    dialog.get_by_label("Stripe customer", exact=True).fill(tenant.customer_id)
    dialog.get_by_role("button", name="Save").click()
    expect(dialog).to_be_hidden()
    expect(frame.locator("#client-title")).to_have_text("Acme <b>Browser</b>")  # text, never markup

    frame.get_by_role("link", name="Clients", exact=True).click()
    rows = frame.locator("#clients-table tbody tr")
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("Acme <b>Browser</b>")
    expect(rows.first).to_contain_text("chan-browser")
    expect(rows.first).to_contain_text("OK")
    page.screenshot(path=ARTIFACTS / "portal-3-clients.png", full_page=True)

    # An API key for the AI platform, shown once; then usage through the usage API and one tick.
    frame.get_by_role("link", name="API keys", exact=True).click()
    frame.locator("#api-key-name").fill("Capri test")
    frame.get_by_role("button", name="Create key").click()
    expect(frame.locator("#new-key")).to_be_visible()
    api_key = frame.locator("#new-key-value").text_content()
    now = dt.datetime.now(dt.UTC).isoformat()
    events = [
        {"id": f"evt-{index}", "channel": "chan-browser", "input_tokens": 900, "output_tokens": 350,
         "messages": 1, "model": "gpt-4o-mini", "occurred_at": now}
        for index in range(2)
    ]
    answer = requests.post(
        f"{embedded.url}/api/v1/usage", json={"events": events},
        headers={"Authorization": f"Bearer {api_key}"}, timeout=10,
    )
    assert answer.status_code == 200, answer.text
    with app.app_context():
        summary = run_tick()
        db.session.remove()
    assert (summary.units_logged, summary.units_sent) == (2, 2)

    frame.get_by_role("link", name="Clients", exact=True).click()
    frame.get_by_role("link", name="Acme <b>Browser</b>").click()
    stats = frame.locator("#client-stats")
    expect(stats).to_contain_text("2,500")  # usage counted
    expect(stats.locator(".stat").nth(1)).to_contain_text("2")  # units logged
    expect(stats.locator(".stat").nth(2)).to_contain_text("2")  # units reported
    expect(stats).to_contain_text("500 / 1,000")  # remainder toward the next unit
    reports = frame.locator("#reports-table tbody tr")
    expect(reports).to_have_count(1)
    expect(reports.first).to_contain_text("sent")
    expect(frame.locator("#usage-chart rect.bar")).to_have_count(1)
    page.screenshot(path=ARTIFACTS / "portal-4-client-usage.png", full_page=True)
    assert fake.state.total_units(tenant.stripe_key, tenant.customer_id, DEMO_METER_EVENT) == 2


def test_a_subaccount_user_sees_only_their_subaccount_and_none_of_the_agencys_settings(embedded):
    from playwright.sync_api import expect

    tenant = embedded.tenant
    admin = embedded.app.test_client()
    headers = sign_in(admin, tenant.company_id)
    assert admin.put("/api/portal/stripe-key", json={"api_key": tenant.stripe_key}, headers=headers).status_code == 200
    created = [
        admin.post("/api/portal/clients", json=fields, headers=headers)
        for fields in (
            client_fields(tenant, nickname="Another client"),
            client_fields(
                tenant, nickname="Their client", provider="ghl", channel_id=None, location_id=tenant.location_id
            ),
        )
    ]
    assert [answer.status_code for answer in created] == [201, 201]
    with embedded.app.app_context():
        db.session.add(UnitReport(agency_id=tenant.agency_id, client_id=created[1].get_json()["id"],
                                  identifier="rebill_sub_1", units=42, usage_timestamp=dt.datetime.now(dt.UTC)))
        usage = UsageRecord(source="capri", source_event_id="sub-1", location_id=tenant.location_id,
                            input_tokens=4200, occurred_at=dt.datetime.now(dt.UTC))
        record_usage(tenant.agency_id, [usage])
        aggregate_pending_usage()  # 4 more units
        db.session.commit()
        db.session.remove()

    payload = sso_payload(tenant.company_id, role="user", user_type="location", location=tenant.location_id)
    page = embedded.open_in_ghl(payload)
    frame = page.frame_locator("#rebill")
    expect(frame.locator("#who")).to_have_text("Read only")
    # Their statement first: this period's units and estimated charge, in names, without Stripe ids.
    statement = frame.locator("#statements article")
    expect(statement).to_have_count(1)
    expect(statement).to_contain_text("Their client")
    expect(statement).to_contain_text("$4.60")  # 46 units at $0.10
    expect(statement).to_contain_text("4,200")  # tokens this period
    expect(statement).to_contain_text("AI usage")
    expect(statement.locator(".chart")).to_be_visible()
    text = frame.locator("#view-statement").inner_text()
    assert tenant.customer_id not in text and tenant.price_id not in text and "cus_" not in text
    page.screenshot(path=ARTIFACTS / "money-6-subaccount-statement.png", full_page=True)

    frame.get_by_role("link", name="Clients", exact=True).click()
    rows = frame.locator("#clients-table tbody tr")
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("Their client")
    expect(frame.get_by_role("link", name="Stripe", exact=True)).to_be_hidden()
    expect(frame.get_by_role("link", name="API keys", exact=True)).to_be_hidden()
    expect(frame.locator("#stripe-missing")).to_be_hidden()
    expect(frame.locator("#notice")).to_be_hidden()  # no failed request for the agency's settings
    portal_frame = next(f for f in page.frames if f.url.startswith(f"{embedded.url}/app"))
    # Resolves once the portal's own hashchange handler has switched the views.
    portal_frame.evaluate("""() => new Promise((resolve) => {
        window.addEventListener("hashchange", () => setTimeout(resolve, 0), {once: true});
        location.hash = "#stripe";
    })""")
    expect(frame.locator("#view-statement")).to_be_visible()  # an agency view falls back to their statement


def test_the_money_view_shows_amounts_a_failing_client_and_the_customer_picker(embedded):
    from playwright.sync_api import expect

    tenant, app = embedded.tenant, embedded.app
    admin = app.test_client()
    headers = sign_in(admin, tenant.company_id)
    assert admin.put("/api/portal/stripe-key", json={"api_key": tenant.stripe_key}, headers=headers).status_code == 200
    long_name = "Northwind Regional Dental Group of Greater Springfield and Shelbyville (Annex)"
    ok = admin.post("/api/portal/clients", json=client_fields(tenant, nickname=long_name), headers=headers)
    broken = client_fields(tenant, nickname="Broken Co", channel_id="chan-broken")
    failing = admin.post("/api/portal/clients", json=broken, headers=headers)
    assert ok.status_code == failing.status_code == 201
    with app.app_context():
        now = dt.datetime.now(dt.UTC)
        db.session.add_all([
            UnitReport(agency_id=tenant.agency_id, client_id=ok.get_json()["id"], identifier="rebill_b_1", units=123,
                       usage_timestamp=now, status="sent"),
            UnitReport(agency_id=tenant.agency_id, client_id=failing.get_json()["id"], identifier="rebill_b_2",
                       units=4, usage_timestamp=now, status="failed", last_error="No such customer: 'cus_gone'"),
        ])
        db.session.commit()
        db.session.remove()

    page = embedded.open_in_ghl(sso_payload(tenant.company_id))
    frame = page.frame_locator("#rebill")
    summary = frame.locator("#money-summary")
    expect(summary).to_contain_text("$12.70")  # 127 units at $0.10
    expect(summary).to_contain_text("127 units")
    banner = frame.locator("#billing-banner")
    expect(banner).to_contain_text("1 client not billing correctly")
    expect(banner).to_contain_text("Stripe has no customer cus_gone")
    rows = frame.locator("#clients-table tbody tr")
    expect(rows).to_have_count(2)
    expect(rows.nth(0)).to_contain_text("$12.30")
    expect(rows.nth(0)).to_contain_text("AI usage")  # the product's name, not its id
    expect(rows.nth(1)).to_have_class("failing")
    expect(rows.nth(1)).to_contain_text("Failing")
    expect(frame.locator("#updated")).to_contain_text("Updated")
    page.screenshot(path=ARTIFACTS / "money-1-clients-with-amounts-and-a-failing-client.png", full_page=True)

    # The client page says what to fix.
    rows.nth(1).get_by_role("link", name="Broken Co").click()
    expect(frame.locator("#client-problem")).to_contain_text("What to fix: Stripe has no customer cus_gone")
    expect(frame.locator("#client-stats")).to_contain_text("$0.40")
    page.screenshot(path=ARTIFACTS / "money-2-failing-client-page.png", full_page=True)

    # The picker: search customers by name as you type, warn when one already backs a client.
    frame.get_by_role("link", name="Clients", exact=True).click()
    frame.get_by_role("button", name="Add User").click()
    dialog = frame.locator("#client-dialog")
    dialog.locator("#f-nickname").fill("broken co")
    expect(dialog.locator("#nickname-warning")).to_contain_text("already called “Broken Co”")
    dialog.locator("#f-customer").fill("acme")
    option = dialog.locator("#customer-results li[role=option]")
    expect(option).to_have_count(1)
    expect(option.first).to_contain_text("Acme Chat Co")
    page.screenshot(path=ARTIFACTS / "money-3-customer-picker.png", full_page=True)
    option.first.click()
    expect(dialog.locator("#f-customer")).to_have_value(tenant.customer_id)
    expect(dialog.locator("#customer-chosen")).to_contain_text("billing@acme.example")
    expect(dialog.locator("#customer-warning")).to_contain_text("already backs")
    dialog.locator("#f-unit").fill("0")
    expect(dialog.locator("#unit-hint")).to_contain_text("must be a whole number from 1 to 1,000,000,000,000")
    page.screenshot(path=ARTIFACTS / "money-4-picker-warnings.png", full_page=True)

    # Stripe disconnected: every screen says billing has stopped.
    dialog.get_by_role("button", name="Cancel").click()
    assert admin.delete("/api/portal/stripe-key", headers=headers).status_code == 200
    frame.get_by_role("link", name="Unmapped usage", exact=True).click()
    expect(banner).to_contain_text("Billing has stopped")
    page.screenshot(path=ARTIFACTS / "money-5-billing-stopped.png", full_page=True)


ATTACKED_HOST_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>GHL (test host) with a hostile frame</title></head>
<body>
<iframe id="rebill" src="__APP__/app" style="width:__WIDTH__px;height:900px;border:0"></iframe>
<iframe id="hostile" src="__HOSTILE__/hostile"></iframe>
<script>
  // The genuine parent answers only after the hostile frame has fired its forged answers at the portal.
  const payload = __PAYLOAD__;
  let portal = null;
  window.addEventListener("message", (event) => {
    if (event.data && event.data.message === "REQUEST_USER_DATA") {
      portal = event.source;
      document.getElementById("hostile").contentWindow.postMessage("strike", "*");
    } else if (event.data === "struck" && portal) {
      portal.postMessage({message: "REQUEST_USER_DATA_RESPONSE", payload}, "*");
    }
  });
</script>
</body></html>
"""

HOSTILE_FRAME = """<!doctype html>
<html><body><script>
  // Another window (a sibling frame) answers the portal's handshake with its own agency's payload.
  window.addEventListener("message", (event) => {
    if (event.data !== "strike") return;
    for (let i = 0; i < 5; i++) {
      parent.frames[0].postMessage({message: "REQUEST_USER_DATA_RESPONSE", payload: __FORGED__}, "*");
    }
    parent.postMessage("struck", "*");
  });
</script></body></html>
"""


def test_a_dry_run_client_shows_what_it_would_bill_and_starts_billing_on_request(embedded):
    from playwright.sync_api import expect

    tenant, app = embedded.tenant, embedded.app
    admin = app.test_client()
    headers = sign_in(admin, tenant.company_id)
    assert admin.put("/api/portal/stripe-key", json={"api_key": tenant.stripe_key}, headers=headers).status_code == 200
    created = admin.post("/api/portal/clients", json=client_fields(tenant, status="shadow"), headers=headers)
    assert created.status_code == 201, created.get_json()
    with app.app_context():
        record_usage(tenant.agency_id, [UsageRecord(source="capri", source_event_id="dry-1", channel_id="chan-acme",
                                                    input_tokens=4_200, occurred_at=dt.datetime.now(dt.UTC))])
        db.session.commit()
        assert run_tick().units_sent == 0
        db.session.remove()

    page = embedded.open_in_ghl(sso_payload(tenant.company_id))
    frame = page.frame_locator("#rebill")
    row = frame.locator("#clients-table tbody tr").first
    expect(row).to_contain_text("Dry run")
    expect(row).to_contain_text("would be $0.40")  # 4 units of 1,000 tokens at $0.10, none sent
    page.screenshot(path=ARTIFACTS / "money-4-dry-run-client.png", full_page=True)
    row.get_by_role("link", name="Acme").click()
    expect(frame.locator("#client-stats")).to_contain_text("Would have billed")
    start = frame.get_by_role("button", name="Start billing")
    start.click()
    expect(frame.get_by_role("button", name="Pause")).to_be_visible()
    with app.app_context():
        status = db.session.scalar(db.select(RebillClient.status).where(RebillClient.id == created.get_json()["id"]))
        db.session.remove()
    assert status == "active"
    assert embedded.fake.state.meter_events(tenant.stripe_key) == []


@pytest.mark.parametrize("hostile_origin", ["ghl", "elsewhere"])
def test_a_handshake_answer_from_another_window_or_origin_is_ignored(embedded, hostile_origin):
    """Login CSRF (issue 10 item 6): only the parent window, at an allowed origin, signs the page in."""
    from playwright.sync_api import expect

    app, fake = embedded.app, embedded.fake
    evil = install_tenant(app, fake, "company-evil")
    for tenant, nickname in ((embedded.tenant, "Genuine client"), (evil, "Hostile agency's client")):
        admin = app.test_client()
        headers = sign_in(admin, tenant.company_id)
        admin.put("/api/portal/stripe-key", json={"api_key": tenant.stripe_key}, headers=headers)
        assert admin.post("/api/portal/clients", json=client_fields(tenant, nickname=nickname),
                          headers=headers).status_code == 201  # fmt: skip

    hostile_html = HOSTILE_FRAME.replace("__FORGED__", json.dumps(sso_payload("company-evil")))
    serve_hostile = Response(hostile_html, mimetype="text/html")
    with LoopbackServer(lambda environ, start: serve_hostile(environ, start)) as elsewhere:
        # "ghl": the hostile frame shares the genuine parent's (allowed) origin but is another window.
        hostile_base = embedded.host_url if hostile_origin == "ghl" else elsewhere.url
        embedded.host_html["hostile"] = hostile_html
        embedded.host_html["page"] = (
            ATTACKED_HOST_PAGE.replace("__APP__", embedded.url)
            .replace("__HOSTILE__", hostile_base)
            .replace("__WIDTH__", str(IFRAME_WIDTH))
            .replace("__PAYLOAD__", json.dumps(sso_payload(embedded.tenant.company_id)))
        )
        page = embedded.chromium.new_page(viewport={"width": IFRAME_WIDTH + 40, "height": 1000})
        page.goto(embedded.host_url)
        frame = page.frame_locator("#rebill")
        rows = frame.locator("#clients-table tbody tr")
        expect(rows).to_have_count(1)
        expect(rows.first).to_contain_text("Genuine client")
        page.screenshot(path=ARTIFACTS / f"portal-handshake-hostile-{hostile_origin}.png", full_page=True)


def test_a_key_of_another_mode_is_connected_only_after_the_warning_is_confirmed(embedded):
    from playwright.sync_api import expect

    tenant = embedded.tenant
    live_key = "sk_live_companybrowser00000000000"
    embedded.fake.state.add_account(live_key, account_id="acct_companybrowser")
    page = embedded.open_in_ghl(sso_payload("company-browser"))
    frame = page.frame_locator("#rebill")
    frame.get_by_role("link", name="Stripe", exact=True).click()
    frame.locator("#stripe-key").fill(tenant.stripe_key)
    frame.locator("#stripe-connect").click()
    facts = frame.locator("#stripe-facts")
    expect(facts).to_contain_text("Test")

    frame.locator("#stripe-key").fill(live_key)
    frame.locator("#stripe-connect").click()
    warning = frame.locator("#stripe-change")
    expect(warning).to_be_visible()
    expect(warning).to_contain_text("live-mode key; Rebill has been billing in test mode")
    expect(facts).to_contain_text("Test")  # nothing changed yet
    page.screenshot(path=ARTIFACTS / "portal-stripe-mode-change-warning.png", full_page=True)
    frame.get_by_role("button", name="Connect this key anyway").click()
    expect(facts).to_contain_text("Live")
    expect(warning).to_be_hidden()
