"""portal session security: agency uninstalled_at and session_generation, rate_limit_window

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04 17:05:00

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('agency', schema=None) as batch_op:
        batch_op.add_column(sa.Column('uninstalled_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('session_generation', sa.Integer(), server_default='0', nullable=False))
    # Agencies installed nowhere any more (neither at agency level nor in a subaccount) start uninstalled.
    op.execute(
        "UPDATE agency SET uninstalled_at = CURRENT_TIMESTAMP"
        " WHERE NOT EXISTS (SELECT 1 FROM ghl_company_install c WHERE c.agency_id = agency.id AND c.is_installed)"
        " AND NOT EXISTS (SELECT 1 FROM ghl_location l WHERE l.agency_id = agency.id AND l.is_installed)"
    )
    op.create_table('rate_limit_window',
    sa.Column('key', sa.String(length=160), nullable=False),
    sa.Column('window_start', sa.BigInteger(), nullable=False),
    sa.Column('hits', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('key', name=op.f('pk_rate_limit_window'))
    )
    with op.batch_alter_table('rate_limit_window', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_rate_limit_window_window_start'), ['window_start'], unique=False)


def downgrade():
    with op.batch_alter_table('rate_limit_window', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_rate_limit_window_window_start'))
    op.drop_table('rate_limit_window')
    with op.batch_alter_table('agency', schema=None) as batch_op:
        batch_op.drop_column('session_generation')
        batch_op.drop_column('uninstalled_at')
