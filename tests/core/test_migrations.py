"""Migrations apply to an empty database of each backend and match the models exactly."""

import re

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import CheckConstraint, inspect
from sqlalchemy.exc import IntegrityError

from billing.models import Agency, UsageEvent
from billing.states import UsageSource
from core.database import db, utcnow


def test_migrations_apply_and_autogenerate_finds_no_difference(app):
    with app.app_context(), db.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert context.get_current_revision() is not None
        assert compare_metadata(context, db.metadata) == []


def test_every_model_table_exists(app):
    with app.app_context():
        existing = set(inspect(db.engine).get_table_names())
    assert {table.name for table in db.metadata.sorted_tables} <= existing


def test_check_constraints_in_the_database_allow_exactly_the_models_words(app):
    """Alembic's comparison above does not look at CHECK constraints: this one does (billing/states.py)."""
    declared = {
        (table.name, constraint.name): set(re.findall(r"'(\w+)'", str(constraint.sqltext)))
        for table in db.metadata.sorted_tables
        for constraint in table.constraints
        if isinstance(constraint, CheckConstraint)
    }
    assert declared, "the models declare CHECK constraints"
    with app.app_context():
        inspector = inspect(db.engine)
        migrated = {
            (table, check["name"]): set(re.findall(r"'(\w+)'", check["sqltext"]))
            for table in {table for table, _ in declared}
            for check in inspector.get_check_constraints(table)
        }
    assert migrated == declared


def test_a_word_outside_a_named_state_is_refused(app):
    with app.app_context():
        agency = Agency(company_id="company-checks")
        db.session.add(agency)
        db.session.flush()
        event = UsageEvent(
            agency_id=agency.id,
            source=UsageSource.USAGE_API,
            source_event_id="e1",
            channel_id="c",
            occurred_at=utcnow(),
        )
        db.session.add(event)
        db.session.flush()
        event.state = "billed twice"
        with pytest.raises(IntegrityError):
            db.session.flush()
        db.session.rollback()
