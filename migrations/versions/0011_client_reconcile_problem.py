"""client reconcile problem

Revision ID: 0011_client_reconcile_problem
Revises: 0010_meter_error_destination
Create Date: 2026-12-04 19:55:00.000000

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0011_client_reconcile_problem'
down_revision = '0010_meter_error_destination'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('rebill_client', schema=None) as batch_op:
        batch_op.add_column(sa.Column('reconcile_problem', sa.Text(), nullable=True))


def downgrade():
    with op.batch_alter_table('rebill_client', schema=None) as batch_op:
        batch_op.drop_column('reconcile_problem')
