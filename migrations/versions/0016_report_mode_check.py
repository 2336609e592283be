"""report mode check: CHECK constraints hold a client's report_mode and a report's target_mode to 'meter' or 'legacy'

Revision ID: 0016_report_mode_check
Revises: 0015_unit_report_agency_due
Create Date: 2026-12-04 22:20:00

"""
from alembic import op


revision = '0016_report_mode_check'
down_revision = '0015_unit_report_agency_due'
branch_labels = None
depends_on = None

# The words as of this revision (billing.states.ReportMode). A report's target_mode is NULL until its first
# offer; a CHECK passes NULL.
CHECKS = {
    'rebill_client': {'report_mode': ('meter', 'legacy')},
    'unit_report': {'target_mode': ('meter', 'legacy')},
}


def _condition(column, words):
    return f"{column} IN ({', '.join(repr(word) for word in words)})"


def upgrade():
    if op.get_context().dialect.name == 'postgresql':
        # As 0012: NOT VALID, then VALIDATE, so the scan of the outbox does not hold an exclusive lock.
        for table, columns in CHECKS.items():
            for column, words in columns.items():
                name = f'ck_{table}_{column}'
                # Each statement commits on its own (autocommit): in the migration's transaction the ADD's
                # exclusive lock would be held through the VALIDATE scan, and ingest would wait for it.
                with op.get_context().autocommit_block():
                    op.execute(f'ALTER TABLE {table} DROP CONSTRAINT IF EXISTS {name}, '
                               f'ADD CONSTRAINT {name} CHECK ({_condition(column, words)}) NOT VALID')
                    op.execute(f'ALTER TABLE {table} VALIDATE CONSTRAINT {name}')
        return
    for table, columns in CHECKS.items():
        with op.batch_alter_table(table, schema=None) as batch_op:
            for column, words in columns.items():
                batch_op.create_check_constraint(column, _condition(column, words))


def downgrade():
    for table, columns in CHECKS.items():
        with op.batch_alter_table(table, schema=None) as batch_op:
            for column in columns:
                batch_op.drop_constraint(op.f(f'ck_{table}_{column}'), type_='check')
