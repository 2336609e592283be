"""client cap amount

Revision ID: 0009_client_cap_amount
Revises: 0008_spend_alerts
Create Date: 2026-12-04 19:45:00.000000

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0009_client_cap_amount'
down_revision = '0008_spend_alerts'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('rebill_client', schema=None) as batch_op:
        batch_op.add_column(sa.Column('monthly_cap_amount', sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column('monthly_cap_currency', sa.String(length=3), nullable=True))


def downgrade():
    with op.batch_alter_table('rebill_client', schema=None) as batch_op:
        batch_op.drop_column('monthly_cap_currency')
        batch_op.drop_column('monthly_cap_amount')
