"""unit_report: a partial index of each agency's pending rows in due order, for reporting's round-robin claim

Revision ID: 0015_unit_report_agency_due
Revises: 0014_shadow_status
Create Date: 2026-12-04 22:15:00

"""
from alembic import op
import sqlalchemy as sa


revision = '0015_unit_report_agency_due'
down_revision = '0014_shadow_status'
branch_labels = None
depends_on = None

NAME = 'ix_unit_report_agency_due'
PENDING = sa.text("status = 'pending'")


def upgrade():
    if op.get_context().dialect.name == 'postgresql':
        # CONCURRENTLY: the outbox stays writable (ticks, aggregation) while a large table is indexed. A build
        # that failed or was interrupted leaves an invalid index of this name, which IF NOT EXISTS would keep
        # (never used by the planner, still maintained on every write): a rerun drops it and builds it again.
        with op.get_context().autocommit_block():
            invalid = op.get_bind().execute(
                sa.text("SELECT 1 FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                        "WHERE c.relname = :name AND NOT i.indisvalid"),
                {'name': NAME},
            ).first()
            if invalid:
                op.drop_index(NAME, table_name='unit_report', postgresql_concurrently=True)
            op.create_index(NAME, 'unit_report', ['agency_id', 'next_attempt_at', 'id'], unique=False,
                            postgresql_where=PENDING, postgresql_concurrently=True, if_not_exists=True)
    else:
        op.create_index(NAME, 'unit_report', ['agency_id', 'next_attempt_at', 'id'], unique=False,
                        sqlite_where=PENDING)


def downgrade():
    if op.get_context().dialect.name == 'postgresql':
        with op.get_context().autocommit_block():
            op.drop_index(NAME, table_name='unit_report', postgresql_concurrently=True, if_exists=True)
    else:
        op.drop_index(NAME, table_name='unit_report')
