"""client_send_lease: the scheduler thread that sends a client's unit reports now (one Stripe call at a time per
customer and meter, across schedulers)

Revision ID: 0017_client_send_lease
Revises: 0016_report_mode_check
Create Date: 2026-12-04 23:05:00

"""
from alembic import op
import sqlalchemy as sa


revision = '0017_client_send_lease'
down_revision = '0016_report_mode_check'
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        'client_send_lease',
        sa.Column('client_id', sa.Integer(), sa.ForeignKey('rebill_client.id', ondelete='CASCADE'), primary_key=True),
        sa.Column('sender', sa.String(length=64), nullable=False),
        sa.Column('until', sa.DateTime(timezone=True), nullable=False),
    )


def downgrade():
    op.drop_table('client_send_lease')
