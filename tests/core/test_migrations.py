"""Migrations apply to an empty database of each backend and match the models exactly."""

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from core.database import db


def test_migrations_apply_and_autogenerate_finds_no_difference(app):
    with app.app_context(), db.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert context.get_current_revision() is not None
        assert compare_metadata(context, db.metadata) == []


def test_every_model_table_exists(app):
    with app.app_context():
        existing = set(inspect(db.engine).get_table_names())
    assert {table.name for table in db.metadata.sorted_tables} <= existing
