"""usage quarantine: a client's reason when aggregation cannot count its usage (rule 12)

Revision ID: 0006_usage_quarantine
Revises: 0005
Create Date: 2026-12-04 16:50:00

"""
from alembic import op
import sqlalchemy as sa


revision = '0006_usage_quarantine'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('rebill_client', schema=None) as batch_op:
        batch_op.add_column(sa.Column('quarantine_reason', sa.Text(), nullable=True))


def downgrade():
    with op.batch_alter_table('rebill_client', schema=None) as batch_op:
        batch_op.drop_column('quarantine_reason')
