"""GET /healthz both ways."""

from app import create_app
from tests.conftest import base_config


def test_healthz_answers_200_when_the_database_answers(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok", "database": "ok"}


def test_healthz_answers_503_when_the_database_does_not(tmp_path):
    # A PostgreSQL port where nothing listens: the app starts, the probe fails fast.
    app = create_app(base_config("postgresql://rebill@127.0.0.1:9/none?connect_timeout=1"))
    response = app.test_client().get("/healthz")
    assert response.status_code == 503
    assert response.get_json()["database"] == "unreachable"
