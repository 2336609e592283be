"""usage_event.agency_id: the foreign key gives way to a guard on agency (deleting or renumbering an agency with usage)

Revision ID: 0019_usage_agency_guard
Revises: 0018_unit_report_customer_time
Create Date: 2026-12-05 06:00:00

What the key did on each inserted usage row (a lookup of the agency row FOR KEY SHARE, in every concurrent
ingest, all on one agency's row) cost ~5 % of webhook ingest (bench/README.md, fifth pass), and it proved
nothing the writers do not: each takes agency_id from a row that itself holds the agency by a foreign key
or from the agency row (docs/billing-rules.md, "Ledger integrity"). What the key also did, refusing to delete
or renumber an agency whose usage the ledger holds, the triggers below do, on every backend; they cost
nothing on ingest (they fire on agency rows only).
"""
from alembic import op


revision = '0019_usage_agency_guard'
down_revision = '0018_unit_report_customer_time'
branch_labels = None
depends_on = None

KEY = 'fk_usage_event_agency_id_agency'
MESSAGE = 'the usage ledger holds events of this agency: it cannot be deleted or renumbered'

POSTGRESQL_GUARD = f"""
CREATE OR REPLACE FUNCTION agency_keeps_its_usage() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM usage_event WHERE agency_id = OLD.id) THEN
        RAISE EXCEPTION '{MESSAGE} (agency %)', OLD.id USING ERRCODE = 'foreign_key_violation';
    END IF;
    IF TG_OP = 'DELETE' THEN
        RETURN OLD;
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER agency_keeps_its_usage_on_delete BEFORE DELETE ON agency
    FOR EACH ROW EXECUTE FUNCTION agency_keeps_its_usage();
CREATE TRIGGER agency_keeps_its_usage_on_renumber BEFORE UPDATE OF id ON agency
    FOR EACH ROW WHEN (OLD.id IS DISTINCT FROM NEW.id) EXECUTE FUNCTION agency_keeps_its_usage();
"""

SQLITE_GUARD = [
    f"""CREATE TRIGGER agency_keeps_its_usage_on_delete BEFORE DELETE ON agency
        WHEN EXISTS (SELECT 1 FROM usage_event WHERE agency_id = OLD.id)
        BEGIN SELECT RAISE(ABORT, '{MESSAGE}'); END""",
    f"""CREATE TRIGGER agency_keeps_its_usage_on_renumber BEFORE UPDATE OF id ON agency
        WHEN OLD.id IS NOT NEW.id AND EXISTS (SELECT 1 FROM usage_event WHERE agency_id = OLD.id)
        BEGIN SELECT RAISE(ABORT, '{MESSAGE}'); END""",
]


def upgrade():
    if op.get_context().dialect.name == 'postgresql':
        # One transaction: the guard exists from the moment the key is gone. Dropping a foreign key takes a
        # short exclusive lock and scans nothing.
        op.execute(f'ALTER TABLE usage_event DROP CONSTRAINT IF EXISTS {KEY}')
        op.execute(POSTGRESQL_GUARD)
        return
    with op.batch_alter_table('usage_event', schema=None) as batch_op:
        batch_op.drop_constraint(KEY, type_='foreignkey')
    for statement in SQLITE_GUARD:
        op.execute(statement)


def downgrade():
    op.execute('DROP TRIGGER IF EXISTS agency_keeps_its_usage_on_delete' + (
        ' ON agency' if op.get_context().dialect.name == 'postgresql' else ''))
    op.execute('DROP TRIGGER IF EXISTS agency_keeps_its_usage_on_renumber' + (
        ' ON agency' if op.get_context().dialect.name == 'postgresql' else ''))
    if op.get_context().dialect.name == 'postgresql':
        op.execute('DROP FUNCTION IF EXISTS agency_keeps_its_usage()')
        op.execute(f'ALTER TABLE usage_event ADD CONSTRAINT {KEY} FOREIGN KEY (agency_id) REFERENCES agency (id)')
        return
    with op.batch_alter_table('usage_event', schema=None) as batch_op:
        batch_op.create_foreign_key(KEY, 'agency', ['agency_id'], ['id'])
