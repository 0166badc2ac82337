"""samples: input samples captured on devices for retraining (issue 6, "Data for retraining")

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

UTC = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("desired_capture", sa.Boolean(), nullable=True))
    op.create_table(
        "samples",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("device_id", sa.String(64), sa.ForeignKey("devices.id", ondelete="CASCADE"), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("ts", sa.Float(), nullable=False),
        sa.Column("corrected_ts", sa.Float(), nullable=True),
        sa.Column("received_at", UTC, nullable=False),
        sa.Column("model", sa.String(64), nullable=True),
        sa.Column("version", sa.String(128), nullable=True),
        sa.Column("reason", sa.String(32), nullable=False),
        sa.Column("top1", sa.Integer(), nullable=True),
        sa.Column("confidence", sa.Float(), nullable=True),
        sa.Column("inputs", sa.JSON(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.UniqueConstraint("device_id", "seq", name="uq_samples_device_seq"),
    )
    op.create_index("ix_samples_model_version", "samples", ["model", "version"])


def downgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("desired_capture")
    op.drop_index("ix_samples_model_version", table_name="samples")
    op.drop_table("samples")
