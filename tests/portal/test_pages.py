"""GET /app: the embedded page, its framing headers, and demo mode's fences."""

from __future__ import annotations

import html
import re

import pytest

from app import create_app
from billing.agencies import ensure_agency
from core.config import ConfigError
from core.database import db
from portal import pages
from tests.conftest import base_config


def frame_ancestors(response) -> list[str]:
    policy = dict(part.strip().split(" ", 1) for part in response.headers["Content-Security-Policy"].split(";"))
    return policy["frame-ancestors"].split()


def test_app_page_can_be_framed_by_ghl_and_known_white_label_domains(app, client):
    with app.app_context():
        ensure_agency("company-a").whitelabel_domain = "app.agency-a.com"
        ensure_agency("company-b").whitelabel_domain = "https://CRM.Agency-B.io/"
        ensure_agency("company-c").whitelabel_domain = "evil.com; script-src *"  # not a hostname: skipped
        ensure_agency("company-d")
        db.session.commit()

    response = client.get("/app")

    assert response.status_code == 200
    assert "X-Frame-Options" not in response.headers
    ancestors = frame_ancestors(response)
    assert ancestors[:5] == ["'self'", *pages.GHL_FRAME_ANCESTORS]
    assert "https://app.gohighlevel.com" in ancestors
    assert "https://*.leadconnectorhq.com" in ancestors
    assert {"https://app.agency-a.com", "https://crm.agency-b.io"} <= set(ancestors)
    assert not any("evil" in source or source == "*" for source in ancestors)
    policy = response.headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy
    assert response.headers["Cache-Control"] == "no-store"
    assert 'data-demo="off"' in response.get_data(as_text=True)


def test_past_the_limit_only_the_requesting_white_label_domain_may_frame_the_page(app, client):
    # Issue 10: the fallback used to be "https:" (any HTTPS site could frame the page and answer its handshake).
    with app.app_context():
        for index in range(pages.MAX_WHITELABEL_ANCESTORS + 1):
            ensure_agency(f"company-{index}").whitelabel_domain = f"app{index}.example.com"
        db.session.commit()

    from_agency = client.get("/app", headers={"Referer": "https://app7.example.com/v2/location/abc/custom-page"})
    from_elsewhere = client.get("/app", headers={"Referer": "https://evil.example.net/"})
    without_referer = client.get("/app")

    assert frame_ancestors(from_agency) == ["'self'", *pages.GHL_FRAME_ANCESTORS, "https://app7.example.com"]
    assert frame_ancestors(from_elsewhere) == frame_ancestors(without_referer) == ["'self'", *pages.GHL_FRAME_ANCESTORS]
    # The page gets the same list, to check the origin of the SSO answer against it.
    rendered = re.search(r'data-frame-ancestors="([^"]*)"', from_agency.get_data(as_text=True)).group(1)
    assert html.unescape(rendered).split() == frame_ancestors(from_agency)


def test_extra_frame_ancestors_come_from_configuration(make_app):
    app = make_app(REBILL_FRAME_ANCESTORS="http://127.0.0.1:8123 https://*.partner.example")
    ancestors = frame_ancestors(app.test_client().get("/app"))
    assert ancestors[-2:] == ["http://127.0.0.1:8123", "https://*.partner.example"]


@pytest.mark.parametrize("value", ["*", "https://a.com;script-src", "javascript:alert(1)", "'unsafe-inline'"])
def test_a_frame_ancestor_that_is_not_a_host_source_stops_the_start(tmp_path, value):
    with pytest.raises(ConfigError, match="REBILL_FRAME_ANCESTORS"):
        create_app(base_config(f"sqlite:///{tmp_path}/x.sqlite3", REBILL_FRAME_ANCESTORS=value))


def test_the_page_loads_only_its_own_vendored_assets(client):
    html = client.get("/app").get_data(as_text=True)
    assert "/static/portal/portal.js" in html and "/static/portal/portal.css" in html
    # No CDN: every script and style is ours (the page does name its allowed parents, as data, not as assets).
    assert not re.search(r'(src|href)="(https?:)?//', html)
    assert client.get("/static/portal/portal.js").status_code == 200
    assert client.get("/static/portal/portal.css").status_code == 200


def test_demo_mode_is_off_unless_enabled(client):
    assert client.post("/api/portal/demo-session").status_code == 404
    assert 'data-demo="off"' in client.get("/app?demo=1").get_data(as_text=True)


def test_production_configuration_cannot_enable_demo_mode(tmp_path):
    config = base_config(f"sqlite:///{tmp_path}/x.sqlite3", REBILL_ENV="production", REBILL_DEMO=True)
    config.pop("TESTING")
    with pytest.raises(ConfigError, match="REBILL_DEMO"):
        create_app(config)
    config["REBILL_DEMO"] = "1"
    with pytest.raises(ConfigError, match="REBILL_DEMO"):
        create_app(config)


def test_a_production_app_serves_no_demo(make_app):
    app = make_app(REBILL_ENV="production")
    client = app.test_client()
    assert client.post("/api/portal/demo-session").status_code == 404
    assert 'data-demo="off"' in client.get("/app?demo=1").get_data(as_text=True)
    # Even a smuggled REBILL_DEMO (set after the start-up check) does not turn it on outside development.
    app.config["REBILL_DEMO"] = True
    assert client.post("/api/portal/demo-session").status_code == 404
    assert 'data-demo="off"' in client.get("/app?demo=1").get_data(as_text=True)


def test_the_root_page_points_to_the_portal_and_in_the_demo_to_the_demo(make_app):
    plain = make_app().test_client().get("/")
    assert plain.status_code == 200 and plain.mimetype == "text/html"
    text = plain.get_data(as_text=True)
    assert 'href="/app"' in text and "Billing → Rebilling" in text
    assert "demo=1" not in text
    demo = make_app(REBILL_DEMO=True, REBILL_ENV="development").test_client().get("/").get_data(as_text=True)
    assert 'href="/app?demo=1"' in demo


def test_the_app_outside_ghl_says_how_to_open_it_and_offers_the_demo_only_in_the_demo(make_app):
    page = make_app().test_client().get("/app").get_data(as_text=True)
    assert "install the Rebill app from the GoHighLevel" in page
    assert "data-demo-url" not in page
    demo_page = make_app(REBILL_DEMO=True, REBILL_ENV="development").test_client().get("/app").get_data(as_text=True)
    assert 'data-demo-url="/app?demo=1"' in demo_page
