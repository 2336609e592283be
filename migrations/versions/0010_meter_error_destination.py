"""meter error destination

Revision ID: 0010_meter_error_destination
Revises: 0009_client_cap_amount
Create Date: 2026-12-04 19:40:00.000000

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0010_meter_error_destination'
down_revision = '0009_client_cap_amount'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('stripe_event_endpoint', schema=None) as batch_op:
        batch_op.add_column(sa.Column('destination_id', sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column('destination_secret_ciphertext', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('destination_status', sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column('destination_problem', sa.Text(), nullable=True))


def downgrade():
    with op.batch_alter_table('stripe_event_endpoint', schema=None) as batch_op:
        batch_op.drop_column('destination_problem')
        batch_op.drop_column('destination_status')
        batch_op.drop_column('destination_secret_ciphertext')
        batch_op.drop_column('destination_id')
