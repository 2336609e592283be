"""unit_report: an index of each Stripe customer's reports by timestamp, for the >24 h check and reconcile

Revision ID: 0018_unit_report_customer_time
Revises: 0017_client_send_lease
Create Date: 2026-12-05 02:20:00

"""
from alembic import op
import sqlalchemy as sa


revision = '0018_unit_report_customer_time'
down_revision = '0017_client_send_lease'
branch_labels = None
depends_on = None

NAME = 'ix_unit_report_customer_time'
COLUMNS = ['target_customer', 'stripe_timestamp']


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
            op.create_index(NAME, 'unit_report', COLUMNS, unique=False, postgresql_concurrently=True,
                            if_not_exists=True)
    else:
        op.create_index(NAME, 'unit_report', COLUMNS, unique=False)


def downgrade():
    if op.get_context().dialect.name == 'postgresql':
        with op.get_context().autocommit_block():
            op.drop_index(NAME, table_name='unit_report', postgresql_concurrently=True, if_exists=True)
    else:
        op.drop_index(NAME, table_name='unit_report')
