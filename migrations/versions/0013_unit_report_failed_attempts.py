"""unit report failed attempts: offers in a row Stripe did not take, for the money view's "failing"

Revision ID: 0013_unit_report_failed_attempts
Revises: 0012_named_states
Create Date: 2026-12-04 20:25:00

"""
from alembic import op
import sqlalchemy as sa


revision = '0013_unit_report_failed_attempts'
down_revision = '0012_named_states'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('unit_report', schema=None) as batch_op:
        batch_op.add_column(sa.Column('failed_attempts', sa.Integer(), server_default='0', nullable=False))
    # Rows retrying with an error keep showing as they did: their attempts were all failures or close to it.
    op.execute(
        "UPDATE unit_report SET failed_attempts = attempts WHERE status = 'pending' AND last_error IS NOT NULL"
    )


def downgrade():
    with op.batch_alter_table('unit_report', schema=None) as batch_op:
        batch_op.drop_column('failed_attempts')
