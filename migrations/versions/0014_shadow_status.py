"""shadow status: a client may be in a dry run, its usage events then kept as 'shadow' (docs/billing-rules.md rule 13)

Revision ID: 0014_shadow_status
Revises: 0013_unit_report_failed_attempts
Create Date: 2026-12-04 20:05:00

"""
from alembic import op


revision = '0014_shadow_status'
down_revision = '0013_unit_report_failed_attempts'
branch_labels = None
depends_on = None

# The words of each constraint this revision widens, before and after it (billing/states.py).
BEFORE = {
    'rebill_client': {'status': ('active', 'paused')},
    'rebill_client_term': {'status': ('active', 'paused')},
    'usage_event': {'state': ('pending', 'counted', 'unmapped', 'paused', 'ignored', 'quarantined', 'capped')},
}
AFTER = {
    'rebill_client': {'status': ('active', 'paused', 'shadow')},
    'rebill_client_term': {'status': ('active', 'paused', 'shadow')},
    'usage_event': {
        'state': ('pending', 'counted', 'unmapped', 'paused', 'ignored', 'quarantined', 'capped', 'shadow'),
    },
}


def _condition(column, words):
    return f"{column} IN ({', '.join(repr(word) for word in words)})"


def _replace(checks):
    if op.get_context().dialect.name == 'postgresql':
        # As 0012: NOT VALID, then VALIDATE, so the usage ledger's scan does not hold an exclusive lock.
        for table, columns in checks.items():
            for column, words in columns.items():
                name = f'ck_{table}_{column}'
                # Each statement commits on its own (autocommit): in the migration's transaction the ADD's
                # exclusive lock would be held through the VALIDATE scan, and ingest would wait for it.
                with op.get_context().autocommit_block():
                    op.execute(f'ALTER TABLE {table} DROP CONSTRAINT IF EXISTS {name}, '
                               f'ADD CONSTRAINT {name} CHECK ({_condition(column, words)}) NOT VALID')
                    op.execute(f'ALTER TABLE {table} VALIDATE CONSTRAINT {name}')
        return
    for table, columns in checks.items():
        with op.batch_alter_table(table, schema=None) as batch_op:
            for column, words in columns.items():
                batch_op.drop_constraint(op.f(f'ck_{table}_{column}'), type_='check')
                batch_op.create_check_constraint(column, _condition(column, words))


def upgrade():
    _replace(AFTER)


def downgrade():
    # Fails while a client, a closed term or an event still holds 'shadow': end the dry runs first.
    _replace(BEFORE)
