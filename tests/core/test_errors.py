"""Errors on any path are JSON: an unreachable database is a 503 to retry, any other database error a 500."""

from billing.models import Agency
from core.database import db
from tests.conftest import base_config

WELL_FORMED_KEY = "rbk_" + "a" * 12 + "_" + "b" * 43


def test_an_unreachable_database_answers_503_json():
    from app import create_app

    app = create_app(base_config("postgresql://rebill@127.0.0.1:9/none?connect_timeout=1"))
    response = app.test_client().post(
        "/api/v1/usage", json={"events": []}, headers={"Authorization": f"Bearer {WELL_FORMED_KEY}"}
    )
    assert response.status_code == 503
    assert response.get_json() == {"error": "the database is unavailable, try again"}


def test_a_value_the_database_refuses_is_a_logged_500_not_an_outage(make_app, capsys):
    app = make_app()

    def add_the_same_agency_twice():
        db.session.add_all([Agency(company_id="same"), Agency(company_id="same")])
        db.session.flush()

    app.add_url_rule("/refused", view_func=add_the_same_agency_twice)
    response = app.test_client().get("/refused")
    assert response.status_code == 500
    assert response.get_json() == {"error": "internal error"}
    assert "IntegrityError" in capsys.readouterr().err  # with its traceback, to be fixed
    with app.app_context():
        assert db.session.query(Agency).count() == 0


def test_a_405_names_the_allowed_methods(client):
    for method, path, allowed in (("GET", "/api/v1/usage", {"POST"}), ("POST", "/api/portal/me", {"GET"}),
                                  ("PUT", "/api/portal/clients", {"GET", "POST"})):  # fmt: skip
        response = client.open(path, method=method)
        assert response.status_code == 405 and response.is_json, path
        assert allowed <= {name.strip() for name in response.headers["Allow"].split(",")}, path
