"""Schemathesis over an OpenAPI document, against the real app and database (issue 10 item 16).

Every operation of the document gets a bounded number of schema-valid and schema-violating requests
(derandomized, so a run is repeatable). Each answer must pass schemathesis' checks: no server error, a
documented status code, content type and headers, a body matching its schema, schema-violating input
refused. And a refused request (4xx) must leave every table as it was.
"""

from __future__ import annotations

import hashlib
from collections import Counter

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance
from sqlalchemy import select

from core.database import db

# Written on every attempt by design, or bookkeeping rather than input: sign-in attempts are counted whatever
# their outcome (the rate limit), and a valid API key's last use is refreshed before the body is read.
NOT_INPUT = {"rate_limit_window": None, "api_key": {"last_used_at"}}
# Schema-valid is not business-valid here: a well-formed Stripe customer id Stripe does not know is a 422.
EXCLUDED_CHECKS = [positive_data_acceptance]


def database_fingerprint(app) -> str:
    """Hash every row of every table (minus NOT_INPUT), read fresh from the database."""
    digest = hashlib.sha256()
    with app.app_context():
        for table in db.metadata.sorted_tables:
            if table.name in NOT_INPUT and NOT_INPUT[table.name] is None:
                continue
            columns = [column for column in table.columns if column.name not in (NOT_INPUT.get(table.name) or ())]
            rows = db.session.execute(select(*columns).order_by(*table.primary_key.columns)).all()
            digest.update(f"{table.name}:{rows!r}".encode())
        db.session.remove()
    return digest.hexdigest()


def fuzz_document(schema, app, *, headers: dict[str, str], examples: int) -> Counter[str]:
    """Send each operation ``examples`` valid and ``examples`` invalid requests; fail on any finding.

    Return how often each operation answered each status ("POST /api/v1/usage 200": 12).
    """
    statuses: Counter[str] = Counter()
    # Our bearer token is sent as is (``headers``); an unknown query parameter is ignored, as HTTP APIs do,
    # rather than refused, so neither counts as schema-violating input here.
    schema.config.generation.update(allow_extra_parameters=False, with_security_parameters=False)
    # Too many events or too large a body is a 413 (documented), a refusal like any 4xx.
    rejection = schema.config.checks.negative_data_rejection
    rejection.expected_statuses = [*rejection.expected_statuses, "413"]
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=examples,
                deadline=None,
                database=None,
                derandomize=True,
                phases=[Phase.explicit, Phase.generate, Phase.shrink],
                suppress_health_check=list(HealthCheck),
            )
            def exchange(case):
                before = database_fingerprint(app)
                response = case.call_and_validate(headers=headers, excluded_checks=EXCLUDED_CHECKS)
                answered = f"{case.operation.label} {response.status_code}"
                statuses[answered] += 1
                if response.status_code >= 400:
                    assert database_fingerprint(app) == before, f"{answered} wrote to the database"

            try:
                exchange()
            except Unsatisfiable:
                # Nothing of this operation can be made schema-violating (no body, only free-text parameters).
                if mode is GenerationMode.POSITIVE:
                    raise
    return statuses
