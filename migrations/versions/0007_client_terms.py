"""client terms: usage is judged by the client's settings when Rebill received it (rule 11)

Revision ID: 0007_client_terms
Revises: 0006_usage_quarantine
Create Date: 2026-12-04 17:00:00

"""
import datetime as dt

from alembic import op
import sqlalchemy as sa


revision = '0007_client_terms'
down_revision = '0006_usage_quarantine'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('rebill_client', schema=None) as batch_op:
        batch_op.add_column(sa.Column('term_started_at', sa.DateTime(timezone=True), nullable=True))
    # Existing clients keep today's judgement (every pending event by the current settings): their term
    # starts at the epoch. Boundaries from now on are recorded.
    client = sa.table('rebill_client', sa.column('term_started_at', sa.DateTime(timezone=True)))
    op.execute(client.update().values(term_started_at=dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)))
    with op.batch_alter_table('rebill_client', schema=None) as batch_op:
        batch_op.alter_column('term_started_at', existing_type=sa.DateTime(timezone=True), nullable=False)

    op.create_table('rebill_client_term',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('client_id', sa.Integer(), nullable=False),
    sa.Column('starts_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('ends_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('provider', sa.String(length=16), nullable=False),
    sa.Column('source_key', sa.String(length=255), nullable=False),
    sa.ForeignKeyConstraint(['client_id'], ['rebill_client.id'], name=op.f('fk_rebill_client_term_client_id_rebill_client')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_rebill_client_term'))
    )
    with op.batch_alter_table('rebill_client_term', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_rebill_client_term_client_id'), ['client_id'], unique=False)


def downgrade():
    with op.batch_alter_table('rebill_client_term', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_rebill_client_term_client_id'))
    op.drop_table('rebill_client_term')
    with op.batch_alter_table('rebill_client', schema=None) as batch_op:
        batch_op.drop_column('term_started_at')
