"""Alembic environment: runs inside the Flask app so it uses the configured database and metadata."""

from alembic import context
from flask import current_app

config = context.config
database = current_app.extensions["migrate"].db
target_metadata = database.metadata


def run_migrations_offline():
    """Emit SQL for the configured URL without connecting."""
    context.configure(
        url=str(database.engine.url), target_metadata=target_metadata, literal_binds=True, render_as_batch=True
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online():
    """Apply migrations over a live connection."""
    with database.engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            compare_type=True,
            render_as_batch=True,
        )
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
