"""flask --app app rebill api-key create|list|revoke."""

from __future__ import annotations

from capri.api_keys import authenticate
from capri.models import ApiKey
from core.database import db
from tests.capri.conftest import make_keyed_agency


def test_create_prints_a_working_key_once_on_stdout(runner, app_context):
    agency = make_keyed_agency("company-a")
    result = runner.invoke(args=["rebill", "api-key", "create", "--company", "company-a", "--name", "prod"])
    assert result.exit_code == 0, result.output
    full_key = result.stdout.strip()
    assert full_key.startswith("rbk_") and "\n" not in full_key
    assert "shown only this once" in result.stderr
    db.session.rollback()
    api_key = authenticate(full_key)
    assert (api_key.agency_id, api_key.name) == (agency.id, "prod")


def test_create_for_an_unknown_company_fails_clearly(runner, app_context):
    result = runner.invoke(args=["rebill", "api-key", "create", "--company", "nobody"])
    assert result.exit_code != 0
    assert "no agency with companyId 'nobody'" in result.output
    assert "Traceback" not in result.output
    assert db.session.query(ApiKey).count() == 0


def test_create_refuses_a_too_long_name(runner, app_context):
    make_keyed_agency("company-a")
    result = runner.invoke(args=["rebill", "api-key", "create", "--company", "company-a", "--name", "n" * 121])
    assert result.exit_code != 0
    assert "120" in result.output


def test_list_shows_prefixes_never_keys(runner, app_context):
    agency = make_keyed_agency("company-a")
    make_keyed_agency("company-b")
    result = runner.invoke(args=["rebill", "api-key", "list", "--company", "company-a"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    assert agency.key.rsplit("_", 1)[0] in lines[0]
    assert agency.key not in result.output
    assert "active" in lines[0] and "never" in lines[0]


def test_revoke_by_id_or_prefix_and_only_the_companys_own(runner, app_context):
    a = make_keyed_agency("company-a")
    b = make_keyed_agency("company-b")
    prefix_a = a.key.rsplit("_", 1)[0]

    result = runner.invoke(args=["rebill", "api-key", "revoke", "--company", "company-a", str(b.key_id)])
    assert result.exit_code != 0 and "no API key" in result.output
    result = runner.invoke(args=["rebill", "api-key", "revoke", "--company", "company-a", "rbk_unknown"])
    assert result.exit_code != 0 and "no API key" in result.output
    result = runner.invoke(args=["rebill", "api-key", "revoke", "--company", "company-a", str(2**40)])
    assert result.exit_code != 0 and "no API key" in result.output

    result = runner.invoke(args=["rebill", "api-key", "revoke", "--company", "company-a", prefix_a])
    assert result.exit_code == 0, result.output
    db.session.rollback()
    assert authenticate(a.key) is None
    assert authenticate(b.key) is not None

    second = make_keyed_agency("company-a")
    result = runner.invoke(args=["rebill", "api-key", "revoke", "--company", "company-a", str(second.key_id)])
    assert result.exit_code == 0, result.output
    db.session.rollback()
    assert authenticate(second.key) is None
    listing = runner.invoke(args=["rebill", "api-key", "list", "--company", "company-a"]).stdout
    assert listing.count("revoked") == 2
