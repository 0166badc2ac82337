"""summaries table (bandwidth mode "summary"); device clock offset; corrected_ts on telemetry and events

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

UTC = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "summaries",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("device_id", sa.String(64), sa.ForeignKey("devices.id", ondelete="CASCADE"), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("ts", sa.Float(), nullable=False),
        sa.Column("corrected_ts", sa.Float(), nullable=True),
        sa.Column("received_at", UTC, nullable=False),
        sa.Column("model", sa.String(64), nullable=True),
        sa.Column("version", sa.String(128), nullable=True),
        sa.Column("window_s", sa.Float(), nullable=False),
        sa.Column("inferences", sa.BigInteger(), nullable=False),
        sa.Column("errors", sa.BigInteger(), nullable=False),
        sa.Column("predictions", sa.BigInteger(), nullable=False),
        sa.Column("latency_p50_ms", sa.Float(), nullable=True),
        sa.Column("latency_p95_ms", sa.Float(), nullable=True),
        sa.Column("latency_p99_ms", sa.Float(), nullable=True),
        sa.Column("classes", sa.JSON(), nullable=False),
        sa.Column("confidence_bins", sa.JSON(), nullable=False),
        sa.Column("confidence_hist", sa.JSON(), nullable=False),
        sa.UniqueConstraint("device_id", "seq", name="uq_summaries_device_seq"),
    )
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("clock_offset_s", sa.Float(), nullable=True))
        batch.add_column(sa.Column("clock_offset_at", UTC, nullable=True))
    for table in ("telemetry", "events"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("corrected_ts", sa.Float(), nullable=True))


def downgrade() -> None:
    for table in ("events", "telemetry"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("corrected_ts")
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("clock_offset_at")
        batch.drop_column("clock_offset_s")
    op.drop_table("summaries")
