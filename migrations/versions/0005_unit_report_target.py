"""unit_report remembers its Stripe target, the timestamp Stripe was given, per-event progress and doubt

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op


revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_CLIENT_TARGET = {
    "target_mode": "report_mode",
    "target_customer": "stripe_customer_id",
    "target_price": "stripe_price_id",
    "target_meter": "meter_id",
    "target_event_name": "meter_event_name",
    "target_customer_key": "meter_customer_key",
    "target_value_key": "meter_value_key",
    "target_formula": "meter_formula",
    "target_subscription_item": "subscription_item_id",
}


def upgrade():
    with op.batch_alter_table("unit_report", schema=None) as batch_op:
        batch_op.add_column(sa.Column("target_account", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("target_mode", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("target_customer", sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column("target_price", sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column("target_meter", sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column("target_event_name", sa.String(length=100), nullable=True))
        batch_op.add_column(sa.Column("target_customer_key", sa.String(length=100), nullable=True))
        batch_op.add_column(sa.Column("target_value_key", sa.String(length=100), nullable=True))
        batch_op.add_column(sa.Column("target_formula", sa.String(length=8), nullable=True))
        batch_op.add_column(sa.Column("target_subscription_item", sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column("stripe_timestamp", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("timestamp_shift", sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column("units_confirmed", sa.BigInteger(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("in_doubt_since", sa.DateTime(timezone=True), nullable=True))
    # Rows offered before this revision went where their client then pointed (the old code read the client's
    # settings on every attempt): record that as their target. Sent rows are confirmed; a row still pending
    # after an attempt, or failed "needs reconcile", may be in Stripe; other failed rows were refused.
    client = lambda column: f"(SELECT c.{column} FROM rebill_client c WHERE c.id = unit_report.client_id)"  # noqa: E731
    targets = ", ".join(f"{target} = {client(column)}" for target, column in _CLIENT_TARGET.items())
    op.execute(
        f"UPDATE unit_report SET {targets}, stripe_timestamp = usage_timestamp, "
        "target_account = (SELECT a.stripe_account_id FROM agency a WHERE a.id = unit_report.agency_id), "
        "units_confirmed = CASE WHEN status = 'sent' THEN units ELSE 0 END, "
        "in_doubt_since = CASE WHEN status = 'pending' OR last_error LIKE 'needs reconcile%' "
        "THEN first_attempt_at END "
        "WHERE first_attempt_at IS NOT NULL"
    )


def downgrade():
    with op.batch_alter_table("unit_report", schema=None) as batch_op:
        for column in (
            "in_doubt_since",
            "units_confirmed",
            "timestamp_shift",
            "stripe_timestamp",
            "target_subscription_item",
            "target_formula",
            "target_value_key",
            "target_customer_key",
            "target_event_name",
            "target_meter",
            "target_price",
            "target_customer",
            "target_mode",
            "target_account",
        ):
            batch_op.drop_column(column)
