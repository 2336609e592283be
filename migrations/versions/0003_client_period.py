"""client_period: each client's cached Stripe billing period, price terms and names

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04 17:00:00

"""
from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade():
    op.create_table('client_period',
    sa.Column('client_id', sa.Integer(), nullable=False),
    sa.Column('customer_id', sa.String(length=255), nullable=False),
    sa.Column('price_id', sa.String(length=255), nullable=False),
    sa.Column('period_start', sa.DateTime(timezone=True), nullable=True),
    sa.Column('period_end', sa.DateTime(timezone=True), nullable=True),
    sa.Column('price_terms', sa.Text(), nullable=True),
    sa.Column('product_name', sa.String(length=255), nullable=True),
    sa.Column('price_name', sa.String(length=255), nullable=True),
    sa.Column('customer_name', sa.String(length=255), nullable=True),
    sa.Column('problem', sa.Text(), nullable=True),
    sa.Column('refreshed_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['client_id'], ['rebill_client.id'], name=op.f('fk_client_period_client_id_rebill_client')),
    sa.PrimaryKeyConstraint('client_id', name=op.f('pk_client_period'))
    )


def downgrade():
    op.drop_table('client_period')
