"""named states: CHECK constraints hold each status column to its words (billing/states.py)

Revision ID: 0012_named_states
Revises: 0011_client_reconcile_problem
Create Date: 2026-12-04 19:50:00

"""
from alembic import op


revision = '0012_named_states'
down_revision = '0011_client_reconcile_problem'
branch_labels = None
depends_on = None

# The words as of this revision (billing/states.py may grow; a later revision then replaces a constraint).
CHECKS = {
    'rebill_client': {'provider': ('capri_api', 'ghl'), 'status': ('active', 'paused')},
    'rebill_client_term': {'provider': ('capri_api', 'ghl'), 'status': ('active', 'paused')},
    'usage_event': {
        'source': ('capri', 'ghl'),
        'state': ('pending', 'counted', 'unmapped', 'paused', 'ignored', 'quarantined', 'capped'),
    },
    'unit_report': {'status': ('pending', 'sent', 'failed')},
}


def _condition(column, words):
    return f"{column} IN ({', '.join(repr(word) for word in words)})"


def upgrade():
    if op.get_context().dialect.name == 'postgresql':
        # NOT VALID, then VALIDATE: adding a checked constraint holds an ACCESS EXCLUSIVE lock while it scans the
        # table (the usage ledger is large and ingest writes to it); VALIDATE scans under a lock that lets
        # reads and writes go on.
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
