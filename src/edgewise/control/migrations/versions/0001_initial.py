"""initial schema: devices, model versions, deployments, telemetry, events

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

UTC = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "devices",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("tags", sa.JSON(), nullable=False),
        sa.Column("hardware", sa.JSON(), nullable=True),
        sa.Column("agent_version", sa.String(64), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("model", sa.String(64), nullable=True),
        sa.Column("version", sa.String(128), nullable=True),
        sa.Column("reported_generation", sa.Integer(), nullable=True),
        sa.Column("desired_model", sa.String(64), nullable=True),
        sa.Column("desired_version", sa.String(128), nullable=True),
        sa.Column("desired_generation", sa.Integer(), nullable=False),
        sa.Column("desired_artifact", sa.JSON(), nullable=True),
        sa.Column("desired_issued_at", sa.Float(), nullable=True),
        sa.Column("last_update", sa.JSON(), nullable=True),
        sa.Column("api_url", sa.String(512), nullable=True),
        sa.Column("registered_at", UTC, nullable=False),
        sa.Column("last_seen", UTC, nullable=True),
        sa.Column("last_state_at", UTC, nullable=True),
    )
    op.create_table(
        "model_versions",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("version", sa.String(128), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.Column("manifest", sa.JSON(), nullable=False),
        sa.Column("path", sa.String(1024), nullable=False),
        sa.Column("uploaded_at", UTC, nullable=False),
        sa.UniqueConstraint("name", "version", name="uq_model_versions_name_version"),
    )
    op.create_index("ix_model_versions_name", "model_versions", ["name"])
    op.create_table(
        "deployments",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("model", sa.String(64), nullable=False),
        sa.Column("version", sa.String(128), nullable=False),
        sa.Column("target_kind", sa.String(16), nullable=False),
        sa.Column("target_value", sa.String(128), nullable=False),
        sa.Column("created_at", UTC, nullable=False),
        sa.Column("device_count", sa.Integer(), nullable=False),
        sa.Column("device_ids", sa.JSON(), nullable=False),
    )
    op.create_table(
        "telemetry",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("device_id", sa.String(64), sa.ForeignKey("devices.id", ondelete="CASCADE"), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("ts", sa.Float(), nullable=False),
        sa.Column("received_at", UTC, nullable=False),
        sa.Column("model", sa.String(64), nullable=True),
        sa.Column("version", sa.String(128), nullable=True),
        sa.Column("uptime_s", sa.Float(), nullable=False),
        sa.Column("inferences", sa.BigInteger(), nullable=False),
        sa.Column("errors", sa.BigInteger(), nullable=False),
        sa.Column("window_inferences", sa.BigInteger(), nullable=False),
        sa.Column("window_s", sa.Float(), nullable=False),
        sa.Column("latency_p50_ms", sa.Float(), nullable=True),
        sa.Column("latency_p95_ms", sa.Float(), nullable=True),
        sa.Column("cpu_percent", sa.Float(), nullable=True),
        sa.Column("rss_bytes", sa.BigInteger(), nullable=True),
        sa.Column("mem_percent", sa.Float(), nullable=True),
        sa.Column("outbox_pending", sa.Integer(), nullable=True),
        sa.Column("dropped", sa.BigInteger(), nullable=False),
        sa.UniqueConstraint("device_id", "seq", name="uq_telemetry_device_seq"),
    )
    op.create_table(
        "events",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("device_id", sa.String(64), sa.ForeignKey("devices.id", ondelete="CASCADE"), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("ts", sa.Float(), nullable=False),
        sa.Column("received_at", UTC, nullable=False),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("severity", sa.String(16), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.UniqueConstraint("device_id", "seq", name="uq_events_device_seq"),
    )


def downgrade() -> None:
    op.drop_table("events")
    op.drop_table("telemetry")
    op.drop_table("deployments")
    op.drop_index("ix_model_versions_name", table_name="model_versions")
    op.drop_table("model_versions")
    op.drop_table("devices")
